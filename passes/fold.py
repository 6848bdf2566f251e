"""fold: check that each variant's kept FFN neurons fold exactly into a smaller dense decoder, one at a time.

Exactness: folded logits == masked full-model logits (fp32, max abs diff <= 1e-5 in units of
max(1, max |logits|)) on the variant's own calibration prompts. Each folded reference is built (an index_select of
the FFN over the mapped weights), checked and dropped: a variant stays its kept indices until a target writes it.
When the run stops here (`--until fold`), each variant is written as a Hugging Face checkpoint under
`variants/<name>/`, streamed tensor by tensor in the source's dtype, so `transformers` and `optimum-cli` load it.
Always written: `variants.safetensors`, each variant's kept neuron indices ([L, k] int32, ascending), from
which any tool can rebuild or check a variant.
"""

from __future__ import annotations

from ifp_export.checkpoint import Checkpoint
from ifp_export.fold import fold_decoder, fold_error, write_kept_indices, write_variant_checkpoint
from ifp_export.generate import left_pad
from ifp_export.pipeline import ExportContext

FOLD_TOLERANCE = 1e-5
KEPT_INDICES_FILE = "variants.safetensors"
VARIANTS_DIR = "variants"
CHECK_PROMPTS = 4


class FoldPass:
    name = "fold"

    def run(self, ctx: ExportContext) -> ExportContext:
        ckpt: Checkpoint = ctx.require("checkpoint", self.name)
        variants = ctx.require("variants", self.name)
        save = ctx.options.until == self.name
        with ctx.progress("fold: variants checked" + (" and written" if save else ""), len(variants)) as advance:
            for variant in variants:
                folded = fold_decoder(ckpt.backbone, variant.kept, ckpt.weights.release_tensors)
                prompts = [ckpt.tasks[i].prompt for i in variant.prompt_indices[:CHECK_PROMPTS]]
                ids, _ = left_pad([ckpt.tokenizer.encode(p).ids for p in prompts])
                with ckpt.weights.streaming(ckpt.backbone, folded):
                    variant.fold_error = fold_error(ckpt.backbone, folded, variant.mask, ids)
                del folded
                if variant.fold_error > FOLD_TOLERANCE:
                    raise RuntimeError(
                        f"folded variant {variant.name!r} differs from the masked model by {variant.fold_error:.2e}"
                    )
                if save:
                    write_variant_checkpoint(ckpt.weights, variant.kept, ctx.workdir / VARIANTS_DIR / variant.name)
                ckpt.weights.release()
                advance(1)
        write_kept_indices(
            ctx.workdir / KEPT_INDICES_FILE, {v.name: v.kept for v in variants}, {v.name: v.task for v in variants}
        )
        worst = max(v.fold_error for v in variants)
        ctx.console.log(
            f"folded {len(variants)} variants; max |folded - masked| logits / max(1, max|logits|) {worst:.2e}"
        )
        return ctx
