"""genai_config.json: what onnxruntime-genai's `og.Model(dir)` needs to load each decoder.

og reads one `genai_config.json` per directory, so each model gets `genai/<name>/genai_config.json` pointing at
the model's graph two levels up (the same .onnx and data files Optimum loads; no second copy). The app feeds
token ids (`og.Generator.append_tokens`); the tokenizer is the output's `tokenizer.json`, which `og.Tokenizer`
does not read from these directories.
"""

from __future__ import annotations

from pathlib import Path

from ifp_export.fsutil import write_json
from ifp_export.model.config import DecoderConfig

GENAI_DIR = "genai"
GENAI_CONFIG = "genai_config.json"
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}


def genai_config(cfg: DecoderConfig, filename: str) -> dict:
    """The og 0.18 config for an Optimum-layout decoder graph (separate past/present buffers)."""
    eos = cfg.eos_token_id
    return {
        "model": {
            "bos_token_id": cfg.bos_token_id,
            "context_length": cfg.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
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
            "eos_token_id": eos if eos is not None else -1,
            "pad_token_id": cfg.pad_token_id if cfg.pad_token_id is not None else (eos if eos is not None else 0),
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
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_configs(directory: Path, models: dict[str, Path], cfg: DecoderConfig) -> dict[str, Path]:
    """One `genai/<name>/genai_config.json` per decoder model; returns name -> that directory."""
    out = {}
    for name, path in models.items():
        folder = directory / GENAI_DIR / name
        folder.mkdir(parents=True)
        write_json(folder / GENAI_CONFIG, genai_config(cfg, f"../../{path.name}"))
        out[name] = folder
    return out
