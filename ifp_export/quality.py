"""How good a pruned variant is, measured without training code, and which FFN neurons it must not drop.

Teacher-forced figures: the full model runs over prompts with a per-row FFN mask (`None` = dense; a masked row's FFN
runs at its kept width), in batches of rows, each batch one streamed forward pass. Per prompt and model, at every
position but the last: the top-1 token and the NLL of the prompt's own next token. A variant's figures against dense are
the share of positions where its top-1 equals dense's (top-1 agreement) and its mean NLL minus dense's (NLL difference),
over the same tokens.

Massive activations (Sun et al., "Massive Activations in Large Language Models", 2024): trained LMs carry a few
residual-stream entries, usually at the first position, thousands of times larger than the rest, written by a
handful of FFN neurons; a mask dropping those neurons breaks the model. Found on the dense rows of the same forward
pass by `MASSIVE_RULE`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from ifp_export.masks import encode_prompts
from ifp_export.model.decoder import CausalLM, RMSNorm, cast, reused_casts
from ifp_export.weights import WeightSource

if TYPE_CHECKING:
    from ifp_export.checkpoint import TaskPrompt

PROMPTS_PER_GROUP = 32  # prompts a variant is judged on per set (and per task for detection): its first ones
MASSIVE_ABSOLUTE = 100.0  # |h| above this ...
MASSIVE_RELATIVE = 1000.0  # ... and above this many times the median |h| of the layer's output: a massive activation
MASSIVE_SHARE = 0.1  # a neuron writing at least this share of a massive activation (in its direction) is "massive"
MASSIVE_RULE = (
    f"a residual-stream entry h (a layer's output, dense model, calibration prompts) is massive if |h| > "
    f"{MASSIVE_ABSOLUTE:g} and |h| > {MASSIVE_RELATIVE:g} x the median |h| of that layer's output; an FFN neuron j "
    f"of that layer is a massive-activation neuron if its contribution act_j * down_proj[d, j] to such an entry, "
    f"in the entry's direction, is at least {MASSIVE_SHARE:.0%} of |h|"
)


@dataclass(frozen=True)
class MassiveNeuron:
    """One FFN neuron that writes a massive activation: its largest contribution seen and the activation it fed."""

    layer: int
    neuron: int
    dimension: int
    position: int
    contribution: float
    activation: float

    def as_dict(self) -> dict[str, float | int]:
        return {
            "layer": self.layer,
            "neuron": self.neuron,
            "dimension": self.dimension,
            "position": self.position,
            "contribution": round(self.contribution, 3),
            "activation": round(self.activation, 3),
        }


@dataclass(frozen=True)
class TokenStats:
    """One prompt under one model: top-1 token and NLL of the true next token at each position but the last, and
    the largest |value| its residual stream reached (every RMSNorm's input, fp32: the headroom a function's fp16
    activations on a Core ML device have to fp16's 65504)."""

    top1: torch.Tensor  # [n - 1] int64
    nll: torch.Tensor  # [n - 1] float64 (computed in float32)
    residual_peak: float


@dataclass(frozen=True)
class Row:
    """A prompt's token ids and the FFN mask [L, d_ff] to run them with (None: the dense model)."""

    ids: list[int]
    mask: torch.Tensor | None
    probe: bool = False  # look for massive activations in this row (dense rows only)


class MassiveProbe:
    """Hooks on a decoder's layers that find massive activations and the neurons writing them, batch by batch.

    `rows` marks the batch rows to inspect and `real` their non-padding positions; set both before each forward.
    Findings keep, per neuron, its largest contribution."""

    def __init__(self, model: CausalLM) -> None:
        self.model = model
        self.rows = torch.zeros(0, dtype=torch.bool)
        self.real = torch.zeros(0, 0, dtype=torch.bool)
        self.found: dict[tuple[int, int], MassiveNeuron] = {}
        self._act: torch.Tensor | None = None

    @contextmanager
    def attached(self) -> Iterator[MassiveProbe]:
        handles = []
        for index, layer in enumerate(self.model.model.layers):
            handles.append(layer.mlp.down_proj.register_forward_hook(self._keep_activations))
            handles.append(layer.register_forward_hook(self._inspector(index)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._act = None

    def _keep_activations(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self._act = args[0]

    def _inspector(self, index: int) -> Callable[..., None]:
        def inspect(module: torch.nn.Module, args: tuple, output: tuple[torch.Tensor, ...]) -> None:
            if bool(self.rows.any()):
                self.inspect_layer(index, module.mlp.down_proj.weight, output[0])

        return inspect

    def inspect_layer(self, layer: int, down_proj: torch.Tensor, hidden: torch.Tensor) -> None:
        """Record the neurons of `layer` writing a massive entry of its output `hidden` [B, T, H] (`MASSIVE_RULE`)."""
        rows = self.rows.nonzero().flatten()
        magnitude = hidden[rows].abs()
        real = self.real[rows]
        threshold = max(MASSIVE_ABSOLUTE, MASSIVE_RELATIVE * float(magnitude[real].median()))
        hits = ((magnitude > threshold) & real[..., None]).nonzero()
        if not len(hits):
            return
        batch_rows, positions, dims = rows[hits[:, 0]], hits[:, 1], hits[:, 2]
        values = hidden[batch_rows, positions, dims]
        acts = self._act[batch_rows, positions].float()  # [n, d_ff]
        contributions = acts * down_proj[dims].float() * values.sign()[:, None]  # in the entry's direction
        for hit, neuron in (contributions >= MASSIVE_SHARE * values.abs()[:, None]).nonzero().tolist():
            self.record(layer, neuron, int(dims[hit]), int(positions[hit]), contributions[hit, neuron], values[hit])

    def record(
        self, layer: int, neuron: int, dim: int, position: int, contribution: torch.Tensor, value: torch.Tensor
    ) -> None:
        found = MassiveNeuron(layer, neuron, dim, position, float(contribution), float(value))
        previous = self.found.get((layer, neuron))
        if previous is None or found.contribution > previous.contribution:
            self.found[(layer, neuron)] = found

    @property
    def neurons(self) -> list[MassiveNeuron]:
        return [self.found[key] for key in sorted(self.found)]


HEAD_POSITIONS = 512  # positions per lm_head matmul: a [512, V] fp32 block (256 MB at a 128k vocabulary)


def position_stats(
    hidden: torch.Tensor, ids: torch.Tensor, lengths: list[int], head: torch.Tensor, peaks: torch.Tensor
) -> list[TokenStats]:
    """TokenStats of each right-padded row of `hidden` [B, T, H] (ids [B, T], `lengths` real tokens per row, `peaks`
    [B] its residual peak): the positions that predict a next token of every row go through the lm_head `head`
    together, `HEAD_POSITIONS` at a time (one wide matmul instead of one per row; never [B, T, vocab] at once)."""
    scored = torch.zeros(ids.shape, dtype=torch.bool)
    for i, length in enumerate(lengths):
        scored[i, : length - 1] = True
    targets = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)[scored]  # the next token of each scored position
    top1, nll = [], []
    for block, target in zip(hidden[scored].split(HEAD_POSITIONS), targets.split(HEAD_POSITIONS), strict=True):
        logits = F.linear(block, head)
        top1.append(logits.argmax(-1))
        nll.append(torch.logsumexp(logits, -1) - logits.gather(-1, target[:, None]).squeeze(-1))
    counts = [max(length - 1, 0) for length in lengths]
    pieces = zip(torch.cat(top1).split(counts), torch.cat(nll).split(counts), peaks.tolist(), strict=True)
    return [TokenStats(t, n.double(), peak) for t, n, peak in pieces]


@contextmanager
def residual_peaks(model: CausalLM, peaks: torch.Tensor, real: torch.Tensor) -> Iterator[None]:
    """Within this block every RMSNorm of `model` raises `peaks` [B] to its input's largest |value| per row over the
    `real` [B, T] positions (padding excluded)."""

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        magnitude = args[0].detach().abs().masked_fill_(~real[..., None], 0.0)
        torch.maximum(peaks, magnitude.amax(dim=(1, 2)).to(peaks.dtype), out=peaks)

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, RMSNorm)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def teacher_forced(
    model: CausalLM, weights: WeightSource, rows: list[Row], batch_size: int, probe: MassiveProbe | None = None
) -> list[TokenStats]:
    """Per row, its TokenStats: `batch_size` rows per streamed forward pass of the full model, dense rows and masked
    rows in batches of their own: a masked row's FFN runs at its kept width (bool masks, `MLP.kept_width`), and the
    probe sees the dense rows' FFN activations. Rows are right-padded, so every real token sees exactly its unpadded
    positions, and batched by length, so little is padding."""
    by_length = lambda group: sorted(group, key=lambda i: len(rows[i].ids))  # noqa: E731
    dense = by_length(i for i, row in enumerate(rows) if row.mask is None)
    masked = by_length(i for i, row in enumerate(rows) if row.mask is not None)
    batches = [
        group[start : start + batch_size] for group in (dense, masked) for start in range(0, len(group), batch_size)
    ]
    stats: dict[int, TokenStats] = {}
    for positions in batches:
        batch = [rows[i] for i in positions]
        width = max(len(r.ids) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        attention = torch.zeros(len(batch), width, dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, : len(row.ids)] = torch.tensor(row.ids)
            attention[i, : len(row.ids)] = 1
        masks = None if batch[0].mask is None else torch.stack([r.mask for r in batch]).bool()
        if probe is not None:
            probe.rows = torch.tensor([r.probe for r in batch])
            probe.real = attention.bool()
        peaks = torch.zeros(len(batch))
        with weights.streaming(model), residual_peaks(model, peaks, attention.bool()):
            with reused_casts():  # its buffers go before lm_head's upcast
                hidden, _ = model.model(ids, attention, ffn_masks=masks)
            head = cast(model.lm_head.weight, hidden.dtype)  # upcast once per batch
            found = position_stats(hidden, ids, [len(r.ids) for r in batch], head, peaks)
            stats.update(zip(positions, found, strict=True))
            del head
        weights.release()
    return [stats[i] for i in range(len(rows))]


def encode(tokenizer: Tokenizer, prompts: list[str], max_length: int) -> list[list[int]]:
    """Each prompt's token ids, its first `max_length` (the model's context) at most."""
    ids, attention, _ = encode_prompts(tokenizer, prompts, max_length)
    return [row[: int(n)].tolist() for row, n in zip(ids, attention.sum(-1), strict=True)]


def figures(variant: list[TokenStats], dense: list[TokenStats]) -> dict[str, float | int] | None:
    """Top-1 agreement and NLL difference of `variant` against `dense` over the same prompts' tokens (None: no
    token to predict)."""
    tokens = sum(len(s.nll) for s in dense)
    if not tokens:
        return None
    agree = sum(int((v.top1 == d.top1).sum()) for v, d in zip(variant, dense, strict=True))
    nll = float(sum(float(s.nll.sum()) for s in variant)) / tokens
    dense_nll = float(sum(float(s.nll.sum()) for s in dense)) / tokens
    return {
        "tokens": tokens,
        "top1_agreement": round(agree / tokens, 6),
        "nll": round(nll, 6),
        "dense_nll": round(dense_nll, 6),
        "nll_diff": round(nll - dense_nll, 6),
    }


def dropped_neurons(mask: torch.Tensor, neurons: list[MassiveNeuron]) -> list[MassiveNeuron]:
    return [n for n in neurons if float(mask[n.layer, n.neuron]) == 0.0]


def forced_mask(neurons: list[MassiveNeuron], shape: tuple[int, int]) -> torch.Tensor:
    """[L, d_ff] 0/1: the massive-activation neurons, for `aggregate_topk(..., forced=)`."""
    mask = torch.zeros(shape)
    for n in neurons:
        mask[n.layer, n.neuron] = 1.0
    return mask


def detection_prompts(tasks: list[str]) -> list[int]:
    """The calibration prompts massive activations are looked for in: the first `PROMPTS_PER_GROUP` of each task."""
    seen: Counter[str] = Counter()
    chosen = []
    for index, task in enumerate(tasks):
        seen[task] += 1
        if seen[task] <= PROMPTS_PER_GROUP:
            chosen.append(index)
    return chosen


def detect_massive_neurons(
    model: CausalLM, weights: WeightSource, tokenizer: Tokenizer, prompts: list[TaskPrompt], batch_size: int
) -> list[MassiveNeuron]:
    """The dense model's massive-activation neurons on `detection_prompts`, from one forward pass (for the group
    pass; the quality pass finds the same in its own forward)."""
    chosen = detection_prompts([p.task for p in prompts])
    ids = encode(tokenizer, [prompts[i].prompt for i in chosen], model.config.max_position_embeddings)
    probe = MassiveProbe(model)
    with probe.attached():
        teacher_forced(model, weights, [Row(i, None, probe=True) for i in ids], batch_size, probe)
    return probe.neurons
