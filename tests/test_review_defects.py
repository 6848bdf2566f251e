"""Issue 27: defects from a code review, each pinned by a test that failed before its fix."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, run_cli, snapshot
from safetensors.torch import load_file, save_file
from tiny import TASK_PROMPTS, char_tokenizer, make_checkpoint, run_export
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ifp_export.artifacts import open_output
from ifp_export.checkpoint import schema
from ifp_export.errors import IFPError
from ifp_export.passes.load import LoadPass
from ifp_export.pipeline import ExportContext
from ifp_export.runtime import Runtime
from ifp_export.staging import NO_RENAMEAT2_ENV, PREVIOUS_SUFFIX, reclaim_debris, staged_directory
from ifp_export.targets.coreml.quantize import quantize_weight
from ifp_export.targets.coreml.validate import blob_difference
from ifp_export.targets.onnx.ops import dequantized_rows, quantize_rows


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def byte_level_tokenizer() -> Tokenizer:
    """A byte-level BPE (as Qwen2's and Llama 3's) with no merges: every UTF-8 byte is its own token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["ok"], trainer)
    return tokenizer


# --- 27.1: a character split over two tokens is streamed whole -------------------------------------------------


def test_stream_text_holds_back_an_incomplete_character(tiny_export: ExportContext) -> None:
    runtime = Runtime(tiny_export.workdir, threads=1)
    runtime.tokenizer, runtime.eos_ids = byte_level_tokenizer(), set()
    ids = runtime.tokenizer.encode("café ok").ids
    assert len(ids) == len("café ok".encode())  # é is two tokens
    pieces = list(runtime.stream_text(iter(ids)))
    assert "".join(pieces) == runtime.tokenizer.decode(ids) == "café ok", pieces
    assert all("\ufffd" not in piece for piece in pieces), pieces
    # a stream that ends inside a character shows what decoding all of its ids shows
    cut = ids[:4]
    assert "".join(runtime.stream_text(iter(cut))) == runtime.tokenizer.decode(cut) == "caf\ufffd"


# --- 27.3: a weight that overflows fp16 is not fp16-exact ------------------------------------------------------


def test_core_ml_weight_check_fails_a_weight_stored_as_inf() -> None:
    tensor = torch.tensor([1.0, 70000.0, -1e6], dtype=torch.bfloat16)
    stored = tensor.float().numpy().astype(np.float16)  # what an fp16 blob holds: [1, inf, -inf]
    assert np.isinf(stored[1:]).all()
    difference, exact = blob_difference(stored, tensor)  # per row: one, for a vector
    assert exact.tolist() == [False] and difference.tolist() == [float("inf")]
    fine = torch.tensor([1.0, 65504.0, -0.5])
    difference, exact = blob_difference(fine.numpy().astype(np.float16), fine)
    assert exact.tolist() == [True] and difference.tolist() == [0.0]


def test_an_export_whose_weight_overflows_fp16_fails_validation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An embedding element of 70000 (an unused token's row, so the fp32 checks pass) becomes inf in fp16: exit 3,
    the Core ML weight check failed in the summary."""
    checkpoint = make_checkpoint(tmp_path)
    weights_file = checkpoint / "backbone" / "model.safetensors"
    tensors = load_file(weights_file)
    unused = char_tokenizer().token_to_id("j")
    assert all("j" not in p for prompts in TASK_PROMPTS.values() for p in prompts)
    tensors["model.embed_tokens.weight"][unused, 0] = 70000.0
    save_file(tensors, weights_file, metadata={"format": "pt"})
    args = ["export", str(checkpoint), "-o", str(tmp_path / "out"), "--heldout", str(checkpoint / "tasks.jsonl")]
    code, stdout, err = run_cli(capsys, *args, "--json")
    assert code == 3, err[-2000:]
    assert "Core ML functions" in err.strip().splitlines()[-1]
    assert json.loads(stdout)["status"] == "validation_failed"
    assert not (tmp_path / "out").exists()


# --- 27.9: a usage error under --json still prints the summary object ------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["export", "--quantize", "int3"], "int3"),
        (["export", "--variants", "many"], "many"),
        (["export", "--no-such-option"], "--no-such-option"),
        (["validate", "OUT", "--no-such-option"], "--no-such-option"),
    ],
)
def test_usage_error_with_json_prints_the_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, args: list[str], needle: str
) -> None:
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_cli(capsys, *args, "--json")
    assert_one_line_error(code, err, needle, "--help")
    summary = json.loads(stdout)
    jsonschema.validate(summary, schema("summary.schema.json"))
    assert summary["status"] == "bad_input" and summary["exit_code"] == 2 and summary["command"] == args[0]
    assert needle in summary["error"] and summary["error"] == err.strip()
    assert list(tmp_path.iterdir()) == []


# --- 27.14: --variants N says when it made fewer than N --------------------------------------------------------


def test_fewer_variants_than_requested_are_reported(
    tiny_export: ExportContext, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With keep 1.0 every prompt's mask is the whole FFN: 4 clusters requested, 1 distinct mask, 1 variant made."""
    checkpoint = tiny_export.checkpoint.root
    args = ["export", str(checkpoint), "-o", str(tmp_path / "out"), "--until", "group", "--keep", "1.0"]
    code, stdout, err = run_cli(capsys, *args, "--variants", "4", "--json")
    assert code == 0, err
    report = json.loads(stdout)["report"]
    assert (report["variants_requested"], report["variants_made"]) == (4, 1)
    assert len(report["warnings"]) == 1 and "--variants 4 made only 1 variants" in report["warnings"][0]
    assert "warning: --variants 4 made only 1 variants" in " ".join(err.split())
    code, stdout, err = run_cli(capsys, *args[:-2], "--variants", "2", "--json")
    report = json.loads(stdout)["report"]
    assert code == 0 and (report["variants_requested"], report["variants_made"]) == (2, 2)
    assert "warnings" not in report and "warning:" not in err


# --- 27.15: the manifest records the sliding window an app must apply in Core ML's causalMask -----------------


def test_manifest_records_the_sliding_window(tiny_export: ExportContext, tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path, model_type="mistral", sliding_window=3)
    mistral = run_export(checkpoint, tmp_path / "out")
    assert open_output(mistral.workdir).manifest["model"]["sliding_window"] == 3  # open_output checks the schema
    assert open_output(tiny_export.workdir).manifest["model"]["sliding_window"] is None


# --- 27.15: int4 granularity where the input width is not a multiple of 32, as the README states it ------------


@pytest.mark.parametrize("in_features", [48, 80])  # e.g. q/k/v or gate/up of a hidden-48 model; any weight
def test_int4_granularity_when_the_input_width_is_not_a_multiple_of_32(in_features: int) -> None:
    """Core ML falls back to one scale per output channel for ANY such weight (not only a pruned down_proj); ONNX's
    MatMulNBits stays block-wise, the last block zero-padded. A multiple of 32 is block-wise in both."""
    weight = np.random.default_rng(0).normal(0, 0.02, (16, in_features)).astype(np.float32)  # [out, in]
    assert quantize_weight(weight, "int4").scale.shape == (16, 1)
    assert quantize_weight(np.tile(weight[:, :32], (1, 2)), "int4").scale.shape == (16, 2)
    blocks, scales = quantize_rows([weight], 4)
    assert scales.shape == (16, -(-in_features // 32))
    error = np.abs(dequantized_rows(blocks, scales, 4, in_features) - weight)
    assert float(error.max()) <= float(scales.max()) / 2 * (1 + 1e-6)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "any weight whose input width is not a multiple of 32" in " ".join(readme.split())


# --- 27.4 / 27.6: the swap re-checks the target, and the two-rename swap (no renameat2) is kill safe ----------

STAGING_KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from ifp_export import staging

target, kill_after = Path(sys.argv[1]), int(sys.argv[2])
renames = []
real_rename = os.rename


def rename(a, b):
    real_rename(a, b)
    renames.append(b)
    if len(renames) == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)


staging.os.rename = rename
with staging.staged_directory(target, force=True) as stage:
    (stage / "new.txt").write_text("new output")
"""


@pytest.fixture(params=["renameat2", "two_renames"])
def swap_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "two_renames":
        monkeypatch.setenv(NO_RENAMEAT2_ENV, "1")
    return request.param


def previous_output(tmp_path: Path) -> Path:
    target = tmp_path / "out"
    (target / "sub").mkdir(parents=True)
    (target / "old.txt").write_text("previous output")
    (target / "sub" / "data.bin").write_bytes(b"\x00\x01" * 100)
    return target


def test_a_directory_that_appears_during_the_run_is_not_replaced(tmp_path: Path, swap_kind: str) -> None:
    target = tmp_path / "out"
    appeared = pytest.raises(IFPError, match="output directory exists and is not empty")
    with appeared as info, staged_directory(target) as stage:
        (stage / "new.txt").write_text("new")
        target.mkdir()
        (target / "mine.txt").write_text("a user's file")
    assert info.value.exit_code == 2
    assert snapshot(tmp_path) == {"out": "dir", "out/mine.txt": sha256(b"a user's file")}  # no staging debris


def test_a_directory_that_appears_during_an_export_is_the_one_line_error(
    tiny_export: ExportContext, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    load = LoadPass.run

    def load_while_another_run_finishes(self: LoadPass, ctx: ExportContext) -> ExportContext:
        out.mkdir()
        (out / "manifest.json").write_text("another run's output")
        return load(self, ctx)

    monkeypatch.setattr(LoadPass, "run", load_while_another_run_finishes)
    before = {"out": "dir", "out/manifest.json": sha256(b"another run's output")}
    code, _, err = run_cli(capsys, "export", str(tiny_export.checkpoint.root), "-o", str(out), "--until", "load")
    assert_one_line_error(code, err.strip().splitlines()[-1] + "\n", str(out), "not empty", "--force")
    assert snapshot(tmp_path) == before


def test_two_rename_swap_replaces_the_previous_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NO_RENAMEAT2_ENV, "1")
    target = previous_output(tmp_path)
    with staged_directory(target, force=True) as stage:
        (stage / "new.txt").write_text("new output")
    assert snapshot(tmp_path) == {"out": "dir", "out/new.txt": sha256(b"new output")}


@pytest.mark.parametrize("kill_after", [1, 2])
def test_a_run_killed_inside_the_two_rename_swap_is_settled_by_the_next_run(tmp_path: Path, kill_after: int) -> None:
    """Killed between the renames (no OUT, the previous output parked): the next run puts it back. Killed after
    both (the new output in place, the previous one parked): the next run removes the parked one."""
    target = previous_output(tmp_path)
    previous = snapshot(target)
    env = {**os.environ, NO_RENAMEAT2_ENV: "1"}
    done = subprocess.run([sys.executable, "-c", STAGING_KILL_SCRIPT, str(target), str(kill_after)], env=env)
    assert done.returncode == -signal.SIGKILL
    assert target.exists() == (kill_after == 2)
    parked = [p.name for p in tmp_path.iterdir() if p.name.endswith(PREVIOUS_SUFFIX)]
    assert len(parked) == 1, sorted(p.name for p in tmp_path.iterdir())
    reclaim_debris(target.absolute())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no debris: staging dir, lock, parked output
    assert snapshot(target) == (previous if kill_after == 1 else {"new.txt": sha256(b"new output")})


# --- 27.5: --force never deletes what the target's own listing does not name -----------------------------------


def test_force_refuses_a_previous_output_holding_unlisted_files(
    tiny_export: ExportContext, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = Path(shutil.copytree(tiny_export.workdir, tmp_path / "out"))
    (out / "notes.txt").write_text("my notes")
    compiled = out / "coreml" / "decoder.mlmodelc"
    compiled.mkdir()
    (compiled / "model.mil").write_text("compiled by Xcode")
    open_output(out)  # still a verified previous output
    before = snapshot(tmp_path)
    args = ["export", str(tiny_export.checkpoint.root), "-o", str(out), "--force", "--until", "load"]
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, str(out), "holds nothing else", "notes.txt", "coreml/decoder.mlmodelc/", "Fix:")
    assert snapshot(tmp_path) == before


def test_new_checkpoint_force_refuses_a_checkpoint_holding_unlisted_files(
    tiny_export: ExportContext, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tiny_export.checkpoint.root.parent / "src"
    ckpt = Path(shutil.copytree(tiny_export.checkpoint.root, tmp_path / "ckpt"))
    (ckpt / "experiments").mkdir()
    (ckpt / "experiments" / "notes.md").write_text("what I tried")
    before = snapshot(tmp_path)
    args = ["new-checkpoint", "--backbone", str(src / "backbone"), "--tasks", str(src / "tasks.jsonl")]
    code, _, err = run_cli(capsys, *args, "-o", str(ckpt), "--force")
    assert_one_line_error(code, err, str(ckpt), "holds nothing else", "experiments/", "Fix:")
    assert snapshot(tmp_path) == before
    shutil.rmtree(ckpt / "experiments")
    code, _, err = run_cli(capsys, *args, "-o", str(ckpt), "--force")
    assert code == 0, err  # the same checkpoint without the user's files is replaced


def test_a_failed_second_rename_puts_the_previous_output_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NO_RENAMEAT2_ENV, "1")
    target = previous_output(tmp_path)
    before = snapshot(tmp_path)
    real_rename, calls = os.rename, []

    def rename(a: object, b: object) -> None:
        calls.append(b)
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error", str(b))
        real_rename(a, b)

    monkeypatch.setattr("ifp_export.staging.os.rename", rename)
    with pytest.raises(OSError, match="I/O error"), staged_directory(target, force=True) as stage:
        (stage / "new.txt").write_text("new output")
    assert snapshot(tmp_path) == before
