"""ifp_export.hf_check: the checkpoint's own model in `transformers` against our decoder (issue 18.2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_hf_model, save_hf_model
from tiny import make_checkpoint

from ifp_export.checkpoint import load_checkpoint
from ifp_export.hf_check import check_against_transformers, check_checkpoint
from ifp_export.model.hf_io import load_decoder

PROMPTS = [[5, 17, 9, 33, 41, 8, 12, 60, 7, 22, 31, 3], [44, 3, 71]]


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [("llama", {}), ("qwen2", {"tie_word_embeddings": True}), ("mistral", {"sliding_window": 4})],
)
def test_checkpoint_matches_transformers(arch: str, overrides: dict, tmp_path: Path) -> None:
    save_hf_model(make_hf_model(arch, **overrides), tmp_path)
    result = check_against_transformers(tmp_path, load_decoder(tmp_path), PROMPTS)
    assert result.ok and result.skipped is None, result.summary()
    check = result.exactness  # transformers vs our decoder in float64, bound from our own fp32 noise
    assert check is not None and 0 <= check.error <= check.bound and check.top1_disagreements == 0
    assert check.positions == len(PROMPTS[0]) + len(PROMPTS[1]) + 2 * result.decode_steps
    assert (result.prompts, result.model_type) == (2, arch)


def test_a_misread_config_is_caught(tmp_path: Path) -> None:
    """Our decoder reading a different window than transformers (the class of bug the check exists for)."""
    save_hf_model(make_hf_model("mistral", sliding_window=4), tmp_path)
    ours = load_decoder(tmp_path)
    ours.model.config = ours.config.replace(sliding_window=None)
    result = check_against_transformers(tmp_path, ours, PROMPTS)
    assert not result.ok and result.max_diff > 1e-2 > 100 * result.exactness.bound
    assert "MISMATCH" in result.summary()


def test_large_models_are_skipped_with_a_reason(tmp_path: Path) -> None:
    save_hf_model(make_hf_model("llama"), tmp_path)
    result = check_against_transformers(tmp_path, load_decoder(tmp_path), PROMPTS, max_parameters=1000)
    assert result.ok and result.max_diff is None
    assert "parameters > 1,000" in result.skipped and "skipped" in result.summary()


def test_check_checkpoint_uses_its_calibration_prompts(tmp_path: Path) -> None:
    result = check_checkpoint(load_checkpoint(make_checkpoint(tmp_path)), decode_steps=2)
    assert result.ok and result.skipped is None and result.prompts == 2 and result.decode_steps == 2
    assert result.max_diff <= result.exactness.bound
