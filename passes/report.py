"""report: the variants as a rich table, a machine JSON (report.json) and a mask-overlap heatmap PNG; with
held-out answers (the bundled sample), exact-match accuracy of each variant vs dense vs one static mask."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from ifp_export.fsutil import write_json
from ifp_export.masks import aggregate_topk, mask_iou, routing_scores
from ifp_export.pipeline import ExportContext, Variant
from ifp_export.samples.evaluate import exact_match

REPORT_FILE, HEATMAP_FILE = "report.json", "mask_overlap.png"


def variant_rows(ctx: ExportContext) -> list[dict[str, Any]]:
    d_ff = ctx.checkpoint.backbone.config.intermediate_size
    return [
        {
            "name": v.name,
            "task": v.task,
            "k": ctx.k_per_layer[0],
            "keep_ratio": ctx.k_per_layer[0] / d_ff,
            "prompts": len(v.prompt_indices),
            "coverage": round(v.coverage, 6),
            "routing_accuracy": None if v.routing_accuracy is None else round(v.routing_accuracy, 6),
            "fold_max_abs_diff": v.fold_error,
            **variant_quality(v),
        }
        for v in ctx.variants
    ]


def variant_quality(variant: Variant) -> dict[str, Any]:
    """The quality pass's figures of a variant (ifp_export/quality.py), as report.json and the manifest carry them:
    per prompt set its top-1 agreement and NLL difference with dense, the massive-activation neurons it drops and,
    if it drops some, its figures with them kept."""
    fields: dict[str, Any] = {
        "quality": variant.quality,
        "massive_neurons_dropped": [{"layer": n.layer, "neuron": n.neuron} for n in variant.massive_dropped],
    }
    if variant.quality_with_massive_kept is not None:
        fields["quality_with_massive_neurons_kept"] = variant.quality_with_massive_kept
    return fields


def overlap(variants: list[Variant]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean IoU [V, V] between variant masks, and per-layer IoU [V*(V-1)/2, L] for each pair."""
    masks = torch.stack([v.mask for v in variants])  # [V, L, d]
    per_layer = mask_iou(masks[:, None], masks[None])  # [V, V, L]
    pairs = list(combinations(range(len(variants)), 2))
    pair_layers = torch.stack([per_layer[i, j] for i, j in pairs]) if pairs else torch.zeros(0, masks.shape[1])
    return per_layer.mean(-1), pair_layers


def write_heatmap(path: Path, variants: list[Variant], mean_iou: torch.Tensor, pair_layers: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v.name for v in variants]
    pairs = [f"{a.name}/{b.name}" for a, b in combinations(variants, 2)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1, 1.4]}, layout="constrained")
    image = axes[0].imshow(mean_iou.numpy(), vmin=0, vmax=1, cmap="viridis")
    axes[0].set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes[0].set_yticks(range(len(names)), names)
    axes[0].set_title("variant mask IoU (mean over layers)")
    for i in range(len(names)):
        for j in range(len(names)):
            axes[0].text(j, i, f"{float(mean_iou[i, j]):.2f}", ha="center", va="center", color="w", fontsize=8)
    if pairs:
        axes[1].imshow(pair_layers.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        axes[1].set_yticks(range(len(pairs)), pairs, fontsize=7)
        axes[1].set_xticks(range(pair_layers.shape[1]))
        axes[1].set_xlabel("layer")
    axes[1].set_title("IoU per layer, per variant pair")
    fig.colorbar(image, ax=axes, shrink=0.8)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


class ReportPass:
    name = "report"

    def run(self, ctx: ExportContext) -> ExportContext:
        variants = ctx.require("variants", self.name)
        mean_iou, pair_layers = overlap(variants)
        preds = ctx.predictions
        ctx.report.update(
            {
                "checkpoint": ctx.checkpoint.root.name,
                "k_per_layer": ctx.k_per_layer,
                "calibration_prompts": len(preds.prompts),
                "heldout_prompts": 0 if ctx.heldout is None else len(ctx.heldout.prompts),
                "truncated_prompts": preds.truncated + (0 if ctx.heldout is None else ctx.heldout.truncated),
                "variants": variant_rows(ctx),
                "variant_iou": {
                    "names": [v.name for v in variants],
                    "mean": [[round(float(x), 6) for x in row] for row in mean_iou],
                },
            }
        )
        accuracy = heldout_accuracy(ctx)
        if accuracy is not None:
            ctx.report["heldout_accuracy"] = accuracy
        write_json(ctx.workdir / REPORT_FILE, ctx.report)
        write_heatmap(ctx.workdir / HEATMAP_FILE, variants, mean_iou, pair_layers)
        ctx.console.print(variants_table(ctx.report))
        for warning in ctx.report.get("warnings", []):
            ctx.console.print(f"warning: {warning}")
        if "quality" in ctx.report:
            ctx.console.print(quality_table(ctx.report))
        if accuracy is not None:
            ctx.console.print(accuracy_table(accuracy))
        return ctx


def heldout_accuracy(ctx: ExportContext) -> dict[str, dict[str, float]] | None:
    """Exact match per task on held-out prompts that carry an "answer": each variant on its task, the routed
    variant, the dense model and one static mask for all (samples/evaluate.py's logic); None without answers.
    """
    heldout = ctx.heldout
    if heldout is None or not all("answer" in p.extra for p in heldout.prompts):
        return None
    ckpt, variants = ctx.checkpoint, ctx.variants
    masks = torch.stack([v.mask for v in variants])
    routed = routing_scores(heldout.scores, masks).argmax(-1)
    static = aggregate_topk(ctx.predictions.scores, ctx.k_per_layer)
    accuracy = {
        "dense": exact_match(ckpt, heldout.prompts, None),
        "routed variant": exact_match(ckpt, heldout.prompts, masks[routed]),
        "static mask": exact_match(ckpt, heldout.prompts, static),
        "own variant": {},
    }
    for variant in variants:
        mine = [p for p in heldout.prompts if p.task == variant.task]
        if mine:
            accuracy["own variant"][variant.task] = exact_match(ckpt, mine, variant.mask)[variant.task]
    return {setting: {task: round(acc, 4) for task, acc in by_task.items()} for setting, by_task in accuracy.items()}


def accuracy_table(accuracy: dict[str, dict[str, float]]) -> Table:
    tasks = list(accuracy["dense"])
    table = Table(title="held-out exact match per task")
    table.add_column("setting")
    for task in [*tasks, "mean"]:
        table.add_column(task, justify="right")
    for setting, by_task in accuracy.items():
        cells = [f"{by_task[t]:.0%}" if t in by_task else "-" for t in tasks]
        mean = sum(by_task.values()) / len(by_task) if by_task else 0.0
        table.add_row(setting, *cells, f"{mean:.1%}")
    return table


def variants_table(report: dict[str, Any]) -> Table:
    table = Table(title="variants")
    for column in ("variant", "task", "keep", "prompts", "coverage", "routing acc.", "fold diff"):
        table.add_column(column, justify="left" if column in ("variant", "task") else "right")
    for row in report["variants"]:
        routing = "n/a" if row["routing_accuracy"] is None else f"{row['routing_accuracy']:.1%}"
        fold = "-" if row["fold_max_abs_diff"] is None else f"{row['fold_max_abs_diff']:.1e}"
        table.add_row(
            row["name"],
            row["task"],
            f"{row['keep_ratio']:.0%}",
            str(row["prompts"]),
            f"{row['coverage']:.3f}",
            routing,
            fold,
        )
    return table


QUALITY_SETS = {"calibration": "", "heldout": "held-out "}


def quality_cells(figures: dict[str, Any] | None) -> list[str]:
    if figures is None:
        return ["n/a", "n/a", "n/a"]
    return [f"{figures['top1_agreement']:.1%}", f"{figures['nll_diff']:+.3f}", f"{figures['nll']:.3f}"]


def quality_table(report: dict[str, Any]) -> Table:
    """Each variant, the routed setting and dense against dense: teacher-forced top-1 agreement, NLL difference and
    NLL per prompt set (the quality pass's figures), and the massive-activation neurons a variant drops."""
    quality = report["quality"]
    sets = [name for name in QUALITY_SETS if name in quality["dense"]]
    table = Table(title="variants vs dense, teacher-forced on their prompts")
    table.add_column("model")
    for name in sets:
        for column in ("agree", "ΔNLL", "NLL"):
            table.add_column(QUALITY_SETS[name] + column, justify="right")
    table.add_column("massive neurons dropped")
    for row in report["variants"]:
        dropped = ", ".join(f"{n['layer']}:{n['neuron']}" for n in row["massive_neurons_dropped"])
        cells = [c for name in sets for c in quality_cells(row["quality"].get(name))]
        table.add_row(row["name"], *cells, f"[red]{dropped}[/red]" if dropped else "-")
    table.add_row("routed", *(c for name in sets for c in quality_cells(quality["routed"][name])), "")
    dense = [quality["dense"][name] for name in sets]
    table.add_row("dense", *(c for d in dense for c in ("100.0%", "+0.000", "n/a" if d is None else f"{d['nll']:.3f}")))
    return table
