"""group: turn per-prompt masks into a few static variants (one per task, or N unlabeled clusters).

Each variant keeps, per layer, the k neurons its prompts vote for most (`aggregate_topk`). Recorded per
variant: coverage (mean IoU of its prompts' own masks with the variant mask) and routing accuracy (held-out
prompts of its task routed to it by `routing_scores`, the rule the predictor graph folds in).
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from ifp_export.masks import aggregate_topk, mask_iou, routing_scores
from ifp_export.pipeline import ExportContext, Predictions, Variant
from ifp_export.quality import detect_massive_neurons, forced_mask

# Stems of the files, directories and Core ML functions the tool writes itself (targets' decoder/predictor/dense/
# dynamic/shared-data files, the HF and GenAI configs beside them, the output's top-level files, coremltools'
# default function). tests/test_variant_names.py checks every stem an export writes is listed here.
RESERVED_NAMES = frozenset(
    {
        "config",
        "coreml",
        "decoder",
        "decoder_shared",
        "dense",
        "dynamic",
        "genai_config",
        "generation_config",
        "main",
        "manifest",
        "mask_overlap",
        "onnx",
        "predictor",
        "report",
        "special_tokens_map",
        "tokenizer",
        "tokenizer_config",
        "variants",
    }
)


def variant_name(task: str, taken: set[str]) -> str:
    """A file- and function-name-safe name for a task ([a-z0-9_], unique, never a reserved name).

    Deterministic renames: a leading digit gets `t_`, a reserved name gets `task_` (`dense` -> `task_dense`), and a
    name already taken (two tasks equal after sanitizing) gets `_2`, `_3`, ... in file order.
    """
    base = re.sub(r"[^a-z0-9_]+", "_", task.lower()).strip("_") or "task"
    if base[0].isdigit():
        base = f"t_{base}"
    if base in RESERVED_NAMES:
        base = f"task_{base}"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


def cluster_prompts(masks: torch.Tensor, n: int, seed: int, iterations: int = 50) -> list[int]:
    """Deterministic k-means (k-means++ seeding) of flattened 0/1 masks [N, L, d] into n clusters."""
    points = masks.flatten(1).double()
    gen = torch.Generator().manual_seed(seed)
    centers = [points[int(torch.randint(len(points), (1,), generator=gen))]]
    for _ in range(1, n):
        dist = torch.cdist(points, torch.stack(centers)).amin(1).pow(2)
        if float(dist.sum()) == 0:
            pick = int(torch.randint(len(points), (1,), generator=gen))
        else:
            pick = int(torch.multinomial(dist / dist.sum(), 1, generator=gen))
        centers.append(points[pick])
    center = torch.stack(centers)
    assign = torch.cdist(points, center).argmin(1)
    for _ in range(iterations):
        for c in range(n):
            members = points[assign == c]
            if len(members):
                center[c] = members.mean(0)
        new = torch.cdist(points, center).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    # Number clusters by their first prompt so names do not depend on seeding order.
    order = {int(c): i for i, c in enumerate(dict.fromkeys(assign.tolist()))}
    return [order[int(c)] for c in assign]


def routing_accuracy(variants: list[Variant], heldout: Predictions) -> list[float | None]:
    """Per variant: the fraction of held-out prompts of its task that route to it (None if it has none)."""
    routed = routing_scores(heldout.scores, torch.stack([v.mask for v in variants])).argmax(-1).tolist()
    out: list[float | None] = []
    for index, variant in enumerate(variants):
        mine = [i for i, task in enumerate(heldout.tasks) if task == variant.task]
        out.append(sum(routed[i] == index for i in mine) / len(mine) if mine else None)
    return out


class GroupPass:
    name = "group"

    def run(self, ctx: ExportContext) -> ExportContext:
        preds: Predictions = ctx.require("predictions", self.name)
        k = ctx.k_per_layer
        if ctx.options.variants is None:
            groups = {task: [i for i, t in enumerate(preds.tasks) if t == task] for task in dict.fromkeys(preds.tasks)}
        else:
            n = ctx.options.variants  # at most the number of prompts (checked by the load pass)
            labels = cluster_prompts(preds.masks, n, ctx.options.seed)
            groups = {f"cluster_{c}": [i for i, lab in enumerate(labels) if lab == c] for c in range(n)}
        forced = self.massive_neurons_forced(ctx) if ctx.options.keep_massive_neurons else None
        variants, taken = [], set()
        for label, indices in groups.items():
            if not indices:
                continue
            name = variant_name(label, taken)
            taken.add(name)
            mask = aggregate_topk(preds.scores[indices], k, forced)
            majority = Counter(preds.tasks[i] for i in indices).most_common(1)[0][0]
            coverage = float(mask_iou(preds.masks[indices], mask).mean())
            variants.append(Variant(name, majority, mask, indices, coverage))
        if ctx.heldout is not None:
            for variant, accuracy in zip(variants, routing_accuracy(variants, ctx.heldout), strict=True):
                variant.routing_accuracy = accuracy
        ctx.variants = variants
        ctx.console.log(f"grouped {len(preds.prompts)} prompts into {len(variants)} variants")
        if ctx.options.variants is not None:
            record_variant_count(ctx, ctx.options.variants, len(variants))
        return ctx

    def massive_neurons_forced(self, ctx: ExportContext) -> torch.Tensor:
        """[L, d_ff] 0/1: the dense model's massive-activation neurons, detected on the calibration prompts, which
        every variant keeps with --keep-massive-neurons (in place of its lowest-ranked others: k is unchanged)."""
        ckpt = ctx.checkpoint
        neurons = detect_massive_neurons(
            ckpt.backbone, ckpt.weights, ckpt.tokenizer, ctx.predictions.prompts, ctx.options.batch_size
        )
        ctx.massive_neurons = neurons
        counts = Counter(n.layer for n in neurons)
        crowded = [layer for layer, count in counts.items() if count > ctx.k_per_layer[layer]]
        if crowded:
            ctx.console.log(
                f"[yellow]warning:[/yellow] layers {crowded} have more massive-activation neurons than k; "
                "each variant keeps the first k of them"
            )
        ctx.console.log(f"--keep-massive-neurons: every variant keeps {len(neurons)} massive-activation neurons")
        return forced_mask(neurons, tuple(ctx.predictions.scores.shape[1:]))


def record_variant_count(ctx: ExportContext, requested: int, made: int) -> None:
    """`--variants N` makes fewer than N variants when prompts' masks coincide (empty clusters): say so in the
    report (JSON summary, report.json) and on the console, never silently."""
    ctx.report["variants_requested"], ctx.report["variants_made"] = requested, made
    if made < requested:
        warning = (
            f"--variants {requested} made only {made} variants: the calibration prompts' masks fall into {made} "
            "distinct groups (identical masks cannot be split)"
        )
        ctx.report.setdefault("warnings", []).append(warning)
        ctx.console.print(f"warning: {warning}")
