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

from ifp_export.bounds import Exactness, compare, reference_pair
from ifp_export.masks import encode_prompts
from ifp_export.model.decoder import CausalLM
from ifp_export.model.predictor import SparsityPredictor
from ifp_export.model.softtopk import hard_topk_mask
from ifp_export.ort import OrtDecoder, session
from ifp_export.targets.onnx.ops import Binding

DYNAMIC_NAME = "dynamic"


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
    greedy_tokens: int = 8,
) -> Exactness:
    """dynamic.onnx, bound to each prompt's predicted neurons, against the dense model masked the same way: ORT
    prefills and greedy-decodes `greedy_tokens` through its cache, then the masked reference runs teacher-forced over
    the same tokens in float32 and float64 (`ifp_export.bounds`); every position of every prompt is compared."""

    def source(spec: dict) -> np.ndarray:
        return np.memmap(directory / spec["file"], np.float32, "r", spec["offset"], tuple(spec["shape"]))

    decoder = OrtDecoder(session(directory / f"{DYNAMIC_NAME}.onnx", threads=1))
    got, ref32, ref64 = [], [], []
    for prompt in prompts:
        ids, mask, _ = encode_prompts(tokenizer, [prompt], predictor.config.max_length)
        neuron_mask = hard_topk_mask(predictor(ids, mask)[0], k)
        kept = torch.stack([row.nonzero().flatten() for row in neuron_mask]).numpy()
        decoder.extra_feeds = gather_dynamic_feeds(ffn_inputs, kept, source)
        tokens = tokenizer.encode(prompt).ids
        steps = [decoder(*single_row(tokens), decoder.empty_cache(1))]
        for _ in range(greedy_tokens):
            tokens.append(int(steps[-1][0][0, -1].argmax()))
            steps.append(decoder(*single_row(tokens, 1), steps[-1][1]))
        got.append(np.concatenate([logits[0] for logits, _ in steps]))
        expected32, expected64 = reference_pair(dense, torch.tensor([tokens]), ffn_masks=neuron_mask)
        ref32.append(expected32[0])
        ref64.append(expected64[0])
    layers = dense.config.num_hidden_layers
    return compare("dynamic", np.concatenate(got), np.concatenate(ref32), np.concatenate(ref64), layers)


def single_row(tokens: list[int], last: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, attention_mask and position_ids of one unpadded sequence (only its `last` tokens fed, if given)."""
    start = 0 if last is None else len(tokens) - last
    ids = np.asarray([tokens[start:]], np.int64)
    return ids, np.ones((1, len(tokens)), np.int64), np.arange(start, len(tokens), dtype=np.int64)[None]
