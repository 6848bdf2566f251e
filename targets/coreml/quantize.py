"""Weight-only quantization of one weight tensor, as the program is built (no pass over finished programs).

int8: symmetric, one scale per output channel. int4: symmetric, one scale per `INT4_BLOCK_SIZE` input channels of
an output channel (iOS 18 block-wise), or per output channel for any weight whose input width is not a multiple of
the block (a pruned `down_proj` with k % 32 != 0; q/k/v, gate/up when hidden % 32 != 0), which coremltools' pass would
otherwise skip. Every 2-D model weight is quantized (no size threshold); norms, biases and the RoPE tables stay
fp16. The arithmetic is coremltools' own (`compute_qparams_by_dtype`, what its `linear_quantize_weights` pass
calls), done in torch on the float32 weight (the same bits, threaded), scales then stored in fp16; the result is
deterministic: a shared weight is quantized once (one `weight_id`), and each function's FFN slices are quantized as
the backend writes them, one tensor at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ifp_export.quiet import quiet
from ifp_export.weights import as_float32

with quiet():
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

INT4_BLOCK_SIZE = 32  # input channels per int4 scale (as ONNX MatMulNBits)
QUANTIZED_SUFFIX = "_quantized"  # the constexpr op replacing const `w` is `w_quantized` (coremltools' naming)
DTYPES = {"int8": types.int8, "int4": types.int4}
QUANT_RANGE = {"int8": (-127, 127), "int4": (-7, 7)}  # signed, symmetric: coremltools' `get_quant_range`
QUANTIZE_CHUNK_ROWS = 64  # output channels quantized at once


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


def quantize_weight(weight: np.ndarray | torch.Tensor, mode: str) -> QuantizedWeight:
    """Quantize one [out, in] weight (numpy or torch, float32 or as stored, e.g. bf16; symmetric, `mode` int8 or
    int4); fp16 scales.

    coremltools' arithmetic (`compute_qparams_by_dtype`, LINEAR_SYMMETRIC: max |w| per block, scale = 2 max / (q_max -
    q_min), data = clip(round(w / scale))), step for step in float32 with torch instead of numpy: threaded, and the
    same bits (tests/test_coreml_quantize.py holds it to coremltools' function); an all-zero block gets data 0. Rows
    are independent, so they are quantized `QUANTIZE_CHUNK_ROWS` at a time, upcast chunk by chunk: the temporaries
    stay in the cache and no float32 copy of a bf16 weight is made."""
    if mode not in DTYPES:
        raise ValueError(f"quantize mode must be one of {sorted(DTYPES)}, got {mode!r}")
    dtype, scale_shape = quantized_layout(mode, weight.shape)
    q_min, q_max = QUANT_RANGE[mode]
    data, scales = np.empty(weight.shape, np.int8), np.empty(scale_shape, np.float16)
    for start in range(0, weight.shape[0], QUANTIZE_CHUNK_ROWS):
        blocks = as_float32(weight[start : start + QUANTIZE_CHUNK_ROWS])
        blocks = blocks.reshape(len(blocks), scale_shape[1], -1)
        max_abs = torch.maximum(blocks.amin(-1, keepdim=True).abs(), blocks.amax(-1, keepdim=True).abs())
        scale = (max_abs - (-max_abs)) / (q_max - q_min)
        chunk = torch.nan_to_num(torch.round(blocks / scale), nan=0.0).clamp_(q_min, q_max)
        data[start : start + len(blocks)] = chunk.to(torch.int8).view(len(blocks), -1).numpy()
        scales[start : start + len(blocks)] = scale.view(len(blocks), -1).numpy().astype(np.float16)
    return QuantizedWeight(data.view(dtype), scales)


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
