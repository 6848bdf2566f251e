"""The PyTorch reference the ONNX decoders are validated against, run after their ORT sessions and kept small.

Every model's reference is one teacher-forced forward over the prompts and the continuation ORT generated, in float32
and in float64 (the pair `ifp_export.bounds` derives the bound from), instead of one forward per generated token. All
the models of an export run together a layer at a time (`reference_runs`, over `ifp_export.bounds.lockstep_hidden`):
each layer of the memory-mapped checkpoint is read once for every model (a variant's FFN slices gathered as it runs),
not once per model, and only logits are kept (`ReferenceRun`), one model's at a time. For a quantized export it
computes with the weights the graph's MatMulNBits use (`LayerDequantizer`: a module's own weights swapped for the
dequantized ones while it runs, then back; the weights every model shares dequantized once), so memory is bounded by
one layer at any model size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from ifp_export.bounds import Member, head_logits, lockstep_hidden
from ifp_export.model.decoder import CausalLM
from ifp_export.targets.onnx.build import build_decoder
from ifp_export.targets.onnx.ops import Binding, dequantized_sources
from ifp_export.weights import ModuleWeights, is_ffn, kept_neurons, neuron_axis


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


def swap_in(
    model: CausalLM, weights: dict[str, np.ndarray], module: nn.Module | None = None, prefix: str = ""
) -> dict[str, nn.Parameter]:
    """Set `weights` (HF name -> the dequantized [out, in] weight) on `module` (default: `model`), which holds the
    names under `prefix` (a decoder layer: `model.layers.N.`); a tied embedding's go on lm_head, untying it. Returns
    the parameters they replaced, by attribute name relative to `module`."""
    module = model if module is None else module
    replaced = {}
    for name, weight in weights.items():
        if model.config.tie_word_embeddings and name == "model.embed_tokens.weight":
            name = "lm_head.weight"
        name = name.removeprefix(prefix)
        owner_name, _, attribute = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        replaced[name] = getattr(owner, attribute)
        setattr(owner, attribute, nn.Parameter(torch.from_numpy(weight), False))
    return replaced


def restore(module: nn.Module, replaced: dict[str, nn.Parameter]) -> None:
    for name, parameter in replaced.items():
        owner_name, _, attribute = name.rpartition(".")
        setattr(module.get_submodule(owner_name), attribute, parameter)


def dequantized(model: CausalLM, quantize: str) -> CausalLM:
    """`model` (a fresh fold, modified in place) with every weight the quantized graph quantizes replaced by what
    its MatMulNBits node computes with, all at once: the whole-model reference tests hold the runtime and
    `LayerDequantizer` to (validation uses `LayerDequantizer`, which never makes this copy)."""
    get = ModuleWeights(model).get
    for bindings in quantized_groups(model, quantize).values():
        swap_in(model, dequantized_sources(bindings, get))
    return model


class LayerDequantizer:
    """The weights the quantized graph's MatMulNBits use, one module (a decoder layer, lm_head) at a time: `swapped`
    sets a module's dequantized weights on it for a block and puts its own back after, so a reference never holds
    more than one module's dequantized weights (a whole 8B model's would be 32 GB). The models of a multi-model
    lockstep share every weight but their FFN slices, so the shared ones (attention, lm_head) are quantized once per
    module for all of them and kept until the lockstep moves on to the next module. So are the dense gate/up
    projections: their blocks run along a neuron's inputs, so a variant's are the dense ones' rows of its kept
    neurons, bit for bit; down_proj's blocks run across neurons, so each member's is quantized from its own slice."""

    def __init__(self, model: CausalLM, quantize: str) -> None:
        self.model = model
        self.groups = {} if quantize == "none" else quantized_groups(model, quantize)
        self._owner: str | None = None
        self._dequantized: dict[str, np.ndarray] = {}  # the current owner's shared weights, dense gate/up

    @contextmanager
    def swapped(self, owner: str, module: nn.Module, kept: torch.Tensor | None = None) -> Iterator[None]:
        """`module` (what `owner` names in the member being run: its decoder layer, keeping FFN neurons `kept` (None:
        all), or the CausalLM for lm_head) with its quantized weights dequantized."""
        bindings = self.groups.get(owner, [])
        sliced = [b for b in bindings if any(s.endswith("down_proj.weight") for s in b.sources)]
        if owner != self._owner:
            shared = [b for b in bindings if b not in sliced]
            self._owner, self._dequantized = owner, dequantized_sources(shared, partial(self.own, None))
        prefix = "" if owner == "lm_head" else owner + "."
        weights = {n: w if kept is None or not is_ffn(n) else w[kept.numpy()] for n, w in self._dequantized.items()}
        replaced = swap_in(self.model, weights | dequantized_sources(sliced, partial(self.own, kept)), module, prefix)
        try:
            yield
        finally:
            restore(module, replaced)

    def own(self, kept: torch.Tensor | None, source: str) -> torch.Tensor:
        """A member's own slice of the dense weight `source` (gathered here: a member whose every stream runs
        swapped gets no FFN slices from its fold, `lockstep_hidden`)."""
        weight = self.model.get_parameter(source).detach()
        return weight if kept is None or not is_ffn(source) else kept_neurons(weight, kept, neuron_axis(source))


@dataclass
class ReferenceRun:
    """What a model's PyTorch reference computes for its checks, kept small (logits only), so the reference's mapped
    weights and the ORT session's are never resident together: ORT generates first, then the reference runs."""

    ref32: np.ndarray  # [B, T, V] one uncached forward over the left-padded prompts + ORT's greedy continuation
    ref64: np.ndarray  # the same forward in float64: the truth the checks measure against (`ifp_export.bounds`)
    fp32: np.ndarray | None = None  # quantized, dense model: the fp32 model's logits on the prompts [B, P, V] (quality)


def reference_members(
    ids: torch.Tensor,
    mask: torch.Tensor,
    quantize: str,
    kept: torch.Tensor | None = None,
    figure_width: int | None = None,
) -> list[Member]:
    """A model's reference over `ids` (left-padded prompts + continuation, [B, T]): one member whose streams are
    float32 and float64, for a quantized export on the dequantized weights; with `figure_width`, a quantized
    export's second member runs the fp32 weights over the first `figure_width` columns (the prompts: the
    quantization's quality figure, which needs no more positions than the prefill's); `kept` as `Member.kept`."""
    quantized = quantize != "none"
    members = [Member(ids, mask, [(torch.float32, quantized), (torch.float64, quantized)], kept)]
    if quantized and figure_width is not None:
        members.append(Member(ids[:, :figure_width], mask[:, :figure_width], [(torch.float32, False)], kept))
    return members


def reference_runs(
    backbone: CausalLM,
    models: list[list[Member]],
    quantize: str = "none",
    release: Callable[[nn.Module], None] = lambda module: None,
) -> Iterator[ReferenceRun]:
    """Every model's `ReferenceRun` (from its `reference_members`), in order: the layers run once for all their members
    (`lockstep_hidden`: the checkpoint is read once, the shared weights are dequantized once per module), then lm_head
    one member at a time, each run yielded before the next model's logits are made (one model's logits alive at a
    time)."""
    dequantizer = LayerDequantizer(backbone, quantize)
    hidden = lockstep_hidden(backbone, [m for members in models for m in members], dequantizer.swapped, release)
    for members in models:
        logits = [head_logits(backbone, m, hidden.pop(0), dequantizer.swapped) for m in members]
        yield ReferenceRun(*logits[0], logits[1][0] if len(logits) > 1 else None)
    release(backbone.lm_head)
