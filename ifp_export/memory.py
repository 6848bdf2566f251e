"""Giving memory back between large steps (passes, models), so each starts from what is really in use."""

from __future__ import annotations

import ctypes
import gc


def release_freed_memory() -> None:
    """Collect reference cycles, then give the C heap's free pages back to the system.

    coremltools' MIL programs and onnx-ir graphs are cycles (ops and values point at each other), so their arrays
    go only with a cyclic collection. And glibc keeps freed chunks below its mmap threshold (which grows to 32 MiB
    as large arrays are freed: most weight tensors) in its heap, counted in RSS until trimmed: the bench model's
    Core ML program (~1 GB) stayed resident after it was written, and the next pass started from the last one's
    peak. A no-op trim where there is no `malloc_trim` (not glibc).
    """
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)
