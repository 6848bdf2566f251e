"""Disk pre-flight: before any work, estimate the bytes an export will write and refuse (exit 4) if the output's
filesystem cannot hold them, instead of failing after minutes (or hours at 3B) with a full disk.

The estimate reads only the checkpoint's `config.json`/`ifp.json`/`tasks.jsonl` and the safetensors headers
(tensor shapes), never the weights. It models what the targets write: ONNX fp32 shared weights once + one FFN
slice per variant + the dense FFN + the fp32 predictor; Core ML the same in fp16 (int8/int4 when quantized);
plus graph/spec overheads per model and layer measured on real exports. `tests/test_preflight.py` checks it
against a real export's size (it must not under-estimate, and stay within the factor stated there).
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from ifp_export.errors import EnvironmentFailure, IFPError
from ifp_export.weights import is_ffn

# Bytes per weight element on disk. ONNX quantization is MatMulNBits (blocks of 32, one fp32 scale each) on every
# MatMul; the embedding Gather stays fp32. Core ML stores fp16, or int8 per channel / int4 with a fp16 scale per 32.
ONNX_BYTES = {"none": 4.0, "int8": 1.0 + 4 / 32, "int4": 0.5 + 4 / 32}
COREML_BYTES = {"none": 2.0, "int8": 1.0, "int4": 0.5 + 2 / 32}
PREDICTOR_BYTES = 4  # both targets keep the predictor fp32, whatever its checkpoint's dtype (a bf16 LM included)
# Serialized graphs / specs, per model and layer (measured: ONNX ~6 KB, Core ML MIL spec ~34 KB per function-layer
# on the tiny test models; both grow with the op count, not the weights), and fixed files (report, heatmap, ...).
ONNX_GRAPH_BYTES_PER_LAYER = 8 << 10
COREML_SPEC_BYTES_PER_LAYER = 40 << 10
FIXED_BYTES = 256 << 10
MARGIN = 1.10  # headroom over the estimate: filesystem blocks, metadata, the manifest


@dataclass(frozen=True)
class Estimate:
    """What an export will write, in bytes, and the shapes it was computed from."""

    total: int
    onnx: int
    coreml: int
    other: int
    variants: int
    layers: int
    scratch: int = 0  # written and deleted during the export: coremltools saves the package once (in TMPDIR) first

    @property
    def needed(self) -> int:
        return int((self.total + self.scratch) * MARGIN)


def safetensors_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype) from a safetensors header: reads 8 + header bytes, never the data."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {name: (tuple(info["shape"]), info["dtype"]) for name, info in header.items() if name != "__metadata__"}


def model_shapes(hf_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    index = hf_dir / "model.safetensors.index.json"
    if not index.is_file():
        return safetensors_shapes(hf_dir / "model.safetensors")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return {name: info for shard in shards for name, info in safetensors_shapes(hf_dir / shard).items()}


def predictor_shapes(directory: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """The predictor's tensors: the encoder's model.safetensors, or an LM predictor's head.safetensors plus its LM
    (lm/, one file or sharded) without the LM's own `lm_head`, which the predictor graphs do not use."""
    from ifp_export.model.lm_predictor import HEAD_FILE, LM_DIR, LM_PREDICTOR_FORMAT

    if json.loads((directory / "config.json").read_text()).get("format") != LM_PREDICTOR_FORMAT:
        return safetensors_shapes(directory / "model.safetensors")
    body = {name: info for name, info in model_shapes(directory / LM_DIR).items() if not name.startswith("lm_head")}
    return {**body, **safetensors_shapes(directory / HEAD_FILE)}


def count(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def estimate_export(
    checkpoint: Path,
    variants: int | None,
    keep: float | None,
    quantize: str,
    mode: str,
    until: str | None,
    targets: tuple[str, ...] = ("onnx", "coreml"),
) -> Estimate:
    """Bytes the export of `checkpoint` with these options will write. Raises on unreadable input (the load pass
    then reports it properly); see `preflight` for the wrapper that never blames the input."""
    from ifp_export.checkpoint import BACKBONE_DIR, PREDICTOR_DIR, SPEC_FILE, TASKS_FILE, TOKENIZER_FILE, read_tasks

    spec = json.loads((checkpoint / SPEC_FILE).read_text())
    config = json.loads((checkpoint / BACKBONE_DIR / "config.json").read_text())
    backbone = model_shapes(checkpoint / BACKBONE_DIR)
    predictor = predictor_shapes(checkpoint / PREDICTOR_DIR)
    layers, d_ff = int(config["num_hidden_layers"]), int(config["intermediate_size"])
    k = max(1, round(keep * d_ff)) if keep is not None else max(int(v) for v in spec["k_per_layer"])
    n_variants = variants or len({t.task for t in read_tasks(checkpoint / TASKS_FILE)})
    ffn = sum(count(shape) for name, (shape, _) in backbone.items() if is_ffn(name))
    embedding = sum(count(shape) for name, (shape, _) in backbone.items() if "embed_tokens" in name)
    shared = sum(count(shape) for name, (shape, _) in backbone.items() if not is_ffn(name))
    if config.get("tie_word_embeddings", True) is not False and not any("lm_head" in n for n in backbone):
        shared += embedding  # a tied lm_head becomes its own (transposed / quantized) MatMul weight in the graphs
    ffn_all = ffn + n_variants * ffn * k // d_ff  # dense + every variant's slices
    predictor_bytes = PREDICTOR_BYTES * sum(count(shape) for shape, _ in predictor.values())
    other = FIXED_BYTES + 2 * (checkpoint / TOKENIZER_FILE).stat().st_size  # in OUT/ and beside the ONNX models
    if until in ("load", "predict", "group"):
        return Estimate(other, 0, 0, other, n_variants, layers)
    if until == "fold":  # each variant saved as a Hugging Face checkpoint (fp32)
        other += n_variants * 4 * (shared + ffn * k // d_ff)
        return Estimate(other, 0, 0, other, n_variants, layers)
    models = n_variants + 1 + (mode == "dynamic")
    onnx = coreml = 0
    if "onnx" in targets:
        matmul = shared - embedding
        onnx = int(4 * embedding + ONNX_BYTES[quantize] * (matmul + ffn_all)) + predictor_bytes
        onnx += (models + 1) * layers * ONNX_GRAPH_BYTES_PER_LAYER
    if "coreml" in targets:
        coreml = int(COREML_BYTES[quantize] * (shared + ffn_all)) + predictor_bytes
        coreml += (n_variants + 2) * layers * COREML_SPEC_BYTES_PER_LAYER
    return Estimate(onnx + coreml + other, onnx, coreml, other, n_variants, layers, scratch=coreml)


def free_bytes(output: Path) -> int:
    """Free bytes (for this user) on the filesystem that will hold `output` (its nearest existing ancestor)."""
    probe = output.absolute()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def preflight(checkpoint: Path, output: Path, **options: object) -> Estimate | None:
    """Refuse (EnvironmentFailure, exit 4) an export that cannot fit on the output's filesystem.

    Returns the estimate, or None when the checkpoint cannot be read here: the load pass then reports the input
    problem with its own one-line error, so a broken checkpoint is never blamed on the disk.
    """
    try:
        estimate = estimate_export(checkpoint, **options)  # type: ignore[arg-type]
    except (OSError, ValueError, KeyError, TypeError, IFPError, struct.error):
        return None
    available = free_bytes(output)
    if estimate.needed > available:
        raise EnvironmentFailure(
            f"not enough disk space for this export: it needs about {human(estimate.needed)} "
            f"({estimate.variants} variants + dense, {estimate.layers} layers), {human(available)} is available",
            output.absolute().parent,
            "free disk space, choose an -o on a larger filesystem, or export fewer variants / with --quantize",
        )
    return estimate
