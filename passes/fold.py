"""fold: slice each variant's kept FFN neurons into a smaller dense decoder, and prove it exact.

Exactness: folded logits == masked full-model logits (fp32, max abs diff <= 1e-5 in units of
max(1, max |logits|)) on the variant's own calibration prompts. When the run stops here (`--until fold`), each
folded variant is also saved as a Hugging Face checkpoint under `variants/<name>/` so `transformers` and
`optimum-cli` load it directly.
Always written: `variants.safetensors`, each variant's kept neuron indices ([L, k] int32, ascending), from
which any tool can rebuild or check a variant.
"""

from __future__ import annotations

from ifp_export.checkpoint import Checkpoint
from ifp_export.fold import fold_decoder, fold_error, kept_indices, write_kept_indices
from ifp_export.generate import left_pad
from ifp_export.model.hf_io import save_decoder
from ifp_export.pipeline import ExportContext

FOLD_TOLERANCE = 1e-5
KEPT_INDICES_FILE = "variants.safetensors"
CHECK_PROMPTS = 4


class FoldPass:
    name = "fold"

    def run(self, ctx: ExportContext) -> ExportContext:
        ckpt: Checkpoint = ctx.require("checkpoint", self.name)
        variants = ctx.require("variants", self.name)
        for variant in variants:
            folded = fold_decoder(ckpt.backbone, kept_indices(variant.mask))
            prompts = [ckpt.tasks[i].prompt for i in variant.prompt_indices[:CHECK_PROMPTS]]
            ids, _ = left_pad([ckpt.tokenizer.encode(p).ids for p in prompts])
            variant.fold_error = fold_error(ckpt.backbone, folded, variant.mask, ids)
            if variant.fold_error > FOLD_TOLERANCE:
                raise RuntimeError(
                    f"folded variant {variant.name!r} differs from the masked model by {variant.fold_error:.2e}"
                )
            ctx.folded[variant.name] = folded
            if ctx.options.until == self.name:
                save_decoder(folded, ctx.workdir / "variants" / variant.name)
        write_kept_indices(
            ctx.workdir / KEPT_INDICES_FILE,
            {v.name: kept_indices(v.mask) for v in variants},
            {v.name: v.task for v in variants},
        )
        worst = max(v.fold_error for v in variants)
        ctx.console.log(
            f"folded {len(variants)} variants; max |folded - masked| logits / max(1, max|logits|) {worst:.2e}"
        )
        return ctx
