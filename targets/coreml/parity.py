"""macOS only: Core ML predictions (stateful, fp16) against the PyTorch decoder over prefill + cached decode."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ifp_export.model.decoder import CausalLM
from ifp_export.quiet import quiet
from ifp_export.targets.coreml.package import causal_mask, coremltools

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
    package: Path, functions: list[str], reference: Callable[[str], CausalLM], prompt: list[int], decode_steps: int = 8
) -> dict[str, float]:
    """macOS only: per function, Core ML (stateful, fp16) vs PyTorch logits over prefill + `decode_steps` cached
    greedy steps, as max |Δ| relative to the largest logit."""
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
        result[name] = relative_diff(got, reference_cached(reference(name), prompt, tokens))
    return result
