"""Giving memory back between large steps (passes, models), so each starts from what is really in use."""

from __future__ import annotations

import ctypes
import gc
import mmap
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

_scopes = [0]  # how many `survivors_frozen` blocks are open


@contextmanager
def survivors_frozen() -> Iterator[None]:
    """Within this block each `release_freed_memory` freezes what survived it (`gc.freeze`), so the next full
    collection walks only the objects made since; at the end all are unfrozen again.

    Why: the imported modules (torch, onnxscript, coremltools) are ~340k-630k objects that live as long as the
    process, and walking them made each full collection 0.2-0.5 s: 6.3 s of a tiny export's 17.7-s pipeline.
    What this costs: an object alive at one release that dies in a reference cycle before the block ends is
    collected only at its end. What a pass drops is garbage by the release that follows it, so that is collected.
    """
    gc.freeze()
    _scopes[0] += 1
    try:
        yield
    finally:
        _scopes[0] -= 1
        if not _scopes[0]:
            gc.unfreeze()


def release_freed_memory() -> None:
    """Collect reference cycles, then give the C heap's free pages back to the system.

    coremltools' MIL programs and onnx-ir graphs are cycles (ops and values point at each other), so their arrays
    go only with a cyclic collection. And glibc keeps freed chunks below its mmap threshold (which grows to 32 MiB
    as large arrays are freed: most weight tensors) in its heap, counted in RSS until trimmed: the bench model's
    Core ML program (~1 GB) stayed resident after it was written, and the next pass started from the last one's
    peak. A no-op trim where there is no `malloc_trim` (not glibc).
    """
    gc.collect()
    if _scopes[0]:
        gc.freeze()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def drop_clean_file_pages(tensors: Iterable[torch.Tensor]) -> None:
    """Drop the resident pages of every file mapping that holds one of `tensors` and none of whose pages was ever
    written (each byte is the file's, re-read from the page cache when touched again); other memory is left alone.

    Why: weights read with safetensors (the predictor, an LM predictor's body) are private file mappings whose touched
    pages count in RSS until dropped, and the predictor, read by the predict, ONNX and Core ML passes, was 52 MiB of
    the bench export's peak (validation's ONNX Runtime run of the dense model, which never reads it)."""
    starts = sorted({t.untyped_storage().data_ptr() for t in tensors})
    madvise = ctypes.CDLL(None).madvise
    for start, end in clean_file_mappings():
        if any(start <= ptr < end for ptr in starts):
            madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


def clean_file_mappings() -> list[tuple[int, int]]:
    """[start, end) of this process's mappings of a file with no anonymous (written, copy-on-write) page."""
    mappings, current = [], None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                fields = line.split()
                start, end = (int(x, 16) for x in fields[0].split("-"))
                current = (start, end) if len(fields) > 5 and fields[5].startswith("/") else None
            elif line.startswith("Anonymous:") and current is not None and int(line.split()[1]) == 0:
                mappings.append(current)
    return mappings
