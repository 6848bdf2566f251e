"""The MIL-builder decoder program against PyTorch on Linux: the pymil functions `emit` converts (after
coremltools' passes, weights as stored) run op by op in numpy (tests/mil_interpreter.py, float32 arithmetic on
the fp16 / dequantized weights) over prefill + cached decode steps, per function (variants and dense). This
checks the graph — RoPE tables and layout, GQA, cache writes at P..P+T-1, masks, biases, tied head — not Core
ML's fp16 kernels (macOS-only parity in test_coreml_target.py; fp16 norm/RoPE in test_coreml_numerics.py)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from mil_interpreter import run_function

from ifp_export.fold import fold_decoder
from ifp_export.model.config import DecoderConfig
from ifp_export.model.decoder import CausalLM
from ifp_export.targets.coreml import DECODER_STATES, causal_mask, reference_cached, relative_diff
from ifp_export.targets.onnx import DENSE_NAME
from ifp_export.weights import ModuleWeights

emit_module = importlib.import_module("ifp_export.targets.coreml.emit")
CONTEXT = 32
TOLERANCE = {"none": 5e-3, "int8": 3e-2}  # fp16-rounded / int8 weights vs the fp32 model, relative to max |logit|


def model(model_type: str) -> CausalLM:
    """A 2-layer decoder with non-trivial norms and biases; mistral's with a sliding window shorter than CONTEXT."""
    torch.manual_seed(0)
    cfg = DecoderConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        model_type=model_type,
        rope_theta=5e5,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=model_type == "qwen2",
        sliding_window=8 if model_type == "mistral" else None,
    )
    dense = CausalLM(cfg).eval()
    with torch.no_grad():
        for name, param in dense.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.1)
    return dense


@pytest.mark.parametrize(("model_type", "quantize"), [("llama", "none"), ("qwen2", "none"), ("llama", "int8")])
def test_program_matches_pytorch_over_prefill_and_cached_decode(model_type: str, quantize: str) -> None:
    dense = model(model_type)
    cfg = dense.config
    kept = {"v0": np.stack([np.sort(np.random.default_rng(i).choice(128, 48, replace=False)) for i in range(2)])}
    functions = emit_module.variant_kept(kept)
    prog, _, deferred = emit_module.build_program(ModuleWeights(dense), functions, CONTEXT, quantize, "v0")
    prompt = [3, 17, 42, 5, 77, 9]
    for name, indices in functions.items():
        reference = dense if indices is None else fold_decoder(dense, torch.from_numpy(indices))
        shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, CONTEXT, cfg.head_dim)
        states = {n: np.zeros(shape, np.float32) for n in DECODER_STATES}

        def step(ids: np.ndarray, mask: np.ndarray, fn=prog.functions[name], states=states) -> np.ndarray:
            return run_function(fn, {"inputIds": ids, "causalMask": mask}, states, const_value=deferred.value)

        logits = [step(np.array([prompt], np.int32), causal_mask(0, len(prompt)).numpy())]
        tokens = [11, 60, 2, 95]
        for past, token in enumerate(tokens, start=len(prompt)):
            logits.append(step(np.array([[token]], np.int32), causal_mask(past, 1).numpy()))
        expected = reference_cached(reference, prompt, tokens)
        assert logits[0].shape == (1, len(prompt), cfg.vocab_size)
        assert relative_diff(logits, expected) <= TOLERANCE[quantize], (name, relative_diff(logits, expected))
        assert np.abs(states["keyCache"][:, :, :, len(prompt) + len(tokens) :]).max() == 0  # nothing written past P+T
    assert DENSE_NAME in functions


@pytest.mark.parametrize(("model_type", "quantize"), [("llama", "none"), ("qwen2", "int4"), ("mistral", "int8")])
def test_our_pass_runner_gives_the_program_coremltools_pipelines_give(model_type: str, quantize: str) -> None:
    """`passes.run_passes` runs only the passes in `RUN` and validates once (the pass's time): the function it
    returns must print exactly as the one coremltools' own `apply_pipeline` returns, all passes in."""
    from coremltools.converters.mil import mil
    from coremltools.converters.mil.mil.passes.pass_pipeline import PassPipelineManager

    from ifp_export.targets.coreml.build import ProgramWeights, decoder_function
    from ifp_export.targets.coreml.deferred import DeferredWeights
    from ifp_export.targets.coreml.passes import RUN, pipelines, run_passes

    source = ModuleWeights(model(model_type))
    weights = ProgramWeights(source, CONTEXT, quantize, DeferredWeights())

    def built():
        return decoder_function(source.config, weights, weights.ffn(None), CONTEXT)

    ours = run_passes(built())
    theirs = mil.Program()
    theirs.add_function("main", built())
    for pipeline in pipelines():
        PassPipelineManager.apply_pipeline(theirs, pipeline)
    all_passes = {name for pipeline in pipelines() for name in pipeline.passes}
    assert all_passes > RUN and len(all_passes - RUN) >= 50
    symbols = re.compile(r"\b(is|block)\d+\b")  # symbolic dims and blocks are numbered process-wide
    assert symbols.sub(r"\1", str(ours)) == symbols.sub(r"\1", str(theirs.functions["main"]))


def test_the_program_holds_placeholders_until_the_backend_writes_the_weights() -> None:
    """Every matrix const of a built program is a broadcast placeholder (one row of memory), the same object in
    every function for a shared tensor; the written package holds the real weights (blobs read back equal the
    fp16 weights); a placeholder the backend never wrote fails the write instead of leaving a wrong blob."""
    from ifp_export.targets.coreml.blobs import function_blobs, read_blob
    from ifp_export.targets.coreml.package import package_weights_path

    dense = model("llama")
    functions = {"v0": np.stack([np.arange(0, 128, 2)] * 2), DENSE_NAME: None}
    prog, _, deferred = emit_module.build_program(ModuleWeights(dense), functions, CONTEXT, "none", "v0")
    matrices = {
        name: [op.outputs[0].val for op in fn.operations if op.op_type == "const" and op.name.startswith("model_")]
        for name, fn in prog.functions.items()
    }
    assert all(val.strides[0] == 0 for vals in matrices.values() for val in vals if np.ndim(val) == 2)
    shared = {id(v) for v in matrices["v0"]} & {id(v) for v in matrices[DENSE_NAME]}
    assert len(shared) >= 4 * dense.config.num_hidden_layers  # q/k/v/o of every layer: one object in both functions
    mlmodel = emit_module.convert_program(prog, deferred)
    weights = package_weights_path(Path(mlmodel.package_path)).read_bytes()
    blob = function_blobs(mlmodel.get_spec(), DENSE_NAME)["model_model_layers_1_mlp_down_proj_weight_to_fp16"]
    expected = dense.model.layers[1].mlp.down_proj.weight.detach().numpy().astype(np.float16)
    np.testing.assert_array_equal(read_blob(weights, blob), expected)
    deferred.placeholder((4, 8), np.dtype(np.float16), lambda: np.zeros((4, 8), np.float16))  # in no function
    with pytest.raises(RuntimeError, match="not written"):
        emit_module.convert_program(prog, deferred)
