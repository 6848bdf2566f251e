"""Folding: a variant's FFN mask becomes a smaller dense decoder (intermediate_size = k).

Row j of gate_proj/up_proj and column j of down_proj go with neuron j, so keeping neurons `idx` is
`index_select` on those; every other tensor is shared (not copied) with the full model.
"""

from __future__ import annotations

import torch

from ifp_export.model.decoder import CausalLM


def fold_decoder(model: CausalLM, kept: torch.Tensor) -> CausalLM:
    """A decoder keeping `kept[l]` (ascending neuron indices, [L, k]) in layer l; shares non-FFN weights."""
    cfg = model.config.replace(intermediate_size=int(kept.shape[1]))
    with torch.device("meta"):
        folded = CausalLM(cfg)
    state = dict(model.state_dict())
    for layer, idx in enumerate(kept):
        prefix = f"model.layers.{layer}.mlp."
        for name in ("gate_proj", "up_proj"):
            state[prefix + name + ".weight"] = state[prefix + name + ".weight"].index_select(0, idx)
        state[prefix + "down_proj.weight"] = state[prefix + "down_proj.weight"].index_select(1, idx)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    folded.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)
    if cfg.tie_word_embeddings:
        folded.lm_head.weight = folded.model.embed_tokens.weight
    folded.model.rotary_emb.reset_parameters()
    return folded.eval()


def kept_indices(mask: torch.Tensor) -> torch.Tensor:
    """[L, d_ff] 0/1 mask with the same count per layer -> [L, k] ascending int64 indices."""
    counts = mask.sum(-1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"folding needs the same k in every layer, got {counts.tolist()}")
    return torch.stack([row.nonzero().flatten() for row in mask])


@torch.no_grad()
def fold_error(full: CausalLM, folded: CausalLM, mask: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Max abs logit difference, folded vs the full model with `mask` applied, on `input_ids` [B, T]."""
    reference, _ = full(input_ids, ffn_masks=mask)
    logits, _ = folded(input_ids)
    return float((reference - logits).abs().max())
