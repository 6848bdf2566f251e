"""Core ML target: every variant (and the dense model) as one function of a multifunction `.mlpackage` with a
stateful KV cache, plus the shared predictor (routing head folded in) as its own `.mlpackage`.

Each model is traced with `torch.jit.trace` through `StatefulDecoder` — the folded decoder's own modules with the
KV cache held in two fp16 buffers (`keyCache`, `valueCache`, [L, 1, KVH, MAX_CONTEXT, D]) that Core ML turns into
states (`ct.StateType`, iOS 18) — and converted to an fp16 `mlprogram`. The per-model packages are then merged
with `ct.utils.save_multifunction`, whose constant deduplication stores a tensor shared by several functions
(embeddings, attention, norms, lm_head) once in `weights/weight.bin`; only the FFN slices differ per function.

Inputs follow Apple's stateful Llama example: `inputIds` [1, T] int32 and `causalMask` [1, 1, T, P + T] fp16
(0 where a query may attend, -inf elsewhere; P = tokens already in the cache), both with flexible sizes
(`ct.RangeDim`), so one function serves prefill (T = prompt length) and decode (T = 1). Output: `logits`
[1, T, V] fp16. Core ML cannot predict on Linux, so validation here is structural (spec IO, states, dtypes) plus
the FFN weights read back from `weight.bin` by the blob offsets in the spec.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import struct
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ifp_export.masks import standardize
from ifp_export.model.decoder import CausalLM, apply_rope, repeat_kv
from ifp_export.model.predictor import SparsityPredictor
from ifp_export.targets.onnx import DENSE_NAME, FFN_PARAMS, PredictorRouter, weight_bytes

COREML_DIR = "coreml"
DECODER_PACKAGE = "decoder.mlpackage"
PREDICTOR_PACKAGE = "predictor.mlpackage"
MAX_CONTEXT = 512  # KV-cache length: min(max_position_embeddings, MAX_CONTEXT)
DECODER_INPUTS = ("inputIds", "causalMask")
DECODER_STATES = ("keyCache", "valueCache")
PREDICTOR_INPUTS = ("input_ids", "attention_mask")
PREDICTOR_OUTPUTS = ("scores", "variant_scores")
BLOB_SENTINEL = 0xDEADBEEF
FP16_BLOB_DTYPE = 1  # MIL blob storage dtype code of float16


@contextlib.contextmanager
def quiet_coremltools() -> Iterator[None]:
    """coremltools warns on import (no native runtime on Linux, untested torch version) and logs each pass with
    progress bars; keep the CLI output ours."""
    loggers = [logging.getLogger(n) for n in ("coremltools", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def coremltools() -> Any:
    with quiet_coremltools():
        import coremltools as ct
    return ct


def context_length(model: CausalLM) -> int:
    return min(model.config.max_position_embeddings, MAX_CONTEXT)


class StatefulDecoder(nn.Module):
    """The decoder with its KV cache in fp16 buffers that are written in place (Core ML states).

    `causalMask` is [1, 1, T, P + T]: its last dim tells the graph how many tokens the cache already holds
    (P), so the new keys/values are written at P..P+T and attention reads the cache prefix 0..P+T. Same
    modules and numerics as `CausalLM.forward`; only the cache handling differs.
    """

    def __init__(self, model: CausalLM, max_context: int) -> None:
        super().__init__()
        cfg = model.config
        self.model = model
        shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, max_context, cfg.head_dim)
        self.register_buffer("keyCache", torch.zeros(shape, dtype=torch.float16))
        self.register_buffer("valueCache", torch.zeros(shape, dtype=torch.float16))

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        body, cfg = self.model.model, self.model.config
        t = input_ids.shape[-1]
        end = causal_mask.shape[-1]
        past = end - t
        position_ids = torch.arange(past, end, dtype=torch.int32)[None]
        x = body.embed_tokens(input_ids)
        cos, sin = body.rotary_emb(position_ids, x.dtype)
        for i, layer in enumerate(body.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, t, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(1, t, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(1, t, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            self.keyCache[i, :, :, past:end, :] = k.to(torch.float16)
            self.valueCache[i, :, :, past:end, :] = v.to(torch.float16)
            keys = self.keyCache[i, :, :, :end, :].to(x.dtype)
            values = self.valueCache[i, :, :, :end, :].to(x.dtype)
            out = F.scaled_dot_product_attention(
                q,
                repeat_kv(keys, cfg.num_attention_heads),
                repeat_kv(values, cfg.num_attention_heads),
                attn_mask=causal_mask.to(x.dtype),
            )
            out = out.transpose(1, 2).reshape(1, t, cfg.num_attention_heads * cfg.head_dim)
            x = x + attn.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(body.norm(x))


def causal_mask(past: int, length: int) -> torch.Tensor:
    """[1, 1, length, past + length]: 0 where query i may see key j (j <= past + i), -inf elsewhere."""
    keys = torch.arange(past + length)[None, :]
    queries = torch.arange(length)[:, None] + past
    return torch.where(keys <= queries, 0.0, float("-inf"))[None, None]


def convert_decoder(model: CausalLM, path: Path) -> None:
    """Trace `model` with a stateful cache and save it as a single-function fp16 mlprogram at `path`."""
    ct = coremltools()
    cfg = model.config
    max_context = context_length(model)
    wrapper = StatefulDecoder(model, max_context).eval()
    example = (torch.zeros(1, 2, dtype=torch.int32), causal_mask(3, 2))
    with quiet_coremltools(), torch.no_grad():
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    query = ct.RangeDim(lower_bound=1, upper_bound=max_context, default=1)
    total = ct.RangeDim(lower_bound=1, upper_bound=max_context, default=1)
    cache_shape = tuple(wrapper.keyCache.shape)
    with quiet_coremltools(), contextlib.redirect_stderr(io.StringIO()):  # progress bars
        mlmodel = ct.convert(
            traced,
            inputs=[
                ct.TensorType(shape=(1, query), dtype=np.int32, name=DECODER_INPUTS[0]),
                ct.TensorType(shape=(1, 1, query, total), dtype=np.float16, name=DECODER_INPUTS[1]),
            ],
            outputs=[ct.TensorType(dtype=np.float16, name="logits")],
            states=[
                ct.StateType(wrapped_type=ct.TensorType(shape=cache_shape, dtype=np.float16), name=name)
                for name in DECODER_STATES
            ],
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=ct.precision.FLOAT16,
            skip_model_load=True,
        )
    mlmodel.short_description = f"IFPruning decoder ({cfg.num_hidden_layers} layers, d_ff {cfg.intermediate_size})"
    save_model(mlmodel, path)


def save_model(mlmodel: Any, path: Path) -> None:
    """Save without the conversion date, so the same model gives the same bytes on another day."""
    mlmodel.user_defined_metadata.pop(CONVERSION_DATE_KEY, None)
    with quiet_coremltools():
        mlmodel.save(str(path))


CONVERSION_DATE_KEY = "com.github.apple.coremltools.conversion_date"


# --- weight blobs -------------------------------------------------------------------------------------------


def ffn_const_name(param: str) -> str:
    """The const name coremltools gives an FFN weight of the traced `StatefulDecoder`."""
    return "model_" + param.replace(".", "_") + "_to_fp16"


def ffn_params(model: CausalLM) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.state_dict().items() if n.rsplit(".", 2)[-2] in FFN_PARAMS}


def package_spec_path(package: Path) -> Path:
    return package / "Data" / "com.apple.CoreML" / "model.mlmodel"


def package_weights_path(package: Path) -> Path:
    return package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"


@dataclass(frozen=True)
class BlobRef:
    """A const whose value lives in weight.bin: dtype, shape and the offset of its blob metadata."""

    name: str
    shape: tuple[int, ...]
    offset: int


def function_blobs(spec: Any, function: str) -> dict[str, BlobRef]:
    """const name -> BlobRef for every weight.bin-backed const of one mlprogram function."""
    fn = spec.mlProgram.functions[function]
    refs: dict[str, BlobRef] = {}
    for op in fn.block_specializations[fn.opset].operations:
        if op.type != "const" or not op.attributes["val"].HasField("blobFileValue"):
            continue
        val = op.attributes["val"]
        shape = tuple(int(d.constant.size) for d in val.type.tensorType.dimensions)
        refs[op.outputs[0].name] = BlobRef(op.outputs[0].name, shape, int(val.blobFileValue.offset))
    return refs


def blob_data_range(weights: bytes | bytearray, offset: int) -> tuple[int, int, int]:
    """(dtype code, data offset, data size) of the blob whose metadata starts at `offset`.

    MIL blob storage v2: per blob a 64-byte metadata record `uint32 sentinel (0xDEADBEEF), uint32 dtype,
    uint64 size in bytes, uint64 data offset, ...` (coremltools mlmodel/src/MILBlob/Blob/StorageFormat.hpp).
    """
    sentinel, dtype, size, data_offset = struct.unpack_from("<IIQQ", weights, offset)
    if sentinel != BLOB_SENTINEL or data_offset + size > len(weights):
        raise ValueError(f"no blob at offset {offset} of weight.bin")
    return dtype, data_offset, size


def read_blob(weights: bytes | bytearray, ref: BlobRef) -> np.ndarray:
    dtype, start, size = blob_data_range(weights, ref.offset)
    if dtype != FP16_BLOB_DTYPE:
        raise ValueError(f"blob {ref.name} is not fp16 (dtype code {dtype})")
    return np.frombuffer(bytes(weights[start : start + size]), dtype="<f2").reshape(ref.shape)


def rebind_ffn(package: Path, source: CausalLM, target: CausalLM) -> None:
    """Overwrite, in place, the FFN weights of `package` (converted from `source`) with `target`'s.

    Every variant has the same graph (uniform k), so converting once and rewriting the FFN blobs replaces a
    full trace + conversion per variant. The source blobs are checked first, so a converter that renamed or
    transformed a weight fails loudly instead of binding the wrong tensor.
    """
    ct = coremltools()
    spec = ct.utils.load_spec(str(package))
    refs = function_blobs(spec, "main")
    path = package_weights_path(package)
    weights = bytearray(path.read_bytes())
    for name, param in ffn_params(source).items():
        ref = refs.get(ffn_const_name(name))
        if ref is None or not np.array_equal(read_blob(weights, ref), param.numpy().astype(np.float16)):
            raise RuntimeError(f"FFN weight {name} not found as an fp16 blob in the converted decoder")
        new = ffn_params(target)[name].numpy().astype("<f2")
        _, start, size = blob_data_range(weights, ref.offset)
        if new.nbytes != size or new.shape != ref.shape:
            raise RuntimeError(f"FFN weight {name} of the target has shape {new.shape}, the graph {ref.shape}")
        weights[start : start + size] = new.tobytes()
    path.write_bytes(bytes(weights))


# --- packages -----------------------------------------------------------------------------------------------


def normalize_package(package: Path) -> None:
    """Make a saved .mlpackage byte-reproducible: Manifest.json item identifiers are random UUIDs, so derive
    them from the item paths; fix file modes (coremltools writes model.mlmodel 0600)."""
    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    renamed: dict[str, str] = {}
    entries = {}
    for key, item in manifest["itemInfoEntries"].items():
        renamed[key] = str(uuid.uuid5(uuid.NAMESPACE_URL, "ifp-export:" + item["path"])).upper()
        entries[renamed[key]] = item
    manifest["itemInfoEntries"] = entries
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")
    for path in [package, *package.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def package_bytes(package: Path) -> int:
    return sum(p.stat().st_size for p in package.rglob("*") if p.is_file())


def most_general(names: list[str], variant_masks: torch.Tensor, prompt_masks: torch.Tensor | None) -> str:
    """The variant whose mask overlaps most (mean IoU) with every calibration prompt's own mask (first on ties,
    or without predictions): the best fallback for an app that loads the package without routing."""
    if prompt_masks is None or len(names) == 1:
        return names[0]
    inter = torch.einsum("vld,nld->vnl", variant_masks, prompt_masks)
    union = variant_masks.sum(-1)[:, None] + prompt_masks.sum(-1)[None] - inter
    iou = (inter / union.clamp(min=1)).mean((1, 2))
    return names[int(torch.argmax(iou))]


def save_multifunction(packages: dict[str, Path], default: str, destination: Path) -> None:
    """Merge single-function packages into one package, function name = key; shared consts stored once."""
    ct = coremltools()
    desc = ct.utils.MultiFunctionDescriptor()
    for name, path in packages.items():
        desc.add_function(str(path), src_function_name="main", target_function_name=name)
    desc.default_function_name = default
    with quiet_coremltools(), contextlib.redirect_stderr(io.StringIO()):
        ct.utils.save_multifunction(desc, str(destination))
    spec = ct.utils.load_spec(str(destination))
    if CONVERSION_DATE_KEY in spec.description.metadata.userDefined:
        del spec.description.metadata.userDefined[CONVERSION_DATE_KEY]
        ct.utils.save_spec(spec, str(destination), weights_dir=str(package_weights_path(destination).parent))


class CoreMLPredictorRouter(PredictorRouter):
    """`PredictorRouter` with the encoder's padding bias built by arithmetic instead of `torch.where` over 0-d
    tensors (which coremltools types as a 0-d mask). Same modules, same values: 0 for kept keys, the fp32
    minimum for padding; the encoder is bidirectional and has no sliding window."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        predictor, encoder = self.predictor, self.predictor.encoder
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        x = encoder.embed_tokens(input_ids)
        cos, sin = encoder.rotary_emb(position_ids, x.dtype)
        keep = attention_mask.to(x.dtype)
        bias = ((1.0 - keep) * torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in encoder.layers:
            x, _ = layer(x, cos, sin, bias)
        hidden = encoder.norm(x)
        weights = keep[..., None]
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        scores = predictor.head(F.layer_norm(pooled, pooled.shape[-1:]))
        scores = scores.view(-1, predictor.config.target_layers, predictor.config.target_intermediate_size)
        return scores, standardize(scores).flatten(1) @ self.routing


def convert_predictor(predictor: SparsityPredictor, variant_masks: torch.Tensor, path: Path) -> None:
    """The predictor + routing head as an fp32 mlprogram (runs once per prompt; fp32 keeps the routing argmax
    from hinging on fp16 rounding of standardized scores)."""
    ct = coremltools()
    router = CoreMLPredictorRouter(predictor, variant_masks).eval()
    example = (torch.ones(1, 5, dtype=torch.int32), torch.ones(1, 5, dtype=torch.int32))
    with quiet_coremltools(), torch.no_grad():
        traced = torch.jit.trace(router, example, check_trace=False)
    length = ct.RangeDim(lower_bound=1, upper_bound=predictor.config.max_length, default=predictor.config.max_length)
    with quiet_coremltools(), contextlib.redirect_stderr(io.StringIO()):
        mlmodel = ct.convert(
            traced,
            inputs=[ct.TensorType(shape=(1, length), dtype=np.int32, name=n) for n in PREDICTOR_INPUTS],
            outputs=[ct.TensorType(dtype=np.float32, name=n) for n in PREDICTOR_OUTPUTS],
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=ct.precision.FLOAT32,
            skip_model_load=True,
        )
    mlmodel.short_description = "IFPruning sparsity predictor + routing head: argmax(variant_scores) = variant"
    save_model(mlmodel, path)
    normalize_package(path)


@dataclass
class CoreMLArtifacts:
    directory: Path
    decoder: Path  # multifunction .mlpackage
    predictor: Path
    functions: list[str]  # variant names, then "dense"
    default_function: str
    ideal_bytes: int  # fp16: shared weights once + every function's FFN slices
    disk_bytes: int  # every file of the decoder package
    max_context: int

    @property
    def dedup_ratio(self) -> float:
        return self.disk_bytes / self.ideal_bytes


def ideal_fp16_bytes(dense: CausalLM, folded: dict[str, CausalLM]) -> int:
    """Weights stored once, in fp16: the dense model (shared + its FFN) plus every variant's FFN slices."""
    shared, dense_ffn = weight_bytes(dense)
    return (shared + dense_ffn + sum(weight_bytes(m)[1] for m in folded.values())) // 2


def emit(
    directory: Path,
    dense: CausalLM,
    folded: dict[str, CausalLM],
    predictor: SparsityPredictor,
    variant_masks: torch.Tensor,
    default_function: str | None = None,
) -> CoreMLArtifacts:
    """Write `decoder.mlpackage` (one function per variant + "dense") and `predictor.mlpackage` under
    `directory` (created, must be new). Variants are converted once and re-bound; dense is converted itself."""
    directory.mkdir(parents=True)
    names = list(folded)
    first = folded[names[0]]
    with tempfile.TemporaryDirectory(prefix="ifp-coreml-", dir=directory.parent) as tmp:
        packages: dict[str, Path] = {name: Path(tmp) / f"{name}.mlpackage" for name in [*names, DENSE_NAME]}
        convert_decoder(first, packages[names[0]])
        for name in names[1:]:
            shutil.copytree(packages[names[0]], packages[name])
            rebind_ffn(packages[name], first, folded[name])
        convert_decoder(dense, packages[DENSE_NAME])
        decoder = directory / DECODER_PACKAGE
        save_multifunction(packages, default_function or names[0], decoder)
    normalize_package(decoder)
    predictor_path = directory / PREDICTOR_PACKAGE
    convert_predictor(predictor, variant_masks, predictor_path)
    return CoreMLArtifacts(
        directory,
        decoder,
        predictor_path,
        [*names, DENSE_NAME],
        default_function or names[0],
        ideal_fp16_bytes(dense, folded),
        package_bytes(decoder),
        context_length(dense),
    )


# --- validation (structural; Core ML cannot predict on Linux) -----------------------------------------------


def feature_signature(feature: Any) -> tuple[str, str, str]:
    """(name, kind, "dtype[shape ranges]") of a spec input/output/state, for the table and the checks."""
    kind = feature.type.WhichOneof("Type")
    array = feature.type.stateType.arrayType if kind == "stateType" else feature.type.multiArrayType
    dtype = array.DataType.Name(array.dataType)
    ranges = array.shapeRange.sizeRanges
    if ranges:
        dims = [str(r.lowerBound) if r.lowerBound == r.upperBound else f"{r.lowerBound}..{r.upperBound}" for r in ranges]
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
    max_abs_diff: float  # max |weight.bin fp16 - PyTorch fp32| over the function's weights
    fp16_exact: bool  # every blob equals the fp16 rounding of its PyTorch tensor
    missing: list[str]

    @property
    def ok(self) -> bool:
        return self.io_ok and self.fp16_exact and not self.missing and self.ffn_tensors_checked > 0


def check_weights(
    weights: bytes, refs: dict[str, BlobRef], model: nn.Module, const_name: Any, skip: set[str]
) -> tuple[int, int, float, bool, list[str]]:
    """Read every tensor of `model` back from weight.bin by its const name; (checked, FFN checked, max |diff|,
    all equal to the tensor's fp16 rounding, names not found)."""
    checked = ffn = 0
    worst, exact, missing = 0.0, True, []
    for name, tensor in model.state_dict().items():
        ref = refs.get(const_name(name))
        if ref is None:
            if name not in skip and tensor.numel() >= 2:  # tied or tiny (inlined) tensors have no blob
                missing.append(name)
            continue
        stored = read_blob(weights, ref) if const_name is ffn_const_name else read_fp32_blob(weights, ref)
        expected = tensor.detach().float().numpy()
        if stored.shape != expected.shape:
            missing.append(name)
            continue
        worst = max(worst, float(np.abs(stored.astype(np.float32) - expected).max(initial=0.0)))
        exact &= bool(np.array_equal(stored, expected.astype(stored.dtype)))
        checked += 1
        ffn += name.rsplit(".", 2)[-2] in FFN_PARAMS
    return checked, ffn, worst, exact, missing


def read_fp32_blob(weights: bytes | bytearray, ref: BlobRef) -> np.ndarray:
    dtype, start, size = blob_data_range(weights, ref.offset)
    itemsize = size // max(int(np.prod(ref.shape)), 1)
    return np.frombuffer(bytes(weights[start : start + size]), dtype="<f2" if itemsize == 2 else "<f4").reshape(
        ref.shape
    )


def check_decoder_package(artifacts: CoreMLArtifacts, references: dict[str, CausalLM]) -> list[FunctionCheck]:
    """Per function: IO/states/dtypes from the spec, and every weight read back from weight.bin by the blob
    offsets in the spec, against the folded PyTorch model (equal to its fp16 rounding)."""
    ct = coremltools()
    with quiet_coremltools():
        ct.models.MLModel(str(artifacts.decoder), skip_model_load=True)  # coremltools parses the package
    spec = ct.utils.load_spec(str(artifacts.decoder))
    described = {f.name: f for f in spec.description.functions}
    if list(described) != artifacts.functions or spec.description.defaultFunctionName != artifacts.default_function:
        raise ValidationFailed(
            f"decoder.mlpackage has functions {list(described)} (default {spec.description.defaultFunctionName!r}),"
            f" expected {artifacts.functions} (default {artifacts.default_function!r})"
        )
    weights = package_weights_path(artifacts.decoder).read_bytes()
    rows = []
    for name in artifacts.functions:
        desc, model = described[name], references[name]
        io = {
            "inputs": [feature_signature(f) for f in desc.input],
            "outputs": [feature_signature(f) for f in desc.output],
            "states": [feature_signature(f) for f in desc.state],
        }
        skip = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        checked, ffn, worst, exact, missing = check_weights(
            weights, function_blobs(spec, name), model, ffn_const_name, skip
        )
        io_ok = io == expected_decoder_io(model, artifacts.max_context)
        rows.append(FunctionCheck(name, io["inputs"], io["outputs"], io["states"], io_ok, checked, ffn, worst, exact, missing))
    return rows


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
    weights = package_weights_path(artifacts.predictor).read_bytes()
    refs = function_blobs(spec, "main")
    checked, _, worst, exact, missing = check_weights(
        weights, refs, predictor, lambda n: "predictor_" + n.replace(".", "_"), set()
    )
    routing = CoreMLPredictorRouter(predictor, variant_masks).routing.numpy()
    stored = [read_fp32_blob(weights, r) for r in refs.values() if r.shape in (routing.shape, routing.T.shape)]
    if not any(np.array_equal(s, routing) or np.array_equal(s, routing.T) for s in stored):
        missing.append("routing")
    return FunctionCheck(
        PREDICTOR_PACKAGE, io["inputs"], io["outputs"], io["states"], io == expected, checked, 0, worst, exact, missing
    )


def validation_table(rows: list[FunctionCheck], predictor: FunctionCheck, artifacts: CoreMLArtifacts) -> Table:
    table = Table(title="Core ML validation (structure + weights read back from weight.bin; no prediction on Linux)")
    for column in ("function", "inputs", "outputs", "states", "tensors (FFN)", "max|Δ| vs fp32", "=fp16", "ok"):
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
            "yes" if r.fp16_exact else "NO",
            "yes" if r.ok else f"NO {r.missing[:2] if r.missing else ''}",
        )
    table.caption = (
        f"{DECODER_PACKAGE}: {artifacts.disk_bytes:,} bytes on disk / {artifacts.ideal_bytes:,} ideal fp16 "
        f"= dedup ratio {artifacts.dedup_ratio:.4f}; KV cache {artifacts.max_context} tokens"
    )
    return table


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
            ckpt.backbone,
            ctx.require("folded", self.name),
            ckpt.predictor,
            masks,
            most_general(names, masks, prompt_masks),
        )
        ctx.emitted[self.name] = artifacts
        ctx.console.log(
            f"Core ML: {DECODER_PACKAGE} with functions {', '.join(artifacts.functions)} (default "
            f"{artifacts.default_function}) + {PREDICTOR_PACKAGE}; bytes on disk {artifacts.disk_bytes:,} / ideal "
            f"{artifacts.ideal_bytes:,} = dedup ratio {artifacts.dedup_ratio:.4f}"
        )
        return ctx


def validate_export(ctx: ExportContext) -> None:
    """Check the context's Core ML packages structurally, print the table, raise if anything is off."""
    artifacts: CoreMLArtifacts = ctx.emitted["coreml"]
    ckpt = ctx.checkpoint
    masks = torch.stack([v.mask for v in ctx.variants])
    rows = check_decoder_package(artifacts, {**ctx.folded, DENSE_NAME: ckpt.backbone})
    predictor = check_predictor_package(artifacts, ckpt.predictor, masks)
    ctx.console.print(validation_table(rows, predictor, artifacts))
    ctx.report["coreml_validation"] = {
        "functions": [
            {"function": r.function, "ok": r.ok, "tensors": r.tensors_checked, "max_abs_diff": r.max_abs_diff}
            for r in [*rows, predictor]
        ],
        "default_function": artifacts.default_function,
        "dedup_ratio": artifacts.dedup_ratio,
        "decoder_bytes": artifacts.disk_bytes,
        "ideal_fp16_bytes": artifacts.ideal_bytes,
        "max_context": artifacts.max_context,
    }
    bad = [r.function for r in [*rows, predictor] if not r.ok]
    if bad:
        raise ValidationFailed(f"Core ML functions {bad} do not match the folded PyTorch models (see table)")
