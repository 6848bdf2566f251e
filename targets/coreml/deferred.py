"""Weights the Core ML program refers to but does not hold: each is read when the backend writes its blob.

coremltools keeps every const's value in the program until `mil_to_proto` writes weight.bin, so a multifunction
program held the shared weights, the dense FFN and every variant's FFN slices at once: the bench model's fp16
program ~1 GB beside the mapped checkpoint, an 8B int4 program ~19 GB (coremltools holds int4 one value per byte).
Here a weight const holds a placeholder of its shape and dtype instead (one row of memory, broadcast; rows differ
between placeholders, so no pass sees two weights as equal and merges them), and `writing()` has the backend call
the placeholder's producer (which reads the checkpoint) as it writes that blob: about one tensor is resident at a
time. Consts appear in the program by identity, so the placeholder object is the key. A placeholder that a pass
replaced would be written from its row, so `writing()` refuses to finish unless every placeholder was written, and
validation reads every blob back against the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ifp_export.quiet import quiet

with quiet():
    from coremltools.converters.mil.backend.mil import helper as backend_helper


class DeferredWeights:
    """Placeholders and their producers for one program; `value(op)` is a const's real value wherever it is."""

    def __init__(self) -> None:
        self._producers: dict[int, tuple[np.ndarray, Callable[[], np.ndarray]]] = {}
        self._cached: tuple[object, Any] | None = None

    def placeholder(self, shape: tuple[int, ...], dtype: np.dtype, produce: Callable[[], np.ndarray]) -> np.ndarray:
        """A read-only array of `shape` and `dtype` whose rows are one distinct row; `produce()` gives the real one."""
        rng = np.random.default_rng(len(self._producers))
        if np.issubdtype(dtype, np.integer):
            row = rng.integers(-8, 8, shape[-1]).astype(dtype)
        else:
            row = rng.standard_normal(shape[-1]).astype(dtype)
        strides = (0,) * (len(shape) - 1) + (row.itemsize,)
        array = np.lib.stride_tricks.as_strided(row, shape, strides, writeable=False).view(dtype)
        self._producers[id(array)] = (array, produce)
        return array

    def once(self, key: object, make: Callable[[], Any]) -> Any:
        """`make()`, kept until another key is asked for: a quantized weight's data and scale blobs are written one
        after the other from one quantization."""
        if self._cached is None or self._cached[0] != key:
            self._cached = None
            self._cached = (key, make())
        return self._cached[1]

    def value(self, op: Any) -> np.ndarray:
        """A const op's value: produced if it is a placeholder (tests run programs on the real weights)."""
        val = op.outputs[0].val
        entry = self._producers.get(id(val))
        return val if entry is None or entry[0] is not val else self._produce(entry)

    @staticmethod
    def _produce(entry: tuple[np.ndarray, Callable[[], np.ndarray]]) -> np.ndarray:
        placeholder, produce = entry
        array = np.ascontiguousarray(produce())
        if array.shape != placeholder.shape or array.dtype != placeholder.dtype:
            raise RuntimeError(
                f"deferred Core ML weight produced {array.dtype}{list(array.shape)}, "
                f"the program holds {placeholder.dtype}{list(placeholder.shape)}"
            )
        return array.view(placeholder.dtype)  # keeps coremltools' sub-byte dtype marker (int4)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Within this block the MIL backend writes each placeholder's produced value instead of the placeholder."""
        write = backend_helper._get_offset_by_writing_data
        written: set[int] = set()

        def write_produced(var: Any, blob_writer: Any) -> int:
            entry = self._producers.get(id(var.val))
            if entry is None or entry[0] is not var.val:
                return write(var, blob_writer)
            written.add(id(var.val))
            return write(ProducedVar(var.dtype, self._produce(entry)), blob_writer)

        backend_helper._get_offset_by_writing_data = write_produced
        try:
            yield
        finally:
            backend_helper._get_offset_by_writing_data = write
            self._cached = None
        missing = len(self._producers) - len(written)
        if missing:
            raise RuntimeError(f"{missing} deferred Core ML weights were not written (a graph pass replaced them)")


class ProducedVar:
    """What the backend's blob writer reads of a const var: its MIL dtype and its value."""

    def __init__(self, dtype: Any, val: np.ndarray) -> None:
        self.dtype, self.val = dtype, val
