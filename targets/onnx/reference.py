"""The PyTorch reference an ONNX decoder is validated against, run after its ORT sessions and kept small.

A model's reference streams the memory-mapped checkpoint a layer at a time (`WeightSource.streaming`) and keeps
only its logits (`ReferenceRun`), so its pages and the ORT session's (the whole model) are never resident together.
It is teacher-forced: one forward over the prompts and the continuation ORT generated, in float32 and in float64 (the
pair `ifp_export.bounds` derives the bound from), instead of one forward per generated token. For a quantized export
it computes with the weights the graph's MatMulNBits use (`dequantizing`: the model's own weights swapped for the
dequantized ones and back, no fp32 twin of the dense model folded for it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ifp_export.bounds import reference_pair
from ifp_export.model.decoder import CausalLM
from ifp_export.targets.onnx.build import build_decoder
from ifp_export.targets.onnx.ops import Binding, dequantized_sources
from ifp_export.weights import ModuleWeights


def quantized_groups(model: CausalLM, quantize: str) -> dict[str, list[Binding]]:
    """The bindings (blocks and scales) of every weight the quantized graph quantizes, by the module that computes
    with them: `model.layers.N`, or `lm_head` (also for a tied embedding: the gather stays fp32, as in the graph).
    The bindings come from the graph builder, so the reference follows whatever the graph quantizes."""
    cfg = model.config
    _, bindings = build_decoder(cfg, cfg.intermediate_size, "optimum", quantize)
    groups: dict[str, list[Binding]] = {}
    for binding in bindings:
        if binding.layout.endswith(("_blocks", "_scales")):
            source = binding.sources[0]
            if source.startswith("model.layers."):
                owner = ".".join(source.split(".")[:3])
            elif source in ("lm_head.weight", "model.embed_tokens.weight"):
                owner = "lm_head"
            else:
                raise RuntimeError(f"no reference module computes with the quantized weight {source!r}")
            groups.setdefault(owner, []).append(binding)
    return groups


def swap_in(model: CausalLM, bindings: list[Binding], get: Callable[[str], np.ndarray]) -> dict[str, nn.Parameter]:
    """Set the dequantized weights of `bindings` on `model` (a tied embedding's on lm_head, untying it); returns
    the parameters they replaced, by module attribute name."""
    replaced = {}
    for name, weight in dequantized_sources(bindings, get).items():
        if model.config.tie_word_embeddings and name == "model.embed_tokens.weight":
            name = "lm_head.weight"
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        replaced[name] = getattr(module, attribute)
        setattr(module, attribute, nn.Parameter(torch.from_numpy(weight), False))
    return replaced


def restore(model: CausalLM, replaced: dict[str, nn.Parameter]) -> None:
    for name, parameter in replaced.items():
        module_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(module_name), attribute, parameter)


def dequantized(model: CausalLM, quantize: str) -> CausalLM:
    """`model` (a fresh fold, modified in place) with every weight the quantized graph quantizes replaced by what
    its MatMulNBits node computes with, all at once: the whole-model reference tests hold the runtime and
    `dequantizing` to (validation uses `dequantizing`, which never makes this copy)."""
    get = ModuleWeights(model).get
    for bindings in quantized_groups(model, quantize).values():
        swap_in(model, bindings, get)
    return model


@contextmanager
def dequantizing(model: CausalLM, quantize: str, release: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Within this block `model` computes with the weights the quantized graph's MatMulNBits use (dequantized once,
    on entry, a module at a time with `release()` after each: drops the source pages read); on exit its own weights
    are put back, so no fp32 twin of the model is folded for this. Dequantizing a layer as it runs would hold one
    layer instead of the model, but re-quantizes every weight on each forward pass (~8 s per pass at 100M parameters,
    and the check makes two), so the dequantized weights are held for the block: validation runs it after, never
    beside, the model's ORT sessions."""
    if quantize == "none":
        yield
        return
    get = ModuleWeights(model).get
    replaced: dict[str, nn.Parameter] = {}
    try:
        for bindings in quantized_groups(model, quantize).values():
            replaced.update(swap_in(model, bindings, get))
            release()
        yield
    finally:
        restore(model, replaced)


@dataclass
class ReferenceRun:
    """What a model's PyTorch reference computes for its checks, kept small (logits only), so the reference's mapped
    weights and the ORT session's are never resident together: ORT generates first, then the reference runs."""

    ref32: np.ndarray  # [B, T, V] one uncached forward over the left-padded prompts + ORT's greedy continuation
    ref64: np.ndarray  # the same forward in float64: the truth the checks measure against (`ifp_export.bounds`)
    fp32: np.ndarray | None = None  # quantized only: the fp32 model's logits on the same tokens (quality figure)


@torch.no_grad()
def reference_run(
    reference: CausalLM,
    ids: torch.Tensor,
    mask: torch.Tensor,
    quantize: str = "none",
    release: Callable[[], None] = lambda: None,
) -> ReferenceRun:
    """`reference` (fp32; for quantized exports on the dequantized weights) teacher-forced over `ids` (left-padded
    prompts + continuation, [B, T]): one forward in float32 and one in float64, whatever the continuation's length."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    fp32 = None if quantize == "none" else reference(ids, mask, positions)[0].numpy()
    with dequantizing(reference, quantize, release):
        ref32, ref64 = reference_pair(reference, ids, mask, positions)
    return ReferenceRun(ref32, ref64, fp32)
