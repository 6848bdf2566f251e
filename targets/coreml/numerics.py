"""The decoder program's fp16 norm and RoPE: a numpy emulation (nothing can run the program on Linux) and a
structural check of the saved spec, so validation knows the package computes what the emulation measured.

`rms_norm_fp16` / `rope_fp16` mirror `build.rms_norm` / `build.rope` op for op in float16 (every intermediate
rounded to fp16; reductions summed in fp16), so a test can feed them real-scale activations and compare with fp32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ifp_export.model.config import DecoderConfig
from ifp_export.targets.coreml.blobs import Weights, function_blobs, read_blob
from ifp_export.targets.coreml.build import NORM_FLOOR, ROPE_TABLES, rope_tables

F16 = np.float16
FP16_MAX = 65504.0  # the largest finite fp16 value: activations beyond it become inf on the device
MIL_FP16 = 10  # MIL DataType FLOAT16
NORM_CHAIN = ("rsqrt", "add", "reduce_mean", "mul", "real_div", "maximum", "reduce_max", "abs")


def rms_norm_fp16(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """`build.rms_norm` in fp16: y = x / max(max|x|, floor); w * y * rsqrt(mean(y²) + eps/m/m)."""
    x, w = x.astype(F16), w.astype(F16)
    m = np.maximum(np.abs(x).max(-1, keepdims=True), F16(NORM_FLOOR))
    y = (x / m).astype(F16)
    mean = (np.sum((y * y).astype(F16), axis=-1, keepdims=True, dtype=F16) / F16(x.shape[-1])).astype(F16)
    scaled_eps = ((F16(eps) / m).astype(F16) / m).astype(F16)
    r = (F16(1) / np.sqrt((mean + scaled_eps).astype(F16))).astype(F16)
    return (w * (y * r).astype(F16)).astype(F16)


def rms_norm_naive_fp16(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """What a traced fp16 program computes: mean(x²) in fp16 (overflows above |x| ~ 256)."""
    x, w = x.astype(F16), w.astype(F16)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        mean = (np.sum((x * x).astype(F16), axis=-1, keepdims=True, dtype=F16) / F16(x.shape[-1])).astype(F16)
        return (w * (x * (F16(1) / np.sqrt(mean + F16(eps))).astype(F16))).astype(F16)


def rms_norm_fp32(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float32)
    return w.astype(np.float32) * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def rope_fp16(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """`build.rope` in fp16: x * cos + rotate_half(x) * sin with the fp16 tables' gathered rows [T, D]."""
    x, cos, sin = x.astype(F16), cos.astype(F16), sin.astype(F16)
    half = x.shape[-1] // 2
    rotated = np.concatenate([(x[..., half:] * F16(-1)).astype(F16), x[..., :half]], axis=-1)
    return ((x * cos).astype(F16) + (rotated * sin).astype(F16)).astype(F16)


def rope_fp32(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    x = x.astype(np.float32)
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin


def check_numerics(spec: Any, function: str, weights: Weights, cfg: DecoderConfig, max_context: int) -> list[str]:
    """Problems with one function's norm/RoPE in the spec: every rsqrt must be fed by the max-scaled chain
    (`NORM_CHAIN`, fp16), 2L+1 of them; no cos/sin op (no angles in the program); the RoPE tables stored equal
    to the fp32 tables rounded to fp16."""
    fn = spec.mlProgram.functions[function]
    operations = list(fn.block_specializations[fn.opset].operations)
    producer = {out.name: op for op in operations for out in op.outputs}
    problems = [f"{op.type} op (angles computed in the program)" for op in operations if op.type in ("cos", "sin")]
    norms = 0
    for op in operations:
        if op.type != "rsqrt":
            continue
        chain, current = [op], op
        while len(chain) < len(NORM_CHAIN):  # follow the first operand produced by the next op of the chain
            want = NORM_CHAIN[len(chain)]
            inputs = [producer.get(a.name) for arg in current.inputs.values() for a in arg.arguments if a.name]
            current = next((p for p in inputs if p is not None and p.type == want), None)
            if current is None:
                break
            chain.append(current)
        types = [o.outputs[0].type.tensorType.dataType for o in chain]
        if len(chain) == len(NORM_CHAIN) and all(t == MIL_FP16 for t in types):
            norms += 1
    if norms != 2 * cfg.num_hidden_layers + 1:
        problems.append(f"{norms} max-scaled fp16 RMSNorms, expected {2 * cfg.num_hidden_layers + 1}")
    blobs = function_blobs(spec, function)
    for name, table in zip(ROPE_TABLES, rope_tables(cfg, max_context), strict=True):
        stored = read_blob(weights, blobs[name]) if name in blobs else None
        if stored is None or stored.dtype != F16 or not np.array_equal(stored, table.astype(F16)):
            problems.append(f"{name} missing or not the fp32 RoPE table rounded to fp16")
    return problems
