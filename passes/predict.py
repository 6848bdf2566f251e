"""predict: score every calibration (and held-out) prompt with the predictor; keep scores and hard top-k masks."""

from __future__ import annotations

import torch
from rich.progress import Progress

from ifp_export.checkpoint import Checkpoint, TaskPrompt
from ifp_export.masks import predict_scores
from ifp_export.model.softtopk import hard_topk_mask
from ifp_export.pipeline import ExportContext, Predictions


class PredictPass:
    name = "predict"

    def run(self, ctx: ExportContext) -> ExportContext:
        ckpt: Checkpoint = ctx.require("checkpoint", self.name)
        heldout = ctx.heldout_prompts  # read and checked by the load pass
        with Progress(console=ctx.console, transient=True) as progress:
            ctx.predictions = self.score(ctx, ckpt, ckpt.tasks, progress, "calibration")
            if heldout:
                ctx.heldout = self.score(ctx, ckpt, heldout, progress, "held-out")
        for label, preds in (("calibration", ctx.predictions), ("held-out", ctx.heldout)):
            if preds is not None and preds.truncated:
                ctx.console.log(
                    f"[yellow]warning:[/yellow] {preds.truncated} {label} prompts are longer than the predictor's "
                    f"context ({ckpt.predictor.config.max_length} tokens) and were truncated"
                )
        return ctx

    def score(
        self, ctx: ExportContext, ckpt: Checkpoint, prompts: list[TaskPrompt], progress: Progress, label: str
    ) -> Predictions:
        bar = progress.add_task(f"predicting {label} prompts", total=len(prompts))
        scores, truncated = predict_scores(
            ckpt.predictor,
            ckpt.tokenizer,
            [p.prompt for p in prompts],
            ctx.options.batch_size,
            on_batch=lambda done, _: progress.advance(bar, done),
        )
        masks = hard_topk_mask(scores, torch.as_tensor(ctx.k_per_layer))
        return Predictions(prompts, scores, masks, truncated)
