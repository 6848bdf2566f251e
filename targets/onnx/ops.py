"""Weight layouts of the built ONNX decoder: how each initializer is made from Hugging Face tensors.

`Binding` names an initializer, the HF tensors it is made from and the layout; `materialize` (or a
`Materializer`, for a stream of bindings) makes the array, one initializer at a time, so an emitter can stream a
model tensor by tensor. Quantization is `quantize_rows`: ORT's own block quantizer (`quantize_matmul_4bits` /
`_8bits`, symmetric, block 32, the C++ routines `MatMulNBitsQuantizer` calls) reproduced bit for bit in torch
(tests/test_onnx_graph.py holds it to ORT's), so the bytes are deterministic and exactly what `MatMulNBits` expects.

Layouts (the vocabulary of `Binding.layout`):
- "as_is": the source tensor unchanged (embeddings, norm weights).
- "concat": 1-D sources concatenated (the packed Q/K/V bias).
- "transposed": the sources' rows concatenated ([out, in] each), then transposed to MatMul's [in, out]; with
  several sources this is a packed projection (Q/K/V, or gate/up).
- "int4_blocks" / "int4_scales" / "int8_blocks" / "int8_scales": the "transposed" matrix [K, N] quantized;
  blocks are uint8 [N, ceil(K/32), 32*bits/8], scales float32 [N, ceil(K/32)]. K not a multiple of 32 is
  zero-padded to whole blocks, as ORT's quantizer does.
- "int8hi_blocks" / "int8lo_blocks": the high / low nibbles of the int8 blocks, each packed as int4 blocks
  [N, ceil(K/32), 16] (element 2j in the low nibble): q - 128 = 16 (hi - 8) + lo, so an int8 weight runs as two 4-bit
  MatMulNBits over the same bytes where onnxruntime has no 8-bit kernel (before 1.22); scales are "int8_scales".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ifp_export.weights import as_float32

BLOCK_SIZE = 32
QUANT_BITS = {"none": 0, "int8": 8, "int4": 4}


@dataclass(frozen=True)
class Binding:
    """One initializer of a built graph and how to make it from HF tensors (see the module docstring)."""

    initializer: str
    sources: tuple[str, ...]
    layout: str
    ffn: bool


def materialize(binding: Binding, get: Callable[[str], np.ndarray | torch.Tensor]) -> np.ndarray:
    """The initializer's float32 or quantized array from source tensors (`get(hf_name)`: numpy or torch, float32 or
    as stored, e.g. bf16; FFN sources already sliced).

    Deterministic: the same source tensors give the same bytes.
    """
    return Materializer(get)(binding)


class Materializer:
    """`materialize` over a stream of one model's bindings, quantizing each matrix once: a MatMulNBits' blocks and
    scales are two bindings over one quantization, bound one after the other, so the last one is kept."""

    def __init__(self, get: Callable[[str], np.ndarray | torch.Tensor]) -> None:
        self.get = get
        self._key: tuple | None = None
        self._quantized: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, binding: Binding) -> np.ndarray:
        layout, get = binding.layout, self.get
        if layout == "as_is":
            return np.ascontiguousarray(as_float32(get(binding.sources[0])).numpy())
        if layout == "concat":
            return np.concatenate([as_float32(get(s)).numpy() for s in binding.sources])
        if layout == "transposed":
            return _transposed(binding.sources, get)
        kind, _, part = layout.partition("_")
        if kind not in ("int4", "int8", "int8hi", "int8lo") or part not in ("blocks", "scales"):
            raise ValueError(f"unknown layout {layout!r} for initializer {binding.initializer!r}")
        bits = int(kind[3])
        if self._key != (binding.sources, bits):
            self._key, self._quantized = None, None  # drop the last matrix before making the next
            self._quantized = quantize_rows([get(s) for s in binding.sources], bits)
            self._key = (binding.sources, bits)
        blocks, scales = self._quantized
        if part == "scales":
            return scales
        return nibble_plane(blocks, kind[4:]) if kind in ("int8hi", "int8lo") else blocks


def _transposed(sources: tuple[str, ...], get: Callable[[str], np.ndarray | torch.Tensor]) -> np.ndarray:
    rows = [as_float32(get(s)) for s in sources]
    stacked = rows[0] if len(rows) == 1 else torch.cat(rows)
    return stacked.T.contiguous().numpy()  # blocked and threaded: ~2.5x numpy's transpose


def quantized_shapes(k: int, n: int, bits: int) -> tuple[tuple[int, int, int], tuple[int, int]]:
    """Shapes of MatMulNBits' B (blocks) and scales for a [K, N] weight."""
    k_blocks = -(-k // BLOCK_SIZE)
    return (n, k_blocks, BLOCK_SIZE * bits // 8), (n, k_blocks)


QUANTIZE_ROWS_CHUNK = 64  # rows quantized at once: their temporaries stay in the cache (~2x faster than whole)


def quantize_rows(rows: list[np.ndarray | torch.Tensor], bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block quantization (blocks, scales) of the MatMul weight whose [out, in] rows are `rows`
    (concatenated), computed the way ORT's routine does, bit for bit but for the block padding past K, which nothing
    reads (zero-padded here), in torch on both cores and without the [K, N] transpose ORT's routine needs. Per block
    of 32 inputs the value of largest |.| (the minimum on a tie) over -2**(bits-1) is the scale, and each weight is
    round-half-away(w * (1 / scale) + 2**(bits-1)) clamped to the range. The emitter and the validation reference
    both quantize with it; ORT's MatMulNBits, reading the emitted bytes, is what checks the layout."""
    k = rows[0].shape[1]
    (n, k_blocks, width), _ = quantized_shapes(k, sum(r.shape[0] for r in rows), bits)
    blocks, scales = np.empty((n, k_blocks, width), np.uint8), np.empty((n, k_blocks), np.float32)
    done = 0
    for q, scale in quantized_chunks(rows, bits):
        q = q.to(torch.uint8)
        if bits == 4:
            q = q[..., 0::2] | (q[..., 1::2] << 4)
        blocks[done : done + len(q)] = q.numpy()
        scales[done : done + len(q)] = scale.numpy()
        done += len(q)
    return blocks, scales


def fake_quantized_rows(rows: list[np.ndarray | torch.Tensor], bits: int) -> np.ndarray:
    """`dequantized_rows(*quantize_rows(rows, bits), bits, K)`, bit for bit, without packing and unpacking the
    blocks: the [N, K] float32 weight MatMulNBits computes with, for a reference that never needs the bytes."""
    k = rows[0].shape[1]
    k_blocks = -(-k // BLOCK_SIZE)
    aligned = k == k_blocks * BLOCK_SIZE
    weight = torch.empty(sum(r.shape[0] for r in rows), k)
    done = 0
    for q, scale in quantized_chunks(rows, bits):
        n = len(q)
        if aligned:  # dequantized straight into the result
            dequantized_values(q, scale, bits, out=weight[done : done + n].view(n, k_blocks, BLOCK_SIZE))
        else:
            weight[done : done + n] = dequantized_values(q, scale, bits).view(n, -1)[:, :k]
        done += n
    return weight.numpy()


def quantized_chunks(rows: list[np.ndarray | torch.Tensor], bits: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`quantize_rows`' arithmetic, `QUANTIZE_ROWS_CHUNK` rows at a time, in place on one float32 copy of the chunk
    (its temporaries stay in the cache): per chunk the quantized values [n, K / 32, 32] (float32 integers in
    [0, 2**bits), unpacked, K zero-padded to whole blocks) and the scales."""
    mid = float(1 << (bits - 1))
    k = rows[0].shape[1]
    k_blocks = -(-k // BLOCK_SIZE)
    for source in rows:
        for start in range(0, source.shape[0], QUANTIZE_ROWS_CHUNK):
            chunk = source[start : start + QUANTIZE_ROWS_CHUNK]  # only read
            part = (torch.empty if k == k_blocks * BLOCK_SIZE else torch.zeros)(len(chunk), k_blocks * BLOCK_SIZE)
            part[:, :k] = chunk if isinstance(chunk, torch.Tensor) else as_float32(chunk)  # upcast as it is copied
            part = part.view(len(chunk), k_blocks, BLOCK_SIZE)
            high, low = part.amax(-1), part.amin(-1)  # each ~10x faster than one torch.aminmax here
            scale = torch.where(high.abs() > low.abs(), high, low) / -mid
            reciprocal = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
            shifted = part.mul_(reciprocal[..., None]).add_(mid)  # x in [0, 2 mid] (but for rounding; then clamped)
            # round half away from zero, as floor(x + 0.5), in place (3 passes fewer than floor + compare + add):
            # the same for every float32 w / scale in [-mid - 0.5, mid + 0.5] (checked exhaustively for int4 and
            # int8), as x + 0.5 rounds only where it crosses a power of two, which it floors to either way; beyond,
            # both clamp; floor is ~10x faster than torch's trunc
            yield shifted.add_(0.5).floor_().clamp_(0, 2 * mid - 1), scale


def nibble_plane(blocks: np.ndarray, plane: str) -> np.ndarray:
    """The high ("hi") or low ("lo") nibbles of int8 blocks [N, kb, 32], packed as int4 blocks [N, kb, 16]."""
    values = blocks >> 4 if plane == "hi" else blocks & 0x0F
    return np.ascontiguousarray(values[..., 0::2] | (values[..., 1::2] << 4))


def dequantized_sources(
    bindings: list[Binding], get: Callable[[str], np.ndarray | torch.Tensor]
) -> dict[str, np.ndarray]:
    """HF name -> the float32 [out, in] weight a quantized graph really uses, for every quantized source.

    Load these into the PyTorch decoder (in place of the originals) to get the reference a quantized export
    must match; unquantized tensors (embeddings, norms, biases) are not listed.
    """
    weights: dict[str, np.ndarray] = {}
    for binding in bindings:
        if not binding.layout.endswith("_blocks") or binding.layout == "int8lo_blocks":
            continue
        bits = int(binding.layout[3])  # int8hi: the whole int8 blocks
        rows = [get(s).shape[0] for s in binding.sources]
        matrix = fake_quantized_rows([get(s) for s in binding.sources], bits)
        weights.update(zip(binding.sources, np.split(matrix, np.cumsum(rows)[:-1], axis=0), strict=True))  # [N, K]
    return weights


def dequantized_rows(blocks: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The float32 weight MatMulNBits computes with (symmetric: zero point 2**(bits-1)) as [N, K] (the HF [out, in]
    layout), C-contiguous, computed with torch (threaded, one pass per step: at 8B the reference dequantizes every
    weight of every model it checks)."""
    n, k_blocks, _ = blocks.shape
    packed = torch.from_numpy(blocks)
    if bits == 4:
        values = torch.stack((packed & 0x0F, packed >> 4), dim=-1).view(n, k_blocks, BLOCK_SIZE)
    else:
        values = packed.view(n, k_blocks, BLOCK_SIZE)
    weight = dequantized_values(values, torch.from_numpy(scales), bits)
    return weight.view(n, k_blocks * BLOCK_SIZE)[:, :k].contiguous().numpy()


def dequantized_values(
    q: torch.Tensor, scales: torch.Tensor, bits: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Unpacked quantized values [N, K / 32, 32] (uint8, or float32 integers: then changed in place) times their
    block's scale [N, K / 32], after the symmetric zero point 2**(bits-1): what MatMulNBits computes with, float32
    (into `out` if given)."""
    return torch.mul(q.to(torch.float32).sub_(float(1 << (bits - 1))), scales[:, :, None], out=out)
