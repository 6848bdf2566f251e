"""Weight-only quantization of one weight tensor, as the program is built (no pass over finished programs).

int8: symmetric, one scale per output channel. int4: symmetric, one scale per `INT4_BLOCK_SIZE` input channels of
an output channel (iOS 18 block-wise), or per output channel for any weight whose input width is not a multiple of
the block (a pruned `down_proj` with k % 32 != 0; q/k/v, gate/up when hidden % 32 != 0), which coremltools' pass would
otherwise skip. Every 2-D model weight is quantized (no size threshold); norms, biases and the RoPE tables stay
fp16. The arithmetic is coremltools' own (`compute_qparams_by_dtype`, what its `linear_quantize_weights` pass
calls), applied to the float32 weight (numpy is ~7x slower on fp16 arrays, and the fp32 weight is the better
input), scales then stored in fp16; the result is deterministic: a shared weight is quantized once and its
data/scale arrays are the same objects in every function (one `weight_id`), and each function's FFN slices are
quantized as they are read, one tensor at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ifp_export.quiet import quiet

with quiet():
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.optimize._utils import compute_qparams_by_dtype

INT4_BLOCK_SIZE = 32  # input channels per int4 scale (as ONNX MatMulNBits)
QUANTIZED_SUFFIX = "_quantized"  # the constexpr op replacing const `w` is `w_quantized` (coremltools' naming)
DTYPES = {"int8": types.int8, "int4": types.int4}


@dataclass(frozen=True)
class QuantizedWeight:
    """A 2-D weight as `constexpr_blockwise_shift_scale` operands: weight = data * scale (scale per block)."""

    data: np.ndarray  # [out, in], int8 (int4 values are stored one per int8 until the backend packs them)
    scale: np.ndarray  # [out, in / block], fp16


def block_sizes(mode: str, in_features: int) -> list[int]:
    """coremltools' block sizes for [out, in]: one scale per output channel (1) and per block of input channels
    (0 = the whole row)."""
    if mode == "int4" and in_features % INT4_BLOCK_SIZE == 0:
        return [1, INT4_BLOCK_SIZE]
    return [1, 0]


def quantized_layout(mode: str, shape: tuple[int, ...]) -> tuple[np.dtype, tuple[int, int]]:
    """The dtype of `quantize_weight`'s data and the shape of its scales for an [out, in] weight, without
    quantizing it."""
    out, in_features = shape
    block = block_sizes(mode, in_features)[1] or in_features
    return np.dtype(types.nptype_from_builtin(DTYPES[mode])), (out, in_features // block)


def quantize_weight(weight: np.ndarray, mode: str) -> QuantizedWeight:
    """Quantize one float32 [out, in] weight (symmetric, `mode` int8 or int4); fp16 scales."""
    if mode not in DTYPES:
        raise ValueError(f"quantize mode must be one of {sorted(DTYPES)}, got {mode!r}")
    result = compute_qparams_by_dtype(weight, DTYPES[mode], "LINEAR_SYMMETRIC", block_sizes(mode, weight.shape[1]))
    if result is None:  # only for block sizes that do not divide the weight, which block_sizes never returns
        raise ValueError(f"cannot quantize a weight of shape {weight.shape} to {mode}")
    data, scale, _ = result
    return QuantizedWeight(data, scale.astype(np.float16))


def weight_const(value: np.ndarray | QuantizedWeight, name: str) -> Any:
    """The program's value of a weight: an fp16 `const`, or a `constexpr_blockwise_shift_scale` over two consts
    named after it (so a shared weight's data and scale keep the same names, hence `weight_id`s, in every
    function)."""
    if isinstance(value, np.ndarray):
        return mb.const(val=value, name=name)
    base = name + QUANTIZED_SUFFIX
    data = mb.const(val=value.data, name=base + "_data")
    scale = mb.const(val=value.scale, name=base + "_scale")
    return mb.constexpr_blockwise_shift_scale(data=data, scale=scale, name=base)
