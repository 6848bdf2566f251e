"""The predictor package: the sparsity predictor with the routing head folded in, traced and converted to an
fp32 mlprogram (small, runs once per prompt; fp32 keeps the routing argmax off fp16 rounding)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ifp_export.masks import standardize
from ifp_export.model.predictor import SparsityPredictor
from ifp_export.quiet import quiet
from ifp_export.targets.coreml.package import coremltools, save_model
from ifp_export.targets.onnx import PredictorRouter

PREDICTOR_INPUTS = ("input_ids", "attention_mask")
PREDICTOR_OUTPUTS = ("scores", "variant_scores")


class CoreMLPredictorRouter(PredictorRouter):
    """`PredictorRouter` with the encoder's padding bias built by arithmetic instead of `torch.where` over 0-d
    tensors (which coremltools types as a 0-d mask). Same modules, same values: 0 for kept keys, the fp32
    minimum for padding; the encoder is bidirectional and has no sliding window."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(self.predictor, SparsityPredictor):  # the LM predictor builds its bias by arithmetic
            return super().forward(input_ids, attention_mask)
        predictor, encoder = self.predictor, self.predictor.encoder
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        x = encoder.embed_tokens(input_ids)
        cos, sin = encoder.rotary_emb(position_ids, x.dtype)
        keep = attention_mask.to(x.dtype)
        bias = ((1.0 - keep) * torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in encoder.layers:
            x, _ = layer(x, cos, sin, bias)
        hidden = encoder.norm(x)
        weights = keep[..., None]
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        scores = predictor.head(F.layer_norm(pooled, pooled.shape[-1:]))
        scores = scores.view(-1, predictor.config.target_layers, predictor.config.target_intermediate_size)
        return scores, standardize(scores).flatten(1) @ self.routing


def convert_predictor(predictor: SparsityPredictor, variant_masks: torch.Tensor, path: Path) -> None:
    """The predictor + routing head as an fp32 mlprogram (runs once per prompt; fp32 keeps the routing argmax
    from hinging on fp16 rounding of standardized scores)."""
    ct = coremltools()
    router = CoreMLPredictorRouter(predictor, variant_masks).eval()
    example = (torch.ones(1, 5, dtype=torch.int32), torch.ones(1, 5, dtype=torch.int32))
    with quiet(), torch.no_grad():
        traced = torch.jit.trace(router, example, check_trace=False)
    length = ct.RangeDim(lower_bound=1, upper_bound=predictor.config.max_length, default=predictor.config.max_length)
    with quiet(), contextlib.redirect_stderr(io.StringIO()):
        mlmodel = ct.convert(
            traced,
            inputs=[ct.TensorType(shape=(1, length), dtype=np.int32, name=n) for n in PREDICTOR_INPUTS],
            outputs=[ct.TensorType(dtype=np.float32, name=n) for n in PREDICTOR_OUTPUTS],
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=ct.precision.FLOAT32,
            skip_model_load=True,
        )
    mlmodel.short_description = "IFPruning sparsity predictor + routing head: argmax(variant_scores) = variant"
    save_model(mlmodel, path)
