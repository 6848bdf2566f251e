"""The ONNX variants in their clients (onnxruntime-genai, Optimum, our runtime) and validation's teeth: a model with
head_dim != hidden_size / heads, a swapped FFN tensor that validation must catch, the runtime on int4."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import og_greedy, zero_hf_neurons
from tiny import make_checkpoint, onnx_passes, run_export
from transformers import AutoModelForCausalLM

from ifp_export.checkpoint import PREDICTOR_DIR
from ifp_export.fold import fold_decoder, relative_difference
from ifp_export.generate import greedy_generate
from ifp_export.model.config import DecoderConfig, generation_config
from ifp_export.pipeline import ExportContext
from ifp_export.runtime import Runtime
from ifp_export.targets.onnx import (
    DENSE_NAME,
    ONNX_DIR,
    SHARED_DATA,
    emit,
    external_data_files,
    validate,
    validation_inputs,
)
from ifp_export.targets.onnx.genai import GENAI_CONFIG, genai_overlay, write_genai_config
from ifp_export.targets.onnx.reference import dequantized, reference_members, reference_runs


@pytest.fixture(params=["sample_export", "qwen2_export"])
def exported(request: pytest.FixtureRequest) -> ExportContext:
    return request.getfixturevalue(request.param)


def og_generate(onnx_dir: Path, overlay: dict, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens from onnxruntime-genai: the directory's genai_config.json with `overlay` applied (an app's
    recipe, with the manifest's overlay)."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai not installed (pip install .[test])")
    config = og.Config(str(onnx_dir))
    config.overlay(json.dumps(overlay))
    return og_greedy(og.Model(config), prompt, new_tokens)


def hf_pruned(ctx: ExportContext, mask: torch.Tensor | None) -> torch.nn.Module:
    """transformers on the original checkpoint, the variant's other FFN neurons zeroed (None: dense)."""
    hf = AutoModelForCausalLM.from_pretrained(ctx.checkpoint.root / "backbone").eval()
    if mask is not None:
        zero_hf_neurons(hf, mask)
    return hf


def test_og_generates_what_transformers_generates(exported: ExportContext) -> None:
    ckpt = exported.checkpoint
    directory = exported.workdir / ONNX_DIR
    manifest = json.loads((exported.workdir / "manifest.json").read_text())
    eos = ckpt.backbone.config.eos_token_id
    models = [(v.name, v.mask, v.prompt_indices[0]) for v in exported.variants] + [(DENSE_NAME, None, 0)]
    for name, mask, prompt_index in models:
        entry = manifest["dense"] if name == DENSE_NAME else next(v for v in manifest["variants"] if v["name"] == name)
        genai = entry["files"]["onnx"]["genai"]
        assert (
            genai["config"] == f"{ONNX_DIR}/{GENAI_CONFIG}" and "onnxruntime-genai" in entry["files"]["onnx"]["clients"]
        )
        prompt = ckpt.tokenizer.encode(ckpt.tasks[prompt_index].prompt).ids
        got = og_generate(directory, genai["overlay"], prompt, 12)
        with torch.no_grad():
            out = hf_pruned(exported, mask).generate(
                torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0
            )
        expected = out[0, len(prompt) :].tolist()
        if eos in expected:  # transformers pads after EOS; og stops there
            expected = expected[: expected.index(eos) + 1]
        assert got == expected, name


def test_genai_graphs_share_the_optimum_graphs_data(sample_export: ExportContext) -> None:
    """The sample (head_dim 32) gets a GroupQueryAttention graph per model, over the same data files and offsets."""
    artifacts = sample_export.emitted["onnx"]
    assert set(artifacts.genai_models) == set(artifacts.models)
    for name, path in artifacts.models.items():
        twin = artifacts.genai_models[name]
        assert external_data_files(twin) == external_data_files(path) == sorted([SHARED_DATA, f"{name}.onnx_data"])
        ops = {n.op_type for n in onnx.load(str(twin), load_external_data=False).graph.node}
        assert "GroupQueryAttention" in ops
        assert locations(twin) == locations(path)
    rows = sample_export.report["onnx_validation"]["models"]  # validated too: unpadded prefill + cached decode,
    checked = [row for row in rows if row["same_graph_as"] is None]  # once per distinct graph: the later variants
    assert {row["model"] for row in checked} == {"dense.onnx", f"{sample_export.variants[0].name}.onnx"}
    genai = [next(c for c in row["checks"] if c["name"] == "genai") for row in checked]  # are the first's graph
    assert all(c["ok"] and c["error"] <= c["bound"] for c in genai), genai


def locations(path: Path) -> dict[str, tuple[str, str, str]]:
    out = {}
    for init in onnx.load(str(path), load_external_data=False).graph.initializer:
        info = {e.key: e.value for e in init.external_data}
        if info:
            out[init.name] = (info["location"], info.get("offset", "0"), info["length"])
    return out


def test_a_swapped_ffn_tensor_fails_validation(tiny_export: ExportContext, tmp_path: Path) -> None:
    """Exchange two same-sized FFN tensors (layer 0's and layer 1's gate/up) in one variant's data file: validation
    fails for that variant only."""
    artifacts = tiny_export.emitted["onnx"]
    copy = tmp_path / "onnx"
    shutil.copytree(artifacts.directory, copy)
    name = tiny_export.variants[0].name
    graph = onnx.load(str(copy / f"{name}.onnx"), load_external_data=False)
    spans = []
    for init in graph.graph.initializer:
        info = {e.key: e.value for e in init.external_data}
        if info.get("location") == f"{name}.onnx_data":
            spans.append((int(info.get("offset", 0)), int(info["length"])))
    (a, length), (b, other) = sorted(spans, key=lambda span: (span[1], span[0]))[-2:]
    assert length == other and a != b
    data = bytearray((copy / f"{name}.onnx_data").read_bytes())
    data[a : a + length], data[b : b + length] = data[b : b + length], data[a : a + length]
    (copy / f"{name}.onnx_data").write_bytes(bytes(data))
    moved = dataclasses.replace(
        artifacts,
        directory=copy,
        models={n: copy / p.name for n, p in artifacts.models.items()},
        predictor=copy / artifacts.predictor.name,
    )
    rows, _ = validate(moved, **validation_inputs(tiny_export))
    assert [r.ok for r in rows] == [r.model != f"{name}.onnx" for r in rows]


@pytest.fixture(scope="module")
def wide_heads(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExportContext, Path]:
    """head_dim 16 with hidden 32 and 4 heads (q is 64 wide): emitted and validated without Core ML."""
    root = tmp_path_factory.mktemp("wide_heads")
    ctx = run_export(make_checkpoint(root, head_dim=16), root / "out", until="fold")
    kept = {v.name: v.kept.numpy() for v in ctx.variants}
    masks = torch.stack([v.mask for v in ctx.variants])
    artifacts = emit(root / "onnx", ctx.checkpoint.weights, kept, ctx.checkpoint.root / PREDICTOR_DIR, masks)
    ctx.emitted["onnx"] = artifacts
    return ctx, root / "onnx"


def test_head_dim_model_validates_and_runs_in_og(wide_heads: tuple[ExportContext, Path]) -> None:
    ctx, directory = wide_heads
    rows, routing = validate(ctx.emitted["onnx"], **validation_inputs(ctx))
    assert all(r.ok for r in rows) and all(check.ok for check in routing)
    variant = ctx.variants[0]
    prompt = ctx.checkpoint.tokenizer.encode(ctx.checkpoint.tasks[variant.prompt_indices[0]].prompt).ids
    expected = greedy_generate(fold_decoder(ctx.checkpoint.backbone, variant.kept), [prompt], 10, eos_id=2)[0]
    assert og_generate(directory, genai_overlay(f"{variant.name}.onnx"), prompt, 10) == expected


def test_head_dim_model_is_not_claimed_for_optimum(wide_heads: tuple[ExportContext, Path]) -> None:
    """Optimum sizes the empty KV cache with hidden_size // heads (8 here, not 16): the manifest must not list it,
    and this test notices if an Optimum release starts loading such models."""
    from optimum.onnxruntime import ORTModelForCausalLM

    ctx, directory = wide_heads
    assert "optimum" not in ctx.emitted["onnx"].clients
    model = ORTModelForCausalLM.from_pretrained(directory, file_name=f"{ctx.variants[0].name}.onnx")
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):
        model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False)


def test_dequantized_reference_unties_the_lm_head(qwen2_export: ExportContext) -> None:
    backbone = qwen2_export.checkpoint.backbone
    reference = dequantized(fold_decoder(backbone, qwen2_export.variants[0].kept), "int4")
    assert torch.equal(reference.model.embed_tokens.weight, backbone.model.embed_tokens.weight)
    assert not torch.equal(reference.lm_head.weight, backbone.lm_head.weight)
    assert backbone.lm_head.weight is backbone.model.embed_tokens.weight  # the checkpoint's model is untouched


def test_layer_dequantizer_equals_the_dequantized_copy_and_gives_the_model_back(qwen2_export: ExportContext) -> None:
    """Validation's reference of a quantized export (each module's own weights swapped for the dequantized ones while
    it runs, tied lm_head included; fp32, fp64 and the own-weights stream in lockstep) computes exactly what a
    dequantized fold does, and gives the model back as it was (tie included): the checkpoint's backbone is the dense
    model's reference, with no twin folded for it."""
    backbone, kept = qwen2_export.checkpoint.backbone, qwen2_export.variants[0].kept
    ids = torch.tensor([[1, 5, 6, 7, 3]])
    folded = fold_decoder(backbone, kept)
    before = dict(folded.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        expected = dequantized(fold_decoder(backbone, kept), "int4")(ids)[0].numpy()
        fp32 = folded(ids)[0].numpy()
        prompt_fp32 = folded(ids[:, :3])[0].numpy()  # the fp32 figure's member runs the first 3 columns
    (run,) = reference_runs(folded, [reference_members(ids, torch.ones_like(ids), "int4", figure_width=3)], "int4")
    np.testing.assert_array_equal(run.ref32, expected)
    np.testing.assert_array_equal(run.fp32, prompt_fp32)
    assert not np.array_equal(run.ref32, fp32)
    assert run.ref64.dtype == np.float64 and np.abs(run.ref64 - expected).max() < 1e-4 * np.abs(expected).max()
    after = dict(folded.named_parameters(remove_duplicate=False))
    assert after.keys() == before.keys() and all(after[n] is p for n, p in before.items())
    assert folded.lm_head.weight is folded.model.embed_tokens.weight


def test_multi_model_references_equal_each_model_run_alone(qwen2_export: ExportContext) -> None:
    """Validation runs every model's reference together a layer at a time (each variant's FFN slices gathered from the
    dense layer as it runs; attention and lm_head dequantized once for all, every model's attention rows projected in
    one product): each model's logits must equal its own fold run alone, on its own tokens and padding, in every
    stream (int4, float64, the fp32 figure) but for rounding: a product over more rows may take another kernel,
    whose sums round differently (within 1e-6 of the logits' scale in float32, 1e-14 in float64; a wrong weight
    moves them by ~1e-1)."""
    backbone, variants = qwen2_export.checkpoint.backbone, qwen2_export.variants[:2]
    ids = [torch.tensor([[0, 0, 5, 6, 7], [1, 5, 6, 7, 3]]), torch.tensor([[2, 9, 4]]), torch.tensor([[8, 8, 1, 3]])]
    kept = [None, variants[0].kept, variants[1].kept]
    masks = [(i != 0).long() for i in ids]
    models = [reference_members(i, m, "int4", k, i.shape[1] - 1) for i, m, k in zip(ids, masks, kept, strict=True)]
    together = list(reference_runs(backbone, models, "int4"))
    for i, m, k, run in zip(ids, masks, kept, together, strict=True):
        model = backbone if k is None else fold_decoder(backbone, k)
        (alone,) = reference_runs(model, [reference_members(i, m, "int4", figure_width=i.shape[1] - 1)], "int4")
        for got, expected, tolerance in (
            (run.ref32, alone.ref32, 1e-6),
            (run.fp32, alone.fp32, 1e-6),
            (run.ref64, alone.ref64, 1e-14),
        ):
            assert got.dtype == expected.dtype and relative_difference(got, expected) <= tolerance
    assert not np.array_equal(together[1].ref32[0, :3], together[2].ref32[0, :3])  # the variants' own FFNs differ


def test_runtime_generates_on_an_int4_export(tmp_path: Path) -> None:
    """The reference runtime (shared uint8 blocks memory-mapped and resident) on an int4 export equals PyTorch on
    the same dequantized weights, for every variant."""
    ctx = run_export(make_checkpoint(tmp_path), tmp_path / "out", passes=onnx_passes(), quantize="int4")
    runtime = Runtime(ctx.workdir, threads=1)
    ckpt = ctx.checkpoint
    for variant in ctx.variants:
        prompt = ckpt.tasks[variant.prompt_indices[0]].prompt
        reference = dequantized(fold_decoder(ckpt.backbone, variant.kept), "int4")
        expected = greedy_generate(reference, [ckpt.tokenizer.encode(prompt).ids], 12, eos_id=2)[0]
        assert list(runtime.generate(prompt, variant=variant.name, max_new_tokens=12)) == expected, variant.name


@pytest.mark.parametrize("ids", [{"eos_token_id": [2, 3]}, {"bos_token_id": 1, "eos_token_id": 4, "pad_token_id": 0}])
def test_og_parses_genai_config_without_bos_or_with_several_eos(ids: dict, tmp_path: Path) -> None:
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai not installed (pip install .[test])")
    cfg = DecoderConfig(vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, **ids)  # fmt: skip
    write_genai_config(tmp_path, tmp_path / "dense.onnx", cfg, True, generation_config(cfg, {}))
    og.Config(str(tmp_path))  # parses (the model itself loads lazily, in og.Model)
    assert json.loads((tmp_path / GENAI_CONFIG).read_text())["model"]["pad_token_id"] == (
        0 if "pad_token_id" in ids else 2
    )
