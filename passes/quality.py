"""quality: how close each variant stays to the dense model, and whether it drops a massive-activation neuron.

One streamed, batched forward pass of the full model (per-row FFN masks, each masked row at its kept width) over the
calibration prompts, and the held-out prompts if given: each prompt once dense, once with its own variant's mask,
and once with the variant routing picks for it when that is another one. Figures (ifp_export/quality.py): per variant
on its own prompts, per set; the routed setting over all prompts; dense's own NLL. The dense calibration rows are
also where massive activations are detected (unless the group pass already did, for `--keep-massive-neurons`), and
every row records its residual stream's peak: each variant's and dense's largest, which the Core ML validation
reports as that function's headroom to fp16.

A variant that drops massive-activation neurons is run once more with them forced in (what `--keep-massive-neurons`
would export), so the warning says what dropping them costs.
"""

from __future__ import annotations

from typing import Any

import torch

from ifp_export.checkpoint import Checkpoint
from ifp_export.masks import aggregate_topk, routing_scores
from ifp_export.pipeline import ExportContext, Predictions, Variant
from ifp_export.quality import (
    MASSIVE_RULE,
    PROMPTS_PER_GROUP,
    MassiveNeuron,
    MassiveProbe,
    Row,
    TokenStats,
    detection_prompts,
    dropped_neurons,
    encode,
    figures,
    forced_mask,
    teacher_forced,
)

CALIBRATION, HELDOUT = "calibration", "heldout"
Key = tuple[str, int, int | None]  # (set, prompt index, variant index or None for dense)


def own_prompts(variants: list[Variant], name: str, preds: Predictions) -> list[list[int]]:
    """Per variant, the prompts of a set it is judged on: the first `PROMPTS_PER_GROUP` of its calibration prompts,
    or of the held-out prompts of its task."""
    if name == CALIBRATION:
        return [v.prompt_indices[:PROMPTS_PER_GROUP] for v in variants]
    return [[i for i, task in enumerate(preds.tasks) if task == v.task][:PROMPTS_PER_GROUP] for v in variants]


def run_rows(
    ctx: ExportContext, rows: dict[Key, torch.Tensor | None], ids: dict[str, list[list[int]]], probe: MassiveProbe
) -> dict[Key, TokenStats]:
    """TokenStats per (set, prompt, variant) row, from one forward pass (batches of --batch-size rows); the dense
    calibration rows feed `probe` while no massive neurons are known."""
    ckpt = ctx.checkpoint
    keys = list(rows)
    probed = set(detection_prompts(ctx.predictions.tasks)) if ctx.massive_neurons is None else set()
    batch = [Row(ids[s][i], rows[(s, i, v)], probe=s == CALIBRATION and v is None and i in probed) for s, i, v in keys]
    with probe.attached():
        stats = teacher_forced(ckpt.backbone, ckpt.weights, batch, ctx.options.batch_size, probe)
    return dict(zip(keys, stats, strict=True))


def judged(
    stats: dict[Key, TokenStats], name: str, prompts: list[int], variant: int | list[int]
) -> dict[str, Any] | None:
    """Figures of a set's `prompts` run with `variant` (one index, or one per prompt) against dense."""
    chosen = [variant] * len(prompts) if isinstance(variant, int) else variant
    return figures(
        [stats[(name, i, v)] for i, v in zip(prompts, chosen, strict=True)], [stats[(name, i, None)] for i in prompts]
    )


def dropped_text(neurons: list[MassiveNeuron]) -> str:
    return ", ".join(f"layer {n.layer} neuron {n.neuron}" for n in neurons)


def warning_text(variant: Variant) -> str:
    now, kept = variant.quality[CALIBRATION], (variant.quality_with_massive_kept or {}).get(CALIBRATION)
    text = f"variant {variant.name!r} drops massive-activation neurons ({dropped_text(variant.massive_dropped)})"
    if now is not None and kept is not None:
        text += (
            f": top-1 agreement with dense {now['top1_agreement']:.1%} (with them kept {kept['top1_agreement']:.1%}), "
            f"NLL difference {now['nll_diff']:+.3f} ({kept['nll_diff']:+.3f})"
        )
    return text + "; export with --keep-massive-neurons to keep them in every variant"


def plan_rows(
    sets: dict[str, Predictions],
    own: dict[str, list[list[int]]],
    routed: dict[str, list[int]],
    judged_prompts: dict[str, list[int]],
    masks: torch.Tensor,
) -> dict[Key, torch.Tensor | None]:
    """Every row the figures need, once: dense rows of the detection and judged prompts, each judged prompt with its
    own variant(s) and with its routed one."""
    rows: dict[Key, torch.Tensor | None] = {
        (CALIBRATION, i, None): None for i in detection_prompts(sets[CALIBRATION].tasks)
    }
    for name in sets:
        rows.update({(name, i, None): None for i in judged_prompts[name]})
        for v, prompts in enumerate(own[name]):
            rows.update({(name, i, v): masks[v] for i in prompts})
        rows.update({(name, i, routed[name][i]): masks[routed[name][i]] for i in judged_prompts[name]})
    return rows


def warn(ctx: ExportContext, variants: list[Variant]) -> None:
    """The massive-activation neurons and the rule in the report; one warning per variant dropping some, on stderr
    and in the report's `warnings` (which the JSON summary carries)."""
    ctx.report["massive_activations"] = {
        "rule": MASSIVE_RULE,
        "neurons": [n.as_dict() for n in ctx.massive_neurons],
        "kept_by_option": ctx.options.keep_massive_neurons,
    }
    warnings = [warning_text(v) for v in variants if v.massive_dropped]
    if warnings:
        ctx.report["warnings"] = [*ctx.report.get("warnings", []), *warnings]
    for text in warnings:
        ctx.console.log(f"[yellow]warning:[/yellow] {text}")


class QualityPass:
    name = "quality"

    def run(self, ctx: ExportContext) -> ExportContext:
        ckpt: Checkpoint = ctx.require("checkpoint", self.name)
        variants: list[Variant] = ctx.require("variants", self.name)
        sets = {CALIBRATION: ctx.require("predictions", self.name)}
        if ctx.heldout is not None:
            sets[HELDOUT] = ctx.heldout
        context = ckpt.backbone.config.max_position_embeddings
        ids = {name: encode(ckpt.tokenizer, [p.prompt for p in preds.prompts], context) for name, preds in sets.items()}
        masks = torch.stack([v.mask for v in variants])
        routed = {name: routing_scores(preds.scores, masks).argmax(-1).tolist() for name, preds in sets.items()}
        own = {name: own_prompts(variants, name, preds) for name, preds in sets.items()}
        judged_prompts = {name: sorted({i for prompts in own[name] for i in prompts}) for name in sets}
        rows = plan_rows(sets, own, routed, judged_prompts, masks)
        probe = MassiveProbe(ckpt.backbone)
        stats = run_rows(ctx, rows, ids, probe)
        if ctx.massive_neurons is None:
            ctx.massive_neurons = probe.neurons
        for v, variant in enumerate(variants):
            variant.quality = {name: judged(stats, name, own[name][v], v) for name in sets}
            variant.massive_dropped = dropped_neurons(variant.mask, ctx.massive_neurons)
            variant.residual_peak = residual_peak(stats, v)
        ctx.dense_residual_peak = residual_peak(stats, None)
        self.judge_with_massive_kept(ctx, variants, sets, own, ids, stats)
        ctx.report["quality"] = {
            "prompts_per_variant": PROMPTS_PER_GROUP,
            "dense": {name: dense_figures(stats, name, judged_prompts[name]) for name in sets},
            "routed": {
                name: judged(stats, name, judged_prompts[name], [routed[name][i] for i in judged_prompts[name]])
                for name in sets
            },
        }
        warn(ctx, variants)
        ctx.console.log(
            f"quality: {len(rows)} teacher-forced rows, {len(ctx.massive_neurons)} massive-activation neurons, "
            f"{sum(bool(v.massive_dropped) for v in variants)} variants drop some"
        )
        return ctx

    def judge_with_massive_kept(
        self,
        ctx: ExportContext,
        variants: list[Variant],
        sets: dict[str, Predictions],
        own: dict[str, list[list[int]]],
        ids: dict[str, list[list[int]]],
        stats: dict[Key, TokenStats],
    ) -> None:
        """Figures of each variant that drops massive-activation neurons, re-grouped with them forced in."""
        flagged = [v for v, variant in enumerate(variants) if variant.massive_dropped]
        if not flagged:
            return
        preds = sets[CALIBRATION]
        forced = forced_mask(ctx.massive_neurons, tuple(variants[0].mask.shape))
        masks = {v: aggregate_topk(preds.scores[variants[v].prompt_indices], ctx.k_per_layer, forced) for v in flagged}
        rows = {(name, i, v): masks[v] for name in sets for v in flagged for i in own[name][v]}
        stats = {**stats, **run_rows(ctx, rows, ids, MassiveProbe(ctx.checkpoint.backbone))}  # dense rows: reused
        for v in flagged:
            variants[v].quality_with_massive_kept = {name: judged(stats, name, own[name][v], v) for name in sets}


def residual_peak(stats: dict[Key, TokenStats], variant: int | None) -> float | None:
    """The largest residual-stream |value| of the rows run with `variant` (None: dense), in any set: how close that
    Core ML function's fp16 activations come to fp16's 65504 (the Core ML validation reports it)."""
    return max((s.residual_peak for (_, _, v), s in stats.items() if v == variant), default=None)


def dense_figures(stats: dict[Key, TokenStats], name: str, prompts: list[int]) -> dict[str, Any] | None:
    dense = [stats[(name, i, None)] for i in prompts]
    result = figures(dense, dense)
    return None if result is None else {"tokens": result["tokens"], "nll": result["dense_nll"]}
