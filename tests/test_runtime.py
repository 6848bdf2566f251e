"""Manifest, output verification and the reference runtime (routing, generation, variant switching)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from tiny import run_export

from ifp_export.artifacts import MANIFEST_FILE, open_output
from ifp_export.cli import bundled_sample, main
from ifp_export.errors import IFPError
from ifp_export.fold import fold_decoder, relative_difference
from ifp_export.generate import greedy_generate
from ifp_export.masks import routing_scores
from ifp_export.ort import own_tensor_feeds
from ifp_export.pipeline import ExportContext
from ifp_export.runtime import Runtime
from ifp_export.targets.onnx import SHARED_DATA


@pytest.fixture
def exported(tiny_export: ExportContext) -> ExportContext:
    return tiny_export


@pytest.fixture
def copy(exported: ExportContext, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(exported.workdir, out)
    return out


def edit_manifest(out: Path, edit: callable) -> None:
    path = out / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_manifest_lists_every_file_with_its_hash(exported: ExportContext) -> None:
    out = exported.workdir
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    assert [f["path"] for f in manifest["files"]] == on_disk
    for entry in manifest["files"]:
        assert hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
    assert manifest["predictor"]["routing"]["variant_order"] == [v.name for v in exported.variants]
    assert manifest["variants"][0]["files"]["onnx"]["data"] == ["onnx/add.onnx_data", f"onnx/{SHARED_DATA}"]
    assert str(out) not in (out / MANIFEST_FILE).read_text()
    assert (out / MANIFEST_FILE).read_text() == json.dumps(manifest, sort_keys=True, indent=2) + "\n"


def test_runtime_generates_what_pytorch_generates(exported: ExportContext) -> None:
    runtime = Runtime(exported.workdir, threads=1)
    tokenizer = exported.checkpoint.tokenizer
    for variant in exported.variants:
        prompt = exported.checkpoint.tasks[variant.prompt_indices[0]].prompt
        got = list(runtime.generate(prompt, variant.name, max_new_tokens=16))
        model = fold_decoder(exported.checkpoint.backbone, variant.kept)
        expected = greedy_generate(model, [tokenizer.encode(prompt).ids], 16, eos_id=2)[0]
        assert got == expected, variant.name


def test_sampling_is_seeded(exported: ExportContext) -> None:
    runtime = Runtime(exported.workdir, threads=1)
    a = list(runtime.generate("add 1+2=", "add", 12, temperature=1.0, seed=7))
    b = list(runtime.generate("add 1+2=", "add", 12, temperature=1.0, seed=7))
    greedy = list(runtime.generate("add 1+2=", "add", 12))
    assert a == b
    assert len(a) >= 1 and len(greedy) >= 1
    # The seed and the temperature really drive the sampler: other seeds (and a near-greedy temperature) differ.
    others = {tuple(runtime.generate("add 1+2=", "add", 12, temperature=1.0, seed=s)) for s in range(8, 12)}
    assert others - {tuple(a)}, "no other seed changed the sampled tokens"
    assert list(runtime.generate("add 1+2=", "add", 12, temperature=1e-4, seed=7)) == greedy != a


def test_routing_matches_the_predictor_rule(exported: ExportContext) -> None:
    runtime = Runtime(exported.workdir, threads=1)
    routed = [runtime.route(p.prompt).variant for p in exported.checkpoint.tasks]
    expected = exported.predictions.scores  # routing rule applied in PyTorch
    names = [v.name for v in exported.variants]
    picks = routing_scores(expected, torch.stack([v.mask for v in exported.variants])).argmax(-1)
    assert routed == [names[i] for i in picks]


def test_switching_keeps_shared_weights_resident(exported: ExportContext) -> None:
    runtime = Runtime(exported.workdir, threads=1)
    runtime.decoder("add")
    resident = dict(runtime.shared)
    assert resident, "no shared initializers were made resident"
    start = time.perf_counter()
    runtime.decoder("reverse")
    switch = time.perf_counter() - start
    assert runtime.shared.keys() == resident.keys()
    assert all(runtime.shared[k] is resident[k] for k in resident)
    start = time.perf_counter()
    Runtime(exported.workdir, threads=1, verify_hashes=False).decoder("dense")
    cold = time.perf_counter() - start
    print(f"switch to a variant {switch * 1e3:.1f} ms vs cold dense session {cold * 1e3:.1f} ms (tiny model)")


def test_variants_share_one_session_each_with_its_own_weights(exported: ExportContext) -> None:
    """A switch creates no session: every variant runs on one session, fed its own FFN slices; each variant's logits
    still equal its own folded PyTorch model (and differ from the others', so no variant ran another's weights)."""
    runtime = Runtime(exported.workdir, threads=1)
    tokens = torch.tensor([exported.checkpoint.tokenizer.encode("add 12+7=").ids])
    logits = {}
    for variant in exported.variants:
        decoder = runtime.decoder(variant.name)
        got, _ = decoder(
            tokens.numpy(), np.ones_like(tokens.numpy()), np.arange(tokens.shape[1])[None], decoder.empty_cache(1)
        )
        with torch.no_grad():
            expected, _ = fold_decoder(exported.checkpoint.backbone, variant.kept)(tokens)
        assert relative_difference(got, expected.numpy()) <= 1e-5, variant.name
        logits[variant.name] = got
    assert len({id(runtime.decoder(v.name).session) for v in exported.variants}) == 1
    assert len(runtime.resident.sessions) == 1
    assert all(not np.array_equal(logits[a], logits[b]) for a, b in itertools.combinations(logits, 2))
    runtime.unload("add")
    assert runtime.decoder("add").session is runtime.decoder("reverse").session  # re-loading makes no session
    assert runtime.decoder("dense").session is not runtime.decoder("add").session  # other shapes, its own session
    assert len(runtime.resident.sessions) == 2


def test_a_tensor_outside_the_export_is_refused(tmp_path: Path) -> None:
    tensor = onnx.helper.make_tensor("w", onnx.TensorProto.FLOAT, [2], [1.0, 2.0])
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in {"location": "../outside.bin", "offset": "0", "length": "8"}.items():
        tensor.external_data.add(key=key, value=value)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["w"], ["y"])],
        "g",
        [],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        [tensor],
    )
    (tmp_path / "outside.bin").write_bytes(np.ones(2, np.float32).tobytes())
    (tmp_path / "export").mkdir()
    with pytest.raises(IFPError, match="points outside its export"):
        own_tensor_feeds(onnx.helper.make_model(graph), tmp_path / "export", SHARED_DATA)


def test_run_command_prints_route_and_text(exported: ExportContext, capsys: pytest.CaptureFixture[str]) -> None:
    main(["run", str(exported.workdir), "--prompt", "add 12+7=", "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert captured.err.startswith("routed to ")
    assert captured.out.endswith("\n")


def test_inspect_json(exported: ExportContext, capsys: pytest.CaptureFixture[str]) -> None:
    main(["inspect", str(exported.workdir), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert [v["name"] for v in data["variants"]] == [v.name for v in exported.variants]


def tamper(out: Path) -> None:
    path = out / "onnx" / "add.onnx_data"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))


def dotdot(out: Path) -> None:
    edit_manifest(out, lambda m: m["files"].append({"path": "../outside", "size": 1, "sha256": "0" * 64}))


def absolute(out: Path) -> None:
    edit_manifest(out, lambda m: m["files"].append({"path": "/etc/passwd", "size": 1, "sha256": "0" * 64}))


def symlink(out: Path) -> None:
    target = out / "onnx" / "add.onnx_data"
    outside = out.parent / "elsewhere.bin"
    shutil.move(target, outside)
    os.symlink(outside, target)


def hardlink(out: Path) -> None:
    os.link(out / "onnx" / "add.onnx_data", out.parent / "second-name.bin")


def missing(out: Path) -> None:
    (out / "onnx" / "reverse.onnx").unlink()


def schema_version(out: Path) -> None:
    edit_manifest(out, lambda m: m.update(schema_version=99))


def unlisted_external(out: Path) -> None:
    def drop(m: dict) -> None:
        m["files"] = [f for f in m["files"] if f["path"] != "onnx/add.onnx_data"]

    edit_manifest(out, drop)


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (tamper, "sha256"),
        (dotdot, "leaves the output directory"),
        (absolute, "leaves the output directory"),
        (symlink, "symlink"),
        (hardlink, "hard links"),
        (missing, "missing"),
        (schema_version, "schema_version 99 is not supported"),
        (unlisted_external, "unlisted external data"),
    ],
)
def test_damaged_output_is_refused(
    copy: Path, damage: callable, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    damage(copy)
    with pytest.raises(IFPError, match=needle):
        open_output(copy)
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(copy), "--prompt", "add 1+1="])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and needle in err[0]


def test_sample_routes_heldout_prompts_to_their_task(tmp_path: Path) -> None:
    """On the bundled sample: held-out prompts of each task route to that task's variant."""
    ctx = run_export(
        bundled_sample(), tmp_path / "out", until="group", heldout=bundled_sample().parent / "heldout.jsonl"
    )
    accuracy = {v.name: v.routing_accuracy for v in ctx.variants}
    print("held-out routing accuracy per task:", accuracy)
    assert all(a is not None and a >= 0.9 for a in accuracy.values()), accuracy
