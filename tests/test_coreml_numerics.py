"""Issue 18.3: the Core ML decoder's fp16 RMSNorm and RoPE at real scale, through a numpy emulation of the
program's fp16 arithmetic (Core ML cannot run on Linux; `numerics.check_numerics` ties the emulated op chain to
the saved spec, see test_coreml_target.py)."""

from __future__ import annotations

import numpy as np
import pytest

from ifp_export.model.config import DecoderConfig
from ifp_export.targets.coreml import numerics
from ifp_export.targets.coreml.build import rope_tables

HIDDEN, HEAD_DIM, THETA, CONTEXT = 4096, 128, 5e5, 4096


def activations(scale: float, rows: int = 16) -> np.ndarray:
    """Residual-stream rows with a few outlier channels up to `scale` (as real checkpoints have)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, HIDDEN)).astype(np.float32) * (scale / 50)
    x[:, rng.choice(HIDDEN, 8, replace=False)] = rng.uniform(-scale, scale, (rows, 8))
    return x


@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0, 5000.0])
def test_rms_norm_fp16_matches_fp32(scale: float) -> None:
    x = activations(scale)
    w = np.random.default_rng(1).uniform(0.5, 1.5, HIDDEN).astype(np.float32)
    expected = numerics.rms_norm_fp32(x, w.astype(np.float16).astype(np.float32), 1e-5)
    got = numerics.rms_norm_fp16(x, w, 1e-5).astype(np.float32)
    assert np.isfinite(got).all()
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert error < 4e-3, error  # a few fp16 ulps of the largest output


def test_naive_fp16_norm_overflows_where_ours_does_not() -> None:
    """The emulation can tell: mean(x²) in fp16 is inf at |x| in the thousands, zeroing the token."""
    x = activations(5000.0)
    naive = numerics.rms_norm_naive_fp16(x, np.ones(HIDDEN, np.float32), 1e-5).astype(np.float32)
    expected = numerics.rms_norm_fp32(x, np.ones(HIDDEN, np.float32), 1e-5)
    assert np.abs(naive - expected).max() > 0.5 * np.abs(expected).max()


def test_rope_tables_and_fp16_rotation_match_fp32_angles() -> None:
    cfg = DecoderConfig(
        vocab_size=8,
        hidden_size=HEAD_DIM,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=HEAD_DIM,
        rope_theta=THETA,
    )
    cos, sin = rope_tables(cfg, CONTEXT)
    positions = np.arange(CONTEXT, dtype=np.float64)[:, None]
    inv = 1.0 / THETA ** (np.arange(0, HEAD_DIM, 2, dtype=np.float64) / HEAD_DIM)
    angles = np.concatenate([positions * inv] * 2, axis=-1)  # float64 truth
    assert np.abs(cos - np.cos(angles)).max() < 2e-3 and np.abs(sin - np.sin(angles)).max() < 2e-3
    q = np.random.default_rng(2).standard_normal((CONTEXT, HEAD_DIM)).astype(np.float32) * 8
    expected = numerics.rope_fp32(q, np.cos(angles), np.sin(angles))
    got = numerics.rope_fp16(q, cos, sin).astype(np.float32)
    assert np.abs(got - expected).max() / np.abs(expected).max() < 2e-3
    # what an fp16 angle computation gives instead (positions and frequencies in fp16, cos/sin of the product)
    half_angles = (positions.astype(np.float16) * inv.astype(np.float16)).astype(np.float16)
    naive = np.cos(np.concatenate([half_angles] * 2, axis=-1).astype(np.float32))
    assert np.abs(naive - np.cos(angles)).max() > 0.1
