"""genai_config.json: what onnxruntime-genai's `og.Model` needs to load each decoder (the same .onnx and data
files Optimum loads; no second copy).

og reads exactly one `genai_config.json` per directory and refuses `..` in `model.decoder.filename`, so there is
one config beside the graphs, naming the dense model (its `.genai.onnx` graph when there is one, else the
Optimum-flavour graph, which og also runs); a variant is that config with its overlay (the manifest's) applied:
`config = og.Config(onnx_dir); config.overlay(json.dumps(genai_overlay(file))); og.Model(config)`. The overlay
carries the KV buffer mode too, so any of our graphs loads through it, whichever one the config names. og's
tokenizer reads the tokenizer.json and tokenizer_config.json written beside the graphs (`ifp_export.chat`).
"""

from __future__ import annotations

from pathlib import Path

from ifp_export.fsutil import write_json
from ifp_export.model.config import DecoderConfig

GENAI_CONFIG = "genai_config.json"
GENAI_SUFFIX = ".genai.onnx"  # <name>.genai.onnx: the GenAI-flavour graph of model <name>
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


def genai_config(cfg: DecoderConfig, filename: str, position_ids: bool, generation: dict) -> dict:
    """The og 0.18 config for our decoder graphs. The GenAI-flavour graph (GroupQueryAttention, rotary inside)
    takes no position_ids and shares og's past/present buffer (GQA writes each step's K/V into the max_length
    buffer in place, as the GenAI builder's models do); the Optimum-flavour graph concatenates, so it gets separate
    buffers. Token ids come from `generation` (what `model.config.generation_config` writes beside the graphs: every
    EOS id of config.json and generation_config.json)."""
    eos = generation.get("eos_token_id")
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if position_ids:
        inputs["position_ids"] = "position_ids"
    return {
        "model": {
            "bos_token_id": generation.get("bos_token_id", -1),  # og refuses null ids
            "context_length": cfg.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": inputs
                | {
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": cfg.num_attention_heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_key_value_heads": cfg.num_key_value_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad_id(generation),
            "type": GENAI_TYPES.get(cfg.model_type, "llama"),
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": cfg.max_position_embeddings,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": not position_ids,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def pad_id(generation: dict) -> int:
    """og wants one int: the pad id, else the (first) EOS id, else 0."""
    if generation.get("pad_token_id") is not None:
        return generation["pad_token_id"]
    eos = generation.get("eos_token_id")
    return (eos[0] if eos else 0) if isinstance(eos, list) else (eos if eos is not None else 0)


def genai_overlay(filename: str) -> dict:
    """What `og.Config.overlay` takes (as JSON) to load `filename` instead of the dense model: the file, and the KV
    buffer mode its flavour needs (shared for a GenAI-flavour graph), whichever flavour the config names."""
    return {
        "model": {"decoder": {"filename": filename}},
        "search": {"past_present_share_buffer": filename.endswith(GENAI_SUFFIX)},
    }


def write_genai_config(directory: Path, dense: Path, cfg: DecoderConfig, position_ids: bool, generation: dict) -> Path:
    path = directory / GENAI_CONFIG
    write_json(path, genai_config(cfg, dense.name, position_ids, generation))
    return path
