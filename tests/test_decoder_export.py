"""Smoke tests that the decoder exports: ONNX (dynamo) run in onnxruntime, and Core ML conversion of a trace."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import assert_close_on_mask, left_padded_batch
from torch import nn

from ifp_export.model.config import DecoderConfig
from ifp_export.model.decoder import CausalLM

# GQA (4 query heads over 2 KV heads), Qwen2 q/k/v biases and a sliding window: every optional op path.
CONFIG = DecoderConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    model_type="qwen2",
    sliding_window=6,
)
KV_NAMES = [f"past_{layer}_{kv}" for layer in range(CONFIG.num_hidden_layers) for kv in "kv"]
PRESENT_NAMES = [name.replace("past_", "present_") for name in KV_NAMES]
INPUT_NAMES = ["input_ids", "attention_mask", "position_ids", *KV_NAMES]
OUTPUT_NAMES = ["logits", *PRESENT_NAMES]


class FlatCacheDecoder(nn.Module):
    """The decoder with the KV cache flattened to tensors: (ids, mask, positions, k0, v0, k1, v1, ...)."""

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        logits, presents = self.model(input_ids, attention_mask, position_ids, pairs)
        return (logits, *(t for pair in presents for t in pair))


@pytest.fixture(scope="module")
def decoder() -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(CONFIG).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # nn.Linear biases start random already; make norms non-trivial
            layer.input_layernorm.weight.normal_(1.0, 0.2)
    return model


def empty_past(batch: int) -> list[torch.Tensor]:
    shape = (batch, CONFIG.num_key_value_heads, 0, CONFIG.head_dim)
    return [torch.zeros(shape) for _ in KV_NAMES]


@pytest.fixture(scope="module")
def onnx_session(decoder: CausalLM, tmp_path_factory: pytest.TempPathFactory):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path_factory.mktemp("onnx") / "decoder.onnx"
    ids, mask, positions = left_padded_batch([5, 3], CONFIG.vocab_size)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    past, total = torch.export.Dim("past", min=0), torch.export.Dim("total")
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past} for _ in KV_NAMES),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            FlatCacheDecoder(decoder).eval(),
            (ids, mask, positions, *empty_past(2)),  # exported with a zero-length past (the prefill case)
            str(path),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
        )
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_onnx(session, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    feed = {name: tensor.numpy() for name, tensor in zip(INPUT_NAMES, inputs, strict=True)}
    return [torch.from_numpy(array) for array in session.run(OUTPUT_NAMES, feed)]


@pytest.mark.slow
def test_onnx_graph_has_dynamic_axes(onnx_session) -> None:
    inputs = {i.name: i.shape for i in onnx_session.get_inputs()}
    outputs = {o.name: o.shape for o in onnx_session.get_outputs()}
    assert list(inputs) == INPUT_NAMES
    assert list(outputs) == OUTPUT_NAMES
    assert all(isinstance(dim, str) for dim in inputs["input_ids"])
    assert isinstance(inputs["attention_mask"][1], str)
    past_shape = inputs["past_0_k"]
    assert isinstance(past_shape[0], str) and isinstance(past_shape[2], str)
    assert past_shape[1::2] == [CONFIG.num_key_value_heads, CONFIG.head_dim]
    assert outputs["logits"][2] == CONFIG.vocab_size


@pytest.mark.slow
def test_onnx_prefill_and_decode_match_pytorch(decoder: CausalLM, onnx_session) -> None:
    """Prefill (empty past, left-padded batch of 2), then decode steps past the sliding window, fed from ORT."""
    wrapper = FlatCacheDecoder(decoder).eval()
    ids, mask, positions = left_padded_batch([7, 4], CONFIG.vocab_size, seed=1)
    inputs = [ids, mask, positions, *empty_past(2)]
    with torch.no_grad():
        expected = wrapper(*inputs)
    actual = run_onnx(onnx_session, inputs)
    assert_close_on_mask(actual[0], expected[0], mask, 1e-4)
    for ort_kv, torch_kv in zip(actual[1:], expected[1:], strict=True):
        assert ort_kv.shape == torch_kv.shape == (2, CONFIG.num_key_value_heads, 7, CONFIG.head_dim)
        assert torch.allclose(ort_kv, torch_kv, atol=1e-4, rtol=0)

    ort_past, torch_past = actual[1:], list(expected[1:])
    for _ in range(4):  # the cache grows to 11 > sliding window 6
        token = expected[0][:, -1].argmax(-1, keepdim=True)
        mask = torch.cat((mask, torch.ones_like(token)), dim=1)
        positions = positions[:, -1:] + 1
        with torch.no_grad():
            expected = wrapper(token, mask, positions, *torch_past)
        actual = run_onnx(onnx_session, [token, mask, positions, *ort_past])
        assert torch.allclose(actual[0], expected[0], atol=1e-4, rtol=0)
        for ort_kv, torch_kv in zip(actual[1:], expected[1:], strict=True):
            assert torch.allclose(ort_kv, torch_kv, atol=1e-4, rtol=0)
        ort_past, torch_past = actual[1:], list(expected[1:])
    assert ort_past[0].shape[2] == 11


@pytest.mark.slow
def test_onnx_multi_token_chunk_with_past_and_other_batch(decoder: CausalLM, onnx_session) -> None:
    """A batch size and past/new lengths different from the export example: the axes really are dynamic."""
    wrapper = FlatCacheDecoder(decoder).eval()
    gen = torch.Generator().manual_seed(2)
    batch, past_len, new = 3, 5, 3
    past = [torch.randn(batch, CONFIG.num_key_value_heads, past_len, CONFIG.head_dim, generator=gen) for _ in KV_NAMES]
    ids = torch.randint(0, CONFIG.vocab_size, (batch, new), generator=gen)
    mask = torch.ones(batch, past_len + new, dtype=torch.long)
    positions = torch.arange(past_len, past_len + new).expand(batch, new).contiguous()
    with torch.no_grad():
        expected = wrapper(ids, mask, positions, *past)
    actual = run_onnx(onnx_session, [ids, mask, positions, *past])
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape
        assert torch.allclose(a, e, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["FLOAT32", "FLOAT16"])
def test_coreml_conversion_of_traced_decode_step(decoder: CausalLM, precision: str) -> None:
    ct = pytest.importorskip("coremltools")
    batch, past_len = 1, 7
    gen = torch.Generator().manual_seed(3)
    example = (
        torch.randint(0, CONFIG.vocab_size, (batch, 1), generator=gen, dtype=torch.int32),
        torch.ones(batch, past_len + 1, dtype=torch.int32),
        torch.full((batch, 1), past_len, dtype=torch.int32),
        *(torch.randn(batch, CONFIG.num_key_value_heads, past_len, CONFIG.head_dim, generator=gen) for _ in KV_NAMES),
    )
    wrapper = FlatCacheDecoder(decoder).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, example)
        for t, e in zip(traced(*example), wrapper(*example), strict=True):
            assert torch.equal(t, e)
        mlmodel = ct.convert(
            traced,
            inputs=[
                ct.TensorType(name=name, shape=tuple(x.shape), dtype=np.float32 if x.is_floating_point() else np.int32)
                for name, x in zip(INPUT_NAMES, example, strict=True)
            ],
            outputs=[ct.TensorType(name=name) for name in OUTPUT_NAMES],
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=getattr(ct.precision, precision),
        )
    spec = mlmodel.get_spec()
    assert spec.WhichOneof("Type") == "mlProgram"
    assert spec.specificationVersion >= 9  # iOS18
    inputs = {i.name: list(i.type.multiArrayType.shape) for i in spec.description.input}
    outputs = {o.name: list(o.type.multiArrayType.shape) for o in spec.description.output}
    assert inputs == {name: list(x.shape) for name, x in zip(INPUT_NAMES, example, strict=True)}
    kv_out = [batch, CONFIG.num_key_value_heads, past_len + 1, CONFIG.head_dim]
    assert outputs == {"logits": [batch, 1, CONFIG.vocab_size], **dict.fromkeys(PRESENT_NAMES, kv_out)}
    op_types = {
        op.type
        for function in spec.mlProgram.functions.values()
        for block in function.block_specializations.values()
        for op in block.operations
    }
    assert "scaled_dot_product_attention" in op_types  # the fused iOS18 op, not a decomposition
