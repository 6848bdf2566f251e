"""Our decoder against `transformers`' own model for the checkpoint's model_type, on a few prompts.

Parity tests hold our decoder to `transformers` on tiny models; this check does it for the checkpoint being exported,
so a config field both sides would read the same wrong way is not the only safeguard: a shared misreading between
our loader, our decoder and our graphs is invisible to every other validation, which compares with our decoder.
It loads a second copy of the weights (fp32), so it runs only up to `max_parameters` and reports why it skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ifp_export.checkpoint import BACKBONE_DIR, Checkpoint
from ifp_export.fold import relative_difference
from ifp_export.model.decoder import CausalLM

TOLERANCE = 1e-4  # max |Δlogits| / max(1, max |logits|), fp32, as the parity tests
DEFAULT_MAX_PARAMETERS = 100_000_000  # a second fp32 copy of a larger model would break the export's RSS budget


@dataclass(frozen=True)
class HFCheck:
    model_type: str
    prompts: int
    decode_steps: int
    max_diff: float | None  # relative, over prefill and every decode step; None when skipped
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return self.skipped is not None or (self.max_diff is not None and self.max_diff <= TOLERANCE)

    def summary(self) -> str:
        if self.skipped is not None:
            return f"transformers check skipped: {self.skipped}"
        verdict = "ok" if self.ok else "MISMATCH"
        return (
            f"transformers {self.model_type}: {self.prompts} prompts, prefill + {self.decode_steps} cached steps, "
            f"max|Δlogits| {self.max_diff:.1e} x max(1, max|logits|) <= {TOLERANCE:g}: {verdict}"
        )


@torch.no_grad()
def check_against_transformers(
    backbone_dir: Path,
    ours: CausalLM,
    prompts: list[list[int]],
    decode_steps: int = 4,
    max_parameters: int = DEFAULT_MAX_PARAMETERS,
) -> HFCheck:
    """Load `backbone_dir` with `transformers.AutoModelForCausalLM` (fp32, eager attention) and compare its logits
    with `ours` (the dense decoder read from the same directory) on each prompt: prefill, then `decode_steps` greedy
    steps through each side's own KV cache (cached decoding is where transformers' cache semantics show)."""
    model_type = ours.config.model_type
    parameters = sum(p.numel() for p in ours.parameters())
    if parameters > max_parameters:
        reason = f"{parameters:,} parameters > {max_parameters:,} (a second fp32 copy would not fit the memory budget)"
        return HFCheck(model_type, 0, decode_steps, None, reason)
    from transformers import AutoModelForCausalLM  # heavy import, only when the check runs

    hf = AutoModelForCausalLM.from_pretrained(backbone_dir, torch_dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    worst = 0.0
    for ids in prompts:
        tokens = torch.tensor([ids])
        hf_out = hf(input_ids=tokens, use_cache=True)
        our_logits, past = ours(tokens)
        worst = max(worst, relative_difference(our_logits, hf_out.logits))
        cache, length = hf_out.past_key_values, len(ids)
        for _ in range(decode_steps):
            token = hf_out.logits[:, -1:].argmax(-1)
            positions = torch.tensor([[length]])
            hf_out = hf(input_ids=token, position_ids=positions, past_key_values=cache, use_cache=True)
            cache, length = hf_out.past_key_values, length + 1
            our_logits, past = ours(token, torch.ones(1, length, dtype=torch.long), positions, past)
            worst = max(worst, relative_difference(our_logits, hf_out.logits))
    del hf
    return HFCheck(model_type, len(prompts), decode_steps, worst)


def check_checkpoint(ckpt: Checkpoint, prompts: int = 2, **options: int) -> HFCheck:
    """`check_against_transformers` on the checkpoint's backbone with the first calibration prompt of each of its
    first `prompts` tasks: the one call the validate pass needs (it raises ValidationFailed when not `.ok`)."""
    firsts: dict[str, str] = {}
    for task in ckpt.tasks:
        firsts.setdefault(task.task, task.prompt)
    ids = [ckpt.tokenizer.encode(prompt).ids for prompt in list(firsts.values())[:prompts]]
    with ckpt.weights.streaming(ckpt.backbone):  # our side keeps a layer of the mapped checkpoint resident
        return check_against_transformers(ckpt.root / BACKBONE_DIR, ckpt.backbone, [i for i in ids if i], **options)
