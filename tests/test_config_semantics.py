"""Issue 18.2/18.6: config.json is read exactly as `transformers` 4.57 reads it for its model_type, and every field
or rope_scaling form we do not implement is refused with the one-line error (never ignored, never a traceback)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import TINY, assert_one_line_ifp_error, left_padded_batch, make_hf_model
from transformers import AutoConfig

from ifp_export.model.config import DecoderConfig
from ifp_export.model.hf_io import check_weight_map

BASE = {**TINY, "head_dim": 8}


def raw_config(model_type: str, **changes: Any) -> dict[str, Any]:
    """A tiny config.json dict (a value of None deletes the key)."""
    raw = {**BASE, "model_type": model_type, **changes}
    return {k: v for k, v in raw.items() if v is not None}


def hf_windows(raw: dict[str, Any], tmp_path: Path) -> list[int | None]:
    """The sliding window each layer of `transformers`' model uses for this config.json (None = full attention)."""
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = AutoConfig.from_pretrained(tmp_path)
    layers = range(config.num_hidden_layers)
    if raw["model_type"] == "llama":
        assert config.sliding_window is None  # a window is refused (test below)
        return [None for _ in layers]
    if raw["model_type"] == "mistral":
        return [config.sliding_window for _ in layers]
    return [config.sliding_window if config.layer_types[i] == "sliding_attention" else None for i in layers]


SEMANTICS = {
    "llama-null-window": raw_config("llama") | {"sliding_window": None},
    "mistral-no-key-defaults-4096": raw_config("mistral", sliding_window=None),
    "mistral-null-window": raw_config("mistral", sliding_window=None) | {"sliding_window": None},
    "mistral-window-6": raw_config("mistral", sliding_window=6),
    "qwen2-flag-without-window-key": raw_config("qwen2", use_sliding_window=True, max_window_layers=0),
    "qwen2-window-without-flag": raw_config("qwen2", sliding_window=8, max_window_layers=0),
    "qwen2-layer-types-all-sliding": raw_config(
        "qwen2", use_sliding_window=True, sliding_window=5, layer_types=["sliding_attention"] * 2
    ),
}


@pytest.mark.parametrize("case", list(SEMANTICS))
def test_sliding_window_follows_transformers(case: str, tmp_path: Path) -> None:
    raw = SEMANTICS[case]
    windows = hf_windows(raw, tmp_path)
    assert len(set(windows)) == 1
    assert DecoderConfig.from_hf_dict(json.loads(json.dumps(raw))).sliding_window == windows[0]


def test_llama_sliding_window_is_refused_because_transformers_applies_it_only_when_decoding(tmp_path: Path) -> None:
    """transformers 4.57's Llama attends fully in a cache-less forward but its DynamicCache keeps only the last
    `sliding_window - 1` tokens, so cached decoding slides: no single export can match both, we refuse it."""
    hf = make_hf_model("llama", sliding_window=4)
    whole, _, _ = left_padded_batch([12], hf.config.vocab_size)

    def last_logits_cacheless_and_cached() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            cacheless = hf(input_ids=whole).logits[:, -1]
            prefilled = hf(input_ids=whole[:, :-1], use_cache=True)
            cached = hf(input_ids=whole[:, -1:], past_key_values=prefilled.past_key_values).logits[:, -1]
        return cacheless, cached

    cacheless, cached = last_logits_cacheless_and_cached()
    assert (cacheless - cached).abs().max() > 1e-2  # the window bites only in the cached step
    hf.config.sliding_window = None
    cacheless, cached = last_logits_cacheless_and_cached()
    assert torch.allclose(cacheless, cached, atol=1e-4)  # control: without it both agree
    raw = raw_config("llama", sliding_window=4)
    assert_one_line_ifp_error(lambda: DecoderConfig.from_hf_dict(raw, "c/config.json"), "c/config.json", "sliding")


REFUSED = {
    "llama3-without-low-freq-factor": (
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
        "low_freq_factor",
    ),
    "linear-without-factor": ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
    "linear-factor-zero": ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "factor"),
    "linear-factor-string": ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "factor"),
    "llama3-high-equals-low": (
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 2.0,
                "high_freq_factor": 2.0,
                "original_max_position_embeddings": 64,
            }
        },
        "high_freq_factor",
    ),
    "rope-scaling-without-type": ({"rope_scaling": {"factor": 2.0}}, "rope_type"),
    "rope-scaling-not-an-object": ({"rope_scaling": "linear"}, "rope_scaling"),
    "rope-dynamic": ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
    "rope-yarn": ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "yarn"),
    "rope-longrope": ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1], "long_factor": [1]}}, "longrope"),
    "rope-theta-negative": ({"rope_theta": -1}, "rope_theta"),
    "rope-theta-zero": ({"rope_theta": 0}, "rope_theta"),
    "rms-norm-eps-negative": ({"rms_norm_eps": -1e-6}, "rms_norm_eps"),
    "heads-fractional": ({"num_attention_heads": 4.7}, "num_attention_heads"),
    "hidden-size-string": ({"hidden_size": "32"}, "hidden_size"),
    "layers-bool": ({"num_hidden_layers": True}, "num_hidden_layers"),
    "partial-rotary-factor": ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    "hidden-act-gelu": ({"hidden_act": "gelu"}, "gelu"),
    "mlp-bias": ({"mlp_bias": True}, "mlp_bias"),
    "sliding-window-zero": ({"model_type": "mistral", "sliding_window": 0}, "sliding_window"),
    "tie-word-embeddings-string": ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unimplemented_or_malformed_field_is_refused(case: str) -> None:
    changes, needle = REFUSED[case]
    raw = raw_config("llama") | changes
    assert_one_line_ifp_error(lambda: DecoderConfig.from_hf_dict(raw, "cfg/config.json"), "cfg/config.json", needle)


ACCEPTED = {
    "attention-dropout-is-inference-no-op": {"attention_dropout": 0.1},
    "pretraining-tp-unread-by-4.57": {"pretraining_tp": 2},
    "linear-factor-int": {"rope_scaling": {"rope_type": "linear", "factor": 2}},
    "default-rope-type-explicit": {"rope_scaling": {"rope_type": "default"}},
    "partial-rotary-factor-one": {"partial_rotary_factor": 1.0},
    "heads-as-whole-float": {"num_attention_heads": 4.0},
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_fields_transformers_ignores_at_inference_are_accepted(case: str) -> None:
    cfg = DecoderConfig.from_hf_dict(raw_config("llama") | ACCEPTED[case])
    assert cfg.num_attention_heads == 4 and isinstance(cfg.num_attention_heads, int)


@pytest.mark.parametrize("value", [3, ["model.safetensors"], None, {"a": 1}, ""])
def test_weight_map_values_must_be_file_names(value: object) -> None:
    raw = {"weight_map": {"model.embed_tokens.weight": "model.safetensors", "lm_head.weight": value}}
    assert_one_line_ifp_error(lambda: check_weight_map(raw, "m/model.safetensors.index.json"), "index.json", "lm_head")


def test_weight_map_of_names_is_returned() -> None:
    raw = {"weight_map": {"b": "model-2.safetensors", "a": "model-1.safetensors"}}
    assert check_weight_map(raw, "index.json") == raw["weight_map"]
