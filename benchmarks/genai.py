"""onnxruntime-genai as a baseline and as a client: its model builder (in a venv of its own) and `og.Generator`.

The 0.18 builder imports classes that need `transformers` >= 5 while optimum-onnx pins 4.57, so the builder runs in
a venv this module creates once (`benchmarks/results/genai-venv`, from the package registry; torch from the local
wheel the main environment uses). `og` itself (the client) runs in the main environment.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.proc import ROOT, run_child

GENAI_VENV = ROOT / "results" / "genai-venv"
BUILDER_REQUIREMENTS = (
    "torch==2.13.0",
    "transformers>=5,<6",
    "onnxruntime-genai==0.18.*",
    "onnx",
    "onnx-ir",
    "numpy<2.4",
)


def builder_python() -> Path:
    """The builder venv's python, creating the venv on first use."""
    python = GENAI_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(GENAI_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *BUILDER_REQUIREMENTS], check=True)
    return python


def write_hf_tokenizer(tokenizer_file: Path, hf_dir: Path) -> None:
    """The builder saves the tokenizer with the model, so the HF dir needs one `AutoTokenizer` can open."""
    (hf_dir / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>"}
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config, sort_keys=True))


def build(hf_dir: Path, out_dir: Path, precision: str, log: Path) -> tuple[float, int | None]:
    """One `python -m onnxruntime_genai.models.builder` run on CPU: (wall seconds, peak RSS bytes)."""
    cmd = [str(builder_python()), "-m", "onnxruntime_genai.models.builder", "-m", str(hf_dir), "-o", str(out_dir)]
    cmd += ["-p", precision, "-e", "cpu", "-c", str(out_dir.parent / f".{out_dir.name}-cache")]
    seconds, code, rss = run_child(cmd, log)
    if code != 0:
        raise RuntimeError(f"GenAI builder failed ({code}); see {log}")
    return seconds, rss


def og_model(model_dir: Path, threads: int, *overlays: dict | None):
    """An `og.Model` from `model_dir`'s genai_config.json, with `overlays` (e.g. a manifest's per-model one) applied
    in order (og merges nested keys), then the thread count."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    for overlay in overlays:
        if overlay:
            config.overlay(json.dumps(overlay))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def our_overlay(export_dir: Path) -> dict:
    """The dense model's overlay from the manifest (what an app passes to `og.Config.overlay`)."""
    manifest = json.loads((export_dir / "manifest.json").read_text())
    return manifest["dense"]["files"]["onnx"]["genai"]["overlay"]


def app_overlay(model_dir: Path) -> dict | None:
    """The overlay an app applies to `model_dir`: the manifest's dense one for our export's onnx/ dir, else none."""
    return our_overlay(model_dir.parent) if (model_dir.parent / "manifest.json").is_file() else None


def og_decode_rate(model, prompt: list[int], steps: int) -> float:
    """Tokens/s of `steps` greedy steps in `og.Generator` after prefilling `prompt` (timed from the first step)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    length = len(prompt) + steps + 1  # min_length too: a random model's EOS must not end the timed loop early
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([prompt])
    generator.generate_next_token()  # the prefill's token
    start = time.perf_counter()
    for _ in range(steps):
        generator.generate_next_token()
    return steps / (time.perf_counter() - start)
