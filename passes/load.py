"""load: read and validate the IFPruning checkpoint (safetensors mmap, never unpickled); settle k."""

from __future__ import annotations

from ifp_export.checkpoint import keep_to_k, load_checkpoint
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
        ctx.console.log(
            f"loaded {ckpt.root}: {cfg.model_type}, {cfg.num_hidden_layers} layers, d_ff {cfg.intermediate_size}, "
            f"k {sorted(set(ctx.k_per_layer))}, {len(ckpt.tasks)} calibration prompts"
        )
        return ctx
