"""Weight-only quantization in ONNX Runtime's MatMulNBits form (8 or 4 bits, blocks of 32 along K, symmetric).

One weight at a time with ORT's own block quantizer kernels, so quantized weights stream like fp32 ones.
`dequantize` is the exact inverse the kernel computes with: validation runs PyTorch on these weights (18.10).
Activations stay fp32 (ORT's quantize_dynamic also quantizes activations per tensor, which cost the trained sample
5 logits of error).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

if TYPE_CHECKING:
    from ifp_export.targets.onnx.binding import Binding

BLOCK_SIZE = 32
BITS = {"int8": 8, "int4": 4}
QUANTIZED_LAYOUTS = {"q4": (4, "blocks"), "q4.scales": (4, "scales"), "q8": (8, "blocks"), "q8.scales": (8, "scales")}


def quantize_blocks(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """HF weight [N, K] (y = x @ W.T) -> (uint8 blocks [N, K/32, 32*bits/8], float32 scales [N, K/32])."""
    n, k = weight.shape
    blocks_per_row = -(-k // BLOCK_SIZE)
    b = np.zeros((blocks_per_row * BLOCK_SIZE, n), np.float32)
    b[:k] = weight.T
    packed = np.zeros((n, blocks_per_row, BLOCK_SIZE * bits // 8), np.uint8)
    zero_points = np.zeros((n, -(-blocks_per_row * bits // 8)), np.uint8)
    scales = np.zeros((n, blocks_per_row), np.float32)
    kernel = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    kernel(packed, b, scales, zero_points, BLOCK_SIZE, n, b.shape[0], True)
    return packed, scales


def dequantize(weight: np.ndarray, bits: int) -> np.ndarray:
    """The float32 [N, K] weight a MatMulNBits node computes with after quantizing `weight` (zero point 2^(bits-1))."""
    n, k = weight.shape
    packed, scales = quantize_blocks(weight, bits)
    if bits == 4:
        values = np.stack((packed & 0x0F, packed >> 4), axis=-1).reshape(n, scales.shape[1], BLOCK_SIZE)
    else:
        values = packed
    centered = values.astype(np.float32) - 2 ** (bits - 1)
    return (centered * scales[..., None]).reshape(n, -1)[:, :k]


def to_matmul_nbits(graph: ir.Model, bindings: list[Binding], bits: int) -> list[Binding]:
    """Replace every MatMul whose B is a bound weight (stored transposed, [K, N]) with MatMulNBits in place;
    returns the new bindings (the weight's blocks and scales instead of the fp32 matrix)."""
    by_name = {b.initializer: b for b in bindings}
    replaced: set[str] = set()
    out = []
    for node in list(graph.graph):
        if node.op_type != "MatMul" or node.domain != "" or node.inputs[1] is None:
            continue
        binding = by_name.get(node.inputs[1].name)
        if binding is None or binding.layout != "transposed":
            continue
        k, n = node.inputs[1].shape
        blocks_per_row = -(-int(k) // BLOCK_SIZE)
        stem = node.inputs[1].name
        q = ir.Value(name=f"{stem}.q{bits}", shape=ir.Shape([n, blocks_per_row, BLOCK_SIZE * bits // 8]))
        q.type = ir.TensorType(ir.DataType.UINT8)
        s = ir.Value(name=f"{stem}.scales", shape=ir.Shape([n, blocks_per_row]))
        s.type = ir.TensorType(ir.DataType.FLOAT)
        for value in (q, s):  # registered data-less, like every bound initializer: filled at write time
            value.const_value = ir.tensor(np.zeros(0, value.dtype.numpy()))
            graph.graph.register_initializer(value)
            value.const_value = None
        new = ir.node(
            "MatMulNBits",
            [node.inputs[0], q, s],
            attributes={"K": int(k), "N": int(n), "bits": bits, "block_size": BLOCK_SIZE},
            domain="com.microsoft",
        )
        graph.graph.insert_before(node, new)
        old, result = node.outputs[0], new.outputs[0]
        result.type, result.shape = old.type, old.shape
        old.replace_all_uses_with(result, replace_graph_outputs=True)
        old.name, result.name = None, old.name  # keeps "logits" when the lm_head MatMul feeds the output
        graph.graph.remove(node, safe=True)
        replaced.add(stem)
        out += [
            dataclasses.replace(binding, initializer=q.name, layout=f"q{bits}"),
            dataclasses.replace(binding, initializer=s.name, layout=f"q{bits}.scales"),
        ]
    for stem in replaced:
        if not graph.graph.initializers[stem].uses():
            del graph.graph.initializers[stem]
    graph.opset_imports.setdefault("com.microsoft", 1)
    return [b for b in bindings if b.initializer in graph.graph.initializers] + out
