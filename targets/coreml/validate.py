"""Validation of the Core ML packages (structural: Core ML cannot predict on Linux): IO, states and dtypes from the
spec, the norm/RoPE numerics structure (`numerics.check_numerics`), and every weight read back from weight.bin by
the blob offsets in the spec against the PyTorch weights (fp16-exact, or within half a quantization step). The
references are built one at a time (`fold_decoder` per variant) and dropped; on macOS the logits are compared too.
"""

from __future__ import annotations

import mmap
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table
from torch import nn

from ifp_export.errors import IFPError, ValidationFailed
from ifp_export.fold import fold_decoder
from ifp_export.model.decoder import CausalLM
from ifp_export.model.predictor import SparsityPredictor
from ifp_export.pipeline import ExportContext
from ifp_export.quiet import quiet
from ifp_export.targets.coreml.blobs import (
    BLOB_DTYPES,
    BLOB_INT4,
    BlobRef,
    QuantizedRef,
    Weights,
    blob_data_range,
    distinct_blob_bytes,
    function_blobs,
    function_quantized,
    open_weights,
    quantized_parts,
    read_blob,
)
from ifp_export.targets.coreml.build import DECODER_STATES, const_name
from ifp_export.targets.coreml.emit import CoreMLArtifacts, Progress, no_progress, variant_kept
from ifp_export.targets.coreml.numerics import FP16_MAX, check_numerics
from ifp_export.targets.coreml.package import (
    DECODER_PACKAGE,
    PREDICTOR_PACKAGE,
    context_length,
    coremltools,
    package_bytes,
    package_spec_path,
    package_weights_path,
)
from ifp_export.targets.coreml.parity import coreml_parity
from ifp_export.targets.coreml.predictor import PREDICTOR_INPUTS, CoreMLPredictorRouter
from ifp_export.targets.coreml.quantize import INT4_BLOCK_SIZE, QUANTIZED_SUFFIX
from ifp_export.targets.onnx import DENSE_NAME, FFN_PARAMS
from ifp_export.weights import kept_neurons

ROW_LOCAL = ("gate_proj", "up_proj")  # [d_ff, hidden]: one row per neuron, quantized along it (`DenseRows`)
COMPARE_CHUNK = 1 << 20  # elements of a weight compared at once (4 MB in fp32: in cache, ~3x faster than 16 MB)


def feature_signature(feature: Any) -> tuple[str, str, str]:
    """(name, kind, "dtype[shape ranges]") of a spec input/output/state, for the table and the checks."""
    kind = feature.type.WhichOneof("Type")
    array = feature.type.stateType.arrayType if kind == "stateType" else feature.type.multiArrayType
    dtype = type(array).ArrayDataType.Name(array.dataType)
    ranges = array.shapeRange.sizeRanges
    if ranges:
        dims = [
            str(r.lowerBound) if r.lowerBound == r.upperBound else f"{r.lowerBound}..{r.upperBound}" for r in ranges
        ]
    else:
        dims = [str(d) for d in array.shape] or ["?"]
    return feature.name, kind, f"{dtype}[{', '.join(dims)}]"


def expected_decoder_io(model: CausalLM, max_context: int) -> dict[str, list[tuple[str, str, str]]]:
    cfg = model.config
    seq = f"1..{max_context}"
    cache = f"FLOAT16[{cfg.num_hidden_layers}, 1, {cfg.num_key_value_heads}, {max_context}, {cfg.head_dim}]"
    return {
        "inputs": [
            ("inputIds", "multiArrayType", f"INT32[1, {seq}]"),
            ("causalMask", "multiArrayType", f"FLOAT16[1, 1, {seq}, {seq}]"),
        ],
        "outputs": [("logits", "multiArrayType", "FLOAT16[?]")],
        "states": [(name, "stateType", cache) for name in DECODER_STATES],
    }


@dataclass
class FunctionCheck:
    function: str
    inputs: list[tuple[str, str, str]]
    outputs: list[tuple[str, str, str]]
    states: list[tuple[str, str, str]]
    io_ok: bool
    tensors_checked: int
    ffn_tensors_checked: int
    max_abs_diff: float  # max |weight read back (dequantized if quantized) - PyTorch fp32| over the weights
    fp16_exact: bool  # fp16 blobs equal the fp16 rounding of their tensor; quantized ones within their bound
    missing: list[str]  # tensors not found, of the wrong shape, or (quantized mode) left unquantized
    expect_ffn: bool = True  # decoder functions must have had their FFN weights found and checked
    quantize: str = "none"
    quantized_tensors: int = 0  # tensors read back through a constexpr_blockwise_shift_scale op
    bound_ratio: float = 0.0  # max over quantized elements of |dequantized - fp32| / its bound (ok <= 1)
    residual_peak: float | None = None  # fp32 max |residual stream| on its quality pass rows: headroom to FP16_MAX

    @property
    def ok(self) -> bool:
        found = self.tensors_checked > 0 and (self.ffn_tensors_checked > 0 or not self.expect_ffn)
        quantized = self.quantize == "none" or self.quantized_tensors > 0
        return self.io_ok and self.fp16_exact and not self.missing and found and quantized


def quantization_bound(expected: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Allowed |dequantized - fp32| per element (float32): half a quantization step (round to nearest), plus the fp16
    rounding of the weight before quantization and of the stored scale (2^-11 relative each, doubled):
    (|w| + scale) 2^-10 + scale / 2 + 2^-24, the per-block terms summed on the scales (block-sized) first."""
    per_block = scales * (2.0**-10 + 0.5) + 2.0**-24
    return torch.add(per_block, expected.abs(), alpha=2.0**-10)


def tolerance_text(quantize: str) -> str:
    if quantize == "none":
        return "fp16 weights: every blob == fp16 rounding of the PyTorch weight"
    granularity = "per output channel" if quantize == "int8" else f"blocks of {INT4_BLOCK_SIZE} input channels"
    return (
        f"{quantize} weights (symmetric, {granularity}): every 2-D weight quantized, dequantized (data x scale) "
        "within scale/2 (+ fp16 rounding) of the PyTorch weight; norms/biases fp16-exact"
    )


def check_weights(
    weights: Weights,
    refs: dict[str, BlobRef],
    model: nn.Module,
    const_name: Any,
    skip: set[str],
    quantized: dict[str, QuantizedRef] | None = None,
    release: Callable[[], None] = lambda: None,
    compared: dict[tuple, tuple[np.ndarray, np.ndarray]] | None = None,
    rows: DenseRows | None = None,
    kept: np.ndarray | None = None,
) -> tuple[int, int, float, bool, list[str], int, float]:
    """Read every tensor of `model` back from weight.bin by its const name; (checked, FFN checked, max |diff|,
    all equal to the tensor's fp16 rounding / within the quantization bound, names not found, quantized checked,
    max |diff| / bound over quantized elements). With `quantized` (the function's constexpr weights), every 2-D
    tensor must be one of them. `release()` runs before each tensor (drops the pages read for the last one).
    `compared` (shared across a package's functions) keeps each comparison by blob offset and the tensor's memory:
    a shared weight, the same blob against the same tensor in every function, is compared once, while a function's
    own tensor (a fold's FFN slice is its own memory) is always compared, even if its blob were another's.
    `rows` (a decoder package's, the dense function checked first) and `kept` ([L, k], None for the dense function)
    check the row-local FFN weights (`DenseRows`)."""
    compared = {} if compared is None else compared
    checked = ffn = nquantized = 0
    worst, exact, missing, ratio = 0.0, True, [], 0.0
    for name, tensor in model.state_dict().items():
        release()
        ref = refs.get(const_name(name))
        qref = None if quantized is None else quantized.get(const_name(name) + QUANTIZED_SUFFIX)
        key = (blob_key(qref or ref), tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if qref is not None:
            if qref.shape != tuple(tensor.shape):
                missing.append(name)
                continue
            compare = lambda tensor, qref=qref: quantized_difference(*quantized_parts(weights, qref), tensor)  # noqa: E731
        elif quantized is not None and tensor.dim() == 2 and name not in skip:
            missing.append(f"{name} (not quantized)")
            continue
        elif ref is None:
            # no blob: tied (lm_head), tiny (inlined), or an identity the converter removed (x * ones, x + zeros)
            identity = not tensor.is_meta and bool((tensor == 1).all() or (tensor == 0).all())
            if name not in skip and tensor.numel() >= 2 and not identity:
                missing.append(name)
            continue
        elif ref.shape != tuple(tensor.shape):
            missing.append(name)
            continue
        else:
            compare = lambda tensor, ref=ref: blob_difference(read_blob(weights, ref), tensor)  # noqa: E731
        if rows is not None and rows.covers(name):
            diff, second = rows.check(weights, name, qref or ref, tensor, compare, kept)
        else:
            if key not in compared or key[0] is None:
                compared[key] = compare(tensor)
            diff, second = compared[key]
        worst = max(worst, float(diff.max()))
        if qref is not None:
            ratio = max(ratio, float(second.max()))
            nquantized += 1
        else:
            exact &= bool(second.all())
        checked += 1
        ffn += name.rsplit(".", 2)[-2] in FFN_PARAMS
    return checked, ffn, worst, exact and ratio <= 1.0, missing, nquantized, ratio


class DenseRows:
    """The row-local FFN weights of a decoder package (gate/up: [d_ff, hidden], one row per neuron, quantized along
    the row), checked against the dense function's. A variant's are the dense rows of its kept neurons, and every
    mode (fp16, int8 per row, int4 in blocks of a row's inputs) stores a row the same whatever other rows the
    function keeps, so they are compared byte for byte with the dense function's rows (checked first against
    PyTorch, row by row), and take those rows' figures: what comparing them with PyTorch again would give, without
    gathering or comparing them. A variant whose bytes differ is compared with PyTorch in full (its kept rows
    gathered from the dense weights), so a wrong byte fails as it would without this."""

    def __init__(self, dense: nn.Module) -> None:
        self.dense = dense
        self.stored: dict[str, list[np.ndarray] | None] = {}  # HF name -> the dense function's stored rows
        self.figures: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # HF name -> per-row (max |Δ|, ratio or exact)

    @staticmethod
    def covers(name: str) -> bool:
        return name.rsplit(".", 2)[-2] in ROW_LOCAL

    def check(
        self,
        weights: Weights,
        name: str,
        ref: BlobRef | QuantizedRef,
        tensor: torch.Tensor,
        compare: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]],
        kept: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-row figures of the weight `name` stored at `ref`: the dense function's compared with `tensor` and
        kept; a variant's (`kept`: its [L, k] indices; `tensor` may be a placeholder) by its bytes."""
        stored = stored_rows(weights, ref)
        if kept is None:
            self.stored[name], self.figures[name] = stored, compare(tensor)
            return self.figures[name]
        rows = kept[int(name.split(".")[2])]
        dense = self.stored.get(name)
        same = stored is not None and dense is not None and len(stored) == len(dense)
        if same and all(np.array_equal(mine, theirs[rows]) for mine, theirs in zip(stored, dense, strict=True)):
            return tuple(figure[rows] for figure in self.figures[name])
        return compare(kept_neurons(self.dense.get_parameter(name).detach(), rows, 0))


def stored_rows(weights: Weights, ref: BlobRef | QuantizedRef) -> list[np.ndarray] | None:
    """The bytes of a [N, ...] weight as stored, per part (quantized: data, scale, offset), as [N, bytes] rows (views
    of the mapped weight.bin; inline parts as they are); None if a part's rows do not each fill whole bytes."""
    parts = [ref] if isinstance(ref, BlobRef) else [p for p in (ref.data, ref.scale, ref.offset) if p is not None]
    rows = ref.shape[0]
    out = []
    for part in parts:
        if isinstance(part, np.ndarray):
            if part.shape[0] != rows:
                return None
            out.append(part.reshape(rows, -1))
            continue
        dtype, start, _ = blob_data_range(weights, part.offset)
        if dtype != BLOB_INT4 and dtype not in BLOB_DTYPES:
            return None
        bits = 4 if dtype == BLOB_INT4 else 8 * np.dtype(BLOB_DTYPES[dtype]).itemsize
        row_bits = bits * int(np.prod(part.shape[1:]))
        if part.shape[0] != rows or row_bits % 8:
            return None
        out.append(np.frombuffer(weights, np.uint8, rows * row_bits // 8, start).reshape(rows, -1))
    return out


def blob_key(ref: BlobRef | QuantizedRef | None) -> tuple | None:
    """The weight.bin offsets a const reads (None if a part is inline in the spec: never taken as seen)."""
    if ref is None or isinstance(ref, BlobRef):
        return None if ref is None else (ref.offset,)
    parts = [p for p in (ref.data, ref.scale, ref.offset) if p is not None]
    return None if any(not isinstance(p, BlobRef) for p in parts) else tuple(p.offset for p in parts)


def blob_difference(stored: np.ndarray, tensor: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per row (of a 2-D weight; one row for a vector): max |stored - tensor| in fp32 and whether stored == tensor
    rounded to the stored dtype, whole rows at a time: the fp32 temporaries of a whole embedding (4 of them, 1 GB at
    1.1B) would otherwise top the validation's peak RSS.

    A stored ±inf is never exact: the checkpoint's weights are finite (checked on load), so it is a weight above
    fp16's 65504 that overflowed, which the rounding compared with would hide."""
    rows = tensor.shape[0] if tensor.dim() > 1 else 1
    flat_stored, flat = stored.reshape(rows, -1), tensor.detach().reshape(rows, -1)
    worst, exact = np.empty(rows, np.float32), np.empty(rows, bool)
    step = max(1, COMPARE_CHUNK // max(1, flat.shape[1]))
    for start in range(0, rows, step):
        part = torch.from_numpy(np.array(flat_stored[start : start + step]))  # as stored (torch: both cores)
        expected = flat[start : start + step]
        same = torch.isfinite(part).all(1) & (part == expected.to(part.dtype)).all(1)
        exact[start : start + step] = same.numpy()
        worst[start : start + step] = part.to(torch.float32).sub_(expected).abs_().amax(1).numpy()
    return worst, exact


def fp32(array: np.ndarray) -> torch.Tensor:
    """A float32 copy of a (read-only, blob-backed) array as a tensor (a writable copy as stored, converted by torch:
    both cores)."""
    return torch.from_numpy(np.array(array)).to(torch.float32)


def quantized_difference(
    data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None, tensor: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a weight stored as `quantized_parts`: max |dequantized - tensor| and max of that / its
    `quantization_bound`, in torch (both cores) a block of rows at a time, in place: each block's scale broadcast
    over it (a view, never repeated to the weight's size), so temporaries stay a chunk's (see blob_difference)."""
    tiles = [full // part for full, part in zip(data.shape, scale.shape, strict=True)]
    step = tiles[0] * max(1, COMPARE_CHUNK // (data[0].size * tiles[0]))  # whole blocks of rows
    worst, ratio = np.empty(data.shape[0], np.float32), np.empty(data.shape[0], np.float32)
    weight = tensor.detach()
    for start in range(0, data.shape[0], step):
        rows = slice(start, start + step)
        blocks = slice(start // tiles[0], (start + step) // tiles[0])
        view = [v for part, tile in zip(scale[blocks].shape, tiles, strict=True) for v in (part, tile)]
        step_scale = [v for part in scale[blocks].shape for v in (part, 1)]
        error = fp32(data[rows]).reshape(view)
        if offset is not None:
            error -= fp32(offset[blocks]).reshape(step_scale)
        scales = fp32(scale[blocks]).reshape(step_scale)
        expected = weight[rows].reshape(view)
        error.mul_(scales).sub_(expected).abs_()  # |dequantized - fp32|
        count = len(weight[rows])
        worst[rows] = error.reshape(count, -1).amax(1).numpy()
        ratio[rows] = error.div_(quantization_bound(expected, scales)).reshape(count, -1).amax(1).numpy()
    return worst, ratio


class FunctionReferences:
    """Function name -> its PyTorch reference, folded from `dense` on demand (one at a time: never every variant at
    once; `gathered` as in `fold_decoder`: drops the source pages a layer's gather read)."""

    def __init__(
        self, dense: CausalLM, kept: dict[str, Any], gathered: Callable[[list[torch.Tensor]], None] = lambda t: None
    ) -> None:
        self.dense, self.kept, self.gathered = dense, variant_kept(kept), gathered

    def __call__(self, name: str, placeholders: tuple[str, ...] = ()) -> CausalLM:
        """`name`'s reference; the FFN projections in `placeholders` not gathered (`fold_decoder`)."""
        indices = self.kept[name]
        if indices is None:
            return self.dense
        return fold_decoder(self.dense, torch.from_numpy(indices), self.gathered, placeholders)


def check_decoder_package(
    artifacts: CoreMLArtifacts,
    reference: Callable[[str], CausalLM],
    progress: Progress = no_progress,
    release: Callable[[], None] = lambda: None,
    peaks: dict[str, float] | None = None,
) -> list[FunctionCheck]:
    """Per function: IO/states/dtypes from the spec, the norm/RoPE structure, and every weight read back from
    weight.bin by the blob offsets in the spec, against the function's PyTorch reference (built, checked and
    dropped one at a time; equal to its fp16 rounding; quantized: dequantized, within half a step). Before each
    tensor the pages read so far are dropped (`release` for the reference's source, MADV_DONTNEED for weight.bin),
    so the check keeps about one tensor resident, not the package and the checkpoint. With `FunctionReferences` the
    dense function goes first and the variants' gate/up are checked against its rows (`DenseRows`), never gathered;
    the table keeps the package's order."""
    ct = coremltools()
    with quiet():
        ct.models.MLModel(str(artifacts.decoder), skip_model_load=True)  # coremltools parses the package
    spec = ct.utils.load_spec(str(artifacts.decoder))
    described = {f.name: f for f in spec.description.functions}
    if list(described) != artifacts.functions or spec.description.defaultFunctionName != artifacts.default_function:
        raise ValidationFailed(
            f"decoder.mlpackage has functions {list(described)} (default {spec.description.defaultFunctionName!r}),"
            f" expected {artifacts.functions} (default {artifacts.default_function!r})"
        )
    weights = open_weights(artifacts.decoder)
    by_rows = isinstance(reference, FunctionReferences)
    rows = DenseRows(reference.dense) if by_rows else None
    order = sorted(artifacts.functions, key=lambda name: name != DENSE_NAME) if by_rows else artifacts.functions
    checks, compared = {}, {}
    with progress("Core ML validation", len(artifacts.functions)) as advance:
        for name in order:

            def dropped(weights: mmap.mmap = weights) -> None:
                weights.madvise(mmap.MADV_DONTNEED)
                release()

            model = reference(name, ROW_LOCAL) if by_rows else reference(name)
            kept = reference.kept[name] if by_rows else None
            check = check_function(
                spec, weights, described[name], name, model, artifacts, dropped, compared, rows, kept
            )
            check.residual_peak = None if peaks is None else peaks[name]
            checks[name] = check
            advance(1)
    return [checks[name] for name in artifacts.functions]


def check_function(
    spec: Any,
    weights: Weights,
    desc: Any,
    name: str,
    model: CausalLM,
    artifacts: CoreMLArtifacts,
    release: Callable[[], None] = lambda: None,
    compared: dict[tuple, tuple[np.ndarray, np.ndarray]] | None = None,
    rows: DenseRows | None = None,
    kept: np.ndarray | None = None,
) -> FunctionCheck:
    """One function's row of the table (`compared`, `rows` and `kept` as in `check_weights`)."""
    io = {
        "inputs": [feature_signature(f) for f in desc.input],
        "outputs": [feature_signature(f) for f in desc.output],
        "states": [feature_signature(f) for f in desc.state],
    }
    skip = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    quantized = None if artifacts.quantize == "none" else function_quantized(spec, name)
    checked, ffn, worst, exact, missing, nquantized, ratio = check_weights(
        weights, function_blobs(spec, name), model, const_name, skip, quantized, release, compared, rows, kept
    )
    missing += check_numerics(spec, name, weights, model.config, artifacts.max_context)
    io_ok = io == expected_decoder_io(model, artifacts.max_context)
    return FunctionCheck(
        name,
        io["inputs"],
        io["outputs"],
        io["states"],
        io_ok,
        checked,
        ffn,
        worst,
        exact,
        missing,
        quantize=artifacts.quantize,
        quantized_tensors=nquantized,
        bound_ratio=ratio,
    )


def check_predictor_package(
    artifacts: CoreMLArtifacts, predictor: SparsityPredictor, variant_masks: torch.Tensor
) -> FunctionCheck:
    """IO of predictor.mlpackage and its weights (fp32) read back against the PyTorch predictor."""
    ct = coremltools()
    spec = ct.utils.load_spec(str(artifacts.predictor))
    desc = spec.description
    io = {
        "inputs": [feature_signature(f) for f in desc.input],
        "outputs": [feature_signature(f) for f in desc.output],
        "states": [feature_signature(f) for f in desc.state],
    }
    cfg = predictor.config
    seq = f"1..{cfg.max_length}"
    expected = {
        "inputs": [(n, "multiArrayType", f"INT32[1, {seq}]") for n in PREDICTOR_INPUTS],
        "outputs": [
            ("scores", "multiArrayType", f"FLOAT32[1, {cfg.target_layers}, {cfg.target_intermediate_size}]"),
            ("variant_scores", "multiArrayType", f"FLOAT32[1, {variant_masks.shape[0]}]"),
        ],
        "states": [],
    }
    weights = open_weights(artifacts.predictor)
    refs = function_blobs(spec, "main")
    checked, _, worst, exact, missing, _, _ = check_weights(
        weights, refs, predictor, lambda n: "predictor_" + n.replace(".", "_"), set()
    )
    routing = CoreMLPredictorRouter(predictor, variant_masks).routing.numpy()
    stored = [read_blob(weights, r) for r in refs.values() if r.shape in (routing.shape, routing.T.shape)]
    if not any(np.array_equal(s, routing) or np.array_equal(s, routing.T) for s in stored):
        missing.append("routing")
    return FunctionCheck(
        PREDICTOR_PACKAGE,
        io["inputs"],
        io["outputs"],
        io["states"],
        io == expected,
        checked,
        0,
        worst,
        exact,
        missing,
        expect_ffn=False,
    )


def validation_table(rows: list[FunctionCheck], predictor: FunctionCheck, artifacts: CoreMLArtifacts) -> Table:
    table = Table(
        title="Core ML validation (structure + weights read back from weight.bin; no prediction on Linux)\n"
        f"decoder: {tolerance_text(artifacts.quantize)}; {PREDICTOR_PACKAGE}: fp32, == PyTorch"
    )
    columns = ("function", "inputs", "outputs", "states", "tensors (FFN)", "max|Δ| vs fp32", "weights", "peak|x|", "ok")
    for column in columns:
        table.add_column(column, justify="left" if column in ("function", "inputs", "outputs", "states") else "right")

    def fmt(features: list[tuple[str, str, str]]) -> str:
        return "\n".join(f"{n} {t}" for n, _, t in features) or "-"

    for r in [*rows, predictor]:
        default = " (default)" if r.function == artifacts.default_function else ""
        table.add_row(
            r.function + default,
            fmt(r.inputs),
            fmt(r.outputs),
            fmt(r.states),
            f"{r.tensors_checked} ({r.ffn_tensors_checked})",
            f"{r.max_abs_diff:.1e}",
            weights_cell(r),
            "-" if r.residual_peak is None else f"{r.residual_peak:,.0f} ({r.residual_peak / FP16_MAX:.0%})",
            "yes" if r.ok else f"NO {r.missing[:2] if r.missing else ''}",
        )
    ideal = "ideal fp16" if artifacts.quantize == "none" else f"ideal ({artifacts.quantize}: distinct blobs once)"
    table.caption = (
        f"{DECODER_PACKAGE}: {artifacts.disk_bytes:,} bytes on disk / {artifacts.ideal_bytes:,} {ideal} "
        f"= dedup ratio {artifacts.dedup_ratio:.4f}; weight.bin {artifacts.weights_bytes:,} bytes; "
        f"KV cache {artifacts.max_context} tokens; peak|x|: the residual stream's largest |value| in fp32 on the "
        "quality pass's prompts run with that function (% of fp16's 65504)"
    )
    return table


def weights_cell(row: FunctionCheck) -> str:
    if row.quantize == "none":
        exact = "=fp16" if row.expect_ffn else "=fp32"  # decoder functions are fp16, the predictor fp32
        return exact if row.fp16_exact else "NO"
    verdict = "ok" if row.fp16_exact else "NO"
    return f"{row.quantized_tensors} {row.quantize}, {row.bound_ratio:.3f}x bound {verdict}"


def open_artifacts(
    directory: Path, max_position_embeddings: int, names: list[str], quantize: str = "none"
) -> CoreMLArtifacts:
    """The CoreMLArtifacts of an existing output directory (for `ifp-export validate`; variant `names` in order,
    `quantize` as recorded in the manifest). The ideal size is every distinct blob once."""
    decoder, predictor = directory / DECODER_PACKAGE, directory / PREDICTOR_PACKAGE
    for path in (decoder, predictor):
        if not package_spec_path(path).is_file() or not package_weights_path(path).is_file():
            raise IFPError("Core ML package missing or incomplete", path, "re-run ifp-export export")
    default = coremltools().utils.load_spec(str(decoder)).description.defaultFunctionName
    return CoreMLArtifacts(
        directory,
        decoder,
        predictor,
        [*names, DENSE_NAME],
        default,
        distinct_blob_bytes([decoder]),
        package_bytes(decoder),
        context_length(max_position_embeddings),
        quantize,
    )


def weights_failure(row: FunctionCheck) -> str:
    """One failed function's figures for the one-line error (the table has the rest)."""
    return (
        f"{row.function} weights: max|Δ| {row.max_abs_diff:.2e} vs PyTorch, {row.bound_ratio:.2f} x the quantization "
        f"bound, fp16-exact {row.fp16_exact}, IO as specified {row.io_ok}, {len(row.missing)} tensors missing"
    )


def validate_export(ctx: ExportContext) -> None:
    """Check the context's Core ML packages structurally, print the table, raise if anything is off."""
    artifacts: CoreMLArtifacts = ctx.emitted["coreml"]
    ckpt = ctx.checkpoint
    masks = torch.stack([v.mask for v in ctx.variants])
    release = ckpt.weights.release
    reference = FunctionReferences(ckpt.backbone, {v.name: v.kept.numpy() for v in ctx.variants}, lambda _: release())
    recorded = {v.name: v.residual_peak for v in ctx.variants} | {DENSE_NAME: ctx.dense_residual_peak}
    peaks = None if None in recorded.values() else recorded  # `ifp-export validate` runs no quality pass
    rows = check_decoder_package(artifacts, reference, ctx.progress, release, peaks)
    predictor = check_predictor_package(artifacts, ckpt.predictor, masks)
    ctx.console.print(validation_table(rows, predictor, artifacts))
    ctx.report["coreml_validation"] = {
        "functions": [
            {
                "function": r.function,
                "ok": r.ok,
                "tensors": r.tensors_checked,
                "quantized_tensors": r.quantized_tensors,
                "max_abs_diff": r.max_abs_diff,
                "bound_ratio": r.bound_ratio,
                "residual_peak": r.residual_peak,
            }
            for r in [*rows, predictor]
        ],
        "quantize": artifacts.quantize,
        "tolerance": tolerance_text(artifacts.quantize),
        "weights_bytes": artifacts.weights_bytes,
        "default_function": artifacts.default_function,
        "dedup_ratio": artifacts.dedup_ratio,
        "decoder_bytes": artifacts.disk_bytes,
        "ideal_bytes": artifacts.ideal_bytes,
        "max_context": artifacts.max_context,
    }
    over = [r.function for r in rows if r.residual_peak is not None and r.residual_peak >= FP16_MAX]
    if over:
        ctx.console.log(f"warning: Core ML functions {over} reach {FP16_MAX:g} in fp32: fp16 activations overflow")
    bad = [weights_failure(r) for r in [*rows, predictor] if not r.ok]
    if sys.platform == "darwin":  # Core ML can predict only on macOS
        first = ctx.variants[0].prompt_indices[0]
        prompt = ckpt.tokenizer.encode(ckpt.tasks[first].prompt).ids
        parity = coreml_parity(artifacts.decoder, artifacts.functions, reference, prompt, quantize=artifacts.quantize)
        ctx.report["coreml_validation"]["parity"] = {name: check.record() for name, check in parity.items()}
        for name, check in parity.items():
            ctx.console.log(f"Core ML {name} vs PyTorch logits (prefill + 8 cached decode steps): {check.text()}")
        bad += [f"{name} {check.text()}" for name, check in parity.items() if not check.ok]
    if bad:
        raise ValidationFailed(f"Core ML functions do not match the folded PyTorch models: {bad[0]} (see table)")
