"""Our decoder against `transformers`' own model for the checkpoint's model_type, on a few prompts.

Parity tests hold our decoder to `transformers` on tiny models; this check does it for the checkpoint being exported,
so a config field both sides would read the same wrong way is not the only safeguard: a shared misreading between
our loader, our decoder and our graphs is invisible to every other validation, which compares with our decoder.
It loads a second copy of the weights (fp32), so it runs only up to `max_parameters` and reports why it skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ifp_export.bounds import Exactness, compare, reference_pair
from ifp_export.checkpoint import BACKBONE_DIR, Checkpoint
from ifp_export.model.decoder import CausalLM

DEFAULT_MAX_PARAMETERS = 100_000_000  # a second fp32 copy of a larger model would break the export's RSS budget


@dataclass(frozen=True)
class HFCheck:
    model_type: str
    prompts: int
    decode_steps: int
    exactness: Exactness | None  # transformers' logits vs our decoder in float64, every position; None when skipped
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return self.skipped is not None or (self.exactness is not None and self.exactness.ok)

    @property
    def max_diff(self) -> float | None:
        return None if self.exactness is None else self.exactness.error

    def record(self) -> dict:
        """For the report and the summary's `transformers` checks."""
        check = None if self.exactness is None else self.exactness.record()
        facts = {"model_type": self.model_type, "prompts": self.prompts, "decode_steps": self.decode_steps}
        return facts | {"skipped": self.skipped, "ok": self.ok, "check": check}

    def summary(self) -> str:
        if self.skipped is not None:
            return f"transformers check skipped: {self.skipped}"
        verdict = "ok" if self.ok else "MISMATCH"
        return (
            f"transformers {self.model_type}: {self.prompts} prompts, prefill + {self.decode_steps} cached steps, "
            f"{self.exactness.text()}: {verdict}"
        )


@torch.no_grad()
def check_against_transformers(
    backbone_dir: Path,
    ours: CausalLM,
    prompts: list[list[int]],
    decode_steps: int = 4,
    max_parameters: int = DEFAULT_MAX_PARAMETERS,
) -> HFCheck:
    """Load `backbone_dir` with `transformers.AutoModelForCausalLM` (fp32, eager attention), let it prefill each
    prompt and greedy-decode `decode_steps` tokens through its own KV cache (where transformers' cache semantics
    show), then run `ours` (the dense decoder read from the same directory) teacher-forced over the same tokens in
    float32 and float64; every position is held to the bound of `ifp_export.bounds`."""
    model_type = ours.config.model_type
    parameters = sum(p.numel() for p in ours.parameters())
    if parameters > max_parameters:
        reason = f"{parameters:,} parameters > {max_parameters:,} (a second fp32 copy would not fit the memory budget)"
        return HFCheck(model_type, 0, decode_steps, None, reason)
    from transformers import AutoModelForCausalLM  # heavy import, only when the check runs

    hf = AutoModelForCausalLM.from_pretrained(backbone_dir, dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    got, ref32, ref64 = [], [], []
    for ids in prompts:
        tokens = torch.tensor([ids])
        out = hf(input_ids=tokens, use_cache=True)
        steps = [out.logits[0]]
        for _ in range(decode_steps):
            token = out.logits[:, -1:].argmax(-1)
            positions = torch.tensor([[tokens.shape[1]]])
            tokens = torch.cat((tokens, token), dim=1)
            out = hf(input_ids=token, position_ids=positions, past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[0])
        got.append(torch.cat(steps).numpy())
        ours32, ours64 = reference_pair(ours, tokens)
        ref32.append(ours32[0])
        ref64.append(ours64[0])
    del hf
    layers = ours.config.num_hidden_layers
    exactness = compare("transformers", np.concatenate(got), np.concatenate(ref32), np.concatenate(ref64), layers)
    return HFCheck(model_type, len(prompts), decode_steps, exactness)


def check_checkpoint(ckpt: Checkpoint, prompts: int = 2, **options: int) -> HFCheck:
    """`check_against_transformers` on the checkpoint's backbone with the first calibration prompt of each of its
    first `prompts` tasks: the one call the validate pass needs (it raises ValidationFailed when not `.ok`)."""
    firsts: dict[str, str] = {}
    for task in ckpt.tasks:
        firsts.setdefault(task.task, task.prompt)
    ids = [ckpt.tokenizer.encode(prompt).ids for prompt in list(firsts.values())[:prompts]]
    with ckpt.weights.streaming(ckpt.backbone):  # our side keeps a layer of the mapped checkpoint resident
        return check_against_transformers(ckpt.root / BACKBONE_DIR, ckpt.backbone, [i for i in ids if i], **options)
