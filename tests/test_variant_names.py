"""Issue 18.1: variant names (from task names) never collide with the tool's own files or with each other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import make_checkpoint, onnx_passes, run_export

from ifp_export.passes.group import RESERVED_NAMES, variant_name
from ifp_export.pipeline import ExportContext

COLLIDING_TASKS = ["dense", "predictor", "Decoder Shared", "dynamic", "add", "Add", "add_2", "manifest", "1st"]


def test_reserved_and_sanitized_names_are_renamed_deterministically() -> None:
    taken: set[str] = set()
    names = []
    for task in COLLIDING_TASKS:
        names.append(variant_name(task, taken))
        taken.add(names[-1])
    assert names == [
        "task_dense",
        "task_predictor",
        "task_decoder_shared",
        "task_dynamic",
        "add",
        "add_2",
        "add_2_2",
        "task_manifest",
        "t_1st",
    ]
    assert not set(names) & RESERVED_NAMES
    assert len(set(names)) == len(names)


def test_every_tool_file_stem_is_reserved(tiny_export: ExportContext) -> None:
    """Any file or Core ML package the export writes that is not a variant's own must carry a reserved stem, so a
    future target file cannot silently become collidable."""
    variants = {v.name for v in tiny_export.variants}
    stems = {p.name.split(".")[0] for p in tiny_export.workdir.rglob("*") if p.parent.name in ("onnx", "coreml", "")}
    stems |= {p.name.split(".")[0] for p in tiny_export.workdir.iterdir()}
    unreserved = sorted(stems - variants - RESERVED_NAMES)
    assert not unreserved, unreserved


@pytest.fixture(scope="module")
def colliding_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("colliding")
    ckpt = make_checkpoint(root)
    tasks = {"dense": "add 1+2=", "predictor": "reverse ab:", "decoder_shared": "brackets ():", "Dense": "add 9+9="}
    rows = [{"task": t, "prompt": p} for t, p in tasks.items()]
    (ckpt / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_export(ckpt, root / "out", passes=onnx_passes(validate=True))  # each distinct file holds its own model
    return root / "out"


def test_tasks_named_like_tool_files_export_to_distinct_files(colliding_export: Path) -> None:
    out = colliding_export
    manifest = json.loads((out / "manifest.json").read_text())
    names = [v["name"] for v in manifest["variants"]]
    assert names == ["task_dense", "task_predictor", "task_decoder_shared", "task_dense_2"]
    assert [v["task"] for v in manifest["variants"]] == ["dense", "predictor", "decoder_shared", "Dense"]
    models = [v["files"]["onnx"]["model"] for v in manifest["variants"]] + [manifest["dense"]["files"]["onnx"]["model"]]
    assert len(set(models)) == len(models)
    assert manifest["dense"]["files"]["onnx"]["model"] == "onnx/dense.onnx"
    assert manifest["predictor"]["onnx"]["model"] == "onnx/predictor.onnx"
