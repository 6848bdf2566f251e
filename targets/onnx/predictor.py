"""The predictor graph with the routing head folded in, traced with the dynamo exporter (it is small; the decoder
is built from the config instead: build.build_decoder).

The export traces it in a child process (`PredictorTrace`, `predictor_process`): the dynamo exporter imports ~75 MiB
of modules (torch._dynamo, torch.onnx's exporter, onnxscript's torchlib) and leaves ~20 MiB more behind, all of it
held to the end of the process that traces, and the export's peak comes later (validation's ONNX Runtime run of the
dense model: bench model 1.60x its weights with the trace in process)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import IO

import onnx_ir as ir
import safetensors.torch
import torch
from onnx_ir.passes.common import ClearMetadataAndDocStringPass
from torch import nn

from ifp_export.masks import standardize
from ifp_export.model.predictor import SparsityPredictor
from ifp_export.quiet import quiet

PREDICTOR_NAME = "predictor"
MASKS_TENSOR = "variant_masks"


class PredictorRouter(nn.Module):
    """Predictor + routing head: scores [B, L, d_ff] and variant_scores [B, V] (see masks.routing_scores)."""

    def __init__(self, predictor: SparsityPredictor, variant_masks: torch.Tensor) -> None:
        super().__init__()
        self.predictor = predictor
        weights = variant_masks / variant_masks.sum(-1, keepdim=True).clamp(min=1) / variant_masks.shape[1]
        self.register_buffer("routing", weights.flatten(1).T.contiguous())  # [L*d, V]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        limit = self.predictor.config.max_length  # masks.TRUNCATION: a longer prompt keeps its first tokens
        input_ids, attention_mask = input_ids[:, :limit], attention_mask[:, :limit]
        scores = self.predictor(input_ids, attention_mask)
        return scores, standardize(scores).flatten(1) @ self.routing


def trace(module: nn.Module, args: tuple, dynamic_shapes: dict, inputs: list[str], outputs: list[str]) -> ir.Model:
    """Export with the dynamo exporter; drop debug metadata (stack traces, node names) and value_info."""
    with quiet(), torch.no_grad():
        program = torch.onnx.export(
            module.eval(),
            args,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=inputs,
            output_names=outputs,
            optimize=True,
            verbose=False,
        )
    model = program.model
    ClearMetadataAndDocStringPass()(model)
    graph_outputs = set(model.graph.outputs)
    count = 0
    for node in model.graph:
        node.name = None
        for value in node.outputs:  # no value_info, short names: every variant's .onnx repeats the graph
            if value not in graph_outputs:
                value.shape, value.type = None, None
                value.name = f"t{count}"
                count += 1
    model.producer_name, model.producer_version = "ifp-export", None
    return model


def trace_predictor(predictor: SparsityPredictor, variant_masks: torch.Tensor) -> ir.Model:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence_length")
    args = (torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long))
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    router = PredictorRouter(predictor, variant_masks)
    return trace(router, args, shapes, ["input_ids", "attention_mask"], ["scores", "variant_scores"])


def feed(pipe: IO[bytes], data: bytes) -> None:
    """Write `data` into `pipe` and close it; a child that died first closed its end (its log says why)."""
    with contextlib.suppress(BrokenPipeError), pipe:
        pipe.write(data)


class PredictorTrace:
    """`predictor_process` run as a child process: it loads the predictor from `predictor_dir`, traces it with the
    routing head of `variant_masks` (safetensors bytes on its stdin: no file to leave behind if the export is killed)
    and writes `predictor.onnx` (+ data) into `directory`. Started on entry, so it runs beside what the caller does
    next (the decoders' binding: mostly I/O, one core); `wait` returns the graph's path or raises with the child's
    last output line; leaving the block early stops the child."""

    def __init__(self, directory: Path, predictor_dir: Path, variant_masks: torch.Tensor) -> None:
        self.directory, self.predictor_dir, self.variant_masks = directory, predictor_dir, variant_masks

    def __enter__(self) -> PredictorTrace:
        self.log = tempfile.TemporaryFile()  # unlinked at once: nothing on disk outlives the process
        command = [sys.executable, "-m", "ifp_export.targets.onnx.predictor_process"]
        command += [str(self.predictor_dir), str(self.directory), str(os.getpid())]
        self.child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT)
        masks = safetensors.torch.save({MASKS_TENSOR: self.variant_masks.contiguous()})
        self.feeder = threading.Thread(target=feed, args=(self.child.stdin, masks), daemon=True)
        self.feeder.start()  # the child reads them after its imports: the caller goes on meanwhile
        return self

    def wait(self) -> Path:
        self.feeder.join()
        if self.child.wait() != 0:
            self.log.seek(0)
            lines = self.log.read().decode(errors="replace").strip().splitlines() or ["(no output)"]
            raise RuntimeError(f"tracing the predictor failed (exit {self.child.returncode}): {lines[-1]}")
        return self.directory / f"{PREDICTOR_NAME}.onnx"

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if self.child.poll() is None:
            self.child.kill()
            self.child.wait()
        self.feeder.join()
        self.log.close()
