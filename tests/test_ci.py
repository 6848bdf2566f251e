"""CI-facing behaviour (issue 16, 18.9): the JSON summary and JUnit file, exit codes 0/2/3/4, the disk pre-flight
and its estimate, a full disk mid-write, debris reclaimed, `--force` that never deletes the input, and the GitHub
Actions example linted with actionlint."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from helpers import assert_one_line_error, run_cli, snapshot
from junitparser import Failure, JUnitXml
from tiny import export_process

from ifp_export.checkpoint import schema
from ifp_export.pipeline import ExportContext
from ifp_export.preflight import estimate_export
from ifp_export.staging import LOCK_SUFFIX, locked_stage, reclaim_debris

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cli_export(tiny_export: ExportContext, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`ifp-export export CKPT -o OUT --json --junit FILE` as a process (stdout and stderr apart, as CI sees them)."""
    root = tmp_path_factory.mktemp("cli_export")
    checkpoint = tiny_export.checkpoint.root
    out, junit = root / "out", root / "export.xml"
    process = export_process(checkpoint, out, "--json", "--junit", str(junit), stdout=subprocess.PIPE)
    stdout, stderr = process.communicate(timeout=600)
    return {
        "code": process.returncode, "stdout": stdout, "stderr": stderr, "out": out, "junit": junit,
        "checkpoint": checkpoint,
    }  # fmt: skip


def check_summary(text: str) -> dict:
    summary = json.loads(text)  # the whole of stdout is one JSON object
    jsonschema.validate(summary, schema("summary.schema.json"))
    return summary


def test_export_json_is_one_schema_valid_object(cli_export: dict, tiny_export: ExportContext) -> None:
    assert cli_export["code"] == 0, cli_export["stderr"]
    summary = check_summary(cli_export["stdout"])
    assert summary["status"] == "ok" and summary["exit_code"] == 0 and summary["error"] is None
    assert summary["output"] == str(cli_export["out"].absolute())
    names = [p["name"] for p in summary["passes"]]
    assert names == [name for name, _ in tiny_export.timings]
    assert all(p["peak_rss_bytes"] > 10 << 20 for p in summary["passes"])  # a Python process with torch loaded
    made = {p["name"]: p["made"] for p in summary["passes"]}
    assert "variants.safetensors" in made["fold"] and made["manifest"] == ["manifest.json", "tokenizer.json"]
    assert "onnx/dense.onnx" in made["onnx"] and any(f.startswith("coreml/") for f in made["coreml"])
    # per model and target: files with their real sizes, checks with figures and bounds, a verdict
    variants = [v.name for v in tiny_export.variants]
    models = {(m["target"], m["name"]): m for m in summary["models"]}
    for name in [*variants, "dense", "predictor"]:
        for target in ("onnx", "coreml"):
            model = models[(target, name)]
            assert model["verdict"] == "pass", model
            assert model["checks"] and all(c["ok"] and c["value"] is not None for c in model["checks"])
            for f in model["files"]:
                assert f["bytes"] == (cli_export["out"] / f["path"]).stat().st_size or f["path"].endswith(".mlpackage")
    onnx_dense = models[("onnx", "dense")]
    cached = next(c for c in onnx_dense["checks"] if c["name"] == "cached_max_rel_diff")
    assert 0 <= cached["value"] <= cached["bound"] <= 1e-4
    for name in variants:  # the fold check of every variant, the transformers check of the dense model
        assert models[("fold", name)]["verdict"] == "pass"
    assert models[("transformers", "dense")]["checks"][0]["name"] == "transformers_max_rel_diff"
    assert summary["targets"]["onnx"]["dedup_ratio"] == pytest.approx(
        tiny_export.report["onnx_validation"]["dedup_ratio"]
    )
    assert summary["report"]["variants"] == tiny_export.report["variants"]  # what --json printed before
    assert {"torch", "onnxruntime", "coremltools"} <= set(summary["versions"])
    assert "wrote" in cli_export["stderr"] and "pass load done" in cli_export["stderr"]  # logs on stderr only


def test_the_log_of_a_ci_run_shows_the_validation_tables_whole(cli_export: dict) -> None:
    """stderr is a pipe, as in CI: the tables are drawn wide enough for their columns, not cut to rich's 80."""
    header = next(line for line in cli_export["stderr"].splitlines() if "┃" in line and "fp32 noise" in line)
    for column in ("model", "load s", "fp32 noise", "bound", "uncached |Δ|", "cached |Δ|", "top-1 differs", "ok"):
        assert column in header
    assert "…" not in cli_export["stderr"]


def test_export_junit_parses_with_one_case_per_model_and_check(cli_export: dict) -> None:
    summary = json.loads(cli_export["stdout"])
    xml = JUnitXml.fromfile(str(cli_export["junit"]))
    cases = [(suite.name, case) for suite in xml for case in suite]
    expected = sum(len(m["checks"]) for m in summary["models"]) + 1  # + the run itself
    assert len(cases) == expected
    assert xml.failures == 0 and xml.errors == 0
    classnames = {case.classname for _, case in cases}
    assert "ifp-export.onnx.dense" in classnames and "ifp-export.coreml.predictor" in classnames


def test_validate_failure_exits_3_with_figures_in_json_and_junit(
    cli_export: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tampered FFN weights with a manifest that vouches for them: the numeric checks fail (exit 3), and the
    JUnit failure names the model, the measured figure and the bound."""
    out = Path(shutil.copytree(cli_export["out"], tmp_path / "out"))
    relative = "onnx/dense.onnx_data"
    data = np.fromfile(out / relative, dtype=np.float32)
    data[: len(data) // 2] *= 1.5
    data.tofile(out / relative)
    manifest = json.loads((out / "manifest.json").read_text())
    from ifp_export.digests import sha256_file

    for entry in manifest["files"]:
        if entry["path"] == relative:
            entry.update(size=(out / entry["path"]).stat().st_size, sha256=sha256_file(out / entry["path"]))
    (out / "manifest.json").write_text(json.dumps(manifest))
    junit = tmp_path / "validate.xml"
    args = ["validate", str(out), "--checkpoint", str(cli_export["checkpoint"]), "--json", "--junit", str(junit)]
    code, stdout, stderr = run_cli(capsys, *args)
    assert code == 3, stderr
    assert "validation failed" in stderr.strip().splitlines()[-1]
    summary = check_summary(stdout)
    assert summary["status"] == "validation_failed" and summary["exit_code"] == 3
    assert "onnx:dense" in summary["failed"]
    failures = [
        (case.classname, result.message)
        for suite in JUnitXml.fromfile(str(junit))
        for case in suite
        for result in case.result
        if isinstance(result, Failure)
    ]
    assert failures and all(classname == "ifp-export.onnx.dense" for classname, _ in failures)
    message = failures[0][1]
    measured, bound = (float(x) for x in message.split("measured ")[1].split(" (")[0].split(", bound "))
    assert measured > bound


def test_validate_ok_exits_0_with_json(cli_export: dict, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, stderr = run_cli(
        capsys, "validate", str(cli_export["out"]), "--checkpoint", str(cli_export["checkpoint"]), "--json"
    )
    assert code == 0, stderr
    summary = check_summary(stdout)
    assert summary["command"] == "validate" and summary["status"] == "ok"
    assert [p["name"] for p in summary["passes"]] == ["validate"]
    assert all(m["verdict"] == "pass" for m in summary["models"])


def test_bad_input_json_and_junit_say_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junit = tmp_path / "j.xml"
    code, stdout, err = run_cli(
        capsys, "export", str(tmp_path / "missing"), "-o", str(tmp_path / "out"), "--json", "--junit", str(junit)
    )
    assert_one_line_error(code, err, "checkpoint directory not found")
    summary = check_summary(stdout)
    assert summary["status"] == "bad_input" and summary["exit_code"] == 2
    assert "checkpoint directory not found" in summary["error"]
    xml = JUnitXml.fromfile(str(junit))
    assert xml.errors == 1


# --- pre-flight ------------------------------------------------------------------------------------------------


def test_preflight_estimate_is_within_stated_factor_of_a_real_export(cli_export: dict) -> None:
    """The estimate never under-states a real export and over-states it by at most 1.5x (measured 1.16x here;
    the margin for filesystem blocks is applied on top, in `Estimate.needed`)."""
    out = cli_export["out"]
    real = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    estimate = estimate_export(cli_export["checkpoint"], None, None, "none", "static", None)
    ratio = estimate.total / real
    print(f"pre-flight estimate {estimate.total:,} B vs real export {real:,} B: {ratio:.2f}x")
    assert 1.0 <= ratio <= 1.5
    onnx_real = sum(p.stat().st_size for p in (out / "onnx").rglob("*") if p.is_file())
    assert 0.9 <= estimate.onnx / onnx_real <= 1.3


def test_preflight_estimate_covers_an_until_fold_export(
    tiny_export: ExportContext, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--until fold` writes every variant as a Hugging Face checkpoint: another shape of output, also covered."""
    checkpoint, out = tiny_export.checkpoint.root, tmp_path / "out"
    code, _, err = run_cli(capsys, "export", str(checkpoint), "-o", str(out), "--until", "fold")
    assert code == 0, err
    real = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    estimate = estimate_export(checkpoint, None, None, "none", "static", "fold")
    assert real <= estimate.total <= real + (512 << 10)  # fixed allowance (report, heatmap, tokenizer) of 256 KB


def test_preflight_refuses_with_exit_4_saying_needed_and_available(
    tiny_export: ExportContext, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ifp_export.preflight.free_bytes", lambda _: 100_000)
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, "export", str(tiny_export.checkpoint.root), "-o", str(tmp_path / "out"))
    assert code == 4, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "not enough disk space" in lines[0] and "needs about" in lines[0] and "97.7 KB is available" in lines[0]
    assert snapshot(tmp_path) == before  # refused before any work


# --- out of disk mid-write -------------------------------------------------------------------------------------


# A previous output (~2.0 MB) on a filesystem with ~0.5 MB left: the ONNX writers (Python appends to .onnx_data)
# run out; with ~1 MB left ONNX fits and coremltools' package writing (copytree of C++-written packages) runs out.
@pytest.mark.parametrize(("small_disk", "failing_pass"), [("2560k", "onnx"), ("3m", "coreml")], indirect=["small_disk"])
def test_out_of_disk_mid_write_exits_4_and_keeps_previous_output(
    tiny_export: ExportContext,
    small_disk: Path,
    failing_pass: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pre-flight is told there is room (as when another process fills the disk mid-run)."""
    monkeypatch.setattr("ifp_export.preflight.free_bytes", lambda _: 1 << 40)
    out = Path(shutil.copytree(tiny_export.workdir, small_disk / "out"))
    before = snapshot(out)
    checkpoint = tiny_export.checkpoint.root
    args = ["export", str(checkpoint), "-o", str(out), "--force", "--heldout", str(checkpoint / "tasks.jsonl")]
    code, stdout, err = run_cli(capsys, *args, "--json")
    lines = err.strip().splitlines()
    assert code == 4, err[-2000:]
    assert lines[-1].startswith("error: ") and "no space left on device" in lines[-1], lines[-1]
    assert "Traceback" not in err
    done = [name for name in ("fold", "onnx", "coreml") if f"pass {name} done" in err]
    assert failing_pass not in done and done[-1] == {"onnx": "fold", "coreml": "onnx"}[failing_pass], done
    summary = check_summary(stdout)
    assert summary["status"] == "environment" and summary["exit_code"] == 4
    assert snapshot(out) == before, "previous output changed"
    assert sorted(p.name for p in small_disk.iterdir()) == ["out"], "staging debris left on the full disk"


# --- debris ----------------------------------------------------------------------------------------------------


def test_sigkilled_export_debris_is_reclaimed_by_the_next_run(
    tiny_export: ExportContext, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, out, log = tiny_export.checkpoint.root, tmp_path / "out", tmp_path / "kill.log"
    with log.open("w") as stderr:
        process = export_process(checkpoint, out, stderr=stderr)
        try:
            while "pass load done" not in log.read_text() and process.poll() is None:
                time.sleep(0.05)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    debris = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.staging-"))
    assert len(debris) == 2 and debris[1] == debris[0] + LOCK_SUFFIX, debris  # the dir and its (now free) lock
    code, _, err = run_cli(capsys, "export", str(checkpoint), "-o", str(out), "--until", "load")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "kill.log") == ["out"]


def test_a_live_runs_staging_dir_is_never_reclaimed(tmp_path: Path) -> None:
    """A run in another process holds its lock: the reclaimer leaves its dir alone, and takes it once it dies."""
    out = tmp_path / "out"
    holder = (
        "import sys, time; from pathlib import Path; from ifp_export.staging import locked_stage\n"
        "with locked_stage(Path(sys.argv[1])) as stage:\n"
        "    (stage / 'work').write_text('in progress'); print(stage.name, flush=True); time.sleep(600)\n"
    )
    process = subprocess.Popen(["python", "-c", holder, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        stage = tmp_path / process.stdout.readline().strip()
        assert stage.is_dir()
        assert reclaim_debris(out.absolute()) == []
        assert (stage / "work").read_text() == "in progress"
        with locked_stage(out.absolute()) as mine:  # a concurrent run's own dir is untouched too
            assert reclaim_debris(out.absolute()) == [] and mine.is_dir() and stage.is_dir()
    finally:
        process.kill()
        process.wait()
    assert reclaim_debris(out.absolute()) == [stage.name]
    assert list(tmp_path.iterdir()) == []


# --- --force never deletes the input (18.9) --------------------------------------------------------------------


@pytest.mark.parametrize("where", ["checkpoint", "parent", "inside", "dot_inside"])
def test_force_never_replaces_the_input(
    tiny_export: ExportContext,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    checkpoint = Path(shutil.copytree(tiny_export.checkpoint.root, tmp_path / "ckpt"))
    output = {
        "checkpoint": str(checkpoint),
        "parent": f"{checkpoint}/..",
        "inside": str(checkpoint / "backbone"),
        "dot_inside": ".",
    }[where]
    if where == "dot_inside":
        monkeypatch.chdir(checkpoint / "predictor")
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, "export", str(checkpoint), "-o", output, "--force")
    relation = {"checkpoint": "is the input", "parent": "contains the input"}.get(where, "lies inside the input")
    assert_one_line_error(code, err, relation, "replacing it would delete the input", "Fix:")
    assert snapshot(tmp_path) == before


def test_force_refuses_a_directory_that_is_not_a_verified_output(
    tiny_export: ExportContext, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tiny_export.checkpoint.root
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    tampered = Path(shutil.copytree(tiny_export.workdir, tmp_path / "tampered"))
    report = (tampered / "report.json").read_bytes()
    (tampered / "report.json").write_bytes(report.replace(b"{", b"[", 1))  # same size, other bytes
    for target, needle in ((foreign, "manifest.json not found"), (tampered, "sha256")):
        before = snapshot(tmp_path)
        code, _, err = run_cli(capsys, "export", str(ckpt), "-o", str(target), "--force", "--until", "load")
        assert_one_line_error(code, err, "--force replaces only an empty directory", needle, str(target))
        assert snapshot(tmp_path) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "export", str(ckpt), "-o", str(empty), "--force", "--until", "load")
    assert code == 0, err


# --- exit codes are documented, the CI example lints ----------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["export"], ["validate"]])
def test_exit_codes_in_help(capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    code, out, _ = run_cli(capsys, *command, "--help")
    assert code == 0
    for line in ("0  ok", "2  bad input", "3  validation failed", "4  environment"):
        assert line in out
    assert "| 3 | validation failed" in (REPO / "README.md").read_text()


def test_github_actions_example_passes_actionlint() -> None:
    beside = Path(sys.executable).with_name("actionlint")  # the venv's, even when it is not on PATH
    actionlint = str(beside) if beside.is_file() else shutil.which("actionlint")
    if actionlint is None:
        pytest.skip("actionlint is not installed: pip install -e '.[test]' provides it")
    workflow = REPO / "examples" / "ci" / "github-actions.yml"
    done = subprocess.run([actionlint, "-no-color", str(workflow)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    text = workflow.read_text()
    for needle in ("cache: pip", "--junit", "ifp-export validate", "actions/upload-artifact"):
        assert needle in text
    assert "examples/ci/github-actions.yml" in (REPO / "README.md").read_text()


def test_new_checkpoint_force_replaces_only_a_checkpoint(
    tiny_export: ExportContext, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tiny_export.checkpoint.root.parent / "src"
    args = ["new-checkpoint", "--backbone", str(src / "backbone"), "--tasks", str(src / "tasks.jsonl"), "-o"]
    code, _, err = run_cli(capsys, *args, str(tmp_path / "ckpt"))
    assert code == 0, err
    code, _, err = run_cli(capsys, *args, str(tmp_path / "ckpt"), "--force", "--seed", "1")
    assert code == 0, err  # a previous checkpoint is replaced
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, *args, str(notes), "--force")
    assert_one_line_error(code, err, "--force replaces only an empty directory or a previous IFPruning checkpoint")
    assert snapshot(tmp_path) == before
