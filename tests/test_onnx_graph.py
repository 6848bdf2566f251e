"""The ONNX decoder graph built from the config (targets/onnx/build.py) against `transformers` and PyTorch.

Each model is built, bound to tiny random weights through `bind_lazy` + `ir.save` (external data, streamed),
checked with `onnx.checker` and run in ONNX Runtime with all optimizations, on a left-padded batch (prefill +
cached decode steps fed HF's greedy tokens).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from helpers import (
    LLAMA3_ROPE,
    hf_greedy_logits,
    left_padded_batch,
    make_hf_model,
    ort_quantize,
    ours_logits_for_tokens,
    positions_from_mask,
)

from ifp_export.errors import IFPError
from ifp_export.fold import fold_decoder, relative_difference
from ifp_export.model.config import DecoderConfig
from ifp_export.model.decoder import CausalLM
from ifp_export.targets.onnx.build import bind_lazy, build_decoder
from ifp_export.targets.onnx.ops import (
    Binding,
    dequantized_rows,
    dequantized_sources,
    fake_quantized_rows,
    materialize,
    quantize_rows,
)
from ifp_export.weights import ModuleWeights, ffn_slice, is_ffn

BOUND = 1e-4  # the project's relative bound: max |Δ| / max(1, max |reference|)
DECODE_STEPS = 4
LENGTHS = [9, 4]  # row 1 is left-padded by 5

CASES = {
    "llama": ("llama", {}),
    "mistral-sliding-window": ("mistral", {"sliding_window": 5, "head_dim": 8}),
    "qwen2-bias-tied": ("qwen2", {"tie_word_embeddings": True}),
    "llama-rope-llama3": ("llama", {"hidden_size": 64, "rope_scaling": LLAMA3_ROPE}),
    "llama-rope-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-head-dim-12-mha": ("llama", {"head_dim": 12, "num_key_value_heads": 4, "attention_bias": True}),
    # GroupQueryAttention needs head_dim % 16 == 0
    "qwen2-head-dim-16": ("qwen2", {"hidden_size": 64, "tie_word_embeddings": True}),
    "mistral-head-dim-16": ("mistral", {"hidden_size": 64, "sliding_window": 5}),
}


def hf_case(case: str):
    arch, overrides = CASES[case]
    hf = make_hf_model(arch, **overrides)
    return hf, DecoderConfig.from_hf_dict(hf.config.to_dict())


def state_getter(model: torch.nn.Module):
    state = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    return state.__getitem__


def ort_session(model: ir.Model, bindings: list[Binding], get, path: Path) -> ort.InferenceSession:
    bind_lazy(model, bindings, get)
    ir.save(model, path, external_data=path.name + ".data")
    onnx.checker.check_model(str(path), full_check=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_logits(
    session: ort.InferenceSession, cfg: DecoderConfig, ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor
) -> list[np.ndarray]:
    """Prefill + one fed token per step, like `ours_logits_for_tokens`, through the ONNX session."""
    names = {i.name for i in session.get_inputs()}
    empty = np.zeros((ids.shape[0], cfg.num_key_value_heads, 0, cfg.head_dim), np.float32)
    past = {f"past_key_values.{i}.{k}": empty for i in range(cfg.num_hidden_layers) for k in ("key", "value")}
    positions = positions_from_mask(mask)
    feed_ids, out = ids, []
    for step in range(tokens.shape[1] + 1):
        feed = {"input_ids": feed_ids.numpy(), "attention_mask": mask.numpy(), **past}
        if "position_ids" in names:
            feed["position_ids"] = positions.numpy()
        logits, *presents = session.run(None, feed)
        out.append(logits)
        past = dict(zip(past, presents, strict=True))
        if step < tokens.shape[1]:
            feed_ids = tokens[:, step : step + 1]
            mask = torch.cat((mask, torch.ones_like(feed_ids)), dim=1)
            positions = positions[:, -1:] + 1
    return out


def worst(actual: list[np.ndarray], expected: list[torch.Tensor], rows: slice = slice(None)) -> float:
    """Largest relative difference over all steps, on real (unpadded) prefill positions and every decode step."""
    return max(relative_difference(a[rows], e[rows].numpy()) for a, e in zip(actual, expected, strict=True))


def prefill_masked(actual: list[np.ndarray], masks: torch.Tensor) -> list[np.ndarray]:
    """Zero the padded prefill positions (their logits are not defined by either model)."""
    first = actual[0] * masks[:, :, None].numpy()
    return [first, *actual[1:]]


@pytest.mark.parametrize("case", list(CASES))
def test_optimum_graph_matches_transformers_on_left_padded_batch(case: str, tmp_path: Path) -> None:
    hf, cfg = hf_case(case)
    ids, mask, _ = left_padded_batch(LENGTHS, cfg.vocab_size)
    expected, _, tokens = hf_greedy_logits(hf, ids, mask, DECODE_STEPS)
    expected = [expected[0] * mask[:, :, None], *expected[1:]]
    model, bindings = build_decoder(cfg, cfg.intermediate_size)
    session = ort_session(model, bindings, state_getter(hf), tmp_path / "m.onnx")
    actual = prefill_masked(onnx_logits(session, cfg, ids, mask, tokens), mask)
    assert worst(actual, expected) <= BOUND


def test_sliding_window_is_shorter_than_the_sequence() -> None:
    assert CASES["mistral-sliding-window"][1]["sliding_window"] < max(LENGTHS) + DECODE_STEPS


def test_folded_variant_matches_folded_pytorch(tmp_path: Path) -> None:
    """FFN width < d_ff: the graph bound to a variant's kept slices equals `fold_decoder`'s model."""
    cfg = DecoderConfig.from_hf_dict(make_hf_model("qwen2").config.to_dict())
    torch.manual_seed(1)
    dense = CausalLM(cfg).eval()
    with torch.no_grad():
        for param in dense.parameters():
            param.normal_(0.0, 0.15)
    gen = torch.Generator().manual_seed(2)
    kept = torch.stack([torch.randperm(cfg.intermediate_size, generator=gen)[:20].sort().values for _ in range(2)])
    folded = fold_decoder(dense, kept)
    source = ModuleWeights(dense)

    def get(name: str) -> np.ndarray:
        if not is_ffn(name):
            return source.get(name)
        layer, proj = int(name.split(".")[2]), name.split(".")[4]
        return ffn_slice(source, layer, proj, kept[layer].numpy())

    ids, mask, _ = left_padded_batch(LENGTHS, cfg.vocab_size)
    tokens = torch.randint(3, cfg.vocab_size, (len(LENGTHS), DECODE_STEPS), generator=gen)
    with torch.no_grad():
        expected = ours_logits_for_tokens(folded, ids, mask, tokens)
    expected = [expected[0] * mask[:, :, None], *expected[1:]]
    model, bindings = build_decoder(cfg, 20)
    assert {b.initializer for b in bindings if b.ffn} == {f"l{i}.{p}" for i in range(2) for p in ("gate_up", "down")}
    session = ort_session(model, bindings, get, tmp_path / "v.onnx")
    actual = prefill_masked(onnx_logits(session, cfg, ids, mask, tokens), mask)
    assert worst(actual, expected) <= BOUND
    dense_logits = ours_logits_for_tokens(dense, ids, mask, tokens)
    assert worst(actual, [dense_logits[0] * mask[:, :, None], *dense_logits[1:]]) > 100 * BOUND  # not the dense one


def test_graph_is_deterministic_and_declares_no_data() -> None:
    hf, cfg = hf_case("qwen2-bias-tied")
    first, bindings = build_decoder(cfg, cfg.intermediate_size, quantize="int4")
    assert sorted(first.graph.initializers) == sorted(b.initializer for b in bindings)
    with pytest.raises(RuntimeError, match="before its weights were bound"):
        first.graph.initializers["embed"].const_value.numpy()
    second, _ = build_decoder(cfg, cfg.intermediate_size, quantize="int4")
    get = state_getter(hf)
    first, second = (bind_lazy(m, bindings, get) for m in (first, second))
    assert ir.to_proto(first).SerializeToString() == ir.to_proto(second).SerializeToString()
    names = [v.name for node in first.graph for v in node.outputs]
    assert max(len(n) for n in names if not n.startswith("present")) <= 8, "short value names"


def test_refuses_what_it_cannot_build() -> None:
    _, cfg = hf_case("llama")  # head_dim 8
    with pytest.raises(IFPError, match="multiple of 16"):
        build_decoder(cfg, cfg.intermediate_size, flavor="genai")
    for kwargs in ({"flavor": "tflite"}, {"quantize": "int3"}):
        with pytest.raises(ValueError, match="unknown"):
            build_decoder(cfg, cfg.intermediate_size, **kwargs)
    with pytest.raises(ValueError, match="ffn_width"):
        build_decoder(cfg, cfg.intermediate_size + 1)


@pytest.mark.parametrize("floor", ["1.20", "1.24"])
def test_fused_op_counts_fp32_and_int4(floor: str) -> None:
    """The default floor (1.20) has no opset-23 op: the first norm is one Pow/ReduceMean/Sqrt chain and attention
    is MatMul/Softmax; the 1.24 floor uses RMSNormalization and Attention (opset 23)."""
    _, cfg = hf_case("llama")
    fp32, bindings = build_decoder(cfg, cfg.intermediate_size, min_onnxruntime=floor)
    ops = Counter(node.op_type for node in fp32.graph)
    opset_23 = floor == "1.24"
    assert fp32.opset_imports[""] == (23 if opset_23 else 21)
    assert ops["RMSNormalization"] == int(opset_23)
    assert ops["Pow"] == ops["ReduceMean"] == ops["Sqrt"] == int(not opset_23)
    assert ops["Attention"] == (cfg.num_hidden_layers if opset_23 else 0)
    assert ops["Softmax"] == (0 if opset_23 else cfg.num_hidden_layers)
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * cfg.num_hidden_layers
    assert ops["RotaryEmbedding"] == 2 * cfg.num_hidden_layers
    assert "Expand" not in ops  # GQA's KV heads are never repeated
    qkv = [b for b in bindings if b.initializer.endswith(".qkv")]
    assert [b.sources for b in qkv] == [
        tuple(f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkv") for i in range(cfg.num_hidden_layers)
    ]
    qkv_matmuls = [n for n in fp32.graph if n.op_type == "MatMul" and n.inputs[1].name.endswith(".qkv")]
    assert len(qkv_matmuls) == cfg.num_hidden_layers
    # 4 linears per layer (qkv, o, gate_up, down) + lm_head
    int4, _ = build_decoder(cfg, cfg.intermediate_size, quantize="int4", min_onnxruntime=floor)
    nbits = [n for n in int4.graph if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * cfg.num_hidden_layers + 1
    assert all(n.attributes["accuracy_level"].as_int() == 4 and n.attributes["bits"].as_int() == 4 for n in nbits)
    assert not [n for n in int4.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]


def quantized_bytes(model: ir.Model) -> int:
    """Bytes of the graph's uint8 (quantized block) initializers."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.dtype == ir.DataType.UINT8)


@pytest.mark.parametrize("floor", ["1.20", "1.21", "1.22"])
def test_int8_uses_8_bit_matmulnbits_only_from_the_release_that_has_its_kernel(floor: str) -> None:
    """onnxruntime < 1.22 has no 8-bit MatMulNBits CPU kernel: below that floor an int8 linear is two 4-bit
    MatMulNBits over the high and low nibbles of the same blocks (the bytes read per step do not change)."""
    _, cfg = hf_case("llama")
    int8, _ = build_decoder(cfg, cfg.intermediate_size, quantize="int8", min_onnxruntime=floor)
    linears = 4 * cfg.num_hidden_layers + 1
    nbits = [n for n in int8.graph if n.op_type == "MatMulNBits"]
    bits = {n.attributes["bits"].as_int() for n in nbits}
    assert (len(nbits), bits) == ((linears, {8}) if floor == "1.22" else (2 * linears, {4}))
    with_8_bit_kernel, _ = build_decoder(cfg, cfg.intermediate_size, quantize="int8", min_onnxruntime="1.22")
    assert quantized_bytes(int8) == quantized_bytes(with_8_bit_kernel)


def test_default_graph_runs_fused_kernels_in_onnxruntime(tmp_path: Path) -> None:
    """The portable graph does no more work per step than the opset-23 one: onnxruntime fuses the first norm's
    chain back into SimplifiedLayerNormalization, and the attention scores are one GEMM with K transposed."""
    hf, cfg = hf_case("llama")
    model, bindings = build_decoder(cfg, cfg.intermediate_size)
    ort_session(model, bindings, state_getter(hf), tmp_path / "m.onnx")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    assert optimized["SimplifiedLayerNormalization"] == 1
    assert not {"Pow", "ReduceMean", "Sqrt"} & set(optimized)
    assert optimized["FusedMatMul"] == cfg.num_hidden_layers  # scores: K transposed inside the GEMM


@pytest.mark.parametrize("case", ["qwen2-head-dim-16", "mistral-head-dim-16"])
def test_genai_graph_exact_on_one_unpadded_sequence(case: str, tmp_path: Path) -> None:
    hf, cfg = hf_case(case)
    ids, mask, _ = left_padded_batch([10], cfg.vocab_size)
    assert cfg.sliding_window is None or cfg.sliding_window < 10
    expected, _, tokens = hf_greedy_logits(hf, ids, mask, DECODE_STEPS)
    model, bindings = build_decoder(cfg, cfg.intermediate_size, flavor="genai")
    assert "position_ids" not in [v.name for v in model.graph.inputs]
    assert Counter(n.op_type for n in model.graph)["GroupQueryAttention"] == cfg.num_hidden_layers
    _, optimum_bindings = build_decoder(cfg, cfg.intermediate_size)
    assert bindings == optimum_bindings, "both flavours bind the same external data"
    session = ort_session(model, bindings, state_getter(hf), tmp_path / "g.onnx")
    assert worst(onnx_logits(session, cfg, ids, mask, tokens), expected) <= BOUND


def test_genai_graph_is_wrong_on_left_padded_rows(tmp_path: Path) -> None:
    """GroupQueryAttention assumes right padding: a left-padded row's logits are far off (documented limit)."""
    hf, cfg = hf_case("qwen2-head-dim-16")
    ids, mask, _ = left_padded_batch(LENGTHS, cfg.vocab_size)
    expected, _, tokens = hf_greedy_logits(hf, ids, mask, DECODE_STEPS)
    model, bindings = build_decoder(cfg, cfg.intermediate_size, flavor="genai")
    session = ort_session(model, bindings, state_getter(hf), tmp_path / "g.onnx")
    actual = onnx_logits(session, cfg, ids, mask, tokens)
    assert worst(actual, expected, rows=slice(0, 1)) <= BOUND  # the unpadded row is exact
    assert worst(actual[1:], expected[1:], rows=slice(1, 2)) > 0.05  # the padded row's decode steps are not


@pytest.mark.parametrize("bits", [4, 8])
def test_quantizer_is_deterministic_and_dequantize_matches_matmulnbits(bits: int) -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(40, 24)).astype(np.float32)  # K = 40: the last block is padded
    blocks, scales = quantize_rows([weight.T], bits)
    again = quantize_rows([weight.T.copy()], bits)
    assert blocks.tobytes() == again[0].tobytes() and scales.tobytes() == again[1].tobytes()
    dequantized = dequantized_rows(blocks, scales, bits, 40).T
    assert np.abs(dequantized - weight).max() <= np.abs(weight).max() / (2 ** (bits - 1) - 1)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([3, 40]))
    node = ir.node(
        "MatMulNBits", [x, ir.Value(name="b"), ir.Value(name="s")], dict(K=40, N=24, bits=bits, block_size=32),
        domain="com.microsoft", outputs=[ir.Value(name="y")],
    )  # fmt: skip
    for value, array in zip(node.inputs[1:], (blocks, scales), strict=True):
        value.const_value = ir.tensor(array)
        value.type, value.shape = ir.TensorType(value.const_value.dtype), value.const_value.shape
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=node.inputs[1:],
                     opset_imports={"": 21, "com.microsoft": 1})  # fmt: skip
    session = ort.InferenceSession(ir.to_proto(ir.Model(graph, ir_version=10)).SerializeToString())
    inputs = rng.normal(size=(3, 40)).astype(np.float32)
    (out,) = session.run(None, {"x": inputs})
    np.testing.assert_allclose(out, inputs @ dequantized, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [96, 100])
def test_the_torch_quantizer_is_orts_bit_for_bit(bits: int, k: int) -> None:
    """`quantize_rows` (the emitter's and validation reference's, torch) against ORT's own routine on rows given as two
    tensors (a packed projection), with the cases where rounding and the scale's sign decide: an all-zero block,
    exact halves, |min| == |max|, tiny and huge blocks. K = 100: the padding past K (nothing reads it) aside."""
    rng = np.random.default_rng(1)
    first = (rng.normal(size=(300, k)) * rng.uniform(0, 3, size=(300, 1))).astype(np.float32)
    first[0, :32] = 0
    first[1, :32] = np.arange(32) / 4 - 4  # every quarter: halves after scaling by 1 / 0.5
    first[2, :32] = np.abs(first[2, :32])
    first[2, 5] = -first[2, :32].max()  # a tie in |.|: ORT takes the minimum
    first[3] *= 1e-30
    first[4] *= 1e30
    second = rng.normal(size=(77, k)).astype(np.float32)
    second.setflags(write=False)  # a memory-mapped weight
    blocks, scales = ort_quantize(np.concatenate([first, second]).T, bits)
    got_blocks, got_scales = quantize_rows([first, second], bits)
    assert got_scales.tobytes() == scales.tobytes()
    dequantized = dequantized_rows(got_blocks, got_scales, bits, k)
    np.testing.assert_array_equal(dequantized, dequantized_rows(blocks, scales, bits, k))
    assert fake_quantized_rows([first, second], bits).tobytes() == dequantized.tobytes()  # the reference's shortcut
    if k % 32 == 0:
        assert got_blocks.tobytes() == blocks.tobytes()


def dequantized_reference(cfg: DecoderConfig, reference: CausalLM, bindings: list[Binding]) -> CausalLM:
    """PyTorch with the weights a quantized graph computes with (untied: the tied lm_head is quantized, the
    embedding Gather is not)."""
    dequantized = dequantized_sources(bindings, state_getter(reference))
    assert "model.embed_tokens.weight" in dequantized
    untied = CausalLM(cfg.replace(tie_word_embeddings=False)).eval()
    state = {**reference.state_dict(), "lm_head.weight": reference.lm_head.weight.detach().clone()}
    for name, array in dequantized.items():
        state["lm_head.weight" if name == "model.embed_tokens.weight" else name] = torch.from_numpy(array)
    untied.load_state_dict(state)
    return untied


# MatMulNBits with accuracy_level=4 quantizes activations to int8 per block: measured 2.2e-2 (int4) and 3.0e-2
# (int8) relative on these random tiny weights (vs 4.0e-1 / 3.2e-2 to the fp32 model); accuracy_level=0 is exact.
QUANT_BOUND = {0: BOUND, 4: 6e-2}


@pytest.mark.parametrize(("quant", "floor"), [("int4", "1.20"), ("int8", "1.20"), ("int8", "1.22")])
@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_quantized_graph_matches_pytorch_with_dequantized_weights(
    quant: str, floor: str, accuracy_level: int, tmp_path: Path
) -> None:
    """int8 below the 1.22 floor is two 4-bit MatMulNBits over the int8 blocks' nibbles: the same product."""
    hf, cfg = hf_case("qwen2-bias-tied")
    reference = CausalLM(cfg).eval()
    reference.load_state_dict(hf.state_dict(), strict=False)
    model, bindings = build_decoder(
        cfg, cfg.intermediate_size, quantize=quant, accuracy_level=accuracy_level, min_onnxruntime=floor
    )
    dequantized = dequantized_reference(cfg, reference, bindings)
    ids, mask, _ = left_padded_batch(LENGTHS, cfg.vocab_size)
    tokens = torch.randint(3, cfg.vocab_size, (len(LENGTHS), DECODE_STEPS), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ours_logits_for_tokens(dequantized, ids, mask, tokens)
    expected = [expected[0] * mask[:, :, None], *expected[1:]]
    session = ort_session(model, bindings, state_getter(reference), tmp_path / "q.onnx")
    actual = prefill_masked(onnx_logits(session, cfg, ids, mask, tokens), mask)
    assert worst(actual, expected) <= QUANT_BOUND[accuracy_level]
    if quant == "int4":  # the reference really is the quantized model, not the fp32 one
        with torch.no_grad():
            original = ours_logits_for_tokens(reference, ids, mask, tokens)
        assert worst(actual, [original[0] * mask[:, :, None], *original[1:]]) > 0.1


def test_materialize_is_deterministic_bytes() -> None:
    hf, cfg = hf_case("qwen2-bias-tied")
    _, bindings = build_decoder(cfg, cfg.intermediate_size, quantize="int4")
    get = state_getter(hf)
    for binding in bindings:
        assert materialize(binding, get).tobytes() == materialize(binding, get).tobytes()


def test_genai_int4_graph_matches_dequantized_pytorch(tmp_path: Path) -> None:
    hf, cfg = hf_case("qwen2-head-dim-16")
    reference = CausalLM(cfg).eval()
    reference.load_state_dict(hf.state_dict(), strict=False)
    model, bindings = build_decoder(cfg, cfg.intermediate_size, flavor="genai", quantize="int4", accuracy_level=0)
    ids, mask, _ = left_padded_batch([10], cfg.vocab_size)
    tokens = torch.randint(3, cfg.vocab_size, (1, DECODE_STEPS), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ours_logits_for_tokens(dequantized_reference(cfg, reference, bindings), ids, mask, tokens)
    session = ort_session(model, bindings, state_getter(reference), tmp_path / "gq.onnx")
    assert worst(onnx_logits(session, cfg, ids, mask, tokens), expected) <= BOUND


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_columns_gathered_equal_the_columns_quantized(bits: int) -> None:
    """A variant's packed gate/up blocks and scales are rows of the dense model's (emitter.DenseRows): the quantizer
    works per output row, so the gather must equal quantizing the kept rows alone, bit for bit."""
    matrix = np.random.default_rng(0).normal(0, 0.02, (96, 80)).astype(np.float32)  # [N, K], K not a multiple of 32
    columns = np.array([0, 3, 4, 50, 95])
    blocks, scales = quantize_rows([matrix], bits)
    kept_blocks, kept_scales = quantize_rows([matrix[columns]], bits)
    np.testing.assert_array_equal(blocks[columns], kept_blocks)
    np.testing.assert_array_equal(scales[columns], kept_scales)
