"""Greedy generation with the explicit KV cache: the PyTorch reference every exported artifact is held to."""

from __future__ import annotations

import torch

from ifp_export.model.decoder import CausalLM


def left_pad(sequences: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, T] with each sequence right-aligned."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """position_ids [B, T] of left-padded rows: each row's real tokens count from 0 (padding gets 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def greedy_generate(
    model: CausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int | None = None,
    ffn_masks: torch.Tensor | None = None,
) -> list[list[int]]:
    """New tokens per prompt (stopping after `eos_id`, which is kept). ffn_masks: [L, d_ff] or [B, L, d_ff]."""
    ids, mask = left_pad(prompts)
    positions = padded_positions(mask)
    logits, past = model(ids, mask, positions, None, ffn_masks)
    out: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(max_new_tokens):
        token = logits[:, -1].argmax(-1)
        for row in range(len(prompts)):
            if not done[row]:
                out[row].append(int(token[row]))
        if eos_id is not None:
            done |= token == eos_id
        if bool(done.all()):
            break
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        positions = positions[:, -1:] + 1
        logits, past = model(token[:, None], mask, positions, past, ffn_masks)
    return out
