"""Load and save our decoder as a Hugging Face `save_pretrained` directory (config.json + safetensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ifp_export.errors import IFPError
from ifp_export.fsutil import check_finite, read_json, read_safetensors, write_json, write_safetensors
from ifp_export.model.config import DecoderConfig
from ifp_export.model.decoder import CausalLM

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_config(hf_dir: Path) -> DecoderConfig:
    if not hf_dir.is_dir():
        raise IFPError("backbone directory not found", hf_dir, "pass a save_pretrained directory")
    path = hf_dir / "config.json"
    raw = read_json(path, "model config")
    if not isinstance(raw, dict):
        raise IFPError("model config must be a JSON object", path, "re-save it with save_pretrained")
    return DecoderConfig.from_hf_dict(raw, path)


def check_weight_map(raw: Any, path: str | Path) -> dict[str, str]:
    """The `weight_map` of a parsed `model.safetensors.index.json`: tensor name -> shard file name (strings only)."""
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict):
        raise IFPError("safetensors index has no weight_map object", path, "re-save with save_pretrained")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise IFPError(
                f"weight_map entry {name!r} is {shard!r}, not a shard file name", path, "re-save with save_pretrained"
            )
    return weight_map


def read_state_dict(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Tensors of `model.safetensors` or of a sharded `model.safetensors.index.json`."""
    index = hf_dir / "model.safetensors.index.json"
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


def weights_file(hf_dir: Path) -> Path:
    """The file errors about the weights should name: the shard index if there is one."""
    index = hf_dir / "model.safetensors.index.json"
    return index if index.is_file() else hf_dir / "model.safetensors"


def load_decoder(hf_dir: str | Path, dtype: torch.dtype = torch.float32) -> CausalLM:
    """Build our decoder from a HF directory, checking names, shapes and finiteness of every tensor."""
    hf_dir = Path(hf_dir)
    cfg = read_config(hf_dir)
    weights_path = weights_file(hf_dir)
    tensors = {k: v for k, v in read_state_dict(hf_dir).items() if not k.endswith(IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise IFPError(
            f"weights do not match config.json ({detail})", weights_path, "save the model with save_pretrained"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise IFPError(
                f"tensor {name!r} has shape {tuple(tensors[name].shape)}, config.json implies {tuple(shape)}",
                weights_path,
                "make config.json and the weights agree",
            )
    check_finite(tensors, weights_path)
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.reset_parameters()
    return model.eval().requires_grad_(False)


def save_decoder(model: CausalLM, hf_dir: str | Path) -> None:
    """Write config.json + model.safetensors that both our loader and `transformers` read."""
    hf_dir = Path(hf_dir)
    hf_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    write_safetensors(hf_dir / "model.safetensors", state)
    write_json(hf_dir / "config.json", model.config.to_hf_dict())
