"""Load and save our decoder as a Hugging Face `save_pretrained` directory (config.json + safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch

from ifp_export.errors import IFPError
from ifp_export.fsutil import read_json, read_safetensors, write_json, write_safetensors
from ifp_export.model.config import DecoderConfig
from ifp_export.model.decoder import CausalLM, decoder_from_state
from ifp_export.weights import (  # noqa: F401 - IGNORED_SUFFIXES, weights_file: re-exported for the LM predictor
    IGNORED_SUFFIXES,
    INDEX_FILE,
    SafetensorsWeights,
    check_weight_map,
    weights_file,
)


def read_config(hf_dir: Path) -> DecoderConfig:
    if not hf_dir.is_dir():
        raise IFPError("backbone directory not found", hf_dir, "pass a save_pretrained directory")
    path = hf_dir / "config.json"
    raw = read_json(path, "model config")
    if not isinstance(raw, dict):
        raise IFPError("model config must be a JSON object", path, "re-save it with save_pretrained")
    return DecoderConfig.from_hf_dict(raw, path)


def read_state_dict(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of `model.safetensors` or of a sharded `model.safetensors.index.json`, at once (small models:
    the predictor LM; the backbone is opened with `open_decoder`)."""
    index = hf_dir / INDEX_FILE
    if index.is_file():
        weight_map = check_weight_map(read_json(index, "safetensors index"), index)
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = (hf_dir / shard).resolve()
            if hf_dir.resolve() not in shard_path.parents:
                raise IFPError(f"shard {shard!r} is outside the model directory", index, "fix the index")
            tensors.update(read_safetensors(shard_path))
        return tensors
    return read_safetensors(hf_dir / "model.safetensors")


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
