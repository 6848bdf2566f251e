"""fold: check that each variant's kept FFN neurons fold exactly into a smaller dense decoder, one at a time.

Exactness: the masked full model's fp32 logits on the variant's first calibration prompt == the folded model's, under
the bound of `ifp_export.bounds`: the folded model in float64 is the truth (in exact arithmetic the masked model
computes the same numbers: its dropped neurons add exact zeros), its own float32 run gives the noise the bound is a
multiple of, and the masked model (one batched fp32 forward pass of the full model, each prompt row with its
variant's mask: every weight read once for all variants) is what is checked, so a wrong fold (a neuron, an axis)
moves it far outside the bound. The float64 run is the k-wide folded model, in lockstep with its float32 run (every
weight read once), not the d_ff-wide masked one. All the folded models run together a layer at a time
(`ifp_export.bounds.lockstep_hidden`: each layer's FFN slices gathered as it runs, the mapped layer read once for all
variants), to their final hidden states; the lm_head, which every folded model shares, then runs once over all of
them (at 8B its float64 run per variant was a quarter of the pass), and each is compared: a variant stays its kept
indices until a target writes it. The
difference is only in the order the same fp32 products are summed (a k-wide matmul instead of a d_ff-wide one with
zeros), which on a trained model reaches ~1.6e-5 of the largest logit: of the order of the reference's own fp32
noise, not of a constant tuned on toys. A failed check is `ValidationFailed` (exit 3).
When the run stops here (`--until fold`), each variant is written as a Hugging Face checkpoint under
`variants/<name>/`, streamed tensor by tensor in the source's dtype, so `transformers` and `optimum-cli` load it.
Always written: `variants.safetensors`, each variant's kept neuron indices ([L, k] int32, ascending), from
which any tool can rebuild or check a variant.
"""

from __future__ import annotations

import numpy as np
import torch

from ifp_export.bounds import Member, compare, lockstep_hidden
from ifp_export.checkpoint import Checkpoint
from ifp_export.errors import ValidationFailed
from ifp_export.fold import masked_logits, write_kept_indices, write_variant_checkpoint
from ifp_export.generate import left_pad
from ifp_export.pipeline import ExportContext

KEPT_INDICES_FILE = "variants.safetensors"
VARIANTS_DIR = "variants"
# One calibration prompt per variant: every SwiGLU neuron is non-zero on any input, so a wrong neuron, axis or layer
# moves every position's logits; the masked batch is the pass's cost (at 3B, 4 prompts each took ~100 s of 128 s).
CHECK_PROMPTS = 1


class FoldPass:
    name = "fold"

    def run(self, ctx: ExportContext) -> ExportContext:
        ckpt: Checkpoint = ctx.require("checkpoint", self.name)
        variants = ctx.require("variants", self.name)
        save = ctx.options.until == self.name
        prompts = [[ckpt.tasks[i].prompt for i in v.prompt_indices[:CHECK_PROMPTS]] for v in variants]
        sizes = [len(p) for p in prompts]
        ids, attention = left_pad([ckpt.tokenizer.encode(p).ids for group in prompts for p in group])
        masks = [v.mask for v in variants]
        with ckpt.weights.streaming(ckpt.backbone):
            masked = masked_logits(ckpt.backbone, masks, sizes, ids, attention)
        ckpt.weights.release()
        layers = ckpt.backbone.config.num_hidden_layers
        checks = ctx.report.setdefault("fold_validation", {"variants": []})["variants"]
        streams = [(torch.float32, False), (torch.float64, False)]
        members = [Member(rows, mask, streams, v.kept) for v, rows, mask in zip(
            variants, ids.split(sizes), attention.split(sizes), strict=True
        )]  # fmt: skip
        release = lambda module: ckpt.weights.release()  # noqa: E731
        hidden = [[h.numpy() for h in states] for states in lockstep_hidden(ckpt.backbone, members, release=release)]
        references = [
            [r.numpy() for r in lm_head(ckpt, np.concatenate(h)).split(sizes)] for h in zip(*hidden, strict=True)
        ]
        rows = zip(variants, attention.split(sizes), masked, *references, strict=True)
        with ctx.progress("fold: variants checked" + (" and written" if save else ""), len(variants)) as advance:
            for variant, variant_attention, got, ref32, ref64 in rows:
                valid = variant_attention.bool().numpy()
                check = compare("folded_vs_masked", got[valid].numpy(), ref32[valid], ref64[valid], layers)
                variant.fold_error = check.error
                checks.append({"variant": variant.name} | check.record())
                if not check.ok:
                    raise ValidationFailed(f"fold: variant {variant.name!r} {check.text()}")
                if save:
                    write_variant_checkpoint(ckpt.weights, variant.kept, ctx.workdir / VARIANTS_DIR / variant.name)
                ckpt.weights.release()
                advance(1)
        write_kept_indices(
            ctx.workdir / KEPT_INDICES_FILE, {v.name: v.kept for v in variants}, {v.name: v.task for v in variants}
        )
        worst = max(v.fold_error for v in variants)
        ctx.console.log(
            f"folded {len(variants)} variants; max |folded - masked| logits / max(1, max|logits|) {worst:.2e} "
            f"(bounds {min(c['bound'] for c in checks):.1e}..{max(c['bound'] for c in checks):.1e})"
        )
        return ctx


@torch.no_grad()
def lm_head(ckpt: Checkpoint, hidden: np.ndarray) -> torch.Tensor:
    """The logits of every variant's hidden states at once: the head (shared by all folded models; at 8B, 0.5 G
    weights, upcast in blocks for float64) is read once, not once per variant."""
    logits = ckpt.backbone.lm_head(torch.from_numpy(hidden))
    ckpt.weights.release()
    return logits
