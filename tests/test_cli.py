"""CLI shape and bad-input behaviour: one line on stderr, exit code 2, output untouched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_one_line_error, run_cli, snapshot
from tiny import make_checkpoint, save_backbone, write_tasks


def test_console_script_lists_commands() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ifp_export", "--help"], capture_output=True, text=True, check=True, timeout=120
    )
    for command in ("export", "new-checkpoint"):
        assert command in done.stdout


@pytest.mark.parametrize("command", ["export", "new-checkpoint"])
def test_every_command_has_help(capsys: pytest.CaptureFixture[str], command: str) -> None:
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    assert out.startswith(f"Usage: ifp-export {command}")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src")
    save_backbone(root / "backbone")
    write_tasks(root / "tasks.jsonl")
    return root


def test_new_checkpoint_then_export_until_load(
    capsys: pytest.CaptureFixture[str], source: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    code, out, err = run_cli(
        capsys, "new-checkpoint", "--backbone", str(source / "backbone"), "--tasks", str(source / "tasks.jsonl"),
        "--keep", "0.5", "-o", str(ckpt),
    )  # fmt: skip
    assert code == 0, err
    assert "k=24 of 48" in out
    assert {"ifp.json", "backbone", "predictor", "tokenizer.json", "tasks.jsonl"} <= {p.name for p in ckpt.iterdir()}
    assert (ckpt / "backbone" / "model.safetensors").read_bytes() == (
        source / "backbone" / "model.safetensors"
    ).read_bytes()
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "export", str(ckpt), "-o", str(out_dir), "--until", "load")
    assert code == 0, err
    assert out_dir.is_dir()
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name], "staging dir left behind"


def test_new_checkpoint_is_reproducible(capsys: pytest.CaptureFixture[str], source: Path, tmp_path: Path) -> None:
    outs = []
    for name in ("a", "b"):
        args = ["--backbone", str(source / "backbone"), "--tasks", str(source / "tasks.jsonl"), "-o"]
        code, _, err = run_cli(capsys, "new-checkpoint", *args, str(tmp_path / name))
        assert code == 0, err
        outs.append(snapshot(tmp_path / name))
    assert outs[0] == outs[1]


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("missing_backbone", ("backbone directory not found",)),
        ("keep_above_one", ("keep ratio must be in (0, 1]",)),
        ("keep_zero", ("keep ratio must be in (0, 1]",)),
        ("bad_tasks", ("tasks.jsonl", "line 2")),
        ("empty_tasks", ("holds no prompts",)),
        ("output_not_empty", ("not empty", "--force")),
        ("output_is_file", ("not a directory",)),
    ],
)
def test_new_checkpoint_bad_input(
    capsys: pytest.CaptureFixture[str], source: Path, tmp_path: Path, case: str, needles: tuple[str, ...]
) -> None:
    backbone, tasks, keep, out = source / "backbone", source / "tasks.jsonl", "0.25", tmp_path / "out"
    if case == "missing_backbone":
        backbone = tmp_path / "nope"
    elif case == "keep_above_one":
        keep = "1.5"
    elif case == "keep_zero":
        keep = "0"
    elif case in ("bad_tasks", "empty_tasks"):
        tasks = tmp_path / "tasks.jsonl"
        tasks.write_text('{"task": "a", "prompt": "x"}\n{"task": 3}\n' if case == "bad_tasks" else "\n")
    elif case == "output_not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    elif case == "output_is_file":
        out.write_text("a file")
    before = snapshot(tmp_path)
    args = ["--backbone", str(backbone), "--tasks", str(tasks), "--keep", keep, "-o", str(out)]
    code, _, err = run_cli(capsys, "new-checkpoint", *args)
    assert_one_line_error(code, err, *needles)
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--until", "nosuchpass"], ("unknown pass 'nosuchpass'", "load")),
        (["--keep", "2"], ("keep ratio must be in (0, 1]",)),
        (["--variants", "0"], ("--variants must be at least 1",)),
    ],
)
def test_export_bad_options(
    capsys: pytest.CaptureFixture[str], checkpoint: Path, tmp_path: Path, args: list[str], needles: tuple[str, ...]
) -> None:
    code, _, err = run_cli(capsys, "export", str(checkpoint), "-o", str(tmp_path / "out"), *args)
    assert_one_line_error(code, err, *needles)
    assert list(tmp_path.iterdir()) == []


def test_export_missing_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "export", str(tmp_path / "missing"), "-o", str(tmp_path / "out"))
    assert_one_line_error(code, err, "checkpoint directory not found", str(tmp_path / "missing"))
    assert list(tmp_path.iterdir()) == []
