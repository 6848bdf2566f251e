"""Two exports of the same inputs are byte-identical (DESIGN.md section 10): different temp dirs, different
PYTHONHASHSEED, separate processes; every file, ONNX, Core ML packages, the PNG heatmap and the manifest."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import snapshot
from tiny import export_process

from ifp_export.artifacts import MANIFEST_FILE, open_output
from ifp_export.pipeline import ExportContext


def test_exports_are_byte_identical(tiny_export: ExportContext, tmp_path: Path) -> None:
    checkpoint = tiny_export.checkpoint.root
    outs = [tmp_path / "first" / "out", tmp_path / "second" / "deeper" / "out"]
    runs = []
    for out, hash_seed in zip(outs, ("1", "4242"), strict=True):
        out.parent.mkdir(parents=True)
        runs.append(export_process(checkpoint, out, hash_seed=hash_seed))
    for run in runs:
        _, err = run.communicate(timeout=900)
        assert run.returncode == 0, err
    manifests = [json.loads((out / MANIFEST_FILE).read_text()) for out in outs]
    assert manifests[0]["files"] == manifests[1]["files"]
    first, second = (snapshot(out) for out in outs)
    assert first.keys() == second.keys()
    differing = sorted(path for path in first if first[path] != second[path])
    assert not differing, f"differ between the two exports: {differing}"
    for out in outs:
        open_output(out)
    # and the in-process session export (same options, one intra-op thread) is the same bytes too
    in_process = snapshot(tiny_export.workdir)
    differing = sorted(path for path in first.keys() | in_process.keys() if first.get(path) != in_process.get(path))
    assert not differing, (
        f"differ from the in-process export: {differing}: {json_differences(outs[0], tiny_export.workdir, differing)}"
    )
    files = [path for path, digest in first.items() if digest != "dir"]
    size = sum((outs[0] / path).stat().st_size for path in files)
    print(f"{len(files)} files ({size:,} bytes) byte-identical across 3 exports; {len(manifests[0]['files'])} listed")


def json_differences(first: Path, second: Path, files: list[str]) -> list[tuple[str, object, object]]:
    """(file:key path, first value, second value) of the JSON files among `files` that differ: what a failure shows."""

    def leaves(value: object, key: str) -> dict[str, object]:
        if isinstance(value, dict):
            return {k: v for name, item in value.items() for k, v in leaves(item, f"{key}.{name}").items()}
        if isinstance(value, list):
            return {k: v for i, item in enumerate(value) for k, v in leaves(item, f"{key}[{i}]").items()}
        return {key: value}

    found = []
    for name in (f for f in files if f.endswith(".json")):
        a, b = (leaves(json.loads((root / name).read_text()), name) for root in (first, second))
        found += [(key, a.get(key), b.get(key)) for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key)]
    return found[:20]
