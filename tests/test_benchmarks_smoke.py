"""Smoke test of the benchmarks (`python -m benchmarks.run`) on a tiny model: the table is complete.

Only completeness is checked (every figure P1–P7 has a row, every measured ratio is finite); timings are never
asserted. Optimum's exports are left out: one `optimum-cli export onnx` run takes ~25–30 s here even for the
tiny model (process start, TorchScript export, its own validation), more than this test's whole budget; the P1
export-vs-Optimum rows and P4b then say so, and the bench-size run includes them. The onnxruntime-genai parts
(P1d, P4a, P4c) are left out too (`--no-genai`): they need the GenAI builder's own venv (transformers 5), ~40 s to
create from the registry on first use, plus a second (int4) export and two builder runs; their rows then say why.
`python -m benchmarks.run --size tiny` without `--no-genai` runs them in ~30 s once the venv exists.
"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ifp_export.pipeline import ExportContext

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("P1", "P2", "P3", "P4", "P5", "P6", "P7")


@pytest.mark.slow
def test_benchmarks_table_is_complete(tmp_path: Path) -> None:
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "benchmarks.run", "--size", "tiny", "--repeats", "1", "--optimum-runs", "0"]
    cmd += ["--decode-steps", "4", "--prefill", "64", "--threads", "1", "--out", str(out), "--no-readme"]
    cmd += ["--workdir", str(tmp_path / "work"), "--no-genai"]
    print("GenAI builder parts (P1d, P4a, P4c) left out: creating the builder's venv is too slow for this test")
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    for figure in FIGURES:
        mine = [r for r in rows if r["id"].startswith(figure)]
        assert mine, f"no row for {figure}"
        assert all(r["ratio"] is None or math.isfinite(r["ratio"]) for r in mine), mine
        assert all(r["ratio"] is not None or r["note"] for r in mine), f"{figure}: a skipped row must say why"
    measured = {r["id"][:2] for r in rows if r["ratio"] is not None}
    assert measured >= {"P1", "P2", "P3", "P5", "P6", "P7"}, sorted(measured)  # P4 needs Optimum / the builder
    skipped = {r["id"]: r["note"] for r in rows if r["id"] in ("P1d", "P4a", "P4b", "P4c")}
    assert sorted(skipped) == ["P1d", "P4a", "P4b", "P4c"] and all(skipped.values()), skipped
    assert (out / "ratios.png").stat().st_size > 0
    for figure in FIGURES:
        assert figure in done.stdout


def test_scale_benchmark_runs_a_bf16_sharded_model_as_a_user_would(tmp_path: Path) -> None:
    """`benchmarks.scale --size tiny`: a bf16 sharded model written by `transformers`, `new-checkpoint` + `export
    --until fold` as subprocesses; the result names every pass run, a peak RSS and the checkpoint's bytes."""
    result_path = tmp_path / "scale.json"
    cmd = [sys.executable, "-m", "benchmarks.scale", "--size", "tiny", "--until", "fold"]
    cmd += ["--workdir", str(tmp_path / "work"), "--json", str(result_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert [name for name, _ in result["passes"]] == ["load", "predict", "group", "quality", "fold"]
    shards = sorted((tmp_path / "work" / "ckpt" / "backbone").glob("model-*.safetensors"))
    assert len(shards) > 1 and result["dtype"] == "bfloat16"
    predictor = tmp_path / "work" / "ckpt" / "predictor" / "model.safetensors"
    assert result["checkpoint_weight_bytes"] == sum(p.stat().st_size for p in [*shards, predictor])
    assert result["peak_rss_bytes"] > result["checkpoint_weight_bytes"]  # the interpreter alone outweighs it
    variants = sorted((tmp_path / "work" / "out" / "variants").iterdir())
    assert len(variants) == 8
    assert "RSS / weight bytes" in done.stdout


def test_profile_decode_in_ort_and_in_og(tiny_export: ExportContext) -> None:
    """`python -m benchmarks.profile_decode` on the dense graph in OrtDecoder and on the export's onnx/ dir in
    og.Generator (the manifest's dense overlay): both give kernel time per decode step, MatMul among it."""
    onnx_dir = tiny_export.workdir / "onnx"
    models = [onnx_dir / "dense.onnx"]
    try:
        import onnxruntime_genai  # noqa: F401

        models.append(onnx_dir)
    except ImportError:
        print("onnxruntime-genai not installed (pip install .[test]): og profile not checked")
    cmd = [sys.executable, "-m", "benchmarks.profile_decode", *map(str, models), "--steps", "3", "--shapes", "2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    header = r"^(\S+): ([0-9.]+) ms per decode step \(model_run\), kernels ([0-9.]+) ms$"
    reports = re.findall(header, done.stdout, re.M)
    assert [Path(r[0]) for r in reports] == models, done.stdout
    assert all(float(total) > 0 and float(kernels) > 0 for _, total, kernels in reports), done.stdout
    sections = re.split(r"^\S+: [0-9.]+ ms per decode step.*$", done.stdout, flags=re.M)[1:]
    assert all(re.search(r"^  MatMul", section, re.M) for section in sections), done.stdout
