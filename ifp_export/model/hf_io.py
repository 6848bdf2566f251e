"""Load and save our decoder as a Hugging Face `save_pretrained` directory (config.json + safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch

from ifp_export.errors import IFPError
from ifp_export.fsutil import read_json, write_json, write_safetensors
from ifp_export.model.config import DecoderConfig
from ifp_export.model.decoder import CausalLM, decoder_from_state
from ifp_export.weights import SafetensorsWeights


def read_config(hf_dir: Path) -> DecoderConfig:
    if not hf_dir.is_dir():
        raise IFPError("backbone directory not found", hf_dir, "pass a save_pretrained directory")
    path = hf_dir / "config.json"
    raw = read_json(path, "model config")
    if not isinstance(raw, dict):
        raise IFPError("model config must be a JSON object", path, "re-save it with save_pretrained")
    return DecoderConfig.from_hf_dict(raw, path)


def open_decoder(hf_dir: str | Path) -> tuple[CausalLM, SafetensorsWeights]:
    """Our decoder over a HF directory's memory-mapped weights, and those weights as a `WeightSource`.

    Names and shapes are checked against config.json from the headers, finiteness tensor by tensor; the
    parameters are zero-copy views in the stored dtype (bf16/fp16 weights are cast per op, see `decoder.py`).
    """
    hf_dir = Path(hf_dir)
    cfg = read_config(hf_dir)
    weights = SafetensorsWeights(hf_dir, cfg)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in CausalLM(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    stored = set(weights.names())
    missing, unexpected = sorted(set(expected) - stored), sorted(stored - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise IFPError(
            f"weights do not match config.json ({detail})", weights.path, "save the model with save_pretrained"
        )
    for name, shape in expected.items():
        if weights.info(name).shape != shape:
            raise IFPError(
                f"tensor {name!r} has shape {weights.info(name).shape}, config.json implies {shape}",
                weights.path,
                "make config.json and the weights agree",
            )
    weights.check_finite()
    return decoder_from_state(cfg, {name: weights.tensor(name) for name in expected}), weights


def load_decoder(hf_dir: str | Path) -> CausalLM:
    """Our decoder over a HF directory's memory-mapped weights (see `open_decoder`)."""
    return open_decoder(hf_dir)[0]


def save_decoder(model: CausalLM, hf_dir: str | Path) -> None:
    """Write config.json + model.safetensors that both our loader and `transformers` read."""
    hf_dir = Path(hf_dir)
    hf_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    write_safetensors(hf_dir / "model.safetensors", state)
    write_json(hf_dir / "config.json", model.config.to_hf_dict())
