"""Dynamic mode: `dynamic.onnx`, the pruned graph with its FFN weights as inputs, bound per prompt at run time.

Per prompt, a runtime gathers the predicted neurons' rows/columns from the dense model's FFN tensors (already on
disk in `dense.onnx_data`) and feeds them; every other weight comes from the shared file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from tokenizers import Tokenizer

from ifp_export.fold import relative_difference
from ifp_export.masks import encode_prompts
from ifp_export.model.decoder import CausalLM
from ifp_export.model.predictor import SparsityPredictor
from ifp_export.model.softtopk import hard_topk_mask
from ifp_export.ort import OrtDecoder, session
from ifp_export.targets.onnx.binding import Binding

DYNAMIC_NAME = "dynamic"
DYNAMIC_TOLERANCE = 1e-5


def emit_dynamic(
    directory: Path, graph: ir.Model, bindings: list[Binding], dense: ir.Model, dense_bindings: list[Binding]
) -> list[dict]:
    """Write `dynamic.onnx` from the (bound) pruned graph; returns, per FFN input `ffn.{layer}.{proj}`, its source
    tensor in the dense data file and the axis that indexes neurons."""
    dense_values = {
        (b.sources, b.layout): dense.graph.initializers[b.initializer].const_value for b in dense_bindings if b.ffn
    }
    inputs = []
    for binding in sorted((b for b in bindings if b.ffn), key=lambda b: b.sources):
        (hf_name,) = binding.sources
        layer, proj = int(hf_name.split(".")[2]), hf_name.split(".")[4]
        value = graph.graph.initializers.pop(binding.initializer)
        value.const_value = None
        value.name = f"ffn.{layer}.{proj}"
        graph.graph.inputs.append(value)
        source = dense_values[(binding.sources, binding.layout)]
        if not isinstance(source, ir.ExternalTensor):
            raise RuntimeError(f"dense {hf_name} is not in external data: dynamic mode cannot gather it")
        neuron_axis = int(proj == "down_proj") ^ int(binding.layout == "transposed")  # W: gate/up rows, down columns
        spec = {"file": source.location, "offset": source.offset or 0, "length": source.length}
        spec |= {"shape": [int(d) for d in source.shape], "dtype": "float32"}
        inputs.append({"name": value.name, "layer": layer, "neuron_axis": neuron_axis, "source": spec})
    ir.save(graph, directory / f"{DYNAMIC_NAME}.onnx")
    return inputs


def gather_dynamic_feeds(
    ffn_inputs: list[dict], kept: np.ndarray, source: Callable[[dict], np.ndarray]
) -> dict[str, np.ndarray]:
    """The dynamic decoder's FFN inputs for one prompt: kept neurons [L, k] gathered from the dense tensors."""
    return {
        ffn["name"]: np.ascontiguousarray(np.take(source(ffn["source"]), kept[ffn["layer"]], axis=ffn["neuron_axis"]))
        for ffn in ffn_inputs
    }


@torch.no_grad()
def check_dynamic(
    directory: Path,
    ffn_inputs: list[dict],
    dense: CausalLM,
    predictor: SparsityPredictor,
    tokenizer: Tokenizer,
    prompts: list[str],
    k: int,
) -> float:
    """Max |Δlogits| / max(1, max|logits|) of dynamic.onnx (bound to each prompt's predicted neurons) vs the masked
    dense model."""

    def source(spec: dict) -> np.ndarray:
        return np.memmap(directory / spec["file"], np.float32, "r", spec["offset"], tuple(spec["shape"]))

    decoder = OrtDecoder(session(directory / f"{DYNAMIC_NAME}.onnx", threads=1))
    worst = 0.0
    for prompt in prompts:
        ids, mask, _ = encode_prompts(tokenizer, [prompt], predictor.config.max_length)
        neuron_mask = hard_topk_mask(predictor(ids, mask)[0], k)
        kept = torch.stack([row.nonzero().flatten() for row in neuron_mask]).numpy()
        decoder.extra_feeds = gather_dynamic_feeds(ffn_inputs, kept, source)
        tokens = torch.tensor([tokenizer.encode(prompt).ids])
        expected, _ = dense(tokens, ffn_masks=neuron_mask)
        got, _ = decoder(
            tokens.numpy(), np.ones_like(tokens.numpy()), np.arange(tokens.shape[1])[None], decoder.empty_cache(1)
        )
        worst = max(worst, relative_difference(got, expected.numpy()))
    return worst
