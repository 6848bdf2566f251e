"""Core ML target: one multifunction decoder package (a function per variant + dense, stateful KV cache) and the
predictor package, checked structurally from the spec and by reading the weights back from weight.bin. Core ML
cannot predict on Linux: the program's fp16 norm/RoPE arithmetic is emulated in tests/test_coreml_numerics.py,
and the Core ML prediction parity test runs only on macOS."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_rows_checked_as_dense_rows
from tiny import make_checkpoint, run_export

from ifp_export.cli import bundled_sample
from ifp_export.fold import fold_decoder, kept_indices
from ifp_export.model.config import DecoderConfig
from ifp_export.model.decoder import CausalLM
from ifp_export.model.predictor import PredictorConfig, SparsityPredictor
from ifp_export.model.softtopk import hard_topk_mask
from ifp_export.pipeline import ExportContext
from ifp_export.targets import coreml
from ifp_export.targets.coreml import numerics
from ifp_export.targets.onnx import DENSE_NAME, weight_bytes
from ifp_export.weights import ModuleWeights, is_ffn

PARAMS = ["llama", "qwen2", "sample"]


@pytest.fixture(scope="module", params=PARAMS)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ExportContext:
    """Load → fold, then the Core ML emit and validate steps (the ONNX target has its own tests)."""
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "sample":
        if not (bundled_sample() / "ifp.json").is_file():
            pytest.skip("the bundled sample checkpoint (samples/checkpoint) has not been trained yet")
        checkpoint = bundled_sample()
    elif request.param == "qwen2":
        checkpoint = make_checkpoint(root, keep=0.25, model_type="qwen2", tie_word_embeddings=False)
    else:
        checkpoint = make_checkpoint(root, keep=0.25, tie_word_embeddings=True)
    ctx = run_export(checkpoint, root / "out", until="fold")
    ctx = coreml.EmitCoreMLPass().run(ctx)
    coreml.validate_export(ctx)
    return ctx


def artifacts(ctx: ExportContext) -> coreml.CoreMLArtifacts:
    return ctx.emitted["coreml"]


def kept(ctx: ExportContext) -> dict[str, np.ndarray]:
    return {v.name: v.kept.numpy() for v in ctx.variants}


def references(ctx: ExportContext) -> dict[str, CausalLM]:
    """Every function's reference (the tiny test models only; the target itself folds one at a time)."""
    reference = coreml.FunctionReferences(ctx.checkpoint.backbone, kept(ctx))
    return {name: reference(name) for name in artifacts(ctx).functions}


def ffn_params(model: CausalLM) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.state_dict().items() if is_ffn(n)}


def test_one_function_per_variant_plus_dense(exported: ExportContext) -> None:
    art = artifacts(exported)
    spec = coreml.coremltools().utils.load_spec(str(art.decoder))
    names = [v.name for v in exported.variants]
    assert [f.name for f in spec.description.functions] == [*names, DENSE_NAME]
    assert sorted(spec.mlProgram.functions) == sorted([*names, DENSE_NAME])
    masks = torch.stack([v.mask for v in exported.variants])
    default = coreml.most_general(names, masks, exported.predictions.masks)
    assert spec.description.defaultFunctionName == art.default_function == default
    assert spec.specificationVersion >= 9  # iOS 18: states and multifunction
    assert sorted(p.name for p in art.directory.iterdir()) == [coreml.DECODER_PACKAGE, coreml.PREDICTOR_PACKAGE]


def test_io_states_and_dtypes(exported: ExportContext) -> None:
    art = artifacts(exported)
    cfg = exported.checkpoint.backbone.config
    n = art.max_context
    assert n == min(cfg.max_position_embeddings, coreml.MAX_CONTEXT)
    report = exported.report["coreml_validation"]
    assert all(row["ok"] for row in report["functions"]), report
    spec = coreml.coremltools().utils.load_spec(str(art.decoder))
    for function in spec.description.functions:
        assert [coreml.feature_signature(f) for f in function.input] == [
            ("inputIds", "multiArrayType", f"INT32[1, 1..{n}]"),
            ("causalMask", "multiArrayType", f"FLOAT16[1, 1, 1..{n}, 1..{n}]"),
        ]
        assert [coreml.feature_signature(f) for f in function.output] == [("logits", "multiArrayType", "FLOAT16[?]")]
        cache = f"FLOAT16[{cfg.num_hidden_layers}, 1, {cfg.num_key_value_heads}, {n}, {cfg.head_dim}]"
        assert [coreml.feature_signature(f) for f in function.state] == [
            ("keyCache", "stateType", cache),
            ("valueCache", "stateType", cache),
        ]
    ops = {op.type for f in spec.mlProgram.functions.values() for op in f.block_specializations[f.opset].operations}
    assert {"read_state", "write_state", "slice_update", "scaled_dot_product_attention"} <= ops  # in-place cache
    predictor = coreml.coremltools().utils.load_spec(str(art.predictor)).description
    pcfg = exported.checkpoint.predictor.config
    assert [coreml.feature_signature(f) for f in predictor.input] == [
        ("input_ids", "multiArrayType", f"INT32[1, 1..{pcfg.max_length}]"),
        ("attention_mask", "multiArrayType", f"INT32[1, 1..{pcfg.max_length}]"),
    ]
    assert [f.name for f in predictor.output] == ["scores", "variant_scores"]
    assert not predictor.state


def test_ffn_weights_read_back_equal_folded_weights(exported: ExportContext) -> None:
    """Read every function's FFN tensors from weight.bin at the blob offsets of its spec: equal to the fp16
    rounding of the folded PyTorch weights (so within fp16 rounding of the fp32 ones)."""
    art = artifacts(exported)
    spec = coreml.coremltools().utils.load_spec(str(art.decoder))
    weights = coreml.package_weights_path(art.decoder).read_bytes()
    for name, model in references(exported).items():
        blobs = coreml.function_blobs(spec, name)
        params = ffn_params(model)
        assert len(params) == 3 * model.config.num_hidden_layers
        for param, tensor in params.items():
            stored = coreml.read_blob(weights, blobs[coreml.const_name(param)])
            assert stored.dtype == np.float16 and stored.shape == tuple(tensor.shape)
            assert np.array_equal(stored, tensor.numpy().astype(np.float16)), (name, param)
            ulp = np.abs(tensor.numpy()) * 2.0**-11 + 2.0**-24
            assert (np.abs(stored.astype(np.float32) - tensor.numpy()) <= ulp).all()


def test_shared_weights_are_stored_once(exported: ExportContext) -> None:
    """Every function points at the same blob for a shared tensor; FFN slices share a blob only when equal."""
    art = artifacts(exported)
    spec = coreml.coremltools().utils.load_spec(str(art.decoder))
    blobs = {name: coreml.function_blobs(spec, name) for name in art.functions}
    shared = {  # the model's own tensors and the RoPE tables
        name: {n: r.offset for n, r in refs.items() if (n.startswith("model_") or "rope" in n) and "_mlp_" not in n}
        for name, refs in blobs.items()
    }
    first = shared[art.functions[0]]
    assert any("self_attn_q_proj_weight" in n for n in first)
    for name in art.functions:
        assert shared[name] == first, name
    by_offset: dict[int, list[np.ndarray]] = {}
    for name, model in references(exported).items():
        for param, tensor in ffn_params(model).items():
            offset = blobs[name][coreml.const_name(param)].offset
            by_offset.setdefault(offset, []).append(tensor.numpy().astype(np.float16))
    for tensors in by_offset.values():  # two variants keeping the same neurons in a layer may share a slice
        assert all(np.array_equal(t, tensors[0]) for t in tensors[1:])
    assert len(by_offset) > 3 * exported.checkpoint.backbone.config.num_hidden_layers


def test_variant_gate_up_checked_as_dense_rows_give_the_full_figures(exported: ExportContext, monkeypatch) -> None:
    """fp16: a variant's gate/up blobs are the dense function's rows of its kept neurons, byte for byte: checked that
    way, never gathered, the figures equal those of comparing every weight."""
    full = references(exported).__getitem__
    dense = exported.checkpoint.backbone
    assert_rows_checked_as_dense_rows(artifacts(exported), full, dense, kept(exported), monkeypatch)


@pytest.mark.parametrize("projection", ["down_proj", "gate_proj"])
def test_tampered_ffn_weight_fails_validation(exported: ExportContext, tmp_path: Path, projection: str) -> None:
    art = artifacts(exported)
    copy = tmp_path / "coreml"
    shutil.copytree(art.directory, copy)
    spec = coreml.coremltools().utils.load_spec(str(copy / coreml.DECODER_PACKAGE))
    name = art.functions[1]
    ref = coreml.function_blobs(spec, name)[coreml.const_name(f"model.layers.0.mlp.{projection}.weight")]
    path = coreml.package_weights_path(copy / coreml.DECODER_PACKAGE)
    data = bytearray(path.read_bytes())
    _, start, size = coreml.blob_data_range(data, ref.offset)
    values = np.frombuffer(bytes(data[start : start + size]), dtype="<f2") * np.float16(1.5)
    data[start : start + size] = values.astype("<f2").tobytes()
    path.write_bytes(bytes(data))
    names = [v.name for v in exported.variants]
    tampered = coreml.open_artifacts(copy, exported.checkpoint.backbone.config.max_position_embeddings, names)
    reference = coreml.FunctionReferences(exported.checkpoint.backbone, kept(exported))
    rows = {r.function: r for r in coreml.check_decoder_package(tampered, reference)}
    assert not rows[name].ok
    assert all(r.ok for f, r in rows.items() if f != name)


def test_norm_and_rope_structure_is_checked(exported: ExportContext, tmp_path: Path) -> None:
    """Validation ties the package to the numerics emulation: the max-scaled fp16 norms are found in every
    function and the stored RoPE table must equal the fp32 table rounded to fp16 (a shifted table fails)."""
    art = artifacts(exported)
    spec = coreml.coremltools().utils.load_spec(str(art.decoder))
    weights = coreml.package_weights_path(art.decoder).read_bytes()
    cfg = exported.checkpoint.backbone.config
    for name in art.functions:
        assert numerics.check_numerics(spec, name, weights, cfg, art.max_context) == []
    copy = tmp_path / "coreml"
    shutil.copytree(art.directory, copy)
    path = coreml.package_weights_path(copy / coreml.DECODER_PACKAGE)
    data = bytearray(path.read_bytes())
    _, start, size = coreml.blob_data_range(data, coreml.function_blobs(spec, name)["rope_cos_table"].offset)
    table = np.frombuffer(bytes(data[start : start + size]), dtype="<f2").reshape(art.max_context, -1)
    data[start : start + size] = np.roll(table, 1, axis=0).tobytes()  # positions off by one
    path.write_bytes(bytes(data))
    names = [v.name for v in exported.variants]
    tampered = coreml.open_artifacts(copy, cfg.max_position_embeddings, names)
    rows = coreml.check_decoder_package(
        tampered, coreml.FunctionReferences(exported.checkpoint.backbone, kept(exported))
    )
    assert all(not r.ok and any("rope_cos_table" in m for m in r.missing) for r in rows)


def test_emit_is_reproducible(exported: ExportContext, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Same inputs, same bytes (Manifest.json UUIDs, the spec's map order and the conversion date normalized)."""
    if request.node.callspec.params["exported"] != "llama":
        pytest.skip("one model is enough to show reproducibility (each emit takes seconds)")
    ckpt = exported.checkpoint
    masks = torch.stack([v.mask for v in exported.variants])
    art = artifacts(exported)
    again = coreml.emit(tmp_path / "coreml", ckpt.weights, kept(exported), ckpt.predictor, masks, art.default_function)

    def digests(root: Path) -> dict[str, str]:
        files = sorted(p for p in root.rglob("*") if p.is_file())
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    assert digests(again.directory) == digests(art.directory)
    manifest = (art.decoder / "Manifest.json").read_text()
    assert coreml.CONVERSION_DATE_KEY not in str(coreml.coremltools().utils.load_spec(str(art.predictor)))
    assert "rootModelIdentifier" in manifest


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predicts only on macOS; coremltools on Linux converts")
def test_coreml_predictions_match_pytorch(exported: ExportContext) -> None:
    ckpt = exported.checkpoint
    prompt = ckpt.tokenizer.encode(ckpt.tasks[exported.variants[0].prompt_indices[0]].prompt).ids
    art = artifacts(exported)
    reference = coreml.FunctionReferences(exported.checkpoint.backbone, kept(exported))
    parity = coreml.coreml_parity(art.decoder, art.functions, reference, prompt, decode_steps=8)
    assert set(parity) == set(artifacts(exported).functions)
    assert all(check.ok for check in parity.values()), [check.text() for check in parity.values()]


def test_dedup_ratio_on_a_model_where_weights_dominate(tmp_path: Path) -> None:
    """P2 for Core ML: package bytes / (shared weights once + every function's FFN slices, fp16) <= 1.02.

    Measured on hidden 512 / d_ff 2048 (2 layers, 3 variants + dense, ~25 MB of fp16 weights): on the tiny test
    models the per-function program description (~65 KB of protobuf per 2-layer function) outweighs all their
    weights (~50 KB), so the ratio would measure the spec, not weight sharing.
    """
    torch.manual_seed(0)
    layers, d_ff = 2, 2048
    cfg = DecoderConfig(
        vocab_size=64,
        hidden_size=512,
        intermediate_size=d_ff,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=64,
    )
    dense = CausalLM(cfg).eval()
    predictor = SparsityPredictor(PredictorConfig(vocab_size=64, target_layers=layers, target_intermediate_size=d_ff))
    masks = torch.stack([hard_topk_mask(torch.randn(layers, d_ff), torch.tensor(d_ff // 4)) for _ in range(3)])
    indices = {f"v{i}": kept_indices(m).numpy() for i, m in enumerate(masks)}
    art = coreml.emit(tmp_path / "coreml", ModuleWeights(dense), indices, predictor.eval(), masks)
    shared, dense_ffn = weight_bytes(dense)  # fp32 bytes
    slices = sum(weight_bytes(fold_decoder(dense, torch.from_numpy(k)))[1] for k in indices.values())
    rope = 2 * coreml.context_length(cfg.max_position_embeddings) * cfg.head_dim * 2  # cos/sin tables, fp16
    ideal = (shared + dense_ffn + slices) // 2 + rope
    assert ideal > 20_000_000
    assert art.disk_bytes / ideal <= 1.02, (art.disk_bytes, ideal)
    assert art.dedup_ratio <= 1.02, (art.disk_bytes, art.ideal_bytes, art.dedup_ratio)
    rows = coreml.check_decoder_package(art, coreml.FunctionReferences(dense, indices))
    assert all(r.ok for r in rows)
