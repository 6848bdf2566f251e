"""`--quantize int8|int4` on the Core ML target (structural: Core ML cannot predict on Linux).

One small-but-not-tiny model (hidden 512, d_ff 2048, 1 layer, 2 variants + dense; ~8 MB of fp16 weights), where
the weights outweigh the per-function program description, so sizes and dedup ratios measure weights. The
variants keep 496 neurons (not a multiple of 32), so int4 covers both granularities: block-wise (32 input
channels per scale) and the per-output-channel fallback of the pruned `down_proj`.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_rows_checked_as_dense_rows
from rich.console import Console

from ifp_export.fold import fold_decoder, kept_indices
from ifp_export.model.config import DecoderConfig
from ifp_export.model.decoder import CausalLM
from ifp_export.model.predictor import PredictorConfig, SparsityPredictor
from ifp_export.model.softtopk import hard_topk_mask
from ifp_export.targets import coreml
from ifp_export.targets.onnx import DENSE_NAME, weight_bytes
from ifp_export.weights import ModuleWeights

LAYERS, D_FF, KEEP = 1, 2048, 496


@pytest.fixture(scope="module")
def models() -> tuple[CausalLM, dict[str, CausalLM], SparsityPredictor, torch.Tensor]:
    torch.manual_seed(0)
    cfg = DecoderConfig(
        vocab_size=64,
        hidden_size=512,
        intermediate_size=D_FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=64,
    )
    dense = CausalLM(cfg).eval()
    with torch.no_grad():  # random norm weights: stored as fp16 blobs (all-ones would be folded away)
        for name, param in dense.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    predictor = SparsityPredictor(PredictorConfig(vocab_size=64, target_layers=LAYERS, target_intermediate_size=D_FF))
    masks = torch.stack([hard_topk_mask(torch.randn(LAYERS, D_FF), torch.tensor(KEEP)) for _ in range(2)])
    folded = {f"v{i}": fold_decoder(dense, kept_indices(m)) for i, m in enumerate(masks)}
    return dense, folded, predictor.eval(), masks


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request: pytest.FixtureRequest, models, tmp_path_factory: pytest.TempPathFactory):
    dense, _, predictor, masks = models
    directory = tmp_path_factory.mktemp(request.param) / "coreml"
    art = coreml.emit(directory, ModuleWeights(dense), kept(masks), predictor, masks, quantize=request.param)
    return request.param, art


def kept(masks: torch.Tensor) -> dict[str, np.ndarray]:
    return {f"v{i}": kept_indices(m).numpy() for i, m in enumerate(masks)}


def references(models) -> dict[str, CausalLM]:
    dense, folded, _, _ = models
    return {**folded, DENSE_NAME: dense}


def check(art: coreml.CoreMLArtifacts, models) -> list[coreml.FunctionCheck]:
    """Every function against its own fold, every weight compared with PyTorch."""
    return coreml.check_decoder_package(art, references(models).__getitem__)


def check_by_rows(art: coreml.CoreMLArtifacts, models) -> list[coreml.FunctionCheck]:
    """As validation runs it: the variants' gate/up checked against the dense function's rows (`DenseRows`)."""
    dense, _, _, masks = models
    return coreml.check_decoder_package(art, coreml.FunctionReferences(dense, kept(masks)))


def fp16_ideal(models) -> int:
    """Shared weights once + every function's FFN slices, fp16 (the unquantized package's weights)."""
    dense, folded, _, _ = models
    shared, dense_ffn = weight_bytes(dense)
    return (shared + dense_ffn + sum(weight_bytes(m)[1] for m in folded.values())) // 2


def test_validation_passes_under_the_mode_tolerance(quantized, models) -> None:
    mode, art = quantized
    assert art.quantize == mode  # what the manifest records as quantization.coreml
    rows = check(art, models)
    for row in rows:
        assert row.ok, row
        assert row.quantize == mode
        assert row.quantized_tensors == row.tensors_checked - 2 * LAYERS - 1  # all but the norm weights
        assert row.ffn_tensors_checked == 3 * LAYERS
        assert 0.2 < row.bound_ratio <= 1.0  # really quantized, within half a step
    _, _, predictor, masks = models
    predictor_row = coreml.check_predictor_package(art, predictor, masks)
    assert predictor_row.ok and predictor_row.fp16_exact and predictor_row.max_abs_diff == 0  # fp32, untouched
    console = Console(file=io.StringIO(), width=250)
    console.print(coreml.validation_table(rows, predictor_row, art))
    text = console.file.getvalue()
    assert f"{mode} weights" in text and "x bound ok" in text


def test_quantization_ops_cover_every_linear_and_ffn_weight(quantized, models) -> None:
    mode, art = quantized
    spec = coreml.coremltools().utils.load_spec(str(art.decoder))
    weights = coreml.package_weights_path(art.decoder).read_bytes()
    for name, model in references(models).items():
        refs = coreml.function_quantized(spec, name)
        two_d = [n for n, t in model.state_dict().items() if t.dim() == 2]
        assert len(two_d) == 1 + 7 * LAYERS + 1  # embeddings, q/k/v/o + FFN per layer, lm_head (untied)
        for param in two_d:
            ref = refs[coreml.const_name(param) + coreml.QUANTIZED_SUFFIX]
            data = coreml.read_blob(weights, ref.data)
            scale = coreml.read_blob(weights, ref.scale)
            assert data.dtype == np.int8 and scale.dtype == np.float16 and ref.offset is None  # symmetric
            if mode == "int8":
                assert scale.shape == (data.shape[0], 1)  # per output channel
                assert np.abs(data).max() > 7
            else:
                assert data.min() >= -8 and data.max() <= 7
                blocks = coreml.INT4_BLOCK_SIZE if data.shape[1] % coreml.INT4_BLOCK_SIZE == 0 else data.shape[1]
                assert scale.shape == (data.shape[0], data.shape[1] // blocks), (name, param)
        assert not {n for n in coreml.function_blobs(spec, name) if n.endswith("_weight_to_fp16") and "norm" not in n}
    if mode == "int4":  # both granularities are exercised: dense down_proj block-wise, pruned down_proj per channel
        down = coreml.const_name("model.layers.0.mlp.down_proj.weight") + coreml.QUANTIZED_SUFFIX
        shapes = {
            n: coreml.read_blob(weights, coreml.function_quantized(spec, n)[down].scale).shape for n in art.functions
        }
        assert shapes == {"v0": (512, 1), "v1": (512, 1), DENSE_NAME: (512, D_FF // coreml.INT4_BLOCK_SIZE)}


def test_quantized_package_is_smaller_and_shared_weights_stored_once(quantized, models) -> None:
    """weight.bin vs the fp16 ideal (shared once + every function's FFN slices); the dedup ratio against the
    honest ideal: every distinct quantized blob (data, scales, fp16 norms) once, counted from the program."""
    mode, art = quantized
    fp16 = fp16_ideal(models)
    assert art.weights_bytes < (0.55 if mode == "int8" else 0.32) * fp16, (art.weights_bytes, fp16)
    assert art.disk_bytes < (0.6 if mode == "int8" else 0.4) * fp16
    assert art.weights_bytes <= 1.01 * art.ideal_bytes  # weight.bin: distinct blobs + 64-byte blob headers only
    assert art.dedup_ratio <= 1.05, (art.disk_bytes, art.ideal_bytes)  # + ~0.1 MB of program description
    assert coreml.distinct_blob_bytes([art.decoder]) == art.ideal_bytes  # no blob stored twice after the merge
    spec = coreml.coremltools().utils.load_spec(str(art.decoder))
    quantized_refs = {name: coreml.function_quantized(spec, name) for name in art.functions}
    offsets = {
        name: {n: (r.data.offset, r.scale.offset) for n, r in refs.items() if "_mlp_" not in n}
        for name, refs in quantized_refs.items()
    }
    first = offsets[art.functions[0]]
    assert any("self_attn_q_proj" in n for n in first) and any("embed_tokens" in n for n in first)
    for name in art.functions:
        assert offsets[name] == first, name  # shared weights: the same data and scale blobs in every function
    ffn = {r.data.offset for refs in quantized_refs.values() for n, r in refs.items() if "_mlp_" in n}
    assert len(ffn) == 3 * LAYERS * len(art.functions)  # FFN slices of different masks differ


def test_tampered_quantized_weight_fails_validation(quantized, models, tmp_path: Path) -> None:
    mode, art = quantized
    copy = tmp_path / "coreml"
    shutil.copytree(art.directory, copy)
    package = copy / coreml.DECODER_PACKAGE
    spec = coreml.coremltools().utils.load_spec(str(package))
    name = art.functions[1]
    qname = coreml.const_name("model.layers.0.mlp.up_proj.weight") + coreml.QUANTIZED_SUFFIX
    ref = coreml.function_quantized(spec, name)[qname]
    path = coreml.package_weights_path(package)
    data = bytearray(path.read_bytes())
    _, start, _ = coreml.blob_data_range(data, ref.data.offset)
    data[start] ^= 0x44  # int8: +-68 steps; int4: the high nibble of two values, +-4 steps
    path.write_bytes(bytes(data))
    tampered = coreml.open_artifacts(copy, models[0].config.max_position_embeddings, list(models[1]), mode)
    assert tampered.ideal_bytes == art.ideal_bytes
    for checked in (check, check_by_rows):  # by rows: its bytes differ from the dense rows, so compared in full
        rows = {r.function: r for r in checked(tampered, models)}
        assert not rows[name].ok and rows[name].bound_ratio > 1, checked
        assert all(r.ok for f, r in rows.items() if f != name)


def test_variant_gate_up_checked_as_dense_rows_give_the_full_figures(quantized, models, monkeypatch) -> None:
    """A variant's gate/up are the dense function's rows of its kept neurons, byte for byte (quantized along the
    row): checked that way, never gathered nor compared again, the figures equal the full check's."""
    _, art = quantized
    dense, _, _, masks = models
    assert_rows_checked_as_dense_rows(art, references(models).__getitem__, dense, kept(masks), monkeypatch)


def test_quantized_emit_is_reproducible(quantized, models, tmp_path: Path) -> None:
    mode, art = quantized
    if mode != "int4":
        pytest.skip("one mode is enough to show reproducibility (each emit takes ~10 s)")
    dense, _, predictor, masks = models
    again = coreml.emit(tmp_path / "coreml", ModuleWeights(dense), kept(masks), predictor, masks, quantize=mode)

    def digests(root: Path) -> dict[str, str]:
        files = sorted(p for p in root.rglob("*") if p.is_file())
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    assert digests(again.directory) == digests(art.directory)


def test_unknown_mode_is_refused(models, tmp_path: Path) -> None:
    dense, _, predictor, masks = models
    with pytest.raises(ValueError, match="quantize"):
        coreml.emit(tmp_path / "coreml", ModuleWeights(dense), kept(masks), predictor, masks, quantize="int2")
    assert not (tmp_path / "coreml").exists()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_weight_gives_coremltools_bits(mode: str) -> None:
    """Our torch quantizer is coremltools' `compute_qparams_by_dtype` (what its `linear_quantize_weights` pass
    calls) bit for bit: data and fp16 scales, on normal weights, a row with an outlier, an all-zero row and block,
    and a width that is not a multiple of the int4 block (one scale per row); 150 rows: chunks of rows, the last one
    partial; and a bf16 torch weight as stored, upcast chunk by chunk."""
    from coremltools.optimize._utils import compute_qparams_by_dtype

    from ifp_export.targets.coreml.quantize import DTYPES, block_sizes, quantize_weight

    rng = np.random.default_rng(0)
    for shape in [(48, 96), (16, 40), (150, 64)]:
        weight = rng.normal(0, 0.02, shape).astype(np.float32)
        weight[1, 3] = 7.5  # an outlier
        weight[2] = 0.0  # an all-zero row
        weight[3, :32] = 0.0  # an all-zero block
        expected_data, expected_scale, _ = compute_qparams_by_dtype(
            weight, DTYPES[mode], "LINEAR_SYMMETRIC", block_sizes(mode, shape[1])
        )
        got = quantize_weight(weight, mode)
        assert got.data.dtype == expected_data.dtype and got.data.dtype.metadata == expected_data.dtype.metadata
        np.testing.assert_array_equal(got.data, expected_data)
        np.testing.assert_array_equal(got.scale, expected_scale.astype(np.float16))
    stored = torch.from_numpy(weight).to(torch.bfloat16)
    expected = quantize_weight(stored.float().numpy(), mode)
    got = quantize_weight(stored, mode)
    np.testing.assert_array_equal(got.data, expected.data)
    np.testing.assert_array_equal(got.scale, expected.scale)
