"""Prompt -> neuron masks: batched predictor scoring, per-group aggregation, mask overlap.

Shared by the sample's evaluation, the predict/group passes and the runtime, so all of them pick the
same neurons for the same prompts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tokenizers import Tokenizer

from ifp_export.model.lm_predictor import Predictor
from ifp_export.model.softtopk import hard_topk_mask

# The one truncation rule of every predictor client (export, runtime, predictor.onnx and the Core ML predictor, whose
# input is capped at max_length): keep the FIRST max_length tokens. The instruction leads an IFPruning prompt and
# decides the task; what is cut is the tail of its input. Stated in the manifest as predictor.truncation.
TRUNCATION = "keep_first"


def encode_prompts(
    tokenizer: Tokenizer, prompts: list[str], max_length: int, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Right-padded input_ids and attention_mask [B, T] (T <= max_length) and which prompts were truncated
    (`TRUNCATION`: each keeps its first max_length tokens)."""
    encoded = [tokenizer.encode(p).ids for p in prompts]
    truncated = [len(ids) > max_length for ids in encoded]
    encoded = [ids[:max_length] for ids in encoded]
    width = max(1, max(len(ids) for ids in encoded))
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask, truncated


@torch.no_grad()
def predict_scores(
    predictor: Predictor,
    tokenizer: Tokenizer,
    prompts: list[str],
    batch_size: int = 64,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, int]:
    """Neuron scores [N, L, d_ff] for every prompt, and how many prompts were truncated to max_length.

    `on_batch(done, truncated)` is called after each batch (for progress bars).
    """
    chunks, truncated = [], 0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        ids, mask, cut = encode_prompts(tokenizer, batch, predictor.config.max_length)
        chunks.append(predictor(ids, mask))
        truncated += sum(cut)
        if on_batch is not None:
            on_batch(len(batch), sum(cut))
    return torch.cat(chunks), truncated


def aggregate_topk(scores: torch.Tensor, k: list[int] | int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """One mask [L, d_ff] for a group of prompts' scores [N, L, d_ff].

    Neurons are ranked by how many of the group's own top-k masks keep them, ties broken by mean score,
    which maximizes the overlap with the prompts' own masks. `forced` ([L, d_ff] 0/1) neurons rank above all
    others: they are kept, and the lowest-ranked others make room, so k stays the same.
    """
    votes = hard_topk_mask(scores, torch.as_tensor(k)).mean(0)
    key = votes + torch.sigmoid(scores.mean(0)) / (scores.shape[0] + 1)  # in [0, 2)
    if forced is not None:
        key = key + 2 * forced
    return hard_topk_mask(key, torch.as_tensor(k))


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of 0/1 masks along the last dim (per layer), broadcasting leading dims."""
    inter = (a * b).sum(-1)
    union = ((a + b) > 0).to(a.dtype).sum(-1)
    return inter / union.clamp(min=1)


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """Scores z-normalized per layer, so every layer weighs the same in routing."""
    mean = scores.mean(-1, keepdim=True)
    std = scores.std(-1, keepdim=True, unbiased=False).clamp(min=1e-6)
    return (scores - mean) / std


def routing_scores(scores: torch.Tensor, variant_masks: torch.Tensor) -> torch.Tensor:
    """variant_scores [N, V]: mean over layers of the standardized scores of each variant's kept neurons.

    A linear map of the standardized scores (one matmul with the stacked masks / k), so target graphs
    fold it in; the app routes a prompt to the argmax variant.
    """
    z = standardize(scores).flatten(1)  # [N, L*d]
    weights = variant_masks / variant_masks.sum(-1, keepdim=True).clamp(min=1)  # [V, L, d], rows sum to 1
    return z @ weights.flatten(1).T / variant_masks.shape[1]
