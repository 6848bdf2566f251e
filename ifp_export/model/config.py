"""Decoder hyper-parameters, read from and written to a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ifp_export.errors import IFPError

SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class DecoderConfig:
    """What our decoder needs from a Llama-family config; `model_type` decides which biases exist."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], path: str | Path = "config.json") -> DecoderConfig:
        """Validate a HF config dict; refuse what the decoder cannot run exactly."""
        model_type = raw.get("model_type")
        if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
            supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
            raise IFPError(
                f"unsupported architecture model_type={model_type!r}",
                path,
                f"use a Llama-family checkpoint ({supported})",
            )
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            cfg = cls(
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                model_type=model_type,
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(raw.get("rope_theta", 10000.0)),
                rope_scaling=raw.get("rope_scaling"),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=bool(raw.get("attention_bias", False)),
                sliding_window=_sliding_window(raw, path),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_id=raw.get("eos_token_id"),
                pad_token_id=raw.get("pad_token_id"),
                extra={k: raw[k] for k in ("torch_dtype",) if k in raw},
            )
        except (KeyError, TypeError, ValueError, ArithmeticError, AttributeError) as err:  # wrong types, 0 heads, inf
            raise IFPError(f"bad or missing field in config ({err})", path, "re-save it with save_pretrained") from None
        cfg.validate(path)
        if raw.get("mlp_bias"):
            raise IFPError("mlp_bias=true is not supported", path, "use a checkpoint without MLP biases")
        if raw.get("hidden_act", "silu") != "silu":
            raise IFPError(f"hidden_act={raw.get('hidden_act')!r} is not supported", path, "use a SwiGLU (silu) model")
        return cfg

    def validate(self, path: str | Path = "config.json") -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for name in (*positive, "num_key_value_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise IFPError(f"{name} must be positive, got {getattr(self, name)}", path, "fix config.json")
        if self.num_attention_heads % self.num_key_value_heads:
            raise IFPError("num_attention_heads must be a multiple of num_key_value_heads", path, "fix config.json")
        if self.head_dim % 2:
            raise IFPError(f"head_dim must be even for RoPE, got {self.head_dim}", path, "fix config.json")
        rope_type = rope_type_of(self.rope_scaling)
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise IFPError(
                f"rope_scaling type {rope_type!r} is not supported",
                path,
                f"use one of {', '.join(SUPPORTED_ROPE_TYPES)}",
            )

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that `transformers.AutoConfig` reads back to the same architecture."""
        raw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        raw.update(self.extra)
        raw["architectures"] = [SUPPORTED_MODEL_TYPES[self.model_type]]
        raw["hidden_act"] = "silu"
        if self.model_type == "qwen2":
            raw.pop("attention_bias")
            raw["use_sliding_window"] = self.sliding_window is not None
            if self.sliding_window is not None:
                raw["max_window_layers"] = 0  # every layer slides, as in our decoder
        if self.model_type == "llama":
            raw.pop("sliding_window")
            raw["mlp_bias"] = False
        return {k: v for k, v in raw.items() if v is not None or k == "sliding_window"}

    def replace(self, **changes: Any) -> DecoderConfig:
        return dataclasses.replace(self, **changes)


def rope_type_of(rope_scaling: dict[str, Any] | None) -> str:
    if not rope_scaling:
        return "default"
    if not isinstance(rope_scaling, dict):
        return repr(rope_scaling)  # not a rope_scaling object: refused as an unsupported type
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))


def _sliding_window(raw: dict[str, Any], path: str | Path = "config.json") -> int | None:
    """The window every layer uses, or None for full attention everywhere.

    Mistral slides in every layer. Qwen2 slides only when `use_sliding_window` is set, and then only in the
    layers `layer_types` marks "sliding_attention" (by default layers >= `max_window_layers`, 28): all or none
    of the layers is exact for our single-window decoder, a mix is refused.
    """
    window = raw.get("sliding_window")
    if raw.get("model_type") == "qwen2":
        if not raw.get("use_sliding_window", False) or window is None:
            return None
        first_sliding = int(raw.get("max_window_layers", 28))
        layers = range(int(raw["num_hidden_layers"]))
        layer_types = raw.get("layer_types") or [
            "sliding_attention" if i >= first_sliding else "full_attention" for i in layers
        ]
        if "sliding_attention" not in layer_types:
            return None
        if any(kind != "sliding_attention" for kind in layer_types):
            raise IFPError(
                "Qwen2 config mixes sliding-window and full-attention layers (use_sliding_window with "
                "max_window_layers/layer_types), which is not supported",
                path,
                "use a config whose layers all use full attention or all use the sliding window",
            )
    return None if window is None else int(window)


def rope_inverse_frequencies(cfg: DecoderConfig) -> torch.Tensor:
    """RoPE inverse frequencies, computed exactly as `transformers` does (default, linear, llama3)."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rope_type = rope_type_of(cfg.rope_scaling)
    if rope_type == "linear":
        return inv / float(cfg.rope_scaling["factor"])
    if rope_type == "llama3":
        s = cfg.rope_scaling
        factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_len = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    return inv
