"""Giving memory back between large steps (passes, models), so each starts from what is really in use."""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Iterator
from contextlib import contextmanager

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
