"""Weight-only quantization of the ONNX target and the per-prompt dynamic mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from ifp_export.checkpoint import PREDICTOR_DIR
from ifp_export.errors import IFPError
from ifp_export.generate import greedy_generate
from ifp_export.masks import encode_prompts
from ifp_export.model.softtopk import hard_topk_mask
from ifp_export.pipeline import ExportContext
from ifp_export.runtime import Runtime, top_k_indices
from ifp_export.targets.onnx import DENSE_NAME, SHARED_DATA, emit, external_data_files, validate, validation_inputs


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request: pytest.FixtureRequest, tiny_export: ExportContext, tmp_path_factory: pytest.TempPathFactory):
    ctx = tiny_export
    directory = tmp_path_factory.mktemp(request.param) / "onnx"
    masks = torch.stack([v.mask for v in ctx.variants])
    kept = {v.name: v.kept.numpy() for v in ctx.variants}
    artifacts = emit(
        directory, ctx.checkpoint.weights, kept, ctx.checkpoint.root / PREDICTOR_DIR, masks, quantize=request.param
    )
    return request.param, artifacts


def test_quantized_models_pass_their_tolerance(quantized, tiny_export: ExportContext) -> None:
    mode, artifacts = quantized
    rows, routing = validate(artifacts, **validation_inputs(tiny_export))
    for row in rows:
        assert row.quantize == mode
        assert row.ok, row  # tight parity with PyTorch on the same dequantized weights
        # the shipped graph (int8 activations) vs the same weights, once per graph: later variants share the first's
        assert (row.shipped_prefill_diff is None) == (row.same_graph_as is not None)
        if row.model == f"{DENSE_NAME}.onnx":  # the figure against the fp32 model is the dense model's
            assert row.fp32_prefill_diff > 0  # really quantized: not bit-equal to fp32 (reported as quality)
            assert 0.0 <= row.fp32_top1_agreement <= 1.0
        else:
            assert row.fp32_prefill_diff is None
        assert {c.name for c in row.checks} == {"uncached", "cached"}  # every position, cached and not, gated
    assert all(check.ok for check in routing)


def test_quantized_graphs_use_the_runtime_kernels(quantized) -> None:
    """Every linear is MatMulNBits; at the default floor (1.20) with 4 bits: int8 has no 8-bit CPU kernel before
    onnxruntime 1.22, so each int8 linear is two 4-bit MatMulNBits over its blocks' high and low nibbles."""
    mode, artifacts = quantized
    nodes = onnx.load(str(artifacts.models["add"]), load_external_data=False).graph.node
    nbits = [node for node in nodes if node.op_type == "MatMulNBits"]
    bits = {attr.i for node in nbits for attr in node.attribute if attr.name == "bits"}
    assert bits == {4}
    assert not [node for node in nodes if node.op_type in ("MatMul", "FusedMatMul") and "." in node.input[1]]
    names = sorted(node.input[1].rsplit(".", 1)[-1] for node in nbits)
    assert set(names) == ({"qh", "ql"} if mode == "int8" else {"q"})


def test_int8_at_floor_1_22_uses_matmulnbits(tiny_export: ExportContext, tmp_path: Path) -> None:
    ctx = tiny_export
    masks = torch.stack([v.mask for v in ctx.variants])
    kept = {v.name: v.kept.numpy() for v in ctx.variants}
    predictor = ctx.checkpoint.root / PREDICTOR_DIR
    artifacts = emit(tmp_path / "onnx", ctx.checkpoint.weights, kept, predictor, masks, "int8", min_onnxruntime="1.22")
    nodes = onnx.load(str(artifacts.models["add"]), load_external_data=False).graph.node
    bits = {attr.i for node in nodes if node.op_type == "MatMulNBits" for attr in node.attribute if attr.name == "bits"}
    assert bits == {8}
    rows, _ = validate(artifacts, **validation_inputs(ctx))
    assert all(row.ok for row in rows), rows


def test_quantized_shared_weights_are_stored_once(quantized, tiny_export: ExportContext) -> None:
    mode, artifacts = quantized
    fp32 = tiny_export.emitted["onnx"]
    assert data_bytes(artifacts.directory) < (0.45 if mode == "int8" else 0.35) * data_bytes(fp32.directory)
    for name, path in artifacts.models.items():  # tiny int8 FFN slices are below the external-data threshold
        assert SHARED_DATA in external_data_files(path), name
        assert set(external_data_files(path)) <= {SHARED_DATA, f"{name}.onnx_data"}, name
    shared = (artifacts.directory / SHARED_DATA).stat().st_size
    own = [
        p.stat().st_size for v in tiny_export.variants if (p := artifacts.directory / f"{v.name}.onnx_data").exists()
    ]
    assert shared > max(own, default=0)  # attention, embeddings, lm_head live in the shared file


def data_bytes(directory: Path) -> int:
    """Decoder weight bytes (graphs excluded: at this tiny size they outweigh the weights)."""
    return sum(p.stat().st_size for p in directory.glob("*.onnx_data") if not p.name.startswith("predictor"))


def test_dynamic_logits_equal_masked_full_model(dynamic_export: ExportContext) -> None:
    ctx = dynamic_export
    ckpt = ctx.checkpoint
    runtime = Runtime(ctx.workdir, threads=1)
    dynamic = ctx.report["onnx_validation"]["dynamic"]  # prefill and cached decode steps, every position
    assert dynamic["ok"] and dynamic["error"] <= dynamic["bound"] and dynamic["positions"] > len(ckpt.tasks[0].prompt)
    for task_prompt in ckpt.tasks:
        prompt = task_prompt.prompt
        ids, mask, _ = encode_prompts(ckpt.tokenizer, [prompt], ckpt.predictor.config.max_length)
        with torch.no_grad():
            neuron_mask = hard_topk_mask(ckpt.predictor(ids, mask)[0], ctx.k_per_layer[0])
        kept = top_k_indices(runtime.predict(prompt).scores, ctx.k_per_layer[0])
        assert np.array_equal(kept, torch.stack([r.nonzero().flatten() for r in neuron_mask]).numpy())
        decoder = runtime.dynamic_decoder(prompt)
        tokens = torch.tensor([ckpt.tokenizer.encode(prompt).ids])
        with torch.no_grad():
            expected, _ = ckpt.backbone(tokens, ffn_masks=neuron_mask)
        got, _ = decoder(
            tokens.numpy(), np.ones_like(tokens.numpy()), np.arange(tokens.shape[1])[None], decoder.empty_cache(1)
        )
        assert float(np.abs(got - expected.numpy()).max()) <= 1e-5, prompt


def test_dynamic_generation_matches_pytorch(dynamic_export: ExportContext) -> None:
    ctx = dynamic_export
    ckpt = ctx.checkpoint
    runtime = Runtime(ctx.workdir, threads=1)
    prompt = ckpt.tasks[0].prompt
    ids, mask, _ = encode_prompts(ckpt.tokenizer, [prompt], ckpt.predictor.config.max_length)
    with torch.no_grad():
        neuron_mask = hard_topk_mask(ckpt.predictor(ids, mask)[0], ctx.k_per_layer[0])
    expected = greedy_generate(ckpt.backbone, [ckpt.tokenizer.encode(prompt).ids], 12, 2, neuron_mask)[0]
    assert list(runtime.generate(prompt, max_new_tokens=12, dynamic=True)) == expected


def test_static_export_has_no_dynamic_decoder(tiny_export: ExportContext) -> None:
    with pytest.raises(IFPError, match="export with --mode dynamic"):
        Runtime(tiny_export.workdir, threads=1).dynamic_decoder("add 1+1=")
    assert not Path(tiny_export.workdir / "onnx" / "dynamic.onnx").exists()


def test_interleaved_dynamic_generations_keep_their_own_ffn_weights(dynamic_export: ExportContext) -> None:
    """27.2: a second prompt's dynamic decoder, made while the first is still decoding, leaves the first one's FFN
    weights alone (logits equal to the first prompt run alone, bitwise)."""
    ckpt = dynamic_export.checkpoint
    runtime = Runtime(dynamic_export.workdir, threads=1)
    first, second = ckpt.tasks[0].prompt, ckpt.tasks[-1].prompt
    k = dynamic_export.k_per_layer[0]
    assert not np.array_equal(
        top_k_indices(runtime.predict(first).scores, k), top_k_indices(runtime.predict(second).scores, k)
    )
    tokens = np.asarray([ckpt.tokenizer.encode(first).ids])

    def prefill(decoder: object) -> np.ndarray:
        return decoder(tokens, np.ones_like(tokens), np.arange(tokens.shape[1])[None], decoder.empty_cache(1))[0]

    alone = prefill(runtime.dynamic_decoder(first))
    decoder = runtime.dynamic_decoder(first)
    runtime.dynamic_decoder(second)  # another generation starts meanwhile
    assert np.array_equal(prefill(decoder), alone)

    expected = list(runtime.generate(first, max_new_tokens=8, dynamic=True))
    generation = runtime.generate(first, max_new_tokens=8, dynamic=True)
    started = [next(generation)]
    other = runtime.generate(second, max_new_tokens=8, dynamic=True)
    next(other)
    assert started + list(generation) == expected
