"""Folding: a variant's FFN mask becomes a smaller dense decoder (intermediate_size = k).

Row j of gate_proj/up_proj and column j of down_proj go with neuron j, so keeping neurons `idx` is
`kept_neurons` on those; every other tensor is shared (not copied) with the full model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ifp_export.errors import IFPError
from ifp_export.fsutil import TensorEntry, read_safetensors, stream_safetensors, write_json, write_safetensors
from ifp_export.generate import padded_positions
from ifp_export.model.config import DecoderConfig
from ifp_export.model.decoder import CausalLM, DecoderLayer, decoder_from_state
from ifp_export.weights import FFN_PROJECTIONS, SafetensorsWeights, is_ffn, kept_neurons, neuron_axis


def fold_decoder(
    model: CausalLM,
    kept: torch.Tensor,
    gathered: Callable[[list[torch.Tensor]], None] = lambda tensors: None,
    placeholders: tuple[str, ...] = (),
) -> CausalLM:
    """A decoder keeping `kept[l]` (ascending neuron indices, [L, k]) in layer l; shares non-FFN weights.

    `gathered(tensors)` gets each layer's source FFN matrices once sliced (e.g. `SafetensorsWeights.release_tensors`,
    so the gather does not leave every FFN matrix resident). The FFN projections named in `placeholders` are not
    gathered but meta tensors of their shapes, for a caller that checks them without their values."""
    state = dict(model.state_dict())
    for layer, idx in enumerate(kept):
        sliced = kept_ffn(state, f"model.layers.{layer}.", idx, placeholders)
        gathered([state[name] for name in sliced if not sliced[name].is_meta])  # the sources, before they are replaced
        state |= sliced
    return decoder_from_state(model.config.replace(intermediate_size=int(kept.shape[1])), state)


def fold_layer(layer: DecoderLayer, config: DecoderConfig, kept: torch.Tensor, ffn: bool = True) -> DecoderLayer:
    """One decoder layer keeping the FFN neurons `kept` (ascending, [k]); shares every other weight with `layer`: a
    caller running several variants through one layer at a time (the multi-model lockstep of `ifp_export.bounds`)
    gathers a layer's slices only while that layer runs. Without `ffn` the FFN weights are placeholders (meta
    tensors of their shapes), for a caller that swaps in weights of its own before the layer runs."""
    state = dict(layer.state_dict())
    state |= kept_ffn(state, "", kept, () if ffn else FFN_PROJECTIONS)
    with torch.device("meta"):
        folded = DecoderLayer(config.replace(intermediate_size=int(kept.shape[0])))
    folded.load_state_dict(state, assign=True)
    return folded.eval().requires_grad_(False)


def kept_ffn(
    state: dict[str, torch.Tensor], prefix: str, kept: torch.Tensor, placeholders: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """The FFN matrices of `state` under `prefix` keeping neurons `kept`: row j of gate_proj/up_proj and column j of
    down_proj go with neuron j; the projections in `placeholders` as meta tensors of that shape (nothing gathered)."""
    sliced = {}
    for proj in FFN_PROJECTIONS:
        name, axis = f"{prefix}mlp.{proj}.weight", neuron_axis(proj)
        if proj in placeholders:
            shape = [len(kept) if i == axis else d for i, d in enumerate(state[name].shape)]
            sliced[name] = torch.empty(shape, dtype=state[name].dtype, device="meta")
        else:
            sliced[name] = kept_neurons(state[name], kept, axis)
    return sliced


def write_variant_checkpoint(weights: SafetensorsWeights, kept: torch.Tensor, directory: Path) -> None:
    """A variant as a Hugging Face checkpoint (config.json + model.safetensors), streamed tensor by tensor from the
    mapped source in its stored dtype: shared tensors copied as they are, FFN slices gathered per tensor."""
    cfg = weights.config.replace(intermediate_size=int(kept.shape[1]))
    entries = {}
    for name in weights.names():
        info = weights.info(name)
        shape, data = info.shape, partial(weights.raw, name)
        if is_ffn(name):
            layer, axis = int(name.split(".")[2]), neuron_axis(name)
            shape = tuple(cfg.intermediate_size if i == axis else d for i, d in enumerate(info.shape))
            data = partial(gather, weights.raw, name, kept[layer].numpy(), axis)
        entries[name] = TensorEntry(info.dtype, shape, info.itemsize * int(np.prod(shape)), data)
    release = lambda name: weights.release_tensors([weights.tensor(name)])  # noqa: E731
    stream_safetensors(directory / "model.safetensors", entries, written=release)
    write_json(directory / "config.json", cfg.to_hf_dict())


def gather(read: Callable[[str], np.ndarray], name: str, kept: np.ndarray, axis: int) -> np.ndarray:
    return np.ascontiguousarray(np.take(read(name), kept, axis=axis))


def kept_indices(mask: torch.Tensor) -> torch.Tensor:
    """[L, d_ff] 0/1 mask with the same count per layer -> [L, k] ascending int64 indices."""
    counts = mask.sum(-1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"folding needs the same k in every layer, got {counts.tolist()}")
    return torch.stack([row.nonzero().flatten() for row in mask])


@torch.no_grad()
def masked_logits(
    full: CausalLM, masks: list[torch.Tensor], sizes: list[int], input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> list[torch.Tensor]:
    """The full model's logits on left-padded `input_ids` [B, T] split into groups of `sizes` rows, group i with
    the neuron mask `masks[i]` ([L, d_ff]), in one batched forward pass: every weight is read once for all masks,
    not once per mask."""
    row_masks = torch.cat([m.expand(n, *m.shape) for m, n in zip(masks, sizes, strict=True)])
    logits, _ = full(input_ids, attention_mask, padded_positions(attention_mask), ffn_masks=row_masks)
    return list(logits.split(sizes))


def relative_difference(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray) -> float:
    """max |actual - expected| / max(1, max |expected|)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / max(1.0, float(np.abs(expected).max())))


def write_kept_indices(path: Path, kept: dict[str, torch.Tensor], tasks: dict[str, str | None]) -> None:
    """[L, k] int32 indices per variant; the metadata keeps the variants' order (routing index) and tasks."""
    order = json.dumps([{"name": name, "task": tasks[name]} for name in kept])
    tensors = {name: idx.to(torch.int32) for name, idx in kept.items()}
    write_safetensors(path, tensors, {"format": "ifp-kept-indices", "variants": order})


def read_kept_indices(path: Path) -> list[tuple[str, str | None, torch.Tensor]]:
    """(name, task, [L, k] int64 kept neuron indices) per variant, in routing order."""
    tensors = read_safetensors(path, "re-run ifp-export export")
    try:
        with safe_open(str(path), framework="pt") as f:
            order = json.loads((f.metadata() or {})["variants"])
        return [(v["name"], v["task"], tensors[v["name"]].long()) for v in order]
    except (KeyError, TypeError, ValueError):
        raise IFPError("kept-indices file has no valid variant list", path, "re-run ifp-export export") from None


def mask_from_indices(kept: torch.Tensor, intermediate_size: int) -> torch.Tensor:
    return torch.zeros(kept.shape[0], intermediate_size).scatter_(1, kept, 1.0)
