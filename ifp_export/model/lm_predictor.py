"""The paper's sparsity predictor: a (small) Hugging Face causal LM reads the prompt, its final hidden states are
pooled (last real token or masked mean) and an MLP head scores every FFN neuron of every backbone layer.

On disk (`predictor/` of a checkpoint, see README "Checkpoint format"):
  config.json        {"format": "ifp-lm-predictor", "lm": "lm", "max_length": T,
                      "head": {"hidden_sizes": [...], "activation": "gelu", "pooling": "last",
                               "target_layers": L, "target_intermediate_size": d_ff}}
  lm/                HF save_pretrained dir (Llama / Mistral / Qwen2; sharded or not; fp32/bf16/fp16)
  head.safetensors   layers.{i}.weight [out, in], layers.{i}.bias [out]; the last layer's out = L * d_ff

The LM body is our `DecoderModel` (causal), so the trace and the Core ML conversion see the same modules as the
backbone. The attention bias and the pooling weights are plain arithmetic on the 0/1 mask (no `torch.where` over
0-d tensors, no gather), which converts to ONNX and Core ML exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ifp_export.errors import IFPError
from ifp_export.fsutil import check_finite, read_safetensors, write_json, write_safetensors
from ifp_export.model.config import DecoderConfig
from ifp_export.model.decoder import DecoderModel
from ifp_export.model.hf_io import IGNORED_SUFFIXES, read_config, read_state_dict, weights_file
from ifp_export.model.predictor import SparsityPredictor, check_state, shapes

LM_PREDICTOR_FORMAT = "ifp-lm-predictor"
LM_DIR, HEAD_FILE = "lm", "head.safetensors"
ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}
POOLINGS = ("last", "mean")
DEFAULT_MAX_LENGTH = 512  # prompt tokens the predictor reads (P5 measures a 512-token prompt)


@dataclass(frozen=True)
class HeadConfig:
    target_layers: int
    target_intermediate_size: int
    hidden_sizes: tuple[int, ...] = (256,)
    activation: str = "gelu"
    pooling: str = "last"

    @classmethod
    def from_dict(cls, raw: Any, path: Path) -> HeadConfig:
        fix = "fix the 'head' object of config.json (see README 'Checkpoint format')"
        if not isinstance(raw, dict):
            raise IFPError("predictor config has no 'head' object", path, fix)
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise IFPError(f"unknown head field {unknown[0]!r}", path, fix)
        try:
            sizes = raw.get("hidden_sizes", list(cls.hidden_sizes))
            if not isinstance(sizes, list) or any(isinstance(s, bool) or not isinstance(s, int) for s in sizes):
                raise TypeError("hidden_sizes must be a list of integers")
            cfg = cls(
                target_layers=_int(raw["target_layers"]),
                target_intermediate_size=_int(raw["target_intermediate_size"]),
                hidden_sizes=tuple(sizes),
                activation=str(raw.get("activation", cls.activation)),
                pooling=str(raw.get("pooling", cls.pooling)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise IFPError(f"bad head config ({err})", path, fix) from None
        if min(cfg.target_layers, cfg.target_intermediate_size, *cfg.hidden_sizes) <= 0:
            raise IFPError("head sizes must be positive", path, fix)
        if cfg.activation not in ACTIVATIONS:
            supported = f"use one of {sorted(ACTIVATIONS)}"
            raise IFPError(f"head activation {cfg.activation!r} is not supported", path, supported)
        if cfg.pooling not in POOLINGS:
            raise IFPError(f"head pooling {cfg.pooling!r} is not supported", path, f"use one of {list(POOLINGS)}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "hidden_sizes": list(self.hidden_sizes)}


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class LMPredictorConfig:
    """What the passes and targets read from any predictor's `.config` (same names as `PredictorConfig`)."""

    lm: DecoderConfig
    head: HeadConfig
    max_length: int

    @property
    def vocab_size(self) -> int:
        return self.lm.vocab_size

    @property
    def target_layers(self) -> int:
        return self.head.target_layers

    @property
    def target_intermediate_size(self) -> int:
        return self.head.target_intermediate_size

    def to_dict(self) -> dict[str, Any]:
        return {"format": LM_PREDICTOR_FORMAT, "lm": LM_DIR, "max_length": self.max_length, "head": self.head.to_dict()}


def head_sizes(in_size: int, cfg: HeadConfig) -> list[int]:
    return [in_size, *cfg.hidden_sizes, cfg.target_layers * cfg.target_intermediate_size]


def head_shapes(in_size: int, cfg: HeadConfig) -> dict[str, tuple[int, ...]]:
    """`MLPHead`'s state-dict shapes, by arithmetic (a config is checked against the file before any allocation)."""
    pairs = itertools.pairwise(head_sizes(in_size, cfg))
    return {
        k: v for i, (a, b) in enumerate(pairs) for k, v in ((f"layers.{i}.weight", (b, a)), (f"layers.{i}.bias", (b,)))
    }


class MLPHead(nn.Module):
    """Linear layers with the activation between them; the last one outputs L * d_ff scores."""

    def __init__(self, in_size: int, cfg: HeadConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(head_sizes(in_size, cfg)))
        self.act = ACTIVATIONS[cfg.activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x if i == 0 else self.act(x))
        return x


class LMPredictor(nn.Module):
    """Causal LM body + pooling + MLP head; same call signature as `SparsityPredictor`."""

    def __init__(self, cfg: LMPredictorConfig) -> None:
        super().__init__()
        self.config = cfg
        self.lm = DecoderModel(cfg.lm)
        self.head = MLPHead(cfg.lm.hidden_size, cfg.head)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Neuron scores [B, L, d_ff] for right- or left-padded prompts (padding never changes a prompt's scores)."""
        x = self.lm.embed_tokens(input_ids)
        keep = attention_mask.to(x.dtype)  # [B, T]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        cos, sin = self.lm.rotary_emb(position_ids, x.dtype)
        pos = torch.ones_like(keep[0]).cumsum(0)  # 1..T
        allowed = (pos[None, :] <= pos[:, None]).to(x.dtype)  # causal [T, T]
        if self.config.lm.sliding_window is not None:
            allowed = allowed * ((pos[:, None] - pos[None, :]) < self.config.lm.sliding_window).to(x.dtype)
        allowed = allowed[None, None] * keep[:, None, None, :]
        bias = (1.0 - allowed) * torch.finfo(x.dtype).min
        for layer in self.lm.layers:
            x, _ = layer(x, cos, sin, bias)
        hidden = self.lm.norm(x)
        if self.config.head.pooling == "mean":
            weights = keep / keep.sum(-1, keepdim=True).clamp(min=1.0)
        else:  # one-hot at the last real token: exact (x * 1 + zeros), no gather
            last = (keep * pos).amax(-1, keepdim=True)
            weights = (pos == last).to(x.dtype) * keep
        pooled = (hidden * weights[..., None]).sum(1)
        scores = self.head(pooled)
        return scores.view(-1, self.config.target_layers, self.config.target_intermediate_size)


Predictor = SparsityPredictor | LMPredictor


def read_lm_config(directory: Path, raw: dict[str, Any]) -> LMPredictorConfig:
    path = directory / "config.json"
    if raw.get("lm") != LM_DIR:
        raise IFPError(f"predictor 'lm' must be {LM_DIR!r} (the HF dir beside config.json)", path, "fix config.json")
    unknown = sorted(set(raw) - {"format", "lm", "max_length", "head"})
    if unknown:
        raise IFPError(f"unknown predictor config field {unknown[0]!r}", path, "remove it")
    lm = read_lm_dir_config(directory / LM_DIR)
    head = HeadConfig.from_dict(raw.get("head"), path)
    try:
        max_length = _int(raw.get("max_length"))
    except TypeError as err:
        raise IFPError(f"bad max_length ({err})", path, "fix config.json") from None
    if not 1 <= max_length <= lm.max_position_embeddings:
        raise IFPError(
            f"max_length {max_length} is outside 1..{lm.max_position_embeddings} (the LM's max_position_embeddings)",
            path,
            "fix config.json",
        )
    return LMPredictorConfig(lm, head, max_length)


def read_lm_dir_config(lm_dir: Path) -> DecoderConfig:
    if not lm_dir.is_dir():
        raise IFPError("predictor LM directory not found", lm_dir, "give the predictor a save_pretrained LM directory")
    return read_config(lm_dir)


def load_lm_body(lm_dir: Path, cfg: DecoderConfig) -> DecoderModel:
    """Our `DecoderModel` from a `*ForCausalLM` (`model.` prefix) or a bare `*Model` save, every tensor checked;
    the LM head is not part of the predictor and is ignored."""
    tensors = {k: v for k, v in read_state_dict(lm_dir).items() if not k.endswith(IGNORED_SUFFIXES)}
    tensors.pop("lm_head.weight", None)
    if any(k.startswith("model.") for k in tensors):
        tensors = {k.removeprefix("model."): v for k, v in tensors.items()}
    with torch.device("meta"):
        body = DecoderModel(cfg)
    path = weights_file(lm_dir)
    check_state(tensors, shapes(body), path, "save the predictor LM with save_pretrained")
    check_finite(tensors, path)
    for name in list(tensors):  # one tensor at a time: a bf16 LM never exists twice (bf16 and fp32) in memory
        tensors[name] = tensors[name].float()
    body.load_state_dict(tensors, assign=True)
    body.rotary_emb.reset_parameters()
    return body


def assemble(cfg: LMPredictorConfig, body: DecoderModel, head: MLPHead) -> LMPredictor:
    with torch.device("meta"):
        model = LMPredictor(cfg)
    model.lm, model.head = body, head
    return model.eval().requires_grad_(False)


def load_lm_predictor(directory: str | Path, raw: dict[str, Any]) -> LMPredictor:
    """The LM predictor described by `raw` (its parsed config.json), every tensor checked."""
    directory = Path(directory)
    cfg = read_lm_config(directory, raw)
    body = load_lm_body(directory / LM_DIR, cfg.lm)
    path = directory / HEAD_FILE
    tensors = read_safetensors(path, "re-create the predictor (ifp-export new-checkpoint --predictor-backbone)")
    check_state(
        tensors, head_shapes(cfg.lm.hidden_size, cfg.head), path, "make the head config and head.safetensors agree"
    )
    with torch.device("meta"):  # sizes now those of real tensors
        head = MLPHead(cfg.lm.hidden_size, cfg.head)
    check_finite(tensors, path)
    head.load_state_dict({k: v.float() for k, v in tensors.items()}, assign=True)
    return assemble(cfg, body, head)


def new_lm_predictor(lm_dir: Path, head: HeadConfig, seed: int) -> LMPredictor:
    """The HF LM in `lm_dir` with a freshly initialized head (PyTorch's default Linear init, seeded)."""
    lm = read_lm_dir_config(lm_dir)
    body = load_lm_body(lm_dir, lm)
    torch.manual_seed(seed)
    cfg = LMPredictorConfig(lm, head, min(DEFAULT_MAX_LENGTH, lm.max_position_embeddings))
    return assemble(cfg, body, MLPHead(lm.hidden_size, head))


def save_head(model: LMPredictor, directory: Path) -> None:
    """config.json + head.safetensors; the LM directory is copied beside them by the caller."""
    write_safetensors(directory / HEAD_FILE, model.head.state_dict())
    write_json(directory / "config.json", model.config.to_dict())
