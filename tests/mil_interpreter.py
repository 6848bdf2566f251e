"""A numpy interpreter for the ops of our MIL-builder decoder functions (test helper).

Core ML cannot run on Linux, so the tests execute the pymil function that `emit` converts (after coremltools'
passes, weights as stored: fp16 / dequantized) op by op and compare its logits with PyTorch. In float32 mode it
checks the graph (RoPE layout, head transposes, GQA, cache writes at P..P+T-1, masks). In fp16 mode
(`Fp16Trace`) it emulates an fp16 device: every op's float output is rounded to fp16 (beyond 65504 it becomes
inf, as on the device), while matmuls, attention and reductions accumulate in fp32 from their fp16 inputs (what
Core ML's CPU/GPU/ANE kernels do). Only the ops our builder emits are implemented; anything else raises.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

FP16_MAX = 65504.0
_CONSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # const op -> its value as float32, made once


@dataclass
class Fp16Trace:
    """fp16 emulation switch and what it saw: the largest finite |value| of any op output, of the residual stream
    (the input of every RMSNorm, i.e. of each `abs` op our norm starts with), and how many op outputs held inf/nan."""

    peak: float = 0.0
    residual_peak: float = 0.0
    nonfinite_ops: int = 0

    def round(self, kind: str, op: Any, value: np.ndarray, env: dict[str, Any]) -> np.ndarray:
        if kind == "abs":
            x = env[op.inputs["x"].name]
            self.residual_peak = max(self.residual_peak, float(np.abs(x[np.isfinite(x)]).max(initial=0.0)))
        if not np.issubdtype(value.dtype, np.floating):
            return value
        with np.errstate(over="ignore"):
            rounded = value.astype(np.float16).astype(np.float32)
        finite = np.isfinite(rounded)
        self.nonfinite_ops += int(not finite.all())
        self.peak = max(self.peak, float(np.abs(rounded[finite]).max(initial=0.0)))
        return rounded


def _slice(x: np.ndarray, op: Any, get: Any) -> tuple[slice, ...]:
    begin, end = get("begin"), get("end")
    stride = get("stride") if "stride" in op.inputs else np.ones(x.ndim, np.int32)
    bmask = get("begin_mask") if "begin_mask" in op.inputs else np.zeros(x.ndim, bool)
    emask = get("end_mask") if "end_mask" in op.inputs else np.zeros(x.ndim, bool)
    return tuple(
        slice(None if bm else int(b), None if em else int(e), int(s))
        for b, e, s, bm, em in zip(begin, end, stride, bmask, emask, strict=True)
    )


def _sdpa(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1]) + mask
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    return (scores / scores.sum(-1, keepdims=True)) @ v


def _dequantize(get: Any) -> np.ndarray:
    data, scale = get("data").astype(np.float32), get("scale").astype(np.float32)
    for axis in range(data.ndim):
        scale = np.repeat(scale, data.shape[axis] // scale.shape[axis], axis=axis)
    return data * scale


def run_function(
    fn: Any,
    inputs: dict[str, np.ndarray],
    states: dict[str, np.ndarray],
    fp16: Fp16Trace | None = None,
    const_value: Callable[[Any], np.ndarray] = lambda op: op.outputs[0].val,
) -> np.ndarray:
    """Execute `fn` on `inputs`; `states` (name -> array) are updated in place. Returns the first output. With
    `fp16`, every op's output is rounded to fp16 (accumulation inside an op stays fp32) and recorded there.
    `const_value(op)` gives a const's value (a built program's weights are placeholders until written:
    `DeferredWeights.value`)."""
    env: dict[str, Any] = dict(inputs)
    for op in fn.operations:

        def get(key: str, op: Any = op) -> Any:
            var = op.inputs[key]
            if isinstance(var, list | tuple):
                return [env.get(v.name, v.val) for v in var]
            return env.get(var.name, var.val)

        kind = op.op_type
        if kind == "const":
            if op not in _CONSTS:
                value = np.asarray(const_value(op))
                _CONSTS[op] = value.astype(np.float32) if value.dtype == np.float16 else value
            out = _CONSTS[op]
        elif kind == "constexpr_blockwise_shift_scale":
            out = _dequantize(get)
        elif kind in ("add", "sub", "mul", "real_div", "maximum", "greater_equal"):
            fns = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide}
            fns |= {"maximum": np.maximum, "greater_equal": np.greater_equal}
            x, y = get("x"), get("y")
            out = fns[kind](x, y)
            if kind == "real_div" and np.issubdtype(np.asarray(x).dtype, np.integer):
                raise NotImplementedError("integer real_div")
        elif kind == "abs":
            out = np.abs(get("x"))
        elif kind == "rsqrt":
            out = 1.0 / np.sqrt(get("x") + (get("epsilon") if "epsilon" in op.inputs else 1e-12))
        elif kind == "silu":
            x = get("x")
            out = x / (1.0 + np.exp(-x))
        elif kind in ("reduce_max", "reduce_mean"):
            fn_ = np.max if kind == "reduce_max" else np.mean
            out = fn_(get("x"), axis=tuple(int(a) for a in get("axes")), keepdims=bool(get("keep_dims")))
        elif kind == "reshape":
            out = get("x").reshape([int(s) for s in get("shape")])
        elif kind == "transpose":
            out = np.transpose(get("x"), [int(p) for p in get("perm")])
        elif kind == "expand_dims":
            out = np.expand_dims(get("x"), tuple(int(a) for a in get("axes")))
        elif kind == "squeeze":
            out = np.squeeze(get("x"), None if "axes" not in op.inputs else tuple(int(a) for a in get("axes")))
        elif kind == "shape":
            out = np.array(get("x").shape, np.int32)
        elif kind == "slice_by_index":
            x = get("x")
            out = x[_slice(x, op, get)]
            if "squeeze_mask" in op.inputs and np.any(get("squeeze_mask")):
                raise NotImplementedError("slice_by_index squeeze_mask")
        elif kind == "slice_update":
            out = np.array(get("x"), copy=True)
            out[_slice(out, op, get)] = get("update")
        elif kind == "concat":
            out = np.concatenate([np.asarray(v) for v in get("values")], axis=int(get("axis")))
        elif kind == "gather":
            out = np.take(get("x"), get("indices"), axis=int(get("axis")))
        elif kind == "range_1d":
            out = np.arange(get("start"), get("end"), get("step"), dtype=np.int32)
        elif kind == "select":
            out = np.where(get("cond"), get("a"), get("b"))
        elif kind == "linear":
            out = get("x") @ get("weight").T + get("bias")
        elif kind == "tile":
            out = np.tile(get("x"), [int(r) for r in get("reps")])
        elif kind == "read_state":
            out = states[op.inputs["input"].name].copy()
        elif kind == "coreml_update_state":
            states[op.inputs["state"].name][...] = get("value")
            out = get("value")
        elif kind == "scaled_dot_product_attention":
            out = _sdpa(get("query"), get("key"), get("value"), get("attn_mask"))
        else:
            raise NotImplementedError(f"MIL op {kind} in the test interpreter")
        value = np.asarray(out)
        value = value.astype(np.float32) if value.dtype == np.float16 else value
        if fp16 is not None and kind != "const":
            value = fp16.round(kind, op, value, env)
            if kind == "coreml_update_state":
                states[op.inputs["state"].name][...] = value
        env[op.outputs[0].name] = value
    return env[fn.outputs[0].name]
