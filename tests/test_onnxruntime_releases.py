"""The export's graphs on every onnxruntime release from the floor (1.20) to the newest, as an app loads them.

Each release (the latest patch of each minor, as `pip index versions onnxruntime` lists them) is installed once
with `pip install --no-deps --target ~/.cache/ifp-export/onnxruntime/<version>` and kept there; one child process
per release runs tests/onnxruntime_app.py with that directory first on PYTHONPATH (plain InferenceSessions on the
manifest's files: predictor -> route, greedy decoding with the KV cache on the routed variant, its GenAI twin, the
dense model and the dynamic graph) over every export at once, and its routes and tokens must equal
`ifp_export.runtime.Runtime`'s (the newest onnxruntime, in this process).

Exports: the bundled trained sample in fp32 (the shared `sample_export`), int8 and int4 (ONNX passes only), and the
tiny dynamic-mode export (`dynamic_export`). The table printed at the end is the README's Compatibility table.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from rich.console import Console

from ifp_export.checkpoint import PREDICTOR_DIR
from ifp_export.errors import ValidationFailed
from ifp_export.pipeline import ExportContext
from ifp_export.runtime import Runtime
from ifp_export.targets.onnx import emit, validate, validation_inputs
from ifp_export.targets.onnx.floor import check_floor, graph_problems, validate_floor

CACHE = Path.home() / ".cache" / "ifp-export" / "onnxruntime"
OLDEST_MINOR = 20
MAX_NEW_TOKENS = 16
APP = Path(__file__).with_name("onnxruntime_app.py")


def release_versions() -> list[str]:
    """The latest patch of every onnxruntime minor from 1.20 on, from the registry (skip if pip cannot reach it)."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "onnxruntime"], capture_output=True, text=True, timeout=120
    )
    found = re.search(r"Available versions: (.+)", listing.stdout)
    if listing.returncode or not found:
        reason = (listing.stderr.strip().splitlines() or ["no version list"])[-1]
        pytest.skip(f"pip cannot list onnxruntime releases from the registry: {reason}")
    latest: dict[tuple[int, int], tuple[int, ...]] = {}
    for version in found.group(1).split(", "):
        parts = tuple(int(p) for p in version.split("."))
        if parts[0] == 1 and parts[1] >= OLDEST_MINOR:
            latest[parts[:2]] = max(latest.get(parts[:2], parts), parts)
    return [".".join(map(str, v)) for _, v in sorted(latest.items())]


def installed(version: str) -> Path:
    """~/.cache/ifp-export/onnxruntime/<version>, installed on first use (renamed into place when complete). Called
    after `release_versions` reached the registry, so a failed install is a failure, not a skip."""
    target = CACHE / version
    if not (target / "onnxruntime").is_dir():
        partial = CACHE / f".{version}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(partial)]
        result = subprocess.run([*pip, f"onnxruntime=={version}"], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"pip install onnxruntime=={version}: {result.stderr[-1000:]}"
        partial.rename(target)
    return target


def prompts_of(ctx_tasks: list, per_task: int = 1) -> list[str]:
    """One prompt per task (so every variant is routed to), in file order."""
    seen: dict[str, list[str]] = {}
    for task in ctx_tasks:
        if len(seen.setdefault(task.task, [])) < per_task:
            seen[task.task].append(task.prompt)
    return [p for prompts in seen.values() for p in prompts]


def expected_results(root: Path, prompts: list[str]) -> list[dict]:
    """What the project's runtime (newest onnxruntime) routes and generates, in the child's format."""
    runtime = Runtime(root, threads=1)
    results = []
    for prompt in prompts:
        route = runtime.route(prompt).variant
        variant = list(runtime.generate(prompt, route, MAX_NEW_TOKENS))
        result = {"route": route, "variant": variant, "dense": list(runtime.generate(prompt, "dense", MAX_NEW_TOKENS))}
        if "genai" in runtime.output.variant(route)["files"]["onnx"]:
            result["genai"] = variant  # the GenAI twin is exact on one unpadded sequence: same tokens
        if "dynamic" in runtime.output.manifest:
            result["dynamic"] = list(runtime.generate(prompt, None, MAX_NEW_TOKENS, dynamic=True))
        results.append(result)
    return results


@pytest.fixture(scope="module")
def exports(
    sample_export: ExportContext, sample_int8_export: Path, sample_int4_export: Path, dynamic_export: ExportContext
) -> dict[str, dict]:
    """label -> {"dir", "prompts" (token ids), "expected"} for fp32, int8, int4 and dynamic exports."""
    dirs = {"fp32": (sample_export.workdir, sample_export)}
    dirs["int8"] = (sample_int8_export, sample_export)
    dirs["int4"] = (sample_int4_export, sample_export)
    dirs["dynamic (tiny)"] = (dynamic_export.workdir, dynamic_export)
    table = {}
    for label, (directory, ctx) in dirs.items():
        prompts = prompts_of(ctx.checkpoint.tasks)
        ids = [ctx.checkpoint.tokenizer.encode(p).ids for p in prompts]
        table[label] = {"dir": str(directory), "prompts": ids, "expected": expected_results(directory, prompts)}
    return table


def run_release(version: str, exports: dict[str, dict], tmp_path: Path) -> dict:
    request = {
        "exports": {label: {"dir": e["dir"], "prompts": e["prompts"]} for label, e in exports.items()},
        "max_new_tokens": MAX_NEW_TOKENS,
    }
    (tmp_path / "request.json").write_text(json.dumps(request))
    env = {**os.environ, "PYTHONPATH": str(installed(version)), "OMP_NUM_THREADS": "1"}
    child = subprocess.run(
        [sys.executable, str(APP), str(tmp_path / "request.json")], capture_output=True, text=True, env=env, timeout=600
    )
    assert child.returncode == 0, child.stderr[-2000:]
    return json.loads(child.stdout)


def test_every_release_routes_and_generates_like_the_runtime(exports: dict[str, dict], tmp_path: Path) -> None:
    versions = release_versions()
    assert versions[0].startswith("1.20.") and len(versions) >= 13  # 1.20 ... 1.32 at the time of writing
    rows, failures = [], []
    for version in versions:
        report = run_release(version, exports, tmp_path)
        assert report["onnxruntime"] == version  # the child really ran that release
        cells = []
        for label, export in exports.items():
            got = report["exports"][label]
            same = got == export["expected"]
            cells.append(f"{label} {'ok' if same else 'DIFFERENT'}")
            if not same:
                failures.append(f"onnxruntime {version}, {label}: {got} != {export['expected']}")
        rows.append(f"onnxruntime {version}: {', '.join(cells)}")
    print("\n" + "\n".join(rows))
    assert not failures, "\n".join(failures)


def test_floor_1_24_emits_and_validates_opset_23(tiny_export: ExportContext, tmp_path: Path) -> None:
    """`--min-onnxruntime 1.24` keeps the opset-23 graph (Attention, RMSNormalization), which validates at 1.24; the
    same graphs recorded with the default floor fail validation's floor check (exit 3)."""
    ctx = tiny_export
    masks = torch.stack([v.mask for v in ctx.variants])
    kept = {v.name: v.kept.numpy() for v in ctx.variants}
    artifacts = emit(tmp_path / "onnx", ctx.checkpoint.weights, kept, ctx.checkpoint.root / PREDICTOR_DIR, masks,
                     min_onnxruntime="1.24")  # fmt: skip
    graph = onnx.load(str(artifacts.models["add"]), load_external_data=False)
    assert {o.domain: o.version for o in graph.opset_import}[""] == 23
    assert {"Attention", "RMSNormalization"} <= {n.op_type for n in graph.graph.node}
    rows, routing = validate(artifacts, **validation_inputs(ctx))
    assert all(row.ok for row in rows) and all(check.ok for check in routing)
    assert check_floor(artifacts.graphs, "1.24") == []
    problems = check_floor(artifacts.graphs, "1.20")
    assert any("add.onnx: ai.onnx opset 23 > 21" in p for p in problems), problems
    assert any("ai.onnx.Attention needs onnxruntime 1.24" in p for p in problems), problems
    recorded_too_low = ExportContext(options=ctx.options, workdir=ctx.workdir, console=Console(file=io.StringIO()))
    recorded_too_low.emitted["onnx"] = dataclasses.replace(artifacts, min_onnxruntime="1.20")
    with pytest.raises(ValidationFailed, match=r"exceed their floor onnxruntime 1\.20"):
        validate_floor(recorded_too_low)
    assert recorded_too_low.report["onnx_floor"]["problems"] == problems


def test_default_export_records_and_meets_its_floor(sample_export: ExportContext) -> None:
    manifest = json.loads((sample_export.workdir / "manifest.json").read_text())
    entries = [v["files"]["onnx"] for v in manifest["variants"]] + [manifest["dense"]["files"]["onnx"]]
    assert {e["min_onnxruntime"] for e in entries} == {manifest["predictor"]["onnx"]["min_onnxruntime"]} == {"1.20"}
    assert sample_export.report["onnx_floor"] == {
        "min_onnxruntime": "1.20",
        "graphs": len(sample_export.emitted["onnx"].graphs),
        "files": sorted(path.name for path in sample_export.emitted["onnx"].graphs),
        "problems": [],
    }


def test_floor_check_knows_each_releases_limits() -> None:
    """The floor table: 8-bit MatMulNBits needs 1.22, an unknown contrib op is refused, opset/IR per release."""
    nbits = onnx.helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", bits=8)
    unknown = onnx.helper.make_node("SparseAttention", ["x"], ["z"], domain="com.microsoft")
    graph = onnx.helper.make_graph([nbits, unknown], "g", [], [])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 22)], ir_version=11)
    assert graph_problems(model, (1, 20)) == [
        "IR version 11 > 10 (onnxruntime 1.20)",
        "ai.onnx opset 22 > 21 (onnxruntime 1.20)",
        "com.microsoft.MatMulNBits needs onnxruntime 1.22",
        "contrib op SparseAttention is not known to run on onnxruntime 1.20",
    ]
    assert graph_problems(model, (1, 23)) == ["contrib op SparseAttention is not known to run on onnxruntime 1.23"]
