"""The exactness rule (`ifp_export.bounds`) and the export's checks: their bounds on random, toy and trained weights,
how they fail (exit 3, one stderr line) and how they are reported (JSON summary and JUnit, every check with its
figure, bound and verdict). Issues 24.1-2, 27.7/8/10/13/15, 26.1."""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import assert_one_line_error, refresh, run_cli, wrong_kept_index
from junitparser import Failure, JUnitXml
from tiny import make_checkpoint, run_export

from ifp_export.bounds import FLOOR_ULPS, FP32_EPS, NOISE_MULTIPLE, compare, float64, reference_pair
from ifp_export.checkpoint import PREDICTOR_DIR
from ifp_export.cli import bundled_sample
from ifp_export.fsutil import read_safetensors
from ifp_export.generate import left_pad
from ifp_export.pipeline import ExportContext
from ifp_export.targets.onnx import DENSE_NAME, emit, emitter, validate, validation_inputs
from ifp_export.targets.onnx.validate import padded_batch


def test_bound_is_a_multiple_of_the_reference_noise_with_a_floor() -> None:
    rng = np.random.default_rng(0)
    ref64 = rng.normal(0, 10, (6, 50))
    ref32 = ref64 + rng.normal(0, 1e-5, ref64.shape)
    noise = float(np.abs(ref32 - ref64).max()) / float(np.abs(ref64).max())
    check = compare("x", ref64 + 4 * (ref32 - ref64), ref32, ref64, layers=4)
    assert check.bound == pytest.approx(NOISE_MULTIPLE * noise) and check.ok, check.text()
    assert not compare("x", ref64 + 100 * (ref32 - ref64), ref32, ref64, layers=4).ok
    exact = compare("x", ref64, ref64, ref64, layers=3)  # a reference with no measurable noise: the floor
    assert exact.bound == pytest.approx(FLOOR_ULPS * FP32_EPS * 2) and exact.ok


def test_top1_is_decisive_except_at_a_near_tie() -> None:
    ref64 = np.array([[5.0, 5.0 + 1e-6, 0.0], [9.0, 1.0, 0.0]])
    ref32 = ref64 + 1e-7
    tie = ref64.copy()
    tie[0] = [5.0 + 1e-6, 5.0, 0.0]  # flips a near tie: within the bound, reported only
    check = compare("x", tie, ref32, ref64, layers=2)
    assert check.ok and check.near_ties == 1 and check.top1_disagreements == 0
    flip = ref64.copy()
    flip[1] = [9.0, 9.0 + 1e-6, 0.0]  # the reference's choice was decisive (margin 8): a disagreement
    check = compare("x", flip, ref32, ref64, layers=2)
    assert not check.ok and check.top1_disagreements == 1 and check.near_ties == 0


@pytest.mark.parametrize("source", ["random", "trained"])
def test_reference_noise_is_measured_in_float64(source: str, tmp_path: Path) -> None:
    """The float64 run differs from the float32 one by fp32 rounding only (tiny but non-zero), and the float64 block
    leaves the model computing in float32 afterwards."""
    from ifp_export.checkpoint import load_checkpoint

    ckpt = load_checkpoint(bundled_sample() if source == "trained" else make_checkpoint(tmp_path))
    ids, mask = left_pad([ckpt.tokenizer.encode(t.prompt).ids for t in ckpt.tasks[:2]])
    ref32, ref64 = reference_pair(ckpt.backbone, ids, mask)
    assert ref64.dtype == np.float64 and ref32.dtype == np.float32
    noise = float(np.abs(ref32 - ref64).max()) / max(1.0, float(np.abs(ref64).max()))
    assert 0 < noise < 1e-5
    with torch.no_grad(), float64(ckpt.backbone):
        assert ckpt.backbone(ids, mask)[0].dtype == torch.float64
    assert ckpt.backbone(ids, mask)[0].dtype == torch.float32


# --- a trained model's export, damaged: every damage fails validation (exit 3) and shows in JSON and JUnit --------


def ffn_spans(out: Path, name: str) -> dict[str, tuple[int, list[int]]]:
    """Initializer name -> (byte offset, shape) of a model's own FFN tensors in its data file."""
    graph = onnx.load(str(out / "onnx" / f"{name}.onnx"), load_external_data=False)
    spans = {}
    for init in graph.graph.initializer:
        info = {e.key: e.value for e in init.external_data}
        if info.get("location") == f"{name}.onnx_data":
            spans[init.name] = (int(info.get("offset", 0)), list(init.dims))
    return spans


def wrong_ffn_row(out: Path, name: str) -> None:
    """One neuron's gate_proj row (a column of the [in, 2k] gate_up MatMul weight) replaced by its neighbour's."""
    offset, shape = ffn_spans(out, name)["l1.gate_up"]
    data = np.memmap(out / "onnx" / f"{name}.onnx_data", np.float32, "r+", offset, tuple(shape))
    data[:, 3] = data[:, 4]
    data.flush()
    refresh(out, f"onnx/{name}.onnx_data")


def swapped_tensors(out: Path, name: str) -> None:
    """Layer 0's and layer 2's down_proj exchanged in the variant's data file."""
    spans = ffn_spans(out, name)
    path = out / "onnx" / f"{name}.onnx_data"
    (a, shape), (b, _) = spans["l0.down"], spans["l2.down"]
    data = np.memmap(path, np.float32, "r+", 0, (path.stat().st_size // 4,))
    size = int(np.prod(shape))
    first, second = data[a // 4 : a // 4 + size].copy(), data[b // 4 : b // 4 + size].copy()
    data[a // 4 : a // 4 + size], data[b // 4 : b // 4 + size] = second, first
    data.flush()
    refresh(out, f"onnx/{name}.onnx_data")


def failures(junit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for suite in JUnitXml.fromfile(str(junit)):
        for case in suite:
            for result in case.result:
                if isinstance(result, Failure):
                    found.setdefault(case.classname, []).append(result.message)
    return found


def test_trained_model_passes_and_each_damaged_variant_fails(
    sample_export: ExportContext, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bundled trained sample validates with every check under its bound; then one variant gets a wrong FFN
    row, another a swapped tensor, a third a wrong kept index: exit 3, one stderr line, and each of the three models
    failed in JSON and JUnit with a figure above its bound, the undamaged ones still passing."""
    out = Path(shutil.copytree(sample_export.workdir, tmp_path / "out"))
    names = [v.name for v in sample_export.variants]
    wrong_ffn_row(out, names[0])
    swapped_tensors(out, names[1])
    wrong_kept_index(out, names[2])
    junit = tmp_path / "validate.xml"
    args = ["validate", str(out), "--checkpoint", str(bundled_sample()), "--json", "--junit", str(junit)]
    code, stdout, stderr = run_cli(capsys, *args)
    assert code == 3, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr
    assert names[0] in lines[0] and "bound" in lines[0] and "max|Δ|" in lines[0]
    summary = json.loads(stdout)
    assert summary["status"] == "validation_failed"
    # the predictor graph's routing head folds the variants' masks in: the changed kept index shows there too
    damaged = [*names[:3], "predictor"]
    assert set(summary["failed"]) == {f"onnx:{n}" for n in damaged}
    failed = failures(junit)
    assert set(failed) == {f"ifp-export.onnx.{n}" for n in damaged}
    for model in summary["models"]:
        for check in model["checks"]:
            if not check["ok"]:
                assert check["value"] > check["bound"], (model["name"], check)
    first = next(m for m in summary["models"] if (m["target"], m["name"]) == ("onnx", names[0]))
    assert {c["name"] for c in first["checks"] if not c["ok"]} >= {"cached_max_rel_diff", "genai_max_rel_diff"}


def test_trained_export_checks_hold_with_margin(sample_export: ExportContext) -> None:
    """On trained weights every exactness figure sits under its bound, and the bound is far below what a damaged
    model shows (~1e-3 and more): the rule is neither tuned to pass toys nor loose."""
    report = sample_export.report
    records = [c for row in report["onnx_validation"]["models"] for c in row["checks"]]
    records += report["onnx_validation"]["predictor"] + report["fold_validation"]["variants"]
    records.append(report["transformers_check"]["check"])
    for record in records:
        assert record["ok"] and record["error"] <= record["bound"] < 1e-4, record
    assert {c["name"] for c in records} >= {"uncached", "cached", "genai", "folded_vs_masked", "transformers"}


# --- every check that can make the exit code 3 is in JSON and JUnit, and fails there when it fails -----------------


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny dynamic-mode export (fold, transformers, ONNX decoders + genai, predictor, dynamic, Core ML)."""
    root = tmp_path_factory.mktemp("checks")
    checkpoint = make_checkpoint(root)
    run_export(checkpoint, root / "out", mode="dynamic")
    return checkpoint, root / "out"


def validate_failing(
    tiny_out: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[str, dict, dict[str, list[str]]]:
    checkpoint, out = tiny_out
    junit = tmp_path / "v.xml"
    code, stdout, stderr = run_cli(
        capsys, "validate", str(out), "--checkpoint", str(checkpoint), "--json", "--junit", str(junit)
    )
    assert code == 3, stderr
    assert len([line for line in stderr.strip().splitlines() if line.startswith("error:")]) == 1, stderr
    summary = json.loads(stdout)
    assert summary["status"] == "validation_failed"
    return stderr, summary, failures(junit)


def scaled(factor: float):
    """`ifp_export.bounds.compare` with `got` moved away from the reference by `factor` x its own bound."""
    from ifp_export import bounds

    original = bounds.compare

    def damaged(name, got, ref32, ref64, layers, *args, **kwargs):
        check = original(name, got, ref32, ref64, layers, *args, **kwargs)
        scale = max(1.0, float(np.abs(ref64).max()))
        return original(name, np.asarray(got) + factor * check.bound * scale, ref32, ref64, layers, *args, **kwargs)

    return damaged


@pytest.mark.parametrize(
    ("module", "target", "model"),
    [
        ("ifp_export.hf_check", "transformers", "dense"),
        ("ifp_export.targets.onnx.dynamic", "onnx", "dynamic"),
    ],
)
def test_each_failed_check_is_failed_in_json_and_junit(
    module: str, target: str, model: str, tiny_out, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(f"{module}.compare", scaled(3.0))
    stderr, summary, failed = validate_failing(tiny_out, tmp_path, capsys)
    assert model in stderr.strip().splitlines()[-1]
    assert f"{target}:{model}" in summary["failed"]
    assert f"ifp-export.{target}.{model}" in failed
    entry = next(m for m in summary["models"] if (m["target"], m["name"]) == (target, model))
    bad = [c for c in entry["checks"] if not c["ok"]]
    assert bad and all(c["value"] > c["bound"] for c in bad if c["name"].endswith("max_rel_diff"))


def test_onnx_checks_fail_in_json_and_junit(tiny_out, tmp_path: Path, capsys, monkeypatch) -> None:
    """Decoders (uncached, cached) and predictor (scores, routing) all failed: each named in both (the tiny model has
    no GenAI-flavour graph: its genai check fails in the trained-sample test above)."""
    module = importlib.import_module("ifp_export.targets.onnx.validate")  # the package's `validate` is a function
    monkeypatch.setattr(module, "compare", scaled(3.0))
    _, summary, failed = validate_failing(tiny_out, tmp_path, capsys)
    onnx_models = {m["name"]: m for m in summary["models"] if m["target"] == "onnx"}
    for name in ("add", "dense", "predictor"):
        assert f"onnx:{name}" in summary["failed"] and f"ifp-export.onnx.{name}" in failed
    names = {c["name"] for c in onnx_models["add"]["checks"] if not c["ok"]}
    assert {"uncached_max_rel_diff", "cached_max_rel_diff"} <= names
    assert {c["name"] for c in onnx_models["predictor"]["checks"] if not c["ok"]} >= {"scores_max_rel_diff"}


def test_a_graph_above_its_floor_is_failed_in_json_and_junit(tiny_out, tmp_path: Path, capsys, monkeypatch) -> None:
    """The onnxruntime floor check (`targets/onnx/floor.py`) of every graph is a check of its model in both: a graph
    its recorded floor cannot run fails its model's `min_onnxruntime_problems`, the others pass."""
    from ifp_export.targets.onnx import floor

    original = floor.graph_problems

    def too_new(model, release):
        return [*original(model, release), "ai.onnx opset 99 > 21"] if model.graph.name == "decoder" else []

    monkeypatch.setattr(floor, "graph_problems", too_new)
    stderr, summary, failed = validate_failing(tiny_out, tmp_path, capsys)
    assert "floor" in stderr.strip().splitlines()[-1]
    onnx_models = {m["name"]: m for m in summary["models"] if m["target"] == "onnx"}
    for name in ("add", "dense"):
        row = next(c for c in onnx_models[name]["checks"] if c["name"] == "min_onnxruntime_problems")
        assert not row["ok"] and row["value"] >= 1 and row["bound"] == 0 and "opset 99" in row["detail"]
        assert f"onnx:{name}" in summary["failed"] and f"ifp-export.onnx.{name}" in failed
    predictor = next(c for c in onnx_models["predictor"]["checks"] if c["name"] == "min_onnxruntime_problems")
    assert predictor["ok"] and predictor["value"] == 0


def test_a_failed_fold_check_is_exit_3_in_json_and_junit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """27.13: the fold check fails as a check (one line, exit 3, `validation_failed`, a JUnit failure), not a
    traceback; the failing variant's fold check carries its figure and bound."""
    checkpoint = make_checkpoint(tmp_path)
    monkeypatch.setattr("ifp_export.passes.fold.compare", scaled(2.0))
    junit = tmp_path / "export.xml"
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(capsys, "export", str(checkpoint), "-o", str(out), "--json", "--junit", str(junit))
    assert code == 3, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("error: validation failed: fold: variant") and "bound" in lines[-1]
    assert "Traceback" not in stderr
    summary = json.loads(stdout)
    assert summary["status"] == "validation_failed" and summary["failed"][0].startswith("fold:")
    assert any(name.startswith("ifp-export.fold.") for name in failures(junit))
    assert not out.exists()


def test_validate_with_another_checkpoint_shape_is_bad_input(
    tiny_out: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """27.10: exit 2 naming the mismatch (the manifest's model facts), not a failed validation."""
    other = make_checkpoint(tmp_path, num_hidden_layers=3)
    code, _, err = run_cli(capsys, "validate", str(tiny_out[1]), "--checkpoint", str(other))
    assert_one_line_error(code, err, "num_hidden_layers 3 (export: 2)", "--checkpoint")
    assert read_safetensors(tiny_out[1] / "variants.safetensors", "")  # the output is untouched and still readable


# --- validation's teeth on the teacher-forced design: a KV-cache bug and a quantization-layout bug ----------------


def copy_artifacts(artifacts, directory: Path):
    shutil.copytree(artifacts.directory, directory)
    return dataclasses.replace(
        artifacts,
        directory=directory,
        models={n: directory / p.name for n, p in artifacts.models.items()},
        genai_models={n: directory / p.name for n, p in artifacts.genai_models.items()},
        predictor=directory / artifacts.predictor.name,
    )


def swap_layer_1_cache_outputs(path: Path) -> None:
    """The graph at `path` returns layer 1's keys as its values and back: one forward is right, cached decoding is
    not."""
    graph = onnx.load(str(path), load_external_data=False)
    inner = {"present.1.key": "inner.1.key", "present.1.value": "inner.1.value"}  # what the layer itself reads
    for node in graph.graph.node:
        node.input[:] = [inner.get(name, name) for name in node.input]
        node.output[:] = [inner.get(name, name) for name in node.output]
    graph.graph.node.extend(
        onnx.helper.make_node("Identity", [inner[a]], [b]) for a, b in zip(inner, reversed(inner), strict=True)
    )
    onnx.save(graph, str(path))


@pytest.mark.parametrize("quantize", ["none", "int4"])
@pytest.mark.parametrize("damaged", [DENSE_NAME, "second variant"])
def test_a_kv_cache_bug_fails_the_cached_check_only(
    tiny_export: ExportContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quantize: str, damaged: str
) -> None:
    """A graph with a KV-cache bug: its cached check fails, its uncached check and every other model pass. int4: the
    shipped graph generates, its exact twin replays the tokens through the cache its uncached forward left (the bug is
    in the cache the graph returns, so it shows there too); a later variant of
    the same graph generates on the twin alone. In a variant after the first (whose graph the others share, so its
    padded-batch, uncached and GenAI paths run once, there), the bug makes its graph another one, which gets its own
    checks."""
    ctx = tiny_export
    if quantize == "none":
        artifacts = copy_artifacts(ctx.emitted["onnx"], tmp_path / "onnx")
    else:  # every own tensor in the data files, as at any real size (the tiny int4 scales would be inline: graphs
        monkeypatch.setattr(emitter, "EXTERNAL_THRESHOLD", 64)  # that differ, each then checked in full)
        masks = torch.stack([v.mask for v in ctx.variants])
        kept = {v.name: v.kept.numpy() for v in ctx.variants}
        predictor = ctx.checkpoint.root / PREDICTOR_DIR
        artifacts = emit(tmp_path / "onnx", ctx.checkpoint.weights, kept, predictor, masks, quantize=quantize)
    first, second = (v.name for v in ctx.variants[:2])
    path = artifacts.models[DENSE_NAME if damaged == DENSE_NAME else second]
    swap_layer_1_cache_outputs(path)
    rows, _ = validate(artifacts, **validation_inputs(ctx))
    broken = next(r for r in rows if r.model == path.name)
    assert broken.check("uncached").ok and not broken.check("cached").ok, [c.text() for c in broken.checks]
    assert broken.same_graph_as is None
    assert all(r.ok for r in rows if r is not broken)
    shared = [r for r in rows if r.same_graph_as is not None]
    assert {r.same_graph_as for r in shared} == {first}
    assert len(shared) == len(ctx.variants) - (1 if damaged == DENSE_NAME else 2)
    assert all([c.name for c in r.checks] == ["cached"] for r in shared)  # its own tensors, through its cache
    assert all(r.shipped_prefill_diff is None for r in shared)  # int4: their graph's shipped kernels ran on `first`


def test_a_model_checked_in_full_generates_from_a_padded_batch() -> None:
    """Prompts of one length would leave the left-padded path unchecked: every prompt after the first is cut to at
    most half the first's length (at least one token)."""
    assert padded_batch([[1, 2, 3, 4], [5, 6, 7, 8, 9]]) == [[1, 2, 3, 4], [5, 6]]
    assert padded_batch([[1, 2, 3, 4, 5], [6]]) == [[1, 2, 3, 4, 5], [6]]
    assert padded_batch([[1], [2, 3]]) == [[1], [2]]
    assert padded_batch([[1, 2, 3]]) == [[1, 2, 3]]
    _, mask = left_pad(padded_batch([[1, 2, 3, 4], [5, 6, 7, 8]]))
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]


def test_a_quantization_layout_bug_fails_validation(tiny_export: ExportContext, tmp_path: Path) -> None:
    """int4 blocks of one FFN weight of one variant with their two nibbles swapped (low/high order): caught."""
    ctx = tiny_export
    masks = torch.stack([v.mask for v in ctx.variants])
    kept = {v.name: v.kept.numpy() for v in ctx.variants}
    artifacts = emit(
        tmp_path / "onnx", ctx.checkpoint.weights, kept, ctx.checkpoint.root / PREDICTOR_DIR, masks, quantize="int4"
    )
    name = ctx.variants[0].name
    path = artifacts.models[name]
    graph = onnx.load(str(path), load_external_data=False)
    blocks = next(i for i in graph.graph.initializer if i.name == "l1.gate_up.q")
    info = {e.key: e.value for e in blocks.external_data}
    if info:
        data = np.memmap(
            path.parent / info["location"], np.uint8, "r+", int(info.get("offset", 0)), int(info["length"])
        )
        data[:] = (data << 4) | (data >> 4)
        data.flush()
    else:
        raw = np.frombuffer(blocks.raw_data, np.uint8)
        blocks.raw_data = ((raw << 4) | (raw >> 4)).astype(np.uint8).tobytes()
        onnx.save(graph, str(path))
    rows, _ = validate(artifacts, **validation_inputs(ctx))
    assert [r.ok for r in rows] == [r.model != path.name for r in rows], [(r.model, r.ok) for r in rows]


def test_float64_linear_upcasts_a_block_of_rows_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large weight (lm_head) is never upcast whole by the float64 reference, and the result is the same."""
    from ifp_export.model import decoder

    monkeypatch.setattr(decoder, "FLOAT64_CHUNK", 64)
    linear = decoder.Linear(16, 50, bias=True).requires_grad_(False)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    expected = torch.nn.functional.linear(x, linear.weight.double(), linear.bias.double())
    assert torch.allclose(linear(x), expected, rtol=0, atol=1e-12)
    assert linear(x.float()).dtype == torch.float32


def test_a_failed_coreml_weight_check_names_its_figures(
    tiny_out: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One Core ML function's down_proj scaled by 1.5 in weight.bin (the manifest vouching for it): exit 3, one line
    with the function and its figures, the function failed in JSON and JUnit."""
    from ifp_export.targets import coreml

    checkpoint, source = tiny_out
    out = Path(shutil.copytree(source, tmp_path / "out"))
    package = out / "coreml" / coreml.DECODER_PACKAGE
    spec = coreml.coremltools().utils.load_spec(str(package))
    name = json.loads((out / "manifest.json").read_text())["variants"][0]["name"]
    ref = coreml.function_blobs(spec, name)[coreml.const_name("model.layers.0.mlp.down_proj.weight")]
    path = coreml.package_weights_path(package)
    data = bytearray(path.read_bytes())
    _, start, size = coreml.blob_data_range(data, ref.offset)
    values = np.frombuffer(bytes(data[start : start + size]), dtype="<f2") * np.float16(1.5)
    data[start : start + size] = values.astype("<f2").tobytes()
    path.write_bytes(bytes(data))
    refresh(out, path.relative_to(out).as_posix())
    junit = tmp_path / "v.xml"
    args = ["validate", str(out), "--checkpoint", str(checkpoint), "--json", "--junit", str(junit)]
    code, stdout, stderr = run_cli(capsys, *args)
    assert code == 3, stderr
    line = stderr.strip().splitlines()[-1]
    assert f"{name} weights: max|Δ|" in line and "fp16-exact False" in line
    assert f"coreml:{name}" in json.loads(stdout)["failed"]
    assert f"ifp-export.coreml.{name}" in failures(junit)


def test_quick_checks_say_which_ran_and_still_catch_a_wrong_row(
    tiny_out: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """26.4: `--checks quick` checks dense and the first variant in full, the others by one forward over their
    prompts: the summary names which, and a wrong FFN row in a variant checked quickly still fails (exit 3)."""
    checkpoint, source = tiny_out
    out = Path(shutil.copytree(source, tmp_path / "out"))
    names = [v["name"] for v in json.loads((out / "manifest.json").read_text())["variants"]]
    args = ["validate", str(out), "--checkpoint", str(checkpoint), "--checks", "quick", "--json"]
    code, stdout, stderr = run_cli(capsys, *args)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["targets"]["onnx"]["checks"] == "quick"
    assert summary["targets"]["onnx"]["checked_in_full"] == sorted(["dense", names[0]])
    onnx_checks = {m["name"]: {c["name"] for c in m["checks"]} for m in summary["models"] if m["target"] == "onnx"}
    assert "cached_max_rel_diff" in onnx_checks[names[0]] and "cached_max_rel_diff" in onnx_checks["dense"]
    assert onnx_checks[names[1]] == {"uncached_max_rel_diff", "uncached_top1_disagreements", "min_onnxruntime_problems"}
    wrong_ffn_row(out, names[1])
    code, stdout, stderr = run_cli(capsys, *args)
    assert code == 3 and json.loads(stdout)["failed"] == [f"onnx:{names[1]}"], stderr
