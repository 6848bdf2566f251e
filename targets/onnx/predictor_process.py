"""`python -m ifp_export.targets.onnx.predictor_process PREDICTOR_DIR OUT_DIR PARENT_PID < MASKS`: the predictor graph,
traced and written in a process of its own (`predictor.PredictorTrace` says why): PREDICTOR_DIR is a checkpoint's
predictor directory, MASKS (stdin) safetensors bytes with the variants' masks [V, L, d_ff], OUT_DIR where
`predictor.onnx` and its data file go. It dies with PARENT_PID, the export: a killed export leaves no process writing
into its work directory. Its last output line, on failure, is the error in one line."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import traceback
from pathlib import Path

import onnx_ir as ir
import safetensors.torch
import torch

from ifp_export.checkpoint import read_predictor
from ifp_export.model.predictor import SparsityPredictor
from ifp_export.targets.onnx.emitter import EXTERNAL_THRESHOLD, DataWriter, external
from ifp_export.targets.onnx.predictor import MASKS_TENSOR, PREDICTOR_NAME, trace_predictor


def write_predictor(directory: Path, predictor: SparsityPredictor, variant_masks: torch.Tensor) -> Path:
    """`predictor.onnx` with the routing head folded in; tensors of `EXTERNAL_THRESHOLD` bytes or more go to
    `predictor.onnx_data`."""
    graph = trace_predictor(predictor, variant_masks)
    writer = DataWriter(directory)
    for name, value in graph.graph.initializers.items():
        array = value.const_value.numpy()
        if array.nbytes >= EXTERNAL_THRESHOLD:
            location = writer.write(f"{PREDICTOR_NAME}.onnx_data", array)
            value.const_value = external(name, array.dtype, array.shape, location, directory)
    path = directory / f"{PREDICTOR_NAME}.onnx"
    ir.save(graph, path)
    return path


PR_SET_PDEATHSIG = 1


def die_with(parent: int) -> None:
    """SIGKILL this process when `parent` exits (at once if it already has)."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    predictor_dir, directory, parent = sys.argv[1:] if argv is None else argv
    die_with(int(parent))
    torch.set_num_threads(1)  # tracing is Python work; the parent binds decoders on the other core meanwhile
    try:
        predictor = read_predictor(Path(predictor_dir))
        masks = safetensors.torch.load(sys.stdin.buffer.read())[MASKS_TENSOR]
        write_predictor(Path(directory), predictor, masks)
    except Exception as error:
        traceback.print_exc()
        print(f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
