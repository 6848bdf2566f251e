"""The PyTorch reference an ONNX decoder is validated against, run after its ORT sessions and kept small.

A model's reference reads the memory-mapped checkpoint a module at a time and keeps only its logits (`ReferenceRun`),
so its pages and the ORT session's (the whole model) are never resident together. It is teacher-forced: one forward
over the prompts and the continuation ORT generated, in float32 and in float64 (the pair `ifp_export.bounds` derives
the bound from), instead of one forward per generated token; the two run in lockstep (`lockstep_logits`), so every
weight is read once per model. For a quantized export it computes with the weights the graph's MatMulNBits use
(`LayerDequantizer`: a module's own weights swapped for the dequantized ones while it runs, then back), so memory is
bounded by one layer at any model size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ifp_export.bounds import lockstep_logits
from ifp_export.model.decoder import CausalLM
from ifp_export.targets.onnx.build import build_decoder
from ifp_export.targets.onnx.ops import Binding, dequantized_sources, quantize_rows
from ifp_export.weights import ModuleWeights, is_ffn


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
    model: CausalLM,
    bindings: list[Binding],
    get: Callable[[str], np.ndarray | torch.Tensor],
    packed: Callable[[Binding], tuple[np.ndarray, np.ndarray] | None] = lambda binding: None,
) -> dict[str, nn.Parameter]:
    """Set the dequantized weights of `bindings` on `model` (a tied embedding's on lm_head, untying it); returns
    the parameters they replaced, by module attribute name (`packed` as in `dequantized_sources`)."""
    replaced = {}
    for name, weight in dequantized_sources(bindings, get, packed).items():
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
    `LayerDequantizer` to (validation uses `LayerDequantizer`, which never makes this copy)."""
    get = ModuleWeights(model).get
    for bindings in quantized_groups(model, quantize).values():
        swap_in(model, bindings, get)
    return model


class LayerDequantizer:
    """The weights the quantized graph's MatMulNBits use, one module (a decoder layer, lm_head) at a time: `swapped`
    sets a module's dequantized weights on the model for a block and puts its own back after, so a reference never
    holds more than one module's dequantized weights (a whole 8B model's would be 32 GB), and each weight is
    quantized once per reference, however many streams run through the module. `shared` (a dict kept across the
    models of one export) holds the blocks and scales of the weights no FFN slice enters (attention, lm_head: the
    same tensors in every model), ~0.6 byte per int4 weight, so they are quantized once per export."""

    def __init__(self, model: CausalLM, quantize: str, shared: dict | None = None) -> None:
        self.model = model
        self.groups = {} if quantize == "none" else quantized_groups(model, quantize)
        self.get = ModuleWeights(model).tensor  # as they are: the quantizer reads them a chunk at a time
        self.shared = {} if shared is None else shared

    def packed(self, binding: Binding) -> tuple[np.ndarray, np.ndarray] | None:
        """A shared weight's blocks and scales, quantized on first use; None for an FFN weight (quantized anew)."""
        if any(is_ffn(source) for source in binding.sources):
            return None
        if binding.sources not in self.shared:
            self.shared[binding.sources] = quantize_rows([self.get(s) for s in binding.sources], int(binding.layout[3]))
        return self.shared[binding.sources]

    @contextmanager
    def swapped(self, owner: str) -> Iterator[None]:
        bindings = self.groups.get(owner)
        replaced = {} if bindings is None else swap_in(self.model, bindings, self.get, self.packed)
        try:
            yield
        finally:
            restore(self.model, replaced)


@dataclass
class ReferenceRun:
    """What a model's PyTorch reference computes for its checks, kept small (logits only), so the reference's mapped
    weights and the ORT session's are never resident together: ORT generates first, then the reference runs."""

    ref32: np.ndarray  # [B, T, V] one uncached forward over the left-padded prompts + ORT's greedy continuation
    ref64: np.ndarray  # the same forward in float64: the truth the checks measure against (`ifp_export.bounds`)
    fp32: np.ndarray | None = None  # quantized, dense model: the fp32 model's logits on the same tokens (quality)


def reference_run(
    reference: CausalLM,
    ids: torch.Tensor,
    mask: torch.Tensor,
    quantize: str = "none",
    release: Callable[[nn.Module], None] = lambda module: None,
    fp32_figure: bool = True,
    shared_quantized: dict | None = None,
) -> ReferenceRun:
    """`reference` teacher-forced over `ids` (left-padded prompts + continuation, [B, T]) in float32 and float64, for
    a quantized export on the dequantized weights (and, with `fp32_figure`, once more on its own fp32 weights: the
    quantization's quality figure): one pass over the weights, whatever the continuation's length.
    `shared_quantized` as `LayerDequantizer.shared`."""
    quantized = quantize != "none"
    streams = [(torch.float32, quantized), (torch.float64, quantized)]
    streams += [(torch.float32, False)] if quantized and fp32_figure else []
    dequantizer = LayerDequantizer(reference, quantize, shared_quantized)
    logits = lockstep_logits(reference, ids, mask, streams, dequantizer.swapped, release)
    return ReferenceRun(logits[0], logits[1], logits[2] if len(logits) > 2 else None)
