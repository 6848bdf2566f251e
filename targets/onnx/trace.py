"""Traced graphs: the predictor (small, traced for good) and, until the config-built decoder lands, the decoder.

`traced_decoder(cfg, ffn_width)` is the stand-in for the graph builder's `build_decoder`: it traces a decoder whose
parameters hold distinct random values, finds every parameter among the initializers by content (the exporter
constant-folds transposes into anonymous initializers), and returns the graph with those initializers emptied
plus one `Binding` per weight initializer, so weights are bound from a `WeightSource` at write time.
"""

from __future__ import annotations

import onnx_ir as ir
import torch
from onnx_ir.passes.common import ClearMetadataAndDocStringPass
from torch import nn

from ifp_export.masks import standardize
from ifp_export.model.config import DecoderConfig
from ifp_export.model.decoder import CausalLM
from ifp_export.model.predictor import SparsityPredictor
from ifp_export.quiet import quiet
from ifp_export.targets.onnx.binding import Binding, tensor_key
from ifp_export.weights import is_ffn


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Optimum's input and output names for a decoder with KV cache."""
    kv = [(i, k) for i in range(num_layers) for k in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids", *[f"past_key_values.{i}.{k}" for i, k in kv]]
    outputs = ["logits", *[f"present.{i}.{k}" for i, k in kv]]
    return inputs, outputs


class FlatCacheDecoder(nn.Module):
    """The decoder with the KV cache flattened to tensors, in Optimum's input/output order."""

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        cache = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, presents = self.model(input_ids, attention_mask, position_ids, cache)
        return (logits, *[t for kv in presents for t in kv])


class PredictorRouter(nn.Module):
    """Predictor + routing head: scores [B, L, d_ff] and variant_scores [B, V] (see masks.routing_scores)."""

    def __init__(self, predictor: SparsityPredictor, variant_masks: torch.Tensor) -> None:
        super().__init__()
        self.predictor = predictor
        weights = variant_masks / variant_masks.sum(-1, keepdim=True).clamp(min=1) / variant_masks.shape[1]
        self.register_buffer("routing", weights.flatten(1).T.contiguous())  # [L*d, V]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.predictor(input_ids, attention_mask)
        return scores, standardize(scores).flatten(1) @ self.routing


def trace(module: nn.Module, args: tuple, dynamic_shapes: dict, inputs: list[str], outputs: list[str]) -> ir.Model:
    """Export with the dynamo exporter; drop debug metadata (stack traces, node names) and value_info."""
    with quiet(), torch.no_grad():
        program = torch.onnx.export(
            module.eval(),
            args,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=inputs,
            output_names=outputs,
            optimize=True,
            verbose=False,
        )
    model = program.model
    ClearMetadataAndDocStringPass()(model)
    graph_outputs = set(model.graph.outputs)
    count = 0
    for node in model.graph:
        node.name = None
        for value in node.outputs:  # no value_info, short names: every variant's .onnx repeats the graph
            if value not in graph_outputs:
                value.shape, value.type = None, None
                value.name = f"t{count}"
                count += 1
    model.producer_name, model.producer_version = "ifp-export", None
    return model


def trace_decoder(model: CausalLM) -> ir.Model:
    cfg = model.config
    batch, seq, past, total = (torch.export.Dim(n) for n in ("batch", "sequence_length", "past_length", "total"))
    b, t, p = 2, 3, 4
    cache = [torch.zeros(b, cfg.num_key_value_heads, p, cfg.head_dim) for _ in range(2 * cfg.num_hidden_layers)]
    args = (
        torch.zeros(b, t, dtype=torch.long),
        torch.ones(b, p + t, dtype=torch.long),
        torch.arange(p, p + t)[None].expand(b, t).contiguous(),
        *cache,
    )
    shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past} for _ in cache),
    }
    inputs, outputs = decoder_io_names(cfg.num_hidden_layers)
    return trace(FlatCacheDecoder(model), args, shapes, inputs, outputs)


def trace_predictor(predictor: SparsityPredictor, variant_masks: torch.Tensor) -> ir.Model:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence_length")
    args = (torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long))
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    router = PredictorRouter(predictor, variant_masks)
    return trace(router, args, shapes, ["input_ids", "attention_mask"], ["scores", "variant_scores"])


@torch.no_grad()
def traced_decoder(cfg: DecoderConfig, ffn_width: int) -> tuple[ir.Model, list[Binding]]:
    """The Optimum-layout decoder graph for FFN width `ffn_width`, weight initializers empty, and their bindings."""
    with torch.device("meta"):
        model = CausalLM(cfg.replace(intermediate_size=ffn_width))
    model = model.to_empty(device="cpu")
    model.model.rotary_emb.reset_parameters()
    generator = torch.Generator().manual_seed(0)
    for param in model.parameters():  # distinct values, so every initializer is found by content alone
        param.copy_(torch.randn(param.shape, generator=generator))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    wanted: dict[str, tuple[str, str]] = {}
    for name, param in model.named_parameters():  # tied lm_head: once, as model.embed_tokens.weight
        wanted[tensor_key(param.numpy())] = (name, "same")
        if param.dim() == 2:
            wanted.setdefault(tensor_key(param.T.contiguous().numpy()), (name, "transposed"))
    graph = trace_decoder(model)
    del model
    bindings = []
    for init_name, value in graph.graph.initializers.items():
        hit = wanted.get(tensor_key(value.const_value.numpy()))
        if hit is not None:
            bindings.append(Binding(init_name, (hit[0],), hit[1], is_ffn(hit[0])))
            value.const_value = None
    ffn = sum(b.ffn for b in bindings)
    if ffn != 3 * cfg.num_hidden_layers:
        raise RuntimeError(f"traced decoder: {ffn} FFN initializers found for {cfg.num_hidden_layers} layers")
    return graph, bindings
