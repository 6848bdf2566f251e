"""fold: check that each variant's kept FFN neurons fold exactly into a smaller dense decoder, one at a time.

Exactness: folded logits == masked full-model logits (fp32, max abs diff <= 1e-5 in units of
max(1, max |logits|)) on the variant's own calibration prompts. The masked references of all variants come from one
batched forward pass of the full model (each prompt row with its variant's mask); then each folded model is built
(an index_select of the FFN over the mapped weights), run, compared and dropped: a variant stays its kept indices
until a target writes it. The difference is only in the order the same fp32 products are summed, so it grows with
the logits' magnitude (hence the relative unit: 1e-5 absolute is below fp32 resolution for logits of 20).
When the run stops here (`--until fold`), each variant is written as a Hugging Face checkpoint under
`variants/<name>/`, streamed tensor by tensor in the source's dtype, so `transformers` and `optimum-cli` load it.
Always written: `variants.safetensors`, each variant's kept neuron indices ([L, k] int32, ascending), from
which any tool can rebuild or check a variant.
"""

from __future__ import annotations

import torch

from ifp_export.checkpoint import Checkpoint
from ifp_export.fold import (
    fold_decoder,
    masked_logits,
    relative_difference,
    write_kept_indices,
    write_variant_checkpoint,
)
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
        prompts = [[ckpt.tasks[i].prompt for i in v.prompt_indices[:CHECK_PROMPTS]] for v in variants]
        sizes = [len(p) for p in prompts]
        ids, attention = left_pad([ckpt.tokenizer.encode(p).ids for group in prompts for p in group])
        with ckpt.weights.streaming(ckpt.backbone):
            references = masked_logits(ckpt.backbone, [v.mask for v in variants], sizes, ids, attention)
        ckpt.weights.release()
        rows = zip(variants, ids.split(sizes), attention.split(sizes), references, strict=True)
        with ctx.progress("fold: variants checked" + (" and written" if save else ""), len(variants)) as advance:
            for variant, variant_ids, variant_attention, reference in rows:
                folded = fold_decoder(ckpt.backbone, variant.kept, ckpt.weights.release_tensors)
                with ckpt.weights.streaming(folded), torch.no_grad():
                    variant.fold_error = relative_difference(folded(variant_ids, variant_attention)[0], reference)
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
