"""Giving memory back between large steps (passes, models), so each starts from what is really in use."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys


def release_freed_memory() -> None:
    """Collect reference cycles, then return the heap's free pages to the OS.

    coremltools' MIL programs and onnx-ir graphs are cycles (ops and values point at each other), so their arrays
    go only with a cyclic collection. And glibc keeps freed chunks below its mmap threshold (which grows to 32 MiB
    as large arrays are freed: most weight tensors) in its heap: without `malloc_trim`, the bench model's Core ML
    program (~1 GB) stayed resident after it was written, and the next pass started from the last one's peak.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        libc = ctypes.util.find_library("c")
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None  # glibc only (not musl)
        if trim is not None:
            trim(0)
