"""The sparsity predictor: a tiny bidirectional transformer over the prompt, mean-pooled, then an MLP head
that scores every FFN neuron of every backbone layer ([B, L, d_ff]).

The encoder reuses the decoder's body with `causal=False` rather than a second transformer implementation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ifp_export.errors import IFPError
from ifp_export.fsutil import check_finite, read_json, read_safetensors, write_json, write_safetensors
from ifp_export.model.config import DecoderConfig
from ifp_export.model.decoder import DecoderModel

PREDICTOR_FORMAT = "ifp-sparsity-predictor"


MAX_SIZE = 1 << 24  # per size: any real predictor's are far below, and no module's element count can overflow


@dataclass(frozen=True)
class PredictorConfig:
    vocab_size: int
    target_layers: int
    target_intermediate_size: int
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    head_hidden_size: int = 256
    max_length: int = 128

    def encoder_config(self) -> DecoderConfig:
        return DecoderConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            head_dim=self.hidden_size // self.num_heads,
            max_position_embeddings=self.max_length,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"format": PREDICTOR_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, raw: Any, path: str | Path) -> PredictorConfig:
        if not isinstance(raw, dict) or raw.get("format") != PREDICTOR_FORMAT:
            raise IFPError(f"not a predictor config (format must be {PREDICTOR_FORMAT!r})", path, "fix config.json")
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            cfg = cls(**{k: int(v) for k, v in raw.items() if k in fields})
        except (TypeError, ValueError) as err:
            raise IFPError(f"bad predictor config ({err})", path, "fix config.json") from None
        sizes = (*dataclasses.astuple(cfg), cfg.target_layers * cfg.target_intermediate_size)
        if not 0 < min(sizes) <= max(sizes) <= MAX_SIZE:
            raise IFPError(f"predictor sizes (and target_layers x target_intermediate_size) must be in 1..{MAX_SIZE}",
                           path, "fix config.json")  # fmt: skip
        if cfg.hidden_size % cfg.num_heads:
            raise IFPError("predictor hidden_size must be divisible by num_heads", path, "fix config.json")
        return cfg


class SparsityPredictor(nn.Module):
    def __init__(self, cfg: PredictorConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = DecoderModel(cfg.encoder_config())
        self.head = nn.Sequential(
            nn.Linear(cfg.hidden_size, cfg.head_hidden_size),
            nn.GELU(),
            nn.Linear(cfg.head_hidden_size, cfg.target_layers * cfg.target_intermediate_size),
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Neuron scores [B, L, d_ff] for right- or left-padded prompts."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden, _ = self.encoder(input_ids, attention_mask, position_ids, causal=False)
        weights = attention_mask.to(hidden.dtype)[..., None]
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        scores = self.head(F.layer_norm(pooled, pooled.shape[-1:]))
        return scores.view(-1, self.config.target_layers, self.config.target_intermediate_size)


def load_predictor(directory: str | Path) -> SparsityPredictor:
    directory = Path(directory)
    cfg = PredictorConfig.from_dict(read_json(directory / "config.json", "predictor config"), directory / "config.json")
    weights_path = directory / "model.safetensors"
    tensors = read_safetensors(weights_path, "re-create the predictor (ifp-export new-checkpoint)")
    with torch.device("meta"):
        model = SparsityPredictor(cfg)
    check_state(tensors, shapes(model), weights_path, "make the predictor config and weights agree")
    check_finite(tensors, weights_path)
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, assign=True)
    model.encoder.rotary_emb.reset_parameters()
    return model.eval().requires_grad_(False)


def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def check_state(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], path: Path, fix: str) -> None:
    """Tensor names and shapes as expected (e.g. a module's `shapes`), else one IFPError naming the first mismatch."""
    if set(tensors) != set(expected):
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise IFPError(f"tensors do not match the config ({detail})", path, fix)
    for name, ref in expected.items():
        if tuple(tensors[name].shape) != tuple(ref):
            raise IFPError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {tuple(ref)}", path, fix)


def save_predictor(model: SparsityPredictor, directory: str | Path) -> None:
    directory = Path(directory)
    write_safetensors(directory / "model.safetensors", model.state_dict())
    write_json(directory / "config.json", model.config.to_dict())
