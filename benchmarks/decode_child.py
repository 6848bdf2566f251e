"""Greedy decode speed of one decoder, timed in a fresh process (P3, P4a, P4b, P4c).

    python -m benchmarks.decode_child MODEL THREADS STEPS TOKEN_ID [TOKEN_ID ...]

Prints the tokens/s of STEPS cached decode steps after prefilling the prompt (after a 2-step warm-up) as JSON. A
MODEL.onnx (Optimum's layout) runs in `OrtDecoder` with `ifp_export.ort.session`'s options; a directory with a
genai_config.json runs in `og.Generator` (our export's onnx/ dir with the manifest's dense overlay, as an app).
Why a process per timing: at 1 thread the same graph's speed depends on the session it runs in (bench model, idle:
Optimum's dense graph at 38.5 and then 31.0 tok/s in two sessions of one process), which swamps the graphs'
difference; a fresh process per timing, repeated, and the median keep the comparison about the graph.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ifp_export.ort import OrtDecoder, session


def decode_rate(decoder: OrtDecoder, prompt: list[int], steps: int) -> float:
    """Tokens/s of `steps` greedy decode steps (batch 1) after prefilling `prompt`."""
    ids = np.asarray([prompt], np.int64)
    n = len(prompt)
    logits, past = decoder(ids, np.ones_like(ids), np.arange(n, dtype=np.int64)[None], decoder.empty_cache(1))
    token = int(logits[0, -1].argmax())
    start = time.perf_counter()
    for i in range(steps):
        mask = np.ones((1, n + i + 1), np.int64)
        logits, past = decoder(np.asarray([[token]], np.int64), mask, np.asarray([[n + i]], np.int64), past)
        token = int(logits[0, -1].argmax())
    return steps / (time.perf_counter() - start)


def decode_rate_in_child(model: Path, threads: int, prompt: list[int], steps: int) -> float:
    """`decode_rate` of `model` in a new process (its own session, `ifp_export.ort.session` options)."""
    cmd = [sys.executable, "-m", "benchmarks.decode_child", str(model), str(threads), str(steps), *map(str, prompt)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    return float(json.loads(done.stdout))


def rates_in_children(
    models: dict[str, Path], prompt: list[int], steps: int, threads: int, repeats: int
) -> dict[str, list[float]]:
    """`repeats` timings of each model, each in a fresh process, in a rotating order per repeat (so no model always
    runs first)."""
    rates: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            rates[name].append(decode_rate_in_child(models[name], threads, prompt, steps))
    return rates


def main() -> None:
    model, threads, steps, *prompt = sys.argv[1:]
    path, ids = Path(model), [int(t) for t in prompt]
    if path.is_dir():
        from benchmarks.genai import app_overlay, og_decode_rate, og_model

        generator_model = og_model(path, int(threads), app_overlay(path))
        og_decode_rate(generator_model, ids, 2)  # warm-up: the first runs allocate
        print(json.dumps(og_decode_rate(generator_model, ids, int(steps))))
        return
    decoder = OrtDecoder(session(path, int(threads)))
    decode_rate(decoder, ids, 2)
    print(json.dumps(decode_rate(decoder, ids, int(steps))))


if __name__ == "__main__":
    main()
