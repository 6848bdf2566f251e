"""Write decoder.mlpackage (one MIL-builder function per variant + "dense", shared weights stored once) and
predictor.mlpackage.

Each function is built from the config (`build.decoder_function`, its weights quantized as they are read if
asked), run through coremltools' main and `backend_mlprogram` pass pipelines on its own, then its weight consts get
their `weight_id`: the const name for a shared tensor (the same numpy array in every function, so identical by
construction; no value comparison), function-qualified for everything else. All functions go into one
`mil.Program` with `export_as_multifunction`, converted by the MIL-to-proto backend directly (the passes ran), so the
backend writes one blob per `weight_id`. This replaces `ct.utils.save_multifunction`, which reloads every package
and compares constants pairwise.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ifp_export.memory import release_freed_memory
from ifp_export.model.predictor import SparsityPredictor
from ifp_export.pipeline import ExportContext
from ifp_export.quiet import quiet
from ifp_export.targets.coreml.build import (
    DECODER_STATES,
    ZEROS_PREFIX,
    ProgramWeights,
    decoder_function,
)
from ifp_export.targets.coreml.deferred import DeferredWeights
from ifp_export.targets.coreml.package import (
    COREML_DIR,
    DECODER_PACKAGE,
    PREDICTOR_PACKAGE,
    QUANTIZE_MODES,
    context_length,
    coremltools,
    package_bytes,
    package_weights_path,
    save_model,
)
from ifp_export.targets.coreml.passes import run_passes
from ifp_export.targets.coreml.predictor import convert_predictor
from ifp_export.targets.coreml.quantize import QUANTIZED_SUFFIX
from ifp_export.targets.onnx import DENSE_NAME
from ifp_export.weights import WeightSource

with quiet():
    from coremltools.converters.mil import mil
    from coremltools.converters.mil.backend.mil.load import load as mil_to_proto
    from coremltools.converters.mil.backend.mil.load import should_use_weight_file
    from coremltools.converters.mil.mil import types
    from coremltools.models.model import _create_mlpackage

SPEC_VERSION = 9  # iOS 18: states, multifunction, int4

Progress = Callable[[str, int], contextlib.AbstractContextManager[Callable[[int], None]]]


@contextlib.contextmanager
def no_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n=1: None


def most_general(names: list[str], variant_masks: torch.Tensor, prompt_masks: torch.Tensor | None) -> str:
    """The variant whose mask overlaps most (mean IoU) with every calibration prompt's own mask (first on ties,
    or without predictions): the best fallback for an app that loads the package without routing."""
    if prompt_masks is None or len(names) == 1:
        return names[0]
    inter = torch.einsum("vld,nld->vnl", variant_masks, prompt_masks)
    union = variant_masks.sum(-1)[:, None] + prompt_masks.sum(-1)[None] - inter
    iou = (inter / union.clamp(min=1)).mean((1, 2))
    return names[int(torch.argmax(iou))]


def blob_bytes(op: Any) -> int:
    """Bytes the backend writes to weight.bin for a const (0 if it is inlined in the spec)."""
    var = op.outputs[0]
    if not should_use_weight_file(var.val, SPEC_VERSION):
        return 0
    return (var.val.size + 1) // 2 if var.dtype in (types.int4, types.uint4) else var.val.nbytes


def assign_weight_ids(fn: Any, function: str, shared: set[str]) -> dict[str, int]:
    """Shared consts (and the data/scales of their quantized form) get their name as `weight_id`, so every
    function points at one blob; the rest are qualified by the function. Returns weight_id -> weight.bin bytes."""
    sizes = {}
    for op in fn.operations:
        if op.op_type != "const":
            continue
        if op.name.startswith(ZEROS_PREFIX + "_"):  # zero biases: one blob per width
            op.weight_id = f"{ZEROS_PREFIX}_{op.outputs[0].val.size}"
        elif op.name.split(QUANTIZED_SUFFIX)[0] in shared:
            op.weight_id = op.name
        else:
            op.weight_id = f"{function}::{op.name}"
        sizes[op.weight_id] = blob_bytes(op)
    return sizes


def build_program(
    source: WeightSource,
    kept: dict[str, np.ndarray | None],
    max_context: int,
    quantize: str,
    default: str,
    progress: Progress = no_progress,
) -> tuple[Any, int, DeferredWeights]:
    """The multifunction program (one function per `kept` entry, in order; None = dense), its ideal weight bytes
    (shared consts once + every function's own) and its deferred weights (read when `convert_program` writes them)."""
    deferred = DeferredWeights()
    weights = ProgramWeights(source, max_context, quantize, deferred)
    shared_names = set(weights.names())
    prog, sizes = mil.Program(), {}
    with progress("Core ML functions", len(kept)) as advance:
        for name, indices in kept.items():
            fn = run_passes(decoder_function(source.config, weights, weights.ffn(indices), max_context))
            sizes.update(assign_weight_ids(fn, name, shared_names))
            prog.add_function(name, fn)
            advance(1)
    prog.export_as_multifunction = True
    prog.default_function_name = default
    return prog, sum(sizes.values()), deferred


def convert_program(prog: Any, deferred: DeferredWeights) -> Any:
    """The program as an `MLModel` over a temporary mlpackage, through coremltools' MIL-to-proto backend directly,
    each deferred weight read as its blob is written.

    `mil_convert` would first run three pass pipelines, empty here (every function ran its passes and was
    validated), each of which still validates the whole multifunction program and formats it for a debug log line:
    most of the conversion's time on the bench model."""
    ct = coremltools()
    prog._check_early_error_out_for_invalid_program()
    with quiet(), contextlib.redirect_stderr(io.StringIO()), tempfile.TemporaryDirectory() as weights:
        with deferred.writing():
            proto = mil_to_proto(
                prog,
                weights,
                specification_version=ct.target.iOS18,
                export_multi_functions=True,
                convert_from="milinternal",
                convert_to="mlprogram",
            )
        package = _create_mlpackage(proto, weights)
    return ct.models.MLModel(package, is_temp_package=True, skip_model_load=True, compute_units=ct.ComputeUnit.CPU_ONLY)


@dataclass
class CoreMLArtifacts:
    directory: Path
    decoder: Path  # multifunction .mlpackage
    predictor: Path
    functions: list[str]  # variant names, then "dense"
    default_function: str
    ideal_bytes: int  # weight consts stored once: shared ones once + every function's own (FFN slices)
    disk_bytes: int  # every file of the decoder package
    max_context: int
    quantize: str = "none"  # decoder weights: none (fp16) | int8 | int4; the predictor is always fp32

    @property
    def dedup_ratio(self) -> float:
        return self.disk_bytes / self.ideal_bytes

    @property
    def weights_bytes(self) -> int:
        """Size of the decoder's weights/weight.bin."""
        return package_weights_path(self.decoder).stat().st_size

    def manifest_entries(self, root: Path) -> tuple[dict[str, dict], dict]:
        """Per model name {"package", "function"} (relative to `root`), and the predictor's entry (read by the
        manifest pass)."""
        package = self.decoder.relative_to(root).as_posix()
        models = {name: {"package": package, "function": name} for name in self.functions}
        predictor = {
            "package": self.predictor.relative_to(root).as_posix(),
            "inputs": {
                "input_ids": "int32 [1, T], T in 1..max_length",
                "attention_mask": "int32 [1, T], ones (batch 1 needs no padding)",
            },
            "outputs": {"scores": "float32 [1, layers, d_ff]", "variant_scores": "float32 [1, variants]"},
            "decoder": {
                "package": package,
                "default_function": self.default_function,
                "inputs": {
                    "inputIds": f"int32 [1, T], T in 1..{self.max_context}",
                    "causalMask": "float16 [1, 1, T, P+T]: 0 = attend, -inf = blocked; P = tokens already cached",
                },
                "outputs": {"logits": "float16 [1, T, vocab]"},
                "states": {n: f"float16 [layers, 1, kv_heads, {self.max_context}, head_dim]" for n in DECODER_STATES},
            },
        }
        return models, predictor


def variant_kept(kept: dict[str, Any]) -> dict[str, np.ndarray | None]:
    """Variant name -> [L, k] kept indices (int64 numpy), then "dense" -> None (every neuron)."""
    out: dict[str, np.ndarray | None] = {n: np.asarray(k, dtype=np.int64) for n, k in kept.items()}
    if DENSE_NAME in out:
        raise ValueError(f"a variant may not be called {DENSE_NAME!r}: that is the dense function's name")
    out[DENSE_NAME] = None
    return out


def emit(
    directory: Path,
    source: WeightSource,
    kept: dict[str, Any],
    predictor: SparsityPredictor,
    variant_masks: torch.Tensor,
    default_function: str | None = None,
    quantize: str = "none",
    progress: Progress = no_progress,
) -> CoreMLArtifacts:
    """Write `decoder.mlpackage` (one function per variant of `kept` + "dense") and `predictor.mlpackage` under
    `directory` (created, must be new)."""
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
    functions = variant_kept(kept)
    default = default_function or next(iter(kept))
    max_context = context_length(source.config.max_position_embeddings)
    prog, ideal, deferred = build_program(source, functions, max_context, quantize, default, progress)
    directory.mkdir(parents=True)
    decoder = directory / DECODER_PACKAGE
    mlmodel = convert_program(prog, deferred)
    del prog, deferred
    cfg = source.config
    mlmodel.short_description = f"IFPruning decoder ({cfg.num_hidden_layers} layers, d_ff {cfg.intermediate_size})"
    save_model(mlmodel, decoder)
    del mlmodel  # it holds the program
    release_freed_memory()  # the functions' arrays, before the predictor is converted
    predictor_path = directory / PREDICTOR_PACKAGE
    convert_predictor(predictor, variant_masks, predictor_path)
    return CoreMLArtifacts(
        directory,
        decoder,
        predictor_path,
        list(functions),
        default,
        ideal,
        package_bytes(decoder),
        max_context,
        quantize,
    )


class EmitCoreMLPass:
    name = "coreml"

    def run(self, ctx: ExportContext) -> ExportContext:
        ckpt = ctx.require("checkpoint", self.name)
        variants = ctx.require("variants", self.name)
        masks = torch.stack([v.mask for v in variants])
        names = [v.name for v in variants]
        prompt_masks = None if ctx.predictions is None else ctx.predictions.masks
        artifacts = emit(
            ctx.workdir / COREML_DIR,
            ckpt.weights,
            {v.name: v.kept.numpy() for v in variants},
            ckpt.predictor,
            masks,
            most_general(names, masks, prompt_masks),
            ctx.options.quantize,
            ctx.progress,
        )
        ctx.digests.hash_soon(package_weights_path(artifacts.decoder))  # just written: its pages are cached
        ctx.emitted[self.name] = artifacts
        weights = "fp16" if artifacts.quantize == "none" else f"{artifacts.quantize} weights"
        ctx.console.log(
            f"Core ML: {DECODER_PACKAGE} ({weights}) with functions {', '.join(artifacts.functions)} (default "
            f"{artifacts.default_function}) + {PREDICTOR_PACKAGE} (fp32); bytes on disk {artifacts.disk_bytes:,} / "
            f"ideal {artifacts.ideal_bytes:,} = dedup ratio {artifacts.dedup_ratio:.4f}"
        )
        return ctx
