"""The predictor graph with the routing head folded in, traced with the dynamo exporter (it is small; the decoder
is built from the config instead: build.build_decoder)."""

from __future__ import annotations

import onnx_ir as ir
import torch
from onnx_ir.passes.common import ClearMetadataAndDocStringPass
from torch import nn

from ifp_export.masks import standardize
from ifp_export.model.predictor import SparsityPredictor
from ifp_export.quiet import quiet


class PredictorRouter(nn.Module):
    """Predictor + routing head: scores [B, L, d_ff] and variant_scores [B, V] (see masks.routing_scores)."""

    def __init__(self, predictor: SparsityPredictor, variant_masks: torch.Tensor) -> None:
        super().__init__()
        self.predictor = predictor
        weights = variant_masks / variant_masks.sum(-1, keepdim=True).clamp(min=1) / variant_masks.shape[1]
        self.register_buffer("routing", weights.flatten(1).T.contiguous())  # [L*d, V]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        limit = self.predictor.config.max_length  # masks.TRUNCATION: a longer prompt keeps its first tokens
        input_ids, attention_mask = input_ids[:, :limit], attention_mask[:, :limit]
        scores = self.predictor(input_ids, attention_mask)
        return scores, standardize(scores).flatten(1) @ self.routing


def trace(module: nn.Module, args: tuple, dynamic_shapes: dict, inputs: list[str], outputs: list[str]) -> ir.Model:
    """Export with the dynamo exporter; drop debug metadata (stack traces, node names) and value_info."""
    with quiet(), torch.no_grad():
        program = torch.onnx.export(
            module.eval(),
            args,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=inputs,
            output_names=outputs,
            optimize=True,
            verbose=False,
        )
    model = program.model
    ClearMetadataAndDocStringPass()(model)
    graph_outputs = set(model.graph.outputs)
    count = 0
    for node in model.graph:
        node.name = None
        for value in node.outputs:  # no value_info, short names: every variant's .onnx repeats the graph
            if value not in graph_outputs:
                value.shape, value.type = None, None
                value.name = f"t{count}"
                count += 1
    model.producer_name, model.producer_version = "ifp-export", None
    return model


def trace_predictor(predictor: SparsityPredictor, variant_masks: torch.Tensor) -> ir.Model:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence_length")
    args = (torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long))
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    router = PredictorRouter(predictor, variant_masks)
    return trace(router, args, shapes, ["input_ids", "attention_mask"], ["scores", "variant_scores"])
