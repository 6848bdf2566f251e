"""load: read and validate every input (checkpoint, held-out prompts, options that depend on them) before any
other pass runs or logs, so bad input is one error line; safetensors mmap, never unpickled; settle k."""

from __future__ import annotations

from ifp_export.checkpoint import TASKS_FILE, keep_to_k, load_checkpoint, read_tasks
from ifp_export.errors import IFPError
from ifp_export.pipeline import ExportContext


class LoadPass:
    name = "load"

    def run(self, ctx: ExportContext) -> ExportContext:
        ckpt = load_checkpoint(ctx.options.checkpoint)
        ctx.checkpoint = ckpt
        ctx.k_per_layer = ckpt.k_per_layer
        cfg = ckpt.backbone.config
        if ctx.options.keep is not None:
            ctx.k_per_layer = [keep_to_k(ctx.options.keep, cfg.intermediate_size)] * cfg.num_hidden_layers
        if len(set(ctx.k_per_layer)) != 1 and ctx.options.until not in ("load", "predict", "group"):
            raise IFPError(
                f"folding needs the same k in every layer, the checkpoint has {sorted(set(ctx.k_per_layer))}",
                ckpt.root / "ifp.json",
                "pass --keep to use one keep ratio for all layers",
            )
        if ctx.options.variants is not None and ctx.options.variants > len(ckpt.tasks):
            raise IFPError(
                f"--variants {ctx.options.variants} exceeds the {len(ckpt.tasks)} calibration prompts",
                ckpt.root / TASKS_FILE,
                "ask for fewer variants or add prompts",
            )
        if ctx.options.heldout:
            ctx.heldout_prompts = read_tasks(ctx.options.heldout)
            unknown = sorted({p.task for p in ctx.heldout_prompts} - {p.task for p in ckpt.tasks})
            if unknown:
                raise IFPError(
                    f"held-out task {unknown[0]!r} has no calibration prompts",
                    ctx.options.heldout,
                    "use task names that appear in the checkpoint's tasks.jsonl",
                )
        ctx.console.log(
            f"loaded {ckpt.root}: {cfg.model_type}, {cfg.num_hidden_layers} layers, d_ff {cfg.intermediate_size}, "
            f"k {sorted(set(ctx.k_per_layer))}, {len(ckpt.tasks)} calibration prompts"
        )
        return ctx
