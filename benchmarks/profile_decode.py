"""Where decode time goes: ORT's profiler (SessionOptions.enable_profiling) over N decode steps, per op type.

    python -m benchmarks.profile_decode MODEL [MODEL ...] [--threads 1] [--steps 8] [--shapes 10]

A MODEL.onnx (Optimum's layout) runs in `OrtDecoder` with the benchmarks' session options
(`ifp_export.ort.session`) plus profiling. A directory with a genai_config.json runs in `og.Generator` (P4a, P4c),
profiled through the config's `session_options.enable_profiling`; for our export's `onnx/` directory the manifest's
dense overlay is applied, as an app does. Prints, per model, the time per decode step by op type (kernel time
summed over the timed steps, prefill excluded).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ifp_export.ort import OrtDecoder


def profile(path: Path, threads: int, steps: int, prompt_len: int = 16) -> tuple[Counter, Counter, float]:
    """(microseconds per decode step by op type, the same by op type and input shapes, total per step) for `steps`
    decode steps after a prefill."""
    if path.is_dir():
        return profile_og(path, threads, steps, prompt_len)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    if threads == 1:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        decoder = OrtDecoder(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
        ids = np.arange(4, 4 + prompt_len, dtype=np.int64)[None]
        logits, past = decoder(
            ids, np.ones_like(ids), np.arange(prompt_len, dtype=np.int64)[None], decoder.empty_cache(1)
        )
        for i in range(steps):
            token = np.asarray([[int(logits[0, -1].argmax())]], np.int64)
            mask = np.ones((1, prompt_len + i + 1), np.int64)
            logits, past = decoder(token, mask, np.asarray([[prompt_len + i]], np.int64), past)
        trace = json.loads(Path(decoder.session.end_profiling()).read_text())
    return per_decode_step(trace, steps)


def profile_og(model_dir: Path, threads: int, steps: int, prompt_len: int) -> tuple[Counter, Counter, float]:
    """`profile` for a model directory in `og.Generator` (ORT writes the trace when og's session is destroyed)."""
    from benchmarks.genai import app_overlay, og_decode_rate, og_model

    with tempfile.TemporaryDirectory() as tmp:
        profiling = {"model": {"decoder": {"session_options": {"enable_profiling": str(Path(tmp) / "og")}}}}
        model = og_model(model_dir, threads, app_overlay(model_dir), profiling)
        og_decode_rate(model, list(range(4, 4 + prompt_len)), steps)  # a prefill, then `steps` decode steps
        del model
        gc.collect()
        trace = json.loads(next(Path(tmp).glob("og*.json")).read_text())
    return per_decode_step(trace, steps)


def per_decode_step(trace: list[dict], steps: int) -> tuple[Counter, Counter, float]:
    """Kernel time per decode step by op type and by (op, input shapes), and model_run time per decode step, from an
    ORT profile whose first run is the prefill."""
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    decode_start = runs[1]["ts"] if len(runs) > 1 else 0  # skip the prefill run
    by_op: Counter = Counter()
    by_shape: Counter = Counter()
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= decode_start:
            op = event["args"].get("op_name", "?")
            shapes = [next(iter(i.values())) for i in event["args"].get("input_type_shape", [])]
            by_op[op] += event["dur"] / steps
            by_shape[f"{op} {shapes}"] += event["dur"] / steps
    total = sum(r["dur"] for r in runs[1:]) / max(1, len(runs) - 1)
    return by_op, by_shape, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--shapes", type=int, default=0, help="also print the N costliest (op, input shapes)")
    args = parser.parse_args()
    for path in args.models:
        by_op, by_shape, total = profile(path, args.threads, args.steps)
        kernels = sum(by_op.values())
        print(f"{path}: {total / 1000:.1f} ms per decode step (model_run), kernels {kernels / 1000:.1f} ms")
        for op, us in by_op.most_common(12):
            print(f"  {op:<28} {us / 1000:8.2f} ms  {us / kernels:6.1%}")
        for key, us in by_shape.most_common(args.shapes):
            print(f"  {us / 1000:8.2f} ms  {key}")


if __name__ == "__main__":
    main()
