"""ONNX target end to end: the bundled sample and a tiny Qwen2-style model (q/k/v bias) exported, validated,
loaded by Optimum, and checked against Hugging Face transformers running the original checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoModelForCausalLM

from ifp_export.checkpoint import PREDICTOR_DIR
from ifp_export.cli import bundled_sample, main
from ifp_export.fold import fold_decoder, relative_difference
from ifp_export.fsutil import write_safetensors
from ifp_export.generate import greedy_generate
from ifp_export.masks import encode_prompts, routing_scores
from ifp_export.ort import OrtDecoder, session
from ifp_export.pipeline import ExportContext
from ifp_export.targets.onnx import DENSE_NAME, ONNX_DIR, SHARED_DATA
from ifp_export.targets.onnx.predictor import PredictorTrace
from ifp_export.targets.onnx.validate import GREEDY_TOKENS, SHARED_GRAPH_PROMPT_TOKENS, SHARED_GRAPH_TOKENS


@pytest.fixture(params=["sample_export", "qwen2_export"])
def exported(request: pytest.FixtureRequest) -> ExportContext:
    return request.getfixturevalue(request.param)


def onnx_dir(ctx: ExportContext) -> Path:
    return ctx.workdir / ONNX_DIR


def prompt_ids(ctx: ExportContext, variant_index: int) -> list[int]:
    variant = ctx.variants[variant_index]
    return ctx.checkpoint.tokenizer.encode(ctx.checkpoint.tasks[variant.prompt_indices[0]].prompt).ids


def test_every_model_passes_validation(exported: ExportContext) -> None:
    report = exported.report["onnx_validation"]
    names = [Path(row["model"]).stem for row in report["models"]]
    assert names == [*(v.name for v in exported.variants), DENSE_NAME]
    for index, row in enumerate(report["models"]):
        checks = {c["name"]: c for c in row["checks"]}
        for check in checks.values():  # every position of the prompts + the greedy tokens, top-1 decisive
            assert check["error"] <= check["bound"] <= 1e-4 and check["top1_disagreements"] == 0, check
        if row["same_graph_as"]:  # a graph already checked in full: its own tensors, first prompt, through the cache
            assert row["ok"] and row["greedy_tokens"] == SHARED_GRAPH_TOKENS and set(checks) == {"cached"}, row
            prompt = prompt_ids(exported, index)[:SHARED_GRAPH_PROMPT_TOKENS]
            assert checks["cached"]["positions"] == len(prompt) + SHARED_GRAPH_TOKENS, row
        else:
            assert row["ok"] and row["greedy_tokens"] == GREEDY_TOKENS, row
            assert {"uncached", "cached"} <= set(checks)  # genai too where the model has a GenAI-flavour graph
            assert checks["cached"]["positions"] >= 2 * GREEDY_TOKENS
    assert all(c["ok"] for c in report["predictor"])


def test_optimum_generates_what_pytorch_generates(exported: ExportContext) -> None:
    for index, variant in enumerate(exported.variants):
        model = ORTModelForCausalLM.from_pretrained(onnx_dir(exported), file_name=f"{variant.name}.onnx")
        prompt = prompt_ids(exported, index)
        out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None)
        expected = greedy_generate(fold_decoder(exported.checkpoint.backbone, variant.kept), [prompt], 12)[0]
        assert out[0, len(prompt) :].tolist() == expected, variant.name


def test_variants_match_transformers_with_pruned_neurons_zeroed(exported: ExportContext) -> None:
    """Independent reference: HF runs the original checkpoint with the variant's other neurons zeroed."""
    for index, variant in enumerate(exported.variants):
        hf = AutoModelForCausalLM.from_pretrained(exported.checkpoint.root / "backbone").eval()
        with torch.no_grad():
            for layer, keep in zip(hf.model.layers, variant.mask, strict=True):
                off = keep == 0
                layer.mlp.gate_proj.weight[off] = 0
                layer.mlp.up_proj.weight[off] = 0
                layer.mlp.down_proj.weight[:, off] = 0
            ids = torch.tensor([prompt_ids(exported, index)])
            expected = hf(ids).logits.numpy()
        decoder = OrtDecoder(session(onnx_dir(exported) / f"{variant.name}.onnx", threads=1))
        got, _ = decoder(ids.numpy(), np.ones_like(ids.numpy()), np.arange(ids.shape[1])[None], decoder.empty_cache(1))
        assert relative_difference(got, expected) <= 1e-4, variant.name


def test_predictor_graph_routes_like_pytorch_on_heldout(exported: ExportContext) -> None:
    ckpt = exported.checkpoint
    prompts = [p.prompt for p in exported.heldout.prompts]
    ids, mask, _ = encode_prompts(ckpt.tokenizer, prompts, ckpt.predictor.config.max_length)
    scores, routes = session(onnx_dir(exported) / "predictor.onnx").run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    )
    with torch.no_grad():
        expected_scores = ckpt.predictor(ids, mask)
        expected = routing_scores(expected_scores, torch.stack([v.mask for v in exported.variants]))
    assert float(np.abs(scores - expected_scores.numpy()).max()) <= 1e-4
    assert routes.shape == (len(prompts), len(exported.variants))
    assert np.array_equal(routes.argmax(-1), expected.argmax(-1).numpy())
    assert float(np.abs(routes - expected.numpy()).max()) <= 1e-4


def test_a_failed_predictor_trace_names_the_childs_error_and_leaves_nothing(tmp_path: Path) -> None:
    """The predictor graph is traced in a child process: its failure is one error naming what the child said (here
    before it read its masks, whose writer must not hang on the closed pipe: 4 MB, more than a pipe holds)."""
    (tmp_path / "onnx").mkdir()
    failed = pytest.raises(RuntimeError, match=r"tracing the predictor failed \(exit 1\): .*predictor config")
    with failed, PredictorTrace(tmp_path / "onnx", tmp_path / "no-predictor", torch.ones(8, 32, 4096)) as trace:
        trace.wait()
    assert not any((tmp_path / "onnx").iterdir())


def test_leaving_early_stops_the_predictor_trace(sample_export: ExportContext, tmp_path: Path) -> None:
    """An error while the decoders are written (the child still tracing) stops the child."""
    (tmp_path / "onnx").mkdir()
    masks = torch.stack([v.mask for v in sample_export.variants])
    with (
        pytest.raises(KeyError),
        PredictorTrace(tmp_path / "onnx", sample_export.checkpoint.root / PREDICTOR_DIR, masks) as trace,
    ):
        child = trace.child
        raise KeyError("an error while binding")
    assert child.returncode is not None and child.returncode < 0  # killed, not finished


def test_the_predictor_trace_dies_with_a_killed_export(sample_export: ExportContext, tmp_path: Path) -> None:
    """A SIGKILLed export leaves no child tracing into its work directory (the child dies with it before it writes)
    and no file of the trace's anywhere else (the temporary directory holds what it held before the trace began)."""
    script = (
        "import json, os, sys, tempfile, time; from pathlib import Path; from safetensors.torch import load_file\n"
        "from ifp_export.targets.onnx.predictor import PredictorTrace\n"
        "masks = load_file(sys.argv[3])['masks']\n"
        "before = sorted(os.listdir(tempfile.gettempdir()))\n"
        "with PredictorTrace(Path(sys.argv[1]), Path(sys.argv[2]), masks) as trace:\n"
        "    print(json.dumps([trace.child.pid, before]), flush=True); time.sleep(60)\n"
    )
    (tmp_path / "onnx").mkdir()
    (tmp_path / "tmp").mkdir()
    write_safetensors(tmp_path / "masks.safetensors", {"masks": torch.stack([v.mask for v in sample_export.variants])})
    arguments = [tmp_path / "onnx", sample_export.checkpoint.root / PREDICTOR_DIR, tmp_path / "masks.safetensors"]
    environment = os.environ | {"TMPDIR": str(tmp_path / "tmp")}
    parent = subprocess.Popen([sys.executable, "-c", script, *arguments], stdout=subprocess.PIPE, env=environment)
    child, before = json.loads(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process_state(child) not in ("Z", "gone"):
        time.sleep(0.05)
    assert process_state(child) in ("Z", "gone")
    assert not any((tmp_path / "onnx").iterdir())  # left alone, it would have written predictor.onnx
    assert sorted(os.listdir(tmp_path / "tmp")) == before


def process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_weights_are_stored_once(exported: ExportContext) -> None:
    artifacts = exported.emitted["onnx"]
    if exported.checkpoint.root == bundled_sample():
        assert artifacts.dedup_ratio <= 1.02, artifacts.dedup_ratio
    for name, path in artifacts.models.items():
        model = onnx.load(str(path), load_external_data=False)
        locations = {
            entry.value for init in model.graph.initializer for entry in init.external_data if entry.key == "location"
        }
        assert locations == {SHARED_DATA, f"{name}.onnx_data"}, (name, locations)
    files = list(onnx_dir(exported).iterdir())
    assert not [p for p in files if p.is_symlink()]
    assert all(p.stat().st_nlink == 1 for p in files)


def test_validate_command_passes_then_catches_tampering(
    exported: ExportContext, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(exported.workdir, out)
    args = ["validate", str(out), "--checkpoint", str(exported.checkpoint.root)]
    main(args)
    assert "all checks passed" in capsys.readouterr().out
    relative = f"{ONNX_DIR}/{exported.variants[0].name}.onnx_data"
    data = np.fromfile(out / relative, dtype=np.float32)
    data[: len(data) // 2] *= 1.5
    data.tofile(out / relative)
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and "sha256" in capsys.readouterr().err
    # Same damage with a manifest that vouches for it: the numeric check still catches it.
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == relative:
            entry["sha256"] = hashlib.sha256((out / relative).read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 3
    assert "validation failed" in capsys.readouterr().err


def test_sample_report_compares_variants_with_dense_and_static(sample_export: ExportContext) -> None:
    accuracy = sample_export.report["heldout_accuracy"]
    tasks = [v.task for v in sample_export.variants]
    assert set(accuracy) == {"dense", "routed variant", "static mask", "own variant"}
    for setting in ("dense", "routed variant", "static mask", "own variant"):
        assert sorted(accuracy[setting]) == sorted(tasks)
        assert all(0.0 <= a <= 1.0 for a in accuracy[setting].values())
