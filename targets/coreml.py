"""Core ML target: every variant (and the dense model) as one function of a multifunction `.mlpackage` with a
stateful KV cache, plus the shared predictor (routing head folded in) as its own `.mlpackage`.

The decoder is traced with `torch.jit.trace` through `StatefulDecoder` — the folded decoder's own modules with the
KV cache held in two fp16 buffers (`keyCache`, `valueCache`, [L, 1, KVH, C, D]) that Core ML turns into states
(`ct.StateType`, iOS 18) — and converted to an fp16 `mlprogram`. Every variant has the same graph (uniform k), so
only the first is converted; the others are copies with their FFN blobs rewritten in `weight.bin`. The dense model
(wider FFN) is converted itself. The per-model packages are then merged with `ct.utils.save_multifunction`, whose
constant deduplication stores a tensor shared by several functions (embeddings, attention, norms, lm_head) once
in `weights/weight.bin`; only the FFN slices differ per function.

Inputs follow Apple's stateful Llama example: `inputIds` [1, T] int32 and `causalMask` [1, 1, T, P + T] fp16
(0 where a query may attend, -inf elsewhere; P = tokens already in the cache), both with flexible sizes
(`ct.RangeDim`), so one function serves prefill (T = prompt length) and decode (T = 1). Output: `logits`
[1, T, V] fp16. Core ML cannot predict on Linux, so validation here is structural (spec IO, states, dtypes) plus
every weight read back from `weight.bin` by the blob offsets in the spec; on macOS it also compares predictions.

`--quantize int8|int4` quantizes the decoder's weights with `coremltools.optimize` (weight-only, on the converted
fp16 mlprogram, before the functions are merged): int8 symmetric per output channel, int4 symmetric block-wise
(32 input channels per scale, iOS 18; per output channel where the input width is not a multiple of 32). Every
function is quantized on its own; the quantizer is deterministic, so a weight shared by all functions gives the
same int8/int4 + scale blobs everywhere and `save_multifunction` still stores it once. Validation then reads the
quantized blobs back, dequantizes them (`constexpr_blockwise_shift_scale`: data * scale) and bounds the error
against the fp32 PyTorch weights by half a quantization step. The predictor stays fp32 (routing exactness).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn

from ifp_export.errors import IFPError, ValidationFailed
from ifp_export.fold import as_float32, fold_variants
from ifp_export.masks import standardize
from ifp_export.model.decoder import CausalLM, apply_rope, repeat_kv
from ifp_export.model.predictor import SparsityPredictor
from ifp_export.pipeline import ExportContext
from ifp_export.quiet import quiet
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
BLOB_DTYPES = {1: "<f2", 2: "<f4", 4: "i1"}  # MIL blob storage dtype codes: float16, float32, int8
BLOB_INT4 = 8  # MIL blob storage dtype code of int4 (two per byte, low nibble first)
QUANTIZE_MODES = ("none", "int8", "int4")
INT4_BLOCK_SIZE = 32  # input channels per int4 scale (as ONNX MatMulNBits)
QUANTIZED_SUFFIX = "_quantized"  # coremltools names the constexpr op replacing const `w` as `w_quantized`


def coremltools() -> Any:
    with quiet():
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
    with quiet(), torch.no_grad():
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    query = ct.RangeDim(lower_bound=1, upper_bound=max_context, default=1)
    total = ct.RangeDim(lower_bound=1, upper_bound=max_context, default=1)
    cache_shape = tuple(wrapper.keyCache.shape)
    with quiet(), contextlib.redirect_stderr(io.StringIO()):  # progress bars
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
    with quiet():
        mlmodel.save(str(path))


CONVERSION_DATE_KEY = "com.github.apple.coremltools.conversion_date"


# --- weight blobs -------------------------------------------------------------------------------------------


def ffn_const_name(param: str) -> str:
    """The const name coremltools gives a weight of the traced `StatefulDecoder` (fp16 cast of `model.<param>`)."""
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
    """The value of a blob-backed const (fp16, fp32, int8 or int4) as a numpy array of its shape."""
    dtype, start, size = blob_data_range(weights, ref.offset)
    raw = bytes(weights[start : start + size])
    if dtype == BLOB_INT4:  # packed, low nibble first; sign-extend
        packed = np.frombuffer(raw, dtype=np.uint8)
        nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(-1).astype(np.int8)
        values = np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8)
        return values[: int(np.prod(ref.shape))].reshape(ref.shape)
    if dtype not in BLOB_DTYPES:
        raise ValueError(f"blob {ref.name} has an unexpected dtype code {dtype}")
    return np.frombuffer(raw, dtype=BLOB_DTYPES[dtype]).reshape(ref.shape)


@dataclass(frozen=True)
class QuantizedRef:
    """A `constexpr_blockwise_shift_scale` weight: weight = (data - offset) * scale, with one scale per block
    (block size along each axis = data dim / scale dim). Values as blob references or inline arrays."""

    name: str
    shape: tuple[int, ...]
    data: BlobRef | np.ndarray
    scale: BlobRef | np.ndarray
    offset: BlobRef | np.ndarray | None


MIL_IMMEDIATE_DTYPES = {10: np.float16, 11: np.float32, 21: np.int8}  # MIL DataType: FLOAT16, FLOAT32, INT8


def mil_value(value: Any, name: str) -> BlobRef | np.ndarray:
    """A MIL tensor value: a BlobRef when it lives in weight.bin, else the inline array."""
    tensor_type = value.type.tensorType
    shape = tuple(int(d.constant.size) for d in tensor_type.dimensions)
    if value.HasField("blobFileValue"):
        return BlobRef(name, shape, int(value.blobFileValue.offset))
    tensor = value.immediateValue.tensor
    kind = tensor.WhichOneof("value")
    if kind == "bytes" and tensor_type.dataType in MIL_IMMEDIATE_DTYPES:
        array = np.frombuffer(tensor.bytes.values, dtype=MIL_IMMEDIATE_DTYPES[tensor_type.dataType])
    elif kind in ("floats", "ints"):
        array = np.asarray(getattr(tensor, kind).values, dtype=np.float32 if kind == "floats" else np.int32)
    else:
        raise ValueError(f"inline value of {name} has an unsupported encoding ({kind}, type {tensor_type.dataType})")
    return array.reshape(shape)


def function_quantized(spec: Any, function: str) -> dict[str, QuantizedRef]:
    """Output name -> QuantizedRef for every `constexpr_blockwise_shift_scale` of one mlprogram function."""
    fn = spec.mlProgram.functions[function]
    operations = fn.block_specializations[fn.opset].operations
    consts = {
        op.outputs[0].name: op.attributes["val"] for op in operations if op.type == "const" and "val" in op.attributes
    }
    refs: dict[str, QuantizedRef] = {}
    for op in operations:
        if op.type != "constexpr_blockwise_shift_scale":
            continue
        name = op.outputs[0].name
        values: dict[str, BlobRef | np.ndarray] = {}
        for key in ("data", "scale", "offset"):
            if key not in op.inputs:
                continue
            argument = op.inputs[key].arguments[0]
            value = argument.value if argument.WhichOneof("binding") == "value" else consts[argument.name]
            values[key] = mil_value(value, f"{name}.{key}")
        shape = tuple(int(d.constant.size) for d in op.outputs[0].type.tensorType.dimensions)
        refs[name] = QuantizedRef(name, shape, values["data"], values["scale"], values.get("offset"))
    return refs


def dequantize(weights: bytes | bytearray, ref: QuantizedRef) -> tuple[np.ndarray, np.ndarray]:
    """(weight, per-element scale) of a quantized weight, in fp32."""

    def array(value: BlobRef | np.ndarray | None) -> np.ndarray | None:
        return read_blob(weights, value) if isinstance(value, BlobRef) else value

    data, scale, offset = array(ref.data), array(ref.scale), array(ref.offset)
    if data is None or scale is None or data.ndim != scale.ndim or data.shape != ref.shape:
        raise ValueError(f"quantized weight {ref.name} has inconsistent data/scale shapes")

    def per_element(blocks: np.ndarray) -> np.ndarray:
        out = blocks.astype(np.float32)
        for axis, (full, part) in enumerate(zip(data.shape, blocks.shape, strict=True)):
            if full % part:
                raise ValueError(f"quantized weight {ref.name}: scale dim {part} does not divide {full}")
            out = np.repeat(out, full // part, axis=axis)
        return out

    scales = per_element(scale)
    shifted = data.astype(np.float32) - (per_element(offset) if offset is not None else 0.0)
    return shifted * scales, scales


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


# --- quantization -------------------------------------------------------------------------------------------


def quantization_config(package: Path, mode: str) -> Any:
    """`coremltools.optimize` config for one single-function decoder package: one op config per 2-D model weight
    (embeddings, attention, FFN, untied lm_head; named explicitly, so no size threshold applies). int8: symmetric,
    one scale per output channel. int4: symmetric, one scale per `INT4_BLOCK_SIZE` input channels of an output
    channel (iOS 18 block-wise), or per output channel where the input width is not a multiple of the block size
    (a pruned FFN's `down_proj` with k % 32 != 0), which coremltools would otherwise skip. Norm weights and the
    converter's zero biases stay fp16."""
    from coremltools.optimize import coreml as cto

    spec = coremltools().utils.load_spec(str(package))
    configs = {}
    for name, ref in function_blobs(spec, "main").items():
        if not (name.startswith("model_") and name.endswith("_weight_to_fp16")) or len(ref.shape) != 2:
            continue
        if mode == "int8":
            configs[name] = cto.OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0
            )
        elif ref.shape[1] % INT4_BLOCK_SIZE == 0:
            configs[name] = cto.OpLinearQuantizerConfig(
                mode="linear_symmetric",
                dtype="int4",
                granularity="per_block",
                block_size=INT4_BLOCK_SIZE,
                weight_threshold=0,
            )
        else:
            configs[name] = cto.OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype="int4", granularity="per_channel", weight_threshold=0
            )
    return cto.OptimizationConfig(op_name_configs=configs)


def quantize_package(source: Path, destination: Path, mode: str) -> Path:
    """Weight-only quantization (`linear_quantize_weights`) of a single-function fp16 package, saved at
    `destination`. Deterministic: the same fp16 weight always gives the same data and scale blobs."""
    from coremltools.optimize import coreml as cto

    ct = coremltools()
    config = quantization_config(source, mode)
    with quiet(), contextlib.redirect_stderr(io.StringIO()):  # progress bars
        mlmodel = ct.models.MLModel(str(source), skip_model_load=True)
        quantized = cto.linear_quantize_weights(mlmodel, config)
    save_model(quantized, destination)
    return destination


def blob_offsets(spec: Any) -> set[int]:
    """Metadata offsets of every weight.bin blob any op of any function of `spec` refers to (const values and
    inline operands of constexpr ops)."""
    offsets = set()
    for fn in spec.mlProgram.functions.values():
        for op in fn.block_specializations[fn.opset].operations:
            values = [*op.attributes.values()]
            values += [a.value for i in op.inputs.values() for a in i.arguments if a.WhichOneof("binding") == "value"]
            offsets.update(int(v.blobFileValue.offset) for v in values if v.HasField("blobFileValue"))
    return offsets


def distinct_blob_bytes(packages: list[Path]) -> int:
    """Bytes of every distinct weight blob (dtype + content) across `packages`, each counted once: the ideal
    size of a quantized multifunction package, whose tensors have no PyTorch twin to count from."""
    ct = coremltools()
    seen: dict[tuple[int, str], int] = {}
    for package in packages:
        weights = package_weights_path(package).read_bytes()
        for offset in blob_offsets(ct.utils.load_spec(str(package))):
            dtype, start, size = blob_data_range(weights, offset)
            seen[(dtype, hashlib.sha256(weights[start : start + size]).hexdigest())] = size
    return sum(seen.values())


# --- packages -----------------------------------------------------------------------------------------------


def normalize_package(package: Path) -> None:
    """Make a saved .mlpackage byte-reproducible: Manifest.json item identifiers are random UUIDs, so derive
    them from the item paths; the spec's protobuf maps (op attributes) are serialized in dict order, which
    follows Python's per-process string hashing, so re-serialize deterministically (sorted map keys); fix file
    modes (coremltools writes model.mlmodel 0600)."""
    from coremltools.proto import Model_pb2

    spec_path = package_spec_path(package)
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    spec_path.write_bytes(spec.SerializeToString(deterministic=True))
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
    with quiet(), contextlib.redirect_stderr(io.StringIO()):
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
    with quiet(), torch.no_grad():
        traced = torch.jit.trace(router, example, check_trace=False)
    length = ct.RangeDim(lower_bound=1, upper_bound=predictor.config.max_length, default=predictor.config.max_length)
    with quiet(), contextlib.redirect_stderr(io.StringIO()):
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
    ideal_bytes: int  # fp16: shared weights once + every function's FFN slices; quantized: distinct blobs once
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
    quantize: str = "none",
) -> CoreMLArtifacts:
    """Write `decoder.mlpackage` (one function per variant + "dense") and `predictor.mlpackage` under
    `directory` (created, must be new). Variants are converted once and re-bound; dense is converted itself.
    `quantize` int8/int4: every function's package is quantized on its own before the merge (deterministic, so
    shared weights stay identical and are stored once); the ideal size is then every distinct blob once."""
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
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
        if quantize == "none":
            ideal = ideal_fp16_bytes(dense, folded)
        else:
            packages = {
                name: quantize_package(path, path.with_name(f"{name}.{quantize}.mlpackage"), quantize)
                for name, path in packages.items()
            }
            ideal = distinct_blob_bytes(list(packages.values()))
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
        ideal,
        package_bytes(decoder),
        context_length(dense),
        quantize,
    )


# --- validation (structural; Core ML cannot predict on Linux) -----------------------------------------------


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

    @property
    def ok(self) -> bool:
        found = self.tensors_checked > 0 and (self.ffn_tensors_checked > 0 or not self.expect_ffn)
        quantized = self.quantize == "none" or self.quantized_tensors > 0
        return self.io_ok and self.fp16_exact and not self.missing and found and quantized


def quantization_bound(expected: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Allowed |dequantized - fp32| per element: half a quantization step (round to nearest), plus the fp16
    rounding of the weight before quantization and of the stored scale (2^-11 relative each, doubled)."""
    return 0.5 * scales + 2.0**-10 * (np.abs(expected) + scales) + 2.0**-24


def tolerance_text(quantize: str) -> str:
    if quantize == "none":
        return "fp16 weights: every blob == fp16 rounding of the PyTorch weight"
    granularity = "per output channel" if quantize == "int8" else f"blocks of {INT4_BLOCK_SIZE} input channels"
    return (
        f"{quantize} weights (symmetric, {granularity}): every 2-D weight quantized, dequantized (data x scale) "
        "within scale/2 (+ fp16 rounding) of the PyTorch weight; norms/biases fp16-exact"
    )


def check_weights(
    weights: bytes,
    refs: dict[str, BlobRef],
    model: nn.Module,
    const_name: Any,
    skip: set[str],
    quantized: dict[str, QuantizedRef] | None = None,
) -> tuple[int, int, float, bool, list[str], int, float]:
    """Read every tensor of `model` back from weight.bin by its const name; (checked, FFN checked, max |diff|,
    all equal to the tensor's fp16 rounding / within the quantization bound, names not found, quantized checked,
    max |diff| / bound over quantized elements). With `quantized` (the function's constexpr weights), every 2-D
    tensor must be one of them."""
    checked = ffn = nquantized = 0
    worst, exact, missing, ratio = 0.0, True, [], 0.0
    for name, tensor in model.state_dict().items():
        ref = refs.get(const_name(name))
        qref = None if quantized is None else quantized.get(const_name(name) + QUANTIZED_SUFFIX)
        if qref is not None:
            expected = tensor.detach().float().numpy()
            if qref.shape != expected.shape:
                missing.append(name)
                continue
            stored, scales = dequantize(weights, qref)
            error = np.abs(stored - expected)
            worst = max(worst, float(error.max(initial=0.0)))
            ratio = max(ratio, float((error / quantization_bound(expected, scales)).max(initial=0.0)))
            checked += 1
            nquantized += 1
            ffn += name.rsplit(".", 2)[-2] in FFN_PARAMS
            continue
        if quantized is not None and tensor.dim() == 2 and name not in skip:
            missing.append(f"{name} (not quantized)")
            continue
        if ref is None:
            # no blob: tied (lm_head), tiny (inlined), or an identity the converter removed (x * ones, x + zeros)
            identity = bool((tensor == 1).all() or (tensor == 0).all())
            if name not in skip and tensor.numel() >= 2 and not identity:
                missing.append(name)
            continue
        stored = read_blob(weights, ref)
        expected = tensor.detach().float().numpy()
        if stored.shape != expected.shape:
            missing.append(name)
            continue
        worst = max(worst, float(np.abs(stored.astype(np.float32) - expected).max(initial=0.0)))
        exact &= bool(np.array_equal(stored, expected.astype(stored.dtype)))
        checked += 1
        ffn += name.rsplit(".", 2)[-2] in FFN_PARAMS
    return checked, ffn, worst, exact and ratio <= 1.0, missing, nquantized, ratio


def check_decoder_package(artifacts: CoreMLArtifacts, references: dict[str, CausalLM]) -> list[FunctionCheck]:
    """Per function: IO/states/dtypes from the spec, and every weight read back from weight.bin by the blob
    offsets in the spec, against the folded PyTorch model (equal to its fp16 rounding; quantized: dequantized,
    within half a quantization step)."""
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
        quantized = None if artifacts.quantize == "none" else function_quantized(spec, name)
        checked, ffn, worst, exact, missing, nquantized, ratio = check_weights(
            weights, function_blobs(spec, name), model, ffn_const_name, skip, quantized
        )
        io_ok = io == expected_decoder_io(model, artifacts.max_context)
        rows.append(
            FunctionCheck(
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
        )
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
    for column in ("function", "inputs", "outputs", "states", "tensors (FFN)", "max|Δ| vs fp32", "weights", "ok"):
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
            "yes" if r.ok else f"NO {r.missing[:2] if r.missing else ''}",
        )
    ideal = "ideal fp16" if artifacts.quantize == "none" else f"ideal ({artifacts.quantize}: distinct blobs once)"
    table.caption = (
        f"{DECODER_PACKAGE}: {artifacts.disk_bytes:,} bytes on disk / {artifacts.ideal_bytes:,} {ideal} "
        f"= dedup ratio {artifacts.dedup_ratio:.4f}; weight.bin {artifacts.weights_bytes:,} bytes; "
        f"KV cache {artifacts.max_context} tokens"
    )
    return table


def weights_cell(row: FunctionCheck) -> str:
    if row.quantize == "none":
        exact = "=fp16" if row.expect_ffn else "=fp32"  # decoder functions are fp16, the predictor fp32
        return exact if row.fp16_exact else "NO"
    verdict = "ok" if row.fp16_exact else "NO"
    return f"{row.quantized_tensors} {row.quantize}, {row.bound_ratio:.3f}x bound {verdict}"


PARITY_TOLERANCE = 2e-2  # fp16 compute: max |Δ logits| / max(1, max |logits|)
# quantized weights (macOS prediction check): as the ONNX target's relative tolerances
QUANTIZED_PARITY_TOLERANCE = {"int8": 0.05, "int4": 0.25}


def parity_tolerance(quantize: str) -> float:
    return PARITY_TOLERANCE if quantize == "none" else QUANTIZED_PARITY_TOLERANCE[quantize]


def run_cached(step: Any, prompt: list[int], decode_steps: int) -> tuple[list[np.ndarray], list[int]]:
    """Prefill `prompt`, then greedy-decode `decode_steps` tokens through `step(input_ids, causal_mask)` (a
    stateful callable); the logits of every call (fp32) and the tokens chosen."""
    logits = [np.asarray(step(np.array([prompt], dtype=np.int32), causal_mask(0, len(prompt)).numpy()), np.float32)]
    tokens: list[int] = []
    for _ in range(decode_steps):
        tokens.append(int(logits[-1][0, -1].argmax()))
        past = len(prompt) + len(tokens) - 1
        mask = causal_mask(past, 1).numpy()
        logits.append(np.asarray(step(np.array([[tokens[-1]]], dtype=np.int32), mask), np.float32))
    return logits, tokens


@torch.no_grad()
def reference_cached(model: CausalLM, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    """The PyTorch decoder's logits (fp32, explicit cache) for the same prefill + decode sequence."""
    logits, past = model(torch.tensor([prompt]))
    out = [logits.numpy()]
    for token in tokens:
        logits, past = model(torch.tensor([[token]]), past_key_values=past)
        out.append(logits.numpy())
    return out


def relative_diff(got: list[np.ndarray], expected: list[np.ndarray]) -> float:
    scale = max(1.0, max(float(np.abs(e).max()) for e in expected))
    return max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True)) / scale


def coreml_parity(
    artifacts: CoreMLArtifacts, references: dict[str, CausalLM], prompt: list[int], decode_steps: int = 8
) -> dict[str, float]:
    """macOS only: per function, Core ML (stateful, fp16) vs PyTorch logits over prefill + `decode_steps` cached
    greedy steps, as max |Δ| relative to the largest logit."""
    ct = coremltools()
    result = {}
    for name in artifacts.functions:
        with quiet():
            model = ct.models.MLModel(str(artifacts.decoder), function_name=name, compute_units=ct.ComputeUnit.CPU_ONLY)
        state = model.make_state()

        def step(ids: np.ndarray, mask: np.ndarray, model: Any = model, state: Any = state) -> np.ndarray:
            inputs = {"inputIds": ids, "causalMask": mask.astype(np.float16)}
            return model.predict(inputs, state=state)["logits"]

        got, tokens = run_cached(step, prompt, decode_steps)
        result[name] = relative_diff(got, reference_cached(references[name], prompt, tokens))
    return result


def open_artifacts(
    directory: Path, dense: CausalLM, folded: dict[str, CausalLM], quantize: str = "none"
) -> CoreMLArtifacts:
    """The CoreMLArtifacts of an existing output directory (for `ifp-export validate`; `quantize` as recorded in
    the manifest)."""
    decoder, predictor = directory / DECODER_PACKAGE, directory / PREDICTOR_PACKAGE
    for path in (decoder, predictor):
        if not package_spec_path(path).is_file() or not package_weights_path(path).is_file():
            raise IFPError("Core ML package missing or incomplete", path, "re-run ifp-export export")
    default = coremltools().utils.load_spec(str(decoder)).description.defaultFunctionName
    return CoreMLArtifacts(
        directory,
        decoder,
        predictor,
        [*folded, DENSE_NAME],
        default,
        ideal_fp16_bytes(dense, folded) if quantize == "none" else distinct_blob_bytes([decoder]),
        package_bytes(decoder),
        context_length(dense),
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
            dense := as_float32(ckpt.backbone),
            fold_variants(dense, {v.name: v.kept for v in variants}),
            ckpt.predictor,
            masks,
            most_general(names, masks, prompt_masks),
            ctx.options.quantize,
        )
        ctx.emitted[self.name] = artifacts
        weights = "fp16" if artifacts.quantize == "none" else f"{artifacts.quantize} weights"
        ctx.console.log(
            f"Core ML: {DECODER_PACKAGE} ({weights}) with functions {', '.join(artifacts.functions)} (default "
            f"{artifacts.default_function}) + {PREDICTOR_PACKAGE} (fp32); bytes on disk {artifacts.disk_bytes:,} / "
            f"ideal {artifacts.ideal_bytes:,} = dedup ratio {artifacts.dedup_ratio:.4f}"
        )
        return ctx


def validate_export(ctx: ExportContext) -> None:
    """Check the context's Core ML packages structurally, print the table, raise if anything is off."""
    artifacts: CoreMLArtifacts = ctx.emitted["coreml"]
    ckpt = ctx.checkpoint
    masks = torch.stack([v.mask for v in ctx.variants])
    dense = as_float32(ckpt.backbone)  # the package's weights are compared as float32 arrays
    references = {**fold_variants(dense, {v.name: v.kept for v in ctx.variants}), DENSE_NAME: dense}
    rows = check_decoder_package(artifacts, references)
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
    bad = [r.function for r in [*rows, predictor] if not r.ok]
    if sys.platform == "darwin":  # Core ML can predict only on macOS
        first = ctx.variants[0].prompt_indices[0]
        prompt = ckpt.tokenizer.encode(ckpt.tasks[first].prompt).ids
        parity = coreml_parity(artifacts, references, prompt)
        ctx.report["coreml_validation"]["parity_relative_max_abs_diff"] = parity
        ctx.console.log(f"Core ML vs PyTorch logits (prefill + 8 decode steps), relative max|Δ|: {parity}")
        bad += [name for name, diff in parity.items() if diff > parity_tolerance(artifacts.quantize)]
    if bad:
        raise ValidationFailed(f"Core ML functions {bad} do not match the folded PyTorch models (see table)")
