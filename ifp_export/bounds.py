"""The one rule every exactness check of the export applies (README "How exact is exact"; DESIGN section 10).

Two equivalent fp32 computations of a model differ by rounding, and by how much depends on the model (depth, logit
magnitude, a trained model's massive activations), so no constant fits every model. Each check measures its
reference against itself instead: the same PyTorch forward on the same inputs in float64 (each weight upcast as its
op runs, a layer at a time) and in float32.

    scale = max(1, max |ref64|)
    noise = max |ref32 - ref64| / scale
    bound = max(NOISE_MULTIPLE * noise, FLOOR_ULPS * FP32_EPS * sqrt(layers + 1))
    error = max |got - ref64| / scale           passes when error <= bound

and top-1 is decisive: at every compared position `got`'s argmax must be ref64's, except where ref64's top-2 margin is
within bound * scale (a near tie: counted and reported, never failed). The floor only matters when the measured noise
is near zero (a model whose fp32 forward happens to be exact); the multiple leaves room for another kernel's
reduction order (ORT's fused ops, a k-wide matmul instead of a masked d_ff-wide one), which measured 0.3-3x the
reference's own noise on random, toy and trained weights, while a wrong FFN row, kept index or tensor moves the logits
by orders of magnitude more.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ifp_export.fold import fold_layer
from ifp_export.generate import padded_positions
from ifp_export.model.decoder import CausalLM, DecoderLayer, Embedding, reused_casts

FP32_EPS = float(np.finfo(np.float32).eps)
FP16_EPS = float(np.finfo(np.float16).eps)  # Core ML's compute precision: the noise scales by FP16_EPS / FP32_EPS
NOISE_MULTIPLE = 16.0
FLOOR_ULPS = 8.0
RULE = (
    f"max|got - ref64| / max(1, max|ref64|) <= max({NOISE_MULTIPLE:g} x noise, {FLOOR_ULPS:g} x fp32 eps x "
    "sqrt(layers + 1)), noise = max|ref32 - ref64| / max(1, max|ref64|); top-1 = ref64's where its top-2 margin "
    "exceeds the bound"
)


def scale_of(ref64: np.ndarray) -> float:
    return max(1.0, float(np.abs(ref64).max()))


def relative_noise(ref32: np.ndarray, ref64: np.ndarray) -> float:
    """The reference's own fp32 rounding: max |ref32 - ref64| / max(1, max |ref64|)."""
    return float(np.abs(np.asarray(ref32, np.float64) - ref64).max()) / scale_of(ref64)


def bound_for(noise: float, layers: int, eps: float = FP32_EPS) -> float:
    """The rule, for a computation that rounds at `eps` (fp32; fp16 for Core ML) given the reference's fp32 noise."""
    return max(NOISE_MULTIPLE * noise * eps / FP32_EPS, FLOOR_ULPS * eps * math.sqrt(layers + 1))


@dataclass(frozen=True)
class Exactness:
    """One exactness check's figures: `error` against `bound` (both relative to max(1, max|ref64|)), and top-1."""

    name: str
    error: float
    noise: float
    bound: float
    positions: int
    top1_disagreements: int  # where the reference's top-2 margin exceeds the bound: each one fails the check
    near_ties: int  # top-1 differs where the reference's margin is within the bound: reported only

    @property
    def ok(self) -> bool:
        return self.error <= self.bound and self.top1_disagreements == 0

    def text(self) -> str:
        ties = f", {self.near_ties} near ties" if self.near_ties else ""
        return (
            f"{self.name}: max|Δ| {self.error:.2e} (bound {self.bound:.2e} = rule on fp32 noise {self.noise:.1e}), "
            f"top-1 differs at {self.top1_disagreements} of {self.positions} positions{ties}"
        )

    def record(self) -> dict:
        """For the report and the summary's checks."""
        return {
            "name": self.name,
            "error": self.error,
            "noise": self.noise,
            "bound": self.bound,
            "positions": self.positions,
            "top1_disagreements": self.top1_disagreements,
            "near_ties": self.near_ties,
            "ok": self.ok,
        }


def compare(
    name: str,
    got: np.ndarray,
    ref32: np.ndarray,
    ref64: np.ndarray,
    layers: int,
    noise: float | None = None,
    eps: float = FP32_EPS,
    fixed_bound: float | None = None,
) -> Exactness:
    """`got` against the float64 reference, rows [..., V] (vocabulary, variants, neurons: top-1 is over the last axis)
    already restricted to the positions that count. `noise` may be given when `ref32` belongs to a larger comparison
    (the same reference run); `eps` is the precision `got` computes in; `fixed_bound` replaces the rule for the one
    check whose reference does not compute what the graph does (Core ML with quantized weights vs the fp32 model)."""
    width = ref64.shape[-1]
    got, ref64 = np.asarray(got, np.float64).reshape(-1, width), ref64.reshape(-1, width)
    scale = scale_of(ref64)
    noise = relative_noise(np.reshape(ref32, (-1, width)), ref64) if noise is None else noise
    bound = bound_for(noise, layers, eps) if fixed_bound is None else fixed_bound
    error = float(np.abs(got - ref64).max()) / scale
    differs = got.argmax(-1) != ref64.argmax(-1)
    top2 = np.sort(ref64, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > bound * scale
    return Exactness(
        name, error, noise, bound, len(ref64), int((differs & decisive).sum()), int((differs & ~decisive).sum())
    )


@contextmanager
def float64(model: nn.Module) -> Iterator[None]:
    """Within this block `model` (a `CausalLM`, or anything over our `Embedding`s whose other ops follow their input's
    dtype) computes in float64: the embeddings' rows are upcast and every later op follows (each weight upcast as its
    op runs), so no float64 copy of the model is made."""
    upcast = lambda module, args, output: output.double()  # noqa: E731
    handles = [m.register_forward_hook(upcast) for m in model.modules() if isinstance(m, Embedding)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def reference_pair(model: nn.Module, *args: torch.Tensor, **kwargs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The model's logits in float32 and float64 on the same inputs (two uncached forward passes)."""
    ref32 = model(*args, **kwargs)[0].numpy()
    with float64(model):
        ref64 = model(*args, **kwargs)[0].numpy()
    return ref32, ref64


Stream = tuple[torch.dtype, bool]  # (compute dtype, inside `swapped`: e.g. with a quantized graph's weights)
Swapped = Callable[[str, nn.Module, torch.Tensor | None], AbstractContextManager[None]]


@dataclass
class Member:
    """One model of a multi-model lockstep (`lockstep_hidden`): the dense model keeping `kept[l]` FFN neurons in
    layer l (None: all of them), run over left-padded `ids` ([B, T], `mask` its 0/1 keys) in every stream."""

    ids: torch.Tensor
    mask: torch.Tensor
    streams: list[Stream]
    kept: torch.Tensor | None = None


def no_swap(owner: str, module: nn.Module, kept: torch.Tensor | None) -> AbstractContextManager[None]:
    return nullcontext()


def run_streams(
    member: Member,
    xs: list[torch.Tensor],
    owner: str,
    module: nn.Module,
    run: Callable,
    swapped: Swapped,
    kept: torch.Tensor | None = None,
) -> None:
    """Advance `xs` (the member's streams) through `module`, the streams marked True inside
    `swapped(owner, module, kept)`."""
    for inside in (False, True):
        chosen = [i for i, (_, swap) in enumerate(member.streams) if swap == inside]
        if chosen:
            with swapped(owner, module, kept) if inside else nullcontext():
                for i in chosen:
                    xs[i] = run(xs[i])


@torch.no_grad()
def lockstep_hidden(
    model: CausalLM,
    members: list[Member],
    swapped: Swapped = no_swap,
    release: Callable[[nn.Module], None] = lambda module: None,
) -> list[list[torch.Tensor]]:
    """The final-norm hidden states of one uncached forward per member and stream, every member and stream advancing
    together a layer at a time: each layer's weights are read once for all of them (a variant's FFN slices are
    gathered from the dense layer as it runs, `fold_layer`), then `release(module)` may drop them. The attention
    weights are every member's, so each projection multiplies the rows of every member's streams of one dtype at
    once (`shared_attention`; a few small products run at a fraction of the machine's rate); the FFN runs per
    member. A stream marked True runs a module inside `swapped(owner, module, kept)` (owner: `model.layers.N` or
    `lm_head`; module: the member's own; kept: its layer's kept neurons, None if all), e.g. with the dequantized
    weights a quantized graph computes with; every member's swapped attention weights are the same, so the first
    member's serve all. A float64 stream upcasts the embedding rows and every later op follows its input's dtype (as
    `float64` does)."""
    inner = model.model
    states = []
    for member in members:
        rows = inner.embed_tokens(member.ids)
        positions = padded_positions(member.mask)
        dtypes = {dtype for dtype, _ in member.streams}
        tables = {dtype: inner.positional(member.mask, positions, dtype) for dtype in dtypes}
        states.append(([rows.to(dtype) for dtype, _ in member.streams], tables))
    release(inner.embed_tokens)
    with reused_casts():  # a layer's weights cast once per member and stream: into the same buffers every time
        for index, layer in enumerate(inner.layers):
            owner, owns = f"model.layers.{index}", []
            for member in members:
                kept = None if member.kept is None else member.kept[index]
                gather = any(not swap for _, swap in member.streams)  # else swapped() sets every FFN weight
                owns.append((layer if kept is None else fold_layer(layer, model.config, kept, ffn=gather), kept))
            for inside in (False, True):
                chosen = [[i for i, (_, swap) in enumerate(m.streams) if swap == inside] for m in members]
                runs = [(m, i) for m, streams in enumerate(chosen) for i in streams]
                for m, (own, kept) in enumerate(owns):
                    if not chosen[m]:
                        continue
                    with swapped(owner, own, kept) if inside else nullcontext():
                        if m == runs[0][0]:  # the first member with such streams: its module, every one's attention
                            shared_attention(own, [(states[n][0], states[n][1], i) for n, i in runs])
                        xs = states[m][0]
                        for i in chosen[m]:
                            xs[i] = xs[i] + own.mlp(own.post_attention_layernorm(xs[i]))
            release(layer)
    return [[inner.norm(x) for x in xs] for xs, _ in states]


def shared_attention(layer: DecoderLayer, streams: list[tuple[list[torch.Tensor], dict, int]]) -> None:
    """Advance each stream (a member's hidden states `xs[i]` and its positional `tables`) by `layer`'s attention and
    residual, every projection multiplying the rows of all the streams of one dtype at once."""
    attention = layer.self_attn
    for dtype in dict.fromkeys(xs[i].dtype for xs, _, i in streams):
        same = [(xs, tables[dtype], i) for xs, tables, i in streams if xs[i].dtype == dtype]
        shapes = [xs[i].shape for xs, _, i in same]
        rows = torch.cat([layer.input_layernorm(xs[i]).flatten(0, 1) for xs, _, i in same])
        sizes = [shape[0] * shape[1] for shape in shapes]
        projected = [p(rows).split(sizes) for p in (attention.q_proj, attention.k_proj, attention.v_proj)]
        attended = [
            attention.attend(tuple(p[n].view(*shape[:2], -1) for p in projected), table)[0].flatten(0, 1)
            for n, ((_, table, _), shape) in enumerate(zip(same, shapes, strict=True))
        ]
        out = attention.o_proj(torch.cat(attended)).split(sizes)
        for (xs, _, i), shape, o in zip(same, shapes, out, strict=True):
            xs[i] = xs[i] + o.view(shape)


@torch.no_grad()
def head_logits(model: CausalLM, member: Member, hidden: list[torch.Tensor], swapped: Swapped = no_swap) -> list:
    """One member's logits from its `lockstep_hidden` states, per stream (numpy): lm_head is every member's."""
    xs = list(hidden)
    run_streams(member, xs, "lm_head", model, model.lm_head, swapped)
    return [x.numpy() for x in xs]
