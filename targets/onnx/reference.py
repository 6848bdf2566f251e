"""The PyTorch reference an ONNX decoder is validated against, run before its ORT session and kept small.

A model's reference streams the memory-mapped checkpoint a layer at a time (`WeightSource.streaming`) and keeps
only its logits and tokens (`ReferenceRun`), so its pages and the ORT session's (the whole model) are never
resident together. For a quantized export it computes with the weights the graph's MatMulNBits use, dequantized a
layer at a time (`dequantizing`), not a dequantized fp32 copy of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ifp_export.generate import greedy_generate, left_pad
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
def dequantizing(model: CausalLM, quantize: str) -> Iterator[None]:
    """Within this block `model` computes with the weights the quantized graph's MatMulNBits use, each layer's (and
    lm_head's) dequantized just before it runs and its original weights put back just after: one layer in fp32 at a
    time, never a dequantized copy of the model (`dequantized` makes one: 2x a bf16 checkpoint)."""
    if quantize == "none":
        yield
        return
    get = ModuleWeights(model).get
    groups = quantized_groups(model, quantize)
    pending: dict[str, nn.Parameter] = {}

    def before(owner: str) -> Callable[..., None]:
        return lambda module, args: pending.update(swap_in(model, groups[owner], get))

    def after(module: nn.Module, args: Any, output: Any) -> None:
        restore(model, pending)
        pending.clear()

    handles = []
    for owner in groups:
        module = model.get_submodule(owner)
        handles.append(module.register_forward_pre_hook(before(owner)))
        # first among the forward hooks: `streaming` then drops the pages of the original (mapped) weights
        handles.append(module.register_forward_hook(after, prepend=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        restore(model, pending)


@dataclass
class ReferenceRun:
    """What a model's PyTorch reference computes for its checks, kept small (logits and tokens), so the reference's
    mapped weights and the ORT session's are never resident together: the reference runs first, then ORT."""

    padded: list[np.ndarray]  # left-padded batch: prefill logits, then each cached greedy decode step's
    greedy: list[int]  # greedy continuation of the first prompt
    unpadded: list[np.ndarray] | None  # first prompt unpadded (the GenAI graph's check): prefill + decode steps
    fp32_prefill: np.ndarray | None = None  # quantized only: the fp32 model's prefill logits (quality figure)


@torch.no_grad()
def reference_run(
    reference: CausalLM,
    prompts: list[list[int]],
    quantize: str = "none",
    unpadded: bool = False,
    decode_steps: int = 8,
    greedy_tokens: int = 32,
) -> ReferenceRun:
    """`reference` (fp32; for quantized exports run on the dequantized weights, one layer at a time) on the
    left-padded prompts: prefill, `decode_steps` cached steps feeding its own greedy token, greedy generation of
    `greedy_tokens` tokens from the first prompt (no EOS stop), and the first prompt unpadded if `unpadded`."""
    ids, mask = left_pad(prompts)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    fp32 = None if quantize == "none" else reference(ids, mask, positions)[0].numpy()
    with dequantizing(reference, quantize):
        logits, past = reference(ids, mask, positions)
        padded = [logits.numpy()]
        for _ in range(decode_steps):
            token = logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat((mask, torch.ones_like(token)), dim=1)
            positions = positions[:, -1:] + 1
            logits, past = reference(token, mask, positions, past)
            padded.append(logits.numpy())
        greedy = greedy_generate(reference, prompts[:1], greedy_tokens)[0]
        single = unpadded_logits(reference, prompts[0], decode_steps) if unpadded else None
    return ReferenceRun(padded, greedy, single, fp32)


def unpadded_logits(reference: CausalLM, prompt: list[int], steps: int) -> list[np.ndarray]:
    """`reference`'s logits on one unpadded prompt: prefill, then `steps` cached greedy decode steps."""
    ids = torch.tensor([prompt])
    logits, past = reference(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
    out = [logits.numpy()]
    for _ in range(steps):
        length = ids.shape[1] + len(out)
        token = logits[:, -1].argmax(-1, keepdim=True)
        logits, past = reference(token, torch.ones(1, length, dtype=torch.long), torch.tensor([[length - 1]]), past)
        out.append(logits.numpy())
    return out
