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
from ifp_export.targets.onnx.ops import Binding

DYNAMIC_NAME = "dynamic"
DYNAMIC_TOLERANCE = 1e-5


def emit_dynamic(
    directory: Path, graph: ir.Model, bindings: list[Binding], dense: ir.Model, dense_bindings: list[Binding]
) -> list[dict]:
    """Write `dynamic.onnx` from the (bound) pruned graph; returns, per FFN input `ffn.<initializer>`, its source
    tensor in the dense data file, the axis that indexes neurons and how many projections are packed on it."""
    dense_values = {
        (b.sources, b.layout): dense.graph.initializers[b.initializer].const_value for b in dense_bindings if b.ffn
    }
    inputs = []
    for binding in sorted((b for b in bindings if b.ffn), key=lambda b: b.sources):
        if binding.layout != "transposed":
            raise RuntimeError(f"dynamic mode gathers fp32 [in, out] FFN weights, not {binding.layout!r}")
        layer, proj = int(binding.sources[0].split(".")[2]), binding.sources[0].split(".")[4]
        value = graph.graph.initializers.pop(binding.initializer)
        value.const_value = None
        value.name = f"ffn.{binding.initializer}"
        graph.graph.inputs.append(value)
        source = dense_values[(binding.sources, binding.layout)]
        if not isinstance(source, ir.ExternalTensor):
            raise RuntimeError(f"dense {binding.sources} is not in external data: dynamic mode cannot gather it")
        # MatMul's B is [in, out]: gate/up's neurons are its columns (gate and up packed side by side), down's rows
        neuron_axis = 0 if proj == "down_proj" else 1
        spec = {"file": source.location, "offset": source.offset or 0, "length": source.length}
        spec |= {"shape": [int(d) for d in source.shape], "dtype": "float32"}
        entry = {"name": value.name, "layer": layer, "neuron_axis": neuron_axis, "packed": len(binding.sources)}
        inputs.append(entry | {"source": spec})
    ir.save(graph, directory / f"{DYNAMIC_NAME}.onnx")
    return inputs


def gather_dynamic_feeds(
    ffn_inputs: list[dict], kept: np.ndarray, source: Callable[[dict], np.ndarray]
) -> dict[str, np.ndarray]:
    """The dynamic decoder's FFN inputs for one prompt: kept neurons [L, k] gathered from the dense tensors (from
    each of the `packed` blocks side by side along the neuron axis: gate then up)."""
    feeds = {}
    for ffn in ffn_inputs:
        dense = source(ffn["source"])
        packed = ffn.get("packed", 1)
        width = dense.shape[ffn["neuron_axis"]] // packed
        index = np.concatenate([kept[ffn["layer"]] + j * width for j in range(packed)])
        feeds[ffn["name"]] = np.ascontiguousarray(np.take(dense, index, axis=ffn["neuron_axis"]))
    return feeds


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
