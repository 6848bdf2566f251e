"""macOS only: Core ML predictions (stateful, fp16) against the PyTorch decoder over prefill + cached decode.

Held to the rule of `ifp_export.bounds` at fp16 precision (the reference's fp32 noise scaled by fp16's eps / fp32's:
the same computation rounded at fp16 instead of fp32; top-1 decisive). Quantized functions keep a fixed relative
bound against the fp32 model until the reference computes with the same dequantized weights (as the ONNX check does).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ifp_export.bounds import FP16_EPS, Exactness, compare, reference_pair
from ifp_export.model.decoder import CausalLM
from ifp_export.quiet import quiet
from ifp_export.targets.coreml.package import causal_mask, coremltools

# quantized weights vs the fp32 model (macOS prediction check): relative max |Δ logits|, weight quantization included
QUANTIZED_PARITY_TOLERANCE = {"int8": 0.05, "int4": 0.25}


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
    package: Path,
    functions: list[str],
    reference: Callable[[str], CausalLM],
    prompt: list[int],
    decode_steps: int = 8,
    quantize: str = "none",
) -> dict[str, Exactness]:
    """macOS only: per function, Core ML (stateful, fp16) over prefill + `decode_steps` cached greedy steps against
    the PyTorch reference teacher-forced over the same tokens in float32 and float64 (`ifp_export.bounds`)."""
    ct = coremltools()
    result = {}
    for name in functions:
        with quiet():
            model = ct.models.MLModel(str(package), function_name=name, compute_units=ct.ComputeUnit.CPU_ONLY)
        state = model.make_state()

        def step(ids: np.ndarray, mask: np.ndarray, model: Any = model, state: Any = state) -> np.ndarray:
            inputs = {"inputIds": ids, "causalMask": mask.astype(np.float16)}
            return model.predict(inputs, state=state)["logits"]

        got, tokens = run_cached(step, prompt, decode_steps)
        decoder = reference(name)
        ref32, ref64 = reference_pair(decoder, torch.tensor([prompt + tokens]))
        fixed = None if quantize == "none" else QUANTIZED_PARITY_TOLERANCE[quantize]
        layers = decoder.config.num_hidden_layers
        rows = np.concatenate([g[0] for g in got])
        result[name] = compare("parity", rows, ref32[0], ref64[0], layers, eps=FP16_EPS, fixed_bound=fixed)
    return result
