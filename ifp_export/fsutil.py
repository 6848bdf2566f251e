"""Small file helpers: atomic writes, canonical JSON, validated safetensors reads. Never unpickles."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from ifp_export.errors import IFPError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def canonical_json(data: Any) -> str:
    """Sorted keys, fixed indent, trailing newline: same data, same bytes."""
    return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def check_no_symlink_below(root: Path, path: Path, fix: str) -> None:
    """Refuse `path` if it or a directory between `root` and it is a symlink, or it resolves outside `root` (the
    output loader's rule, artifacts.contained_path, applied to inputs). A missing path is left to its reader."""
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        if current.is_symlink():
            raise IFPError("is (or passes through) a symlink, which is never followed", current, fix)
        if not current.exists():
            return
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise IFPError("resolves outside its directory", path, fix)


@contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A file to write `path` through: a temp file beside it, fsynced and renamed over `path` on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared and shipped
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, canonical_json(data).encode())


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Contiguous CPU tensors in sorted-name order, header with sorted keys, so equal tensors give equal bytes."""
    ordered = {name: tensors[name].detach().cpu().contiguous() for name in sorted(tensors)}
    atomic_write_bytes(path, canonical_safetensors(safetensors_bytes(ordered, metadata=metadata or {"format": "pt"})))


def canonical_safetensors(data: bytes) -> bytes:
    """Re-serialize a safetensors header with sorted keys (the Rust writer emits `__metadata__` in hash-map order,
    which changes from process to process); data offsets are relative to the data section, so they still hold."""
    size = int.from_bytes(data[:8], "little")
    return safetensors_header(json.loads(data[8 : 8 + size])) + data[8 + size :]


def safetensors_header(header: dict[str, Any]) -> bytes:
    """The 8-byte length and the JSON header, sorted keys, space-padded so the data section is 8-byte aligned."""
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-(8 + len(text)) % 8)  # keep the data section 8-byte aligned, as safetensors does
    return len(text).to_bytes(8, "little") + text


@dataclass(frozen=True)
class TensorEntry:
    """One tensor to stream into a safetensors file: its safetensors dtype (`F32`, `BF16`, ...), shape, and a
    callable producing its raw little-endian bytes (called once, when the tensor is written)."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    data: Callable[[], Any]


def stream_safetensors(
    path: Path,
    entries: dict[str, TensorEntry],
    metadata: dict[str, str] | None = None,
    written: Callable[[str], None] = lambda name: None,
) -> None:
    """Write a safetensors file tensor by tensor (header first), holding one tensor at a time; `written(name)` is
    called after each (e.g. to drop the source's pages).

    Names in sorted order and the canonical header, so for tensors of one dtype the bytes equal `write_safetensors`'.
    """
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name in sorted(entries):
        entry = entries[name]
        header[name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    with atomic_writer(path) as f:
        f.write(safetensors_header(header))
        for name in sorted(entries):
            data = memoryview(entries[name].data()).cast("B")
            if data.nbytes != entries[name].nbytes:
                raise RuntimeError(
                    f"tensor {name!r} produced {data.nbytes} bytes, its header says {entries[name].nbytes}"
                )
            f.write(data)
            del data
            written(name)


def read_json(path: Path, what: str = "JSON file") -> Any:
    if not path.is_file():
        raise IFPError(f"{what} not found", path, "check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IFPError(f"{what} is not valid JSON ({err})", path, "fix or regenerate the file") from None


def read_safetensors(path: Path, fix: str = "re-save the weights with safetensors") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (memory-mapped), refusing missing, corrupt or pickle files."""
    open_safetensors(path, fix)
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iterator


def open_safetensors(path: Path, fix: str = "re-save the weights with safetensors") -> dict[str, Any]:
    """The JSON header of a safetensors file, after safetensors itself has validated it (offsets cover the file
    exactly, shapes match sizes); refuses missing, corrupt or pickle files. Reads no tensor data."""
    if not path.is_file():
        pickled = [p.name for p in path.parent.glob("*") if p.suffix in PICKLE_SUFFIXES]
        if pickled:
            raise IFPError(
                f"{path.name} not found; only pickle weights ({', '.join(sorted(pickled))}) exist and pickle "
                "is never loaded",
                path.parent,
                "convert them to safetensors (save_pretrained(..., safe_serialization=True))",
            )
        raise IFPError("weights file not found", path, fix)
    try:
        with safe_open(str(path), framework="pt"):
            pass
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            return json.loads(f.read(size))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise IFPError(f"corrupt or truncated safetensors file ({detail})", path, fix) from None


def check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise IFPError(f"tensor {name!r} holds NaN or Inf values", path, "use a checkpoint with finite weights")
