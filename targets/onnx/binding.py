"""Which checkpoint tensors an ONNX initializer is made of, and how: the contract between a graph and its weights.

A graph (built or traced) comes with data-less initializers; each `Binding` says which HF tensors fill one and in
what layout. `materialize(binding, get)` makes the array from `get(hf_name) -> float32`, so a model's weights are
read one tensor at a time at write time (for a variant, `get` gathers its FFN slices).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ifp_export.targets.onnx.quantize import QUANTIZED_LAYOUTS, quantize_blocks


@dataclass(frozen=True)
class Binding:
    initializer: str
    sources: tuple[str, ...]  # HF tensor names
    layout: str  # "same" | "transposed" | "q4" / "q8" (MatMulNBits blocks) | "q4.scales" / "q8.scales"
    ffn: bool  # an FFN projection: differs per model (variant slice), stored in the model's own data file


def tensor_key(array: np.ndarray) -> str:
    return f"{array.dtype}:{array.shape}:{hashlib.sha256(array.tobytes()).hexdigest()}"


def materialize(binding: Binding, get: Callable[[str], np.ndarray]) -> np.ndarray:
    """The initializer's array from its source tensors (float32, HF layout [out, in])."""
    (name,) = binding.sources
    weight = get(name)
    if binding.layout == "same":
        return weight
    if binding.layout == "transposed":
        return np.ascontiguousarray(weight.T)
    if binding.layout in QUANTIZED_LAYOUTS:
        bits, part = QUANTIZED_LAYOUTS[binding.layout]
        blocks, scales = quantize_blocks(weight, bits)
        return blocks if part == "blocks" else scales
    raise ValueError(f"unknown binding layout {binding.layout!r}")
