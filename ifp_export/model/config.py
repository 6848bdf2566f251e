"""Decoder hyper-parameters, read from and written to a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ifp_export.errors import IFPError
from ifp_export.fsutil import read_json

SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
ROPE_LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
MISTRAL_DEFAULT_WINDOW = QWEN2_DEFAULT_WINDOW = 4096  # MistralConfig / Qwen2Config default for a missing key


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
        """Read a HF config dict exactly as `transformers` 4.57 does for its model_type; refuse what we cannot run.

        Fields the model classes read (LlamaConfig/MistralConfig/Qwen2Config + modeling) are typed and range-checked;
        values of fields we do not implement are refused. `attention_dropout` (a no-op at inference) and
        `pretraining_tp` (unread by 4.57's modeling) are accepted whatever their value.
        """
        model_type = raw.get("model_type")
        if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
            supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
            raise IFPError(
                f"unsupported architecture model_type={model_type!r}",
                path,
                f"use a Llama-family checkpoint ({supported})",
            )
        check_unimplemented(raw, path)
        heads = _integer(raw, "num_attention_heads", path)
        hidden = _integer(raw, "hidden_size", path)
        kv_heads = _integer(raw, "num_key_value_heads", path, None)
        head_dim = _integer(raw, "head_dim", path, None)
        cfg = cls(
            vocab_size=_integer(raw, "vocab_size", path),
            hidden_size=hidden,
            intermediate_size=_integer(raw, "intermediate_size", path),
            num_hidden_layers=_integer(raw, "num_hidden_layers", path),
            num_attention_heads=heads,
            num_key_value_heads=heads if kv_heads is None else kv_heads,
            head_dim=head_dim or hidden // max(heads, 1),
            model_type=model_type,
            rms_norm_eps=_number(raw, "rms_norm_eps", path, 1e-6, minimum=0.0),
            rope_theta=_number(raw, "rope_theta", path, 10000.0),
            rope_scaling=check_rope_scaling(raw.get("rope_scaling"), path),
            max_position_embeddings=_integer(raw, "max_position_embeddings", path, 2048),
            tie_word_embeddings=_boolean(raw, "tie_word_embeddings", path, False),
            # Only LlamaAttention reads attention_bias (Qwen2 always has q/k/v biases, Mistral never has any).
            attention_bias=_boolean(raw, "attention_bias", path, False) if model_type == "llama" else False,
            sliding_window=_sliding_window(raw, path),
            bos_token_id=_token_ids(raw, "bos_token_id", path, many=False),
            eos_token_id=_token_ids(raw, "eos_token_id", path, many=True),
            pad_token_id=_token_ids(raw, "pad_token_id", path, many=False),
            extra={k: raw[k] for k in ("torch_dtype",) if k in raw},
        )
        cfg.validate(path)
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
        check_rope_scaling(self.rope_scaling, path)

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
    """The RoPE type of a checked `rope_scaling` (None = default)."""
    if rope_scaling is None:
        return "default"
    return str(rope_scaling.get("rope_type", rope_scaling.get("type")))


ROPE_FIELDS = {"linear": ("factor",), "llama3": ROPE_LLAMA3_FIELDS}


def check_rope_scaling(rope_scaling: Any, path: str | Path) -> dict[str, Any] | None:
    """`rope_scaling` if it is one we compute exactly (default, linear, llama3 with every parameter), else IFPError.

    Like `transformers`, a rope_scaling object without a type is refused rather than taken as default.
    """
    fix = f"use rope_scaling null or of type {', '.join(SUPPORTED_ROPE_TYPES)} with all its parameters"
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, dict):
        raise IFPError(f"rope_scaling must be an object or null, got {rope_scaling!r}", path, fix)
    kinds = {rope_scaling[k] for k in ("rope_type", "type") if k in rope_scaling}
    if len(kinds) != 1:
        what = "has no rope_type" if not kinds else f"has conflicting type/rope_type {sorted(map(str, kinds))}"
        raise IFPError(f"rope_scaling {what}", path, fix)
    rope_type = kinds.pop()
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise IFPError(f"rope_scaling type {rope_type!r} is not supported", path, fix)
    for name in ROPE_FIELDS.get(rope_type, ()):
        _number(rope_scaling, name, path, where="rope_scaling.")
    if rope_type == "llama3" and rope_scaling["high_freq_factor"] <= rope_scaling["low_freq_factor"]:
        raise IFPError("rope_scaling high_freq_factor must exceed low_freq_factor", path, fix)
    return rope_scaling


def check_unimplemented(raw: dict[str, Any], path: str | Path) -> None:
    """Refuse non-default values of fields `transformers` reads for this model_type that our decoder ignores."""
    if raw.get("hidden_act", "silu") != "silu":
        raise IFPError(f"hidden_act={raw.get('hidden_act')!r} is not supported", path, "use a SwiGLU (silu) model")
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise IFPError(
            f"partial_rotary_factor={raw['partial_rotary_factor']!r} (partial RoPE) is not supported",
            path,
            "use a model with RoPE on the whole head (partial_rotary_factor 1.0)",
        )
    if raw["model_type"] == "llama" and raw.get("mlp_bias", False) is not False:
        raise IFPError(f"mlp_bias={raw['mlp_bias']!r} is not supported", path, "use a checkpoint without MLP biases")


def _integer(raw: dict[str, Any], key: str, path: str | Path, default: Any = ..., where: str = "") -> Any:
    """raw[key] as an int (a whole float like 4.0 is fine; 4.7, "4" or true are refused)."""
    if key not in raw or raw[key] is None:
        if default is ...:
            raise IFPError(f"config field {where}{key} is missing", path, "re-save it with save_pretrained")
        return default
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value % 1:
        raise IFPError(f"config field {where}{key} must be an integer, got {value!r}", path, "fix config.json")
    return int(value)


def _number(
    raw: dict[str, Any], key: str, path: str | Path, default: Any = ..., minimum: float | None = None, where: str = ""
) -> float:
    """raw[key] as a finite float, > 0 (or >= minimum when given)."""
    if key not in raw or raw[key] is None:
        if default is ...:
            raise IFPError(f"config field {where}{key} is missing", path, "re-save it with save_pretrained")
        return default
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise IFPError(f"config field {where}{key} must be a finite number, got {value!r}", path, "fix config.json")
    if value < minimum if minimum is not None else value <= 0:
        bound = f">= {minimum}" if minimum is not None else "> 0"
        raise IFPError(f"config field {where}{key} must be {bound}, got {value!r}", path, "fix config.json")
    return float(value)


def _boolean(raw: dict[str, Any], key: str, path: str | Path, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise IFPError(f"config field {key} must be true or false, got {value!r}", path, "fix config.json")
    return value


def _token_ids(raw: dict[str, Any], key: str, path: str | Path, many: bool) -> int | list[int] | None:
    """A token id (or, if `many`, a list of them) or None."""
    value = raw.get(key)
    ids = value if many and isinstance(value, list) else [value]
    if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        kind = "a token id or a list of them" if many else "a token id"
        raise IFPError(f"config field {key} must be {kind}, got {value!r}", path, "fix config.json")
    return value


def _sliding_window(raw: dict[str, Any], path: str | Path = "config.json") -> int | None:
    """The window every layer uses, or None for full attention everywhere, as `transformers` 4.57 decides it.

    Llama: a non-null `sliding_window` is refused: transformers' Llama attends fully in a cache-less forward, but its
    DynamicCache keeps only the last window - 1 tokens, so cached decoding slides; no export matches both.
    Mistral slides in every layer, 4096 when the key is missing, not at all when it is null.
    Qwen2 slides only when `use_sliding_window` is set (window 4096 when the key is missing), and then only in the
    layers `layer_types` marks "sliding_attention" (by default layers >= `max_window_layers`, 28): all or none of
    the layers is exact for our single-window decoder, a mix is refused.
    """
    model_type = raw["model_type"]
    if model_type == "llama":
        if raw.get("sliding_window") is not None:
            raise IFPError(
                "a llama config with sliding_window is applied by transformers only in cached decoding (its KV "
                "cache keeps the window) and not in prefill, which no export can reproduce",
                path,
                "set sliding_window to null for full attention, or use model_type mistral for a sliding window",
            )
        return None
    default = MISTRAL_DEFAULT_WINDOW if model_type == "mistral" else QWEN2_DEFAULT_WINDOW
    window = _integer(raw, "sliding_window", path, None) if "sliding_window" in raw else default
    if window is not None and window <= 0:
        raise IFPError(f"sliding_window must be positive or null, got {window}", path, "fix config.json")
    if model_type == "mistral":
        return window
    if not _boolean(raw, "use_sliding_window", path, False):
        return None
    layers = _integer(raw, "num_hidden_layers", path)
    first_sliding = _integer(raw, "max_window_layers", path, 28)
    layer_types = raw.get("layer_types") or [
        "sliding_attention" if window is not None and i >= first_sliding else "full_attention" for i in range(layers)
    ]
    kinds = {"sliding_attention", "full_attention"}
    if not isinstance(layer_types, list) or len(layer_types) != layers or not set(layer_types) <= kinds:
        raise IFPError(
            f"layer_types must list 'sliding_attention' or 'full_attention' for each of the {layers} layers",
            path,
            "fix config.json",
        )
    if "sliding_attention" not in layer_types:
        return None
    if window is None or "full_attention" in layer_types:
        raise IFPError(
            "Qwen2 config mixes sliding-window and full-attention layers (use_sliding_window with "
            "max_window_layers/layer_types) or slides without a window, which is not supported",
            path,
            "use a config whose layers all use full attention or all use the sliding window",
        )
    return window


GENERATION_CONFIG_FILE = "generation_config.json"


def read_generation_config(hf_dir: Path) -> dict[str, Any]:
    """The backbone's `generation_config.json` ({} if absent), its token ids checked like config.json's."""
    path = Path(hf_dir) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return {}
    raw = read_json(path, "generation config")
    if not isinstance(raw, dict):
        raise IFPError("generation config must be a JSON object", path, "re-save it with save_pretrained")
    for key in ("bos_token_id", "pad_token_id"):
        _token_ids(raw, key, path, many=False)
    _token_ids(raw, "eos_token_id", path, many=True)
    return raw


def eos_token_ids(cfg: DecoderConfig, generation: dict[str, Any]) -> list[int]:
    """Every end-of-sequence id: generation_config.json's (instruct models list end-of-turn tokens only there) then
    config.json's, without repeats. Stopping on the union is what both files ask for."""
    ids: list[int] = []
    for value in (generation.get("eos_token_id"), cfg.eos_token_id):
        for token in value if isinstance(value, list) else [] if value is None else [value]:
            if token not in ids:
                ids.append(token)
    return ids


def generation_config(cfg: DecoderConfig, generation: dict[str, Any]) -> dict[str, Any]:
    """The `generation_config.json` written beside exported models (Optimum's `generate` reads it): bos/pad from
    generation_config.json else config.json, eos = `eos_token_ids` (an int when there is one)."""
    eos = eos_token_ids(cfg, generation)
    raw = {
        "bos_token_id": generation.get("bos_token_id", cfg.bos_token_id),
        "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
        "pad_token_id": generation.get("pad_token_id", cfg.pad_token_id),
    }
    return {k: v for k, v in raw.items() if v is not None}


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
