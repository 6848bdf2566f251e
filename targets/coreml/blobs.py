"""Reading weights back from an mlpackage's weight.bin by the blob offsets in its spec (validation, tests, sizes)."""

from __future__ import annotations

import hashlib
import mmap
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ifp_export.targets.coreml.package import coremltools, package_weights_path

BLOB_SENTINEL = 0xDEADBEEF
Weights = bytes | bytearray | mmap.mmap
BLOB_DTYPES = {1: "<f2", 2: "<f4", 4: "i1"}  # MIL blob storage dtype codes: float16, float32, int8
BLOB_INT4 = 8  # MIL blob storage dtype code of int4 (two per byte, low nibble first)


@dataclass(frozen=True)
class BlobRef:
    """A const whose value lives in weight.bin: dtype, shape and the offset of its blob metadata."""

    name: str
    shape: tuple[int, ...]
    offset: int


def function_blobs(spec: Any, function: str) -> dict[str, BlobRef]:
    """const name -> BlobRef for every weight.bin-backed const of one mlprogram function."""
    fn = spec.mlProgram.functions[function]
    refs: dict[str, BlobRef] = {}
    for op in fn.block_specializations[fn.opset].operations:
        if op.type != "const" or not op.attributes["val"].HasField("blobFileValue"):
            continue
        val = op.attributes["val"]
        shape = tuple(int(d.constant.size) for d in val.type.tensorType.dimensions)
        refs[op.outputs[0].name] = BlobRef(op.outputs[0].name, shape, int(val.blobFileValue.offset))
    return refs


def blob_data_range(weights: Weights, offset: int) -> tuple[int, int, int]:
    """(dtype code, data offset, data size) of the blob whose metadata starts at `offset`.

    MIL blob storage v2: per blob a 64-byte metadata record `uint32 sentinel (0xDEADBEEF), uint32 dtype,
    uint64 size in bytes, uint64 data offset, ...` (coremltools mlmodel/src/MILBlob/Blob/StorageFormat.hpp).
    """
    sentinel, dtype, size, data_offset = struct.unpack_from("<IIQQ", weights, offset)
    if sentinel != BLOB_SENTINEL or data_offset + size > len(weights):
        raise ValueError(f"no blob at offset {offset} of weight.bin")
    return dtype, data_offset, size


def read_blob(weights: Weights, ref: BlobRef) -> np.ndarray:
    """The value of a blob-backed const (fp16, fp32, int8 or int4) as a numpy array of its shape."""
    dtype, start, size = blob_data_range(weights, ref.offset)
    if dtype == BLOB_INT4:  # low nibble first, sign-extended by arithmetic shifts, from the mapped bytes (no copy)
        with warnings.catch_warnings():  # read-only: torch only reads them
            warnings.simplefilter("ignore", UserWarning)
            packed = torch.from_numpy(np.frombuffer(weights, np.int8, size, start))
        values = torch.empty(size, 2, dtype=torch.int8)
        torch.bitwise_right_shift(packed << 4, 4, out=values[:, 0])
        torch.bitwise_right_shift(packed, 4, out=values[:, 1])
        return values.view(-1)[: int(np.prod(ref.shape))].reshape(ref.shape).numpy()
    if dtype not in BLOB_DTYPES:
        raise ValueError(f"blob {ref.name} has an unexpected dtype code {dtype}")
    return np.frombuffer(bytes(weights[start : start + size]), dtype=BLOB_DTYPES[dtype]).reshape(ref.shape)


@dataclass(frozen=True)
class QuantizedRef:
    """A `constexpr_blockwise_shift_scale` weight: weight = (data - offset) * scale, with one scale per block
    (block size along each axis = data dim / scale dim). Values as blob references or inline arrays."""

    name: str
    shape: tuple[int, ...]
    data: BlobRef | np.ndarray
    scale: BlobRef | np.ndarray
    offset: BlobRef | np.ndarray | None


MIL_IMMEDIATE_DTYPES = {10: np.float16, 11: np.float32, 21: np.int8}  # MIL DataType: FLOAT16, FLOAT32, INT8


def mil_value(value: Any, name: str) -> BlobRef | np.ndarray:
    """A MIL tensor value: a BlobRef when it lives in weight.bin, else the inline array."""
    tensor_type = value.type.tensorType
    shape = tuple(int(d.constant.size) for d in tensor_type.dimensions)
    if value.HasField("blobFileValue"):
        return BlobRef(name, shape, int(value.blobFileValue.offset))
    tensor = value.immediateValue.tensor
    kind = tensor.WhichOneof("value")
    if kind == "bytes" and tensor_type.dataType in MIL_IMMEDIATE_DTYPES:
        array = np.frombuffer(tensor.bytes.values, dtype=MIL_IMMEDIATE_DTYPES[tensor_type.dataType])
    elif kind in ("floats", "ints"):
        array = np.asarray(getattr(tensor, kind).values, dtype=np.float32 if kind == "floats" else np.int32)
    else:
        raise ValueError(f"inline value of {name} has an unsupported encoding ({kind}, type {tensor_type.dataType})")
    return array.reshape(shape)


def function_quantized(spec: Any, function: str) -> dict[str, QuantizedRef]:
    """Output name -> QuantizedRef for every `constexpr_blockwise_shift_scale` of one mlprogram function."""
    fn = spec.mlProgram.functions[function]
    operations = fn.block_specializations[fn.opset].operations
    consts = {
        op.outputs[0].name: op.attributes["val"] for op in operations if op.type == "const" and "val" in op.attributes
    }
    refs: dict[str, QuantizedRef] = {}
    for op in operations:
        if op.type != "constexpr_blockwise_shift_scale":
            continue
        name = op.outputs[0].name
        values: dict[str, BlobRef | np.ndarray] = {}
        for key in ("data", "scale", "offset"):
            if key not in op.inputs:
                continue
            argument = op.inputs[key].arguments[0]
            value = argument.value if argument.WhichOneof("binding") == "value" else consts[argument.name]
            values[key] = mil_value(value, f"{name}.{key}")
        shape = tuple(int(d.constant.size) for d in op.outputs[0].type.tensorType.dimensions)
        refs[name] = QuantizedRef(name, shape, values["data"], values["scale"], values.get("offset"))
    return refs


def quantized_parts(weights: Weights, ref: QuantizedRef) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(data, scale, offset or None) of a quantized weight as stored: weight = (data - offset) * scale, one scale (and
    offset) per block, the block size along each axis being data dim / scale dim."""

    def array(value: BlobRef | np.ndarray | None) -> np.ndarray | None:
        return read_blob(weights, value) if isinstance(value, BlobRef) else value

    data, scale, offset = array(ref.data), array(ref.scale), array(ref.offset)
    if data is None or scale is None or data.ndim != scale.ndim or data.shape != ref.shape:
        raise ValueError(f"quantized weight {ref.name} has inconsistent data/scale shapes")
    for part in (scale, offset):
        tiled = part is None or all(f % b == 0 for f, b in zip(data.shape, part.shape, strict=True))
        if not tiled or (part is not None and part.shape != scale.shape):
            raise ValueError(f"quantized weight {ref.name}: scale/offset shape {part.shape} does not tile {data.shape}")
    return data, scale, offset


def blob_offsets(spec: Any) -> set[int]:
    """Metadata offsets of every weight.bin blob any op of any function of `spec` refers to (const values and
    inline operands of constexpr ops)."""
    offsets = set()
    for fn in spec.mlProgram.functions.values():
        for op in fn.block_specializations[fn.opset].operations:
            values = [*op.attributes.values()]
            values += [a.value for i in op.inputs.values() for a in i.arguments if a.WhichOneof("binding") == "value"]
            offsets.update(int(v.blobFileValue.offset) for v in values if v.HasField("blobFileValue"))
    return offsets


def distinct_blob_bytes(packages: list[Path]) -> int:
    """Bytes of every distinct weight blob (dtype + content) across `packages`, each counted once: the ideal
    size of a quantized multifunction package, whose tensors have no PyTorch twin to count from."""
    ct = coremltools()
    seen: dict[tuple[int, str], int] = {}
    for package in packages:
        weights = open_weights(package)
        for offset in blob_offsets(ct.utils.load_spec(str(package))):
            dtype, start, size = blob_data_range(weights, offset)
            seen[(dtype, hashlib.sha256(weights[start : start + size]).hexdigest())] = size
    return sum(seen.values())


def open_weights(package: Path) -> mmap.mmap:
    """weight.bin of `package`, memory-mapped read-only: blobs are paged in as they are read, not all at once."""
    with package_weights_path(package).open("rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
