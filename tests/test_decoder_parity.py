"""Our decoder against Hugging Face `transformers` on tiny random checkpoints (fp32, <= 1e-4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    LLAMA3_ROPE,
    assert_close_on_mask,
    hf_greedy_logits,
    left_padded_batch,
    make_hf_model,
    ours_logits_for_tokens,
    positions_from_mask,
    save_hf_model,
    zero_hf_neurons,
)
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GenerationConfig

from ifp_export.generate import greedy_generate, left_pad
from ifp_export.model.config import DecoderConfig, rope_inverse_frequencies
from ifp_export.model.decoder import CAST_BUFFERS, reused_casts
from ifp_export.model.hf_io import load_decoder, save_decoder

ATOL = 1e-4
DECODE_STEPS = 8
LENGTHS = [12, 7]  # row 1 is left-padded by 5


CASES = {
    "llama": ("llama", {}),
    "llama-mha-attention-bias": ("llama", {"num_key_value_heads": 4, "attention_bias": True}),
    "qwen2": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen2-sliding-all-layers": ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 0}),
    "qwen2-sliding-flag-no-layers": ("qwen2", {"use_sliding_window": True, "sliding_window": 5}),
    "mistral-sliding-window": ("mistral", {"sliding_window": 6, "head_dim": 8}),
    "mistral-attention-bias-ignored": ("mistral", {"attention_bias": True}),  # MistralAttention has no biases
    "llama-rope-llama3": ("llama", {"hidden_size": 64, "rope_scaling": LLAMA3_ROPE}),
    "llama-rope-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-rope-linear-legacy-key": ("llama", {"rope_scaling": {"type": "linear", "factor": 3.0}}),
}


def hf_and_ours(case: str, directory: Path):
    arch, overrides = CASES[case]
    hf = make_hf_model(arch, **overrides)
    save_hf_model(hf, directory)
    return hf, load_decoder(directory)


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_cached_decode_match_hf(case: str, tmp_path: Path) -> None:
    hf, ours = hf_and_ours(case, tmp_path)
    ids, mask, _ = left_padded_batch(LENGTHS, hf.config.vocab_size)
    hf_logits, new_masks, tokens = hf_greedy_logits(hf, ids, mask, DECODE_STEPS)
    our_logits = ours_logits_for_tokens(ours, ids, mask, tokens)
    assert len(our_logits) == DECODE_STEPS + 1
    for ours_step, hf_step, step_mask in zip(our_logits, hf_logits, new_masks, strict=True):
        assert_close_on_mask(ours_step, hf_step, step_mask, ATOL)


def test_tied_embeddings_share_one_tensor(tmp_path: Path) -> None:
    hf, ours = hf_and_ours("qwen2-tied", tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert torch.equal(ours.lm_head.weight, hf.lm_head.weight)


def test_sliding_window_is_exercised(tmp_path: Path) -> None:
    """The Mistral case must depend on the window, otherwise its parity test proves nothing about it."""
    _, ours = hf_and_ours("mistral-sliding-window", tmp_path)
    assert ours.config.sliding_window == 6
    ids, mask, positions = left_padded_batch(LENGTHS, ours.config.vocab_size)
    with torch.no_grad():
        windowed, _ = ours(ids, mask, positions)
        ours.model.config = ours.config.replace(sliding_window=None)
        full, _ = ours(ids, mask, positions)
    assert (windowed[0, -1] - full[0, -1]).abs().max() > 1e-2


def test_qwen2_sliding_window_follows_layer_types(tmp_path: Path) -> None:
    """use_sliding_window only slides the layers >= max_window_layers (default 28): none in a 2-layer model."""
    _, all_layers = hf_and_ours("qwen2-sliding-all-layers", tmp_path / "all")
    _, no_layers = hf_and_ours("qwen2-sliding-flag-no-layers", tmp_path / "none")
    assert all_layers.config.sliding_window == 5
    assert no_layers.config.sliding_window is None


@pytest.mark.parametrize("case", ["llama-rope-llama3", "llama-rope-linear", "llama-rope-linear-legacy-key"])
def test_rope_scaling_changes_frequencies(case: str, tmp_path: Path) -> None:
    _, ours = hf_and_ours(case, tmp_path)
    scaled = ours.model.rotary_emb.inv_freq
    default = rope_inverse_frequencies(ours.config.replace(rope_scaling=None))
    changed = ~torch.isclose(scaled, default)
    assert changed.any()
    if case == "llama-rope-llama3":
        # high-frequency band kept, low band divided by the factor, medium band in between
        assert torch.equal(scaled[0], default[0])
        assert torch.allclose(scaled[-1], default[-1] / LLAMA3_ROPE["factor"])
        ratio = scaled / default
        assert ((ratio < 1) & (ratio > 1 / LLAMA3_ROPE["factor"])).any()


def zeroed_neurons(cfg: DecoderConfig, seed: int = 1) -> torch.Tensor:
    """A 0/1 [L, d_ff] mask with a different ~half of the neurons off in each layer."""
    gen = torch.Generator().manual_seed(seed)
    masks = (torch.rand(cfg.num_hidden_layers, cfg.intermediate_size, generator=gen) < 0.5).float()
    assert (masks == 0).any(dim=1).all() and (masks == 1).any(dim=1).all()
    return masks


def test_ffn_mask_of_ones_equals_no_mask_exactly(tmp_path: Path) -> None:
    hf, ours = hf_and_ours("qwen2", tmp_path)
    ids, mask, _ = left_padded_batch(LENGTHS, hf.config.vocab_size)
    _, _, tokens = hf_greedy_logits(hf, ids, mask, 3)
    ones = torch.ones(ours.config.num_hidden_layers, ours.config.intermediate_size)
    dense = ours_logits_for_tokens(ours, ids, mask, tokens)
    masked = ours_logits_for_tokens(ours, ids, mask, tokens, ffn_masks=ones)
    for a, b in zip(dense, masked, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", ["llama", "qwen2"])
def test_ffn_mask_equals_hf_with_pruned_weights(case: str, tmp_path: Path) -> None:
    hf, ours = hf_and_ours(case, tmp_path)
    neuron_masks = zeroed_neurons(ours.config)
    zero_hf_neurons(hf, neuron_masks)
    ids, mask, _ = left_padded_batch(LENGTHS, hf.config.vocab_size)
    hf_logits, new_masks, tokens = hf_greedy_logits(hf, ids, mask, DECODE_STEPS)
    masked = ours_logits_for_tokens(ours, ids, mask, tokens, ffn_masks=neuron_masks)
    dense = ours_logits_for_tokens(ours, ids, mask, tokens)
    for ours_step, hf_step, step_mask in zip(masked, hf_logits, new_masks, strict=True):
        assert_close_on_mask(ours_step, hf_step, step_mask, ATOL)
    assert (dense[0] - masked[0]).abs().max() > 1e-2  # the mask really removed something


def test_per_row_ffn_masks_match_separate_runs(tmp_path: Path) -> None:
    _, ours = hf_and_ours("llama", tmp_path)
    first, second = zeroed_neurons(ours.config, seed=1), zeroed_neurons(ours.config, seed=2)
    ids, mask, _ = left_padded_batch(LENGTHS, ours.config.vocab_size)
    tokens = torch.randint(3, ours.config.vocab_size, (2, 4), generator=torch.Generator().manual_seed(3))
    per_row = ours_logits_for_tokens(ours, ids, mask, tokens, ffn_masks=torch.stack((first, second)))
    only_first = ours_logits_for_tokens(ours, ids, mask, tokens, ffn_masks=first)
    only_second = ours_logits_for_tokens(ours, ids, mask, tokens, ffn_masks=second)
    for step, a, b in zip(per_row, only_first, only_second, strict=True):
        assert torch.allclose(step[0], a[0], atol=1e-6, rtol=0)
        assert torch.allclose(step[1], b[1], atol=1e-6, rtol=0)
    assert not torch.allclose(only_first[-1][0], only_second[-1][0], atol=1e-3)


def test_bool_ffn_masks_run_at_the_kept_width_and_match_float_masks(tmp_path: Path) -> None:
    """A bool mask skips the dropped neurons (`MLP.kept_width`, what the quality pass runs) instead of multiplying them
    by 0: the same logits up to summation order, per row (two masks, one mask for both rows, a dense row) and for an
    [L, d_ff] mask; the FFN's down_proj module is never called on that path."""
    _, ours = hf_and_ours("llama", tmp_path)
    first, second = zeroed_neurons(ours.config, seed=1), zeroed_neurons(ours.config, seed=2)
    ids, mask, _ = left_padded_batch(LENGTHS, ours.config.vocab_size)
    tokens = torch.randint(3, ours.config.vocab_size, (2, 4), generator=torch.Generator().manual_seed(3))
    calls = []
    handles = [layer.mlp.down_proj.register_forward_hook(lambda *args: calls.append(1)) for layer in ours.model.layers]
    for masks in (
        torch.stack((first, second)),
        torch.stack((first, first)),
        torch.stack((torch.ones_like(first), second)),
        first,
    ):
        calls.clear()
        floats = ours_logits_for_tokens(ours, ids, mask, tokens, ffn_masks=masks)
        assert calls
        calls.clear()
        kept = ours_logits_for_tokens(ours, ids, mask, tokens, ffn_masks=masks.bool())
        assert not calls
        for a, b in zip(kept, floats, strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=0)
    for handle in handles:
        handle.remove()


def test_reused_cast_buffers_give_the_logits_of_fresh_casts(tmp_path: Path) -> None:
    """bf16 weights, float32 activations: inside `reused_casts` every Linear casts its weight into one buffer that all
    layers reuse (`MLP.kept_width` its three into one each); the logits equal those of fresh casts bit for bit, dense,
    float-masked and bool-masked (kept width), and a forward that records gradients never uses the buffers."""
    _, ours = hf_and_ours("llama", tmp_path)
    for parameter in ours.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)
    ids, mask, _ = left_padded_batch(LENGTHS, ours.config.vocab_size)
    tokens = torch.randint(3, ours.config.vocab_size, (2, 3), generator=torch.Generator().manual_seed(3))
    masks = zeroed_neurons(ours.config)
    for ffn_masks, roles in ((None, {"linear"}), (masks, {"linear"}), (masks.bool(), {"linear", "gate", "up", "down"})):
        with torch.no_grad():
            fresh = ours_logits_for_tokens(ours, ids, mask, tokens, ffn_masks)
            with reused_casts():
                reused = ours_logits_for_tokens(ours, ids, mask, tokens, ffn_masks)
                assert set(CAST_BUFFERS.get()) == {(role, torch.float32) for role in roles}
        assert all(torch.equal(a, b) for a, b in zip(fresh, reused, strict=True))
    with reused_casts():
        ours(ids, mask, positions_from_mask(mask), None)  # grad mode on, as in training
        assert CAST_BUFFERS.get() == {}
    assert CAST_BUFFERS.get() is None


@pytest.mark.parametrize("case", ["llama", "qwen2-tied", "qwen2-sliding-all-layers", "mistral-sliding-window"])
def test_save_decoder_reloads_in_transformers(case: str, tmp_path: Path) -> None:
    hf, ours = hf_and_ours(case, tmp_path / "original")
    save_decoder(ours, tmp_path / "saved")
    saved_config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved_config["model_type"] == CASES[case][0]

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager").eval()
    assert type(reloaded) is type(hf)
    assert reloaded.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert getattr(reloaded.config, "layer_types", None) == getattr(hf.config, "layer_types", None)
    ids, mask, _ = left_padded_batch(LENGTHS, hf.config.vocab_size)
    expected, _, tokens = hf_greedy_logits(hf, ids, mask, 3)
    actual, _, actual_tokens = hf_greedy_logits(reloaded, ids, mask, 3)
    assert torch.equal(tokens, actual_tokens)
    for a, b in zip(actual, expected, strict=True):
        assert torch.equal(a, b)

    ours_again = load_decoder(tmp_path / "saved")
    assert ours_again.config == ours.config
    for name, tensor in ours.state_dict().items():
        assert torch.equal(ours_again.state_dict()[name], tensor), name


@pytest.mark.parametrize("case", ["llama", "qwen2", "mistral-sliding-window"])
def test_greedy_generate_matches_hf_generate(case: str, tmp_path: Path) -> None:
    hf, ours = hf_and_ours(case, tmp_path)
    prompts = [[5, 17, 9, 33, 41, 8, 12, 60], [44, 3, 71]]
    ids, mask = left_pad(prompts)
    config = GenerationConfig(do_sample=False, max_new_tokens=10, min_new_tokens=10, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, generation_config=config)[:, ids.shape[1] :]
    assert expected.shape == (2, 10)
    assert greedy_generate(ours, prompts, max_new_tokens=10) == expected.tolist()
    assert greedy_generate(ours, prompts[:1], max_new_tokens=10) == expected[:1].tolist()


def test_greedy_generate_stops_each_row_after_eos(tmp_path: Path) -> None:
    _, ours = hf_and_ours("llama", tmp_path)
    prompts = [[5, 17, 9, 33, 41, 8, 12, 60], [44, 3, 71]]
    free = greedy_generate(ours, prompts, max_new_tokens=8)
    eos = free[0][2]
    assert eos not in free[1]  # row 1 must keep going
    stopped = greedy_generate(ours, prompts, max_new_tokens=8, eos_id=eos)
    assert stopped[0] == free[0][: free[0].index(eos) + 1]
    assert stopped[1] == free[1]
