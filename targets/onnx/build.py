"""The ONNX decoder graph built node by node from `DecoderConfig` with onnx-ir (no tracing).

`build_decoder(cfg, ffn_width, flavor, quantize)` returns the graph and one `Binding` per initializer; the
initializers carry no data until an emitter binds them (`bind_lazy`: each becomes an `ir.LazyTensor` that
calls `materialize` when `ir.save` writes it, so a model streams to external data one tensor at a time and
no second copy of the weights is ever held). Building takes milliseconds at any size: it reads no weights.

Ops (ORT's fused CPU kernels where they keep the graph exact), chosen for `min_onnxruntime`, the oldest release
the graph must run on (floor.py; default 1.20: ai.onnx opset 21; from 1.24: opset 23):
- RMSNorm: the first norm is ONNX's `RMSNormalization` (opset 23) from the 1.24 floor on, else the
  Pow/ReduceMean/Add/Sqrt/Div/Mul chain that ORT's SimplifiedLayerNormFusion turns into one kernel at load (ORT's
  `SimplifiedLayerNormalization` lives in the default domain where `onnx.checker` does not know it); then
  `SkipSimplifiedLayerNormalization`, which adds the residual and normalizes in one kernel (its 4th output is the
  running residual).
- Q/K/V: one MatMul on a packed [hidden, (H + 2 KVH) D] weight (a shared tensor stored once), then Split
  (optimum) or straight into GroupQueryAttention (genai). gate/up are packed the same way (per variant).
- RoPE (optimum): `com.microsoft.RotaryEmbedding` (interleaved=0 is HF's rotate_half). Its cos/sin "cache" is
  computed per token in the graph from `position_ids` x the inverse frequencies (a [head_dim/2]
  constant, `rope_inverse_frequencies`), and the op is fed row indices 0..B*T-1: exact for any position (no
  max_position_embeddings cap) and for left-padded batches, whose positions are not a plain offset.
- Attention (optimum): a boolean mask built once from `attention_mask` (padding & causal & Mistral's sliding
  window, plus the diagonal, as our decoder does), exact on left-padded batches, then per layer either
  FusedMatMul/Softmax/MatMul with the queries grouped as [B, KVH, G, T, D] so GQA's KV heads broadcast and are
  never repeated (the default floor), or ONNX's `Attention` (opset 23, from the 1.24 floor: 1.23's kernel fails
  on an empty past; q_num_heads / kv_num_heads) with past/present caches. Both are exact; measured (8 layers,
  hidden 512, 40M params, 1 thread, best of 5 alternating rounds on a loaded machine, the grouped form with a
  MatMul on transposed keys): 147 (grouped) vs 139 (Attention) tok/s decoding after a 16-token prompt (noise),
  101 vs 122 tok/s after 512 tokens; GroupQueryAttention (genai) 138 / 90. The alternatives: `MultiHeadAttention`
  needs as many KV heads as query heads; `GroupQueryAttention` assumes right padding (it reads only `seqlens_k`),
  which breaks Optimum's left-padded batches.
- flavor="genai": `com.microsoft.GroupQueryAttention` with do_rotary=1, `seqlens_k` / `total_sequence_length`
  computed from `attention_mask` as onnxruntime-genai's builder does, cos/sin caches [max_positions, D/2]
  computed in the graph from constants (ORT folds them into initializers at session start, so they cost no
  disk). Exact for unpadded sequences; on a left-padded batch the padded rows are wrong (tested).
- quantize="int8"/"int4": every linear is `com.microsoft.MatMulNBits` (block 32, symmetric, accuracy_level=4:
  int8 activations, the fast CPU path); the token embedding Gather stays float32 (tied lm_head reads the same
  source quantized). Below the 1.22 floor there is no 8-bit MatMulNBits CPU kernel: an int8 linear is then two
  4-bit MatMulNBits on the high and low nibbles of the same int8 blocks (ops.py "int8hi"/"int8lo"), summed. fp32 tied
  lm_head is `FusedMatMul(transB=1)` on the embedding: no transposed copy.

Initializer names, layouts and shapes are the same in both flavours, so both graphs can point at the same
external data.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from ifp_export.errors import IFPError
from ifp_export.model.config import DecoderConfig, rope_inverse_frequencies
from ifp_export.targets.onnx.floor import DEFAULT_FLOOR, MATMUL_NBITS_8, OPSET_23, parse_floor
from ifp_export.targets.onnx.ops import QUANT_BITS, Binding, materialize, quantized_shapes

PORTABLE_OPSET = 21  # what onnxruntime 1.20 loads
NEW_OPSET = 23  # RMSNormalization and Attention, from the 1.24 floor on
MS_OPSET = 1
IR_VERSION = 10
MS = "com.microsoft"
FLAVORS = ("optimum", "genai")
FLOAT = ir.DataType.FLOAT


class _Unbound(ir.LazyTensor):
    """Placeholder data of a declared initializer: fails loudly if saved before an emitter binds it."""

    def __init__(self, name: str, dtype: ir.DataType, shape: tuple[int, ...]) -> None:
        def fail() -> ir.TensorProtocol:
            raise RuntimeError(f"initializer {name!r} was saved before its weights were bound (bind_lazy)")

        super().__init__(fail, dtype, ir.Shape(shape), name=name)


class _Builder:
    """Nodes, initializers and bindings of one graph, with short deterministic value names."""

    def __init__(self, quantize: str, accuracy_level: int, floor: tuple[int, int]) -> None:
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self.bindings: list[Binding] = []
        self.bits = QUANT_BITS[quantize]
        self.accuracy_level = accuracy_level
        self.floor = floor
        self._count = 0

    def op(self, op_type: str, *inputs: ir.Value | None, domain: str = "", outputs: int = 1, **attrs: object):
        """Add a node; returns its output (or the tuple of its outputs when `outputs` > 1)."""
        values = [ir.Value(name=self._name()) for _ in range(outputs)]
        node = ir.node(op_type, list(inputs), attrs or None, domain=domain, outputs=values, name=values[0].name)
        self.nodes.append(node)
        return values[0] if outputs == 1 else tuple(values)

    def out(self, value: ir.Value, name: str) -> ir.Value:
        value.name = name
        return value

    def const(self, array: np.ndarray | list[int] | int | float, dtype: type = np.int64) -> ir.Value:
        return self.op("Constant", value=ir.tensor(np.asarray(array, dtype=dtype)))

    def weight(self, name: str, sources: tuple[str, ...], layout: str, shape: tuple[int, ...], ffn: bool,
               dtype: ir.DataType = FLOAT) -> ir.Value:  # fmt: skip
        value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))
        value.const_value = _Unbound(name, dtype, shape)
        self.initializers.append(value)
        self.bindings.append(Binding(name, sources, layout, ffn))
        return value

    def linear(self, x: ir.Value, name: str, sources: tuple[str, ...], k: int, n: int, ffn: bool) -> ir.Value:
        """x @ W for W [K, N] made from HF [out, in] sources (packed when several): MatMul or MatMulNBits."""
        if not self.bits:
            return self.op("MatMul", x, self.weight(name, sources, "transposed", (k, n), ffn))
        if self.bits == 8 and self.floor < MATMUL_NBITS_8:
            return self._int8_as_int4_pair(x, name, sources, k, n, ffn)
        blocks_shape, scales_shape = quantized_shapes(k, n, self.bits)
        kind = f"int{self.bits}"
        blocks = self.weight(f"{name}.q", sources, f"{kind}_blocks", blocks_shape, ffn, ir.DataType.UINT8)
        scales = self.weight(f"{name}.s", sources, f"{kind}_scales", scales_shape, ffn)
        attrs = dict(K=k, N=n, bits=self.bits, block_size=32, accuracy_level=self.accuracy_level)
        return self.op("MatMulNBits", x, blocks, scales, domain=MS, **attrs)

    def _int8_as_int4_pair(self, x: ir.Value, name: str, sources: tuple[str, ...], k: int, n: int, ffn: bool):
        """x @ W for int8 blocks q where onnxruntime has no 8-bit MatMulNBits kernel (before 1.22): q - 128 =
        16 (hi - 8) + lo for q's high and low nibbles, so two 4-bit MatMulNBits over the same bytes (hi: scale 16 s,
        the default zero point 8; lo: scale s, zero point 0) sum to the int8 product."""
        planes_shape, scales_shape = quantized_shapes(k, n, 4)
        high = self.weight(f"{name}.qh", sources, "int8hi_blocks", planes_shape, ffn, ir.DataType.UINT8)
        low = self.weight(f"{name}.ql", sources, "int8lo_blocks", planes_shape, ffn, ir.DataType.UINT8)
        scales = self.weight(f"{name}.s", sources, "int8_scales", scales_shape, ffn)
        zero_points = self.op("ConstantOfShape", self.const([n, -(-scales_shape[1] // 2)]),
                              value=ir.tensor(np.zeros(1, np.uint8)))  # fmt: skip
        attrs = dict(K=k, N=n, bits=4, block_size=32, accuracy_level=self.accuracy_level)
        high_scales = self.op("Mul", scales, self.const(16.0, np.float32))
        high_part = self.op("MatMulNBits", x, high, high_scales, domain=MS, **attrs)
        return self.op("Add", high_part, self.op("MatMulNBits", x, low, scales, zero_points, domain=MS, **attrs))

    def _name(self) -> str:
        self._count += 1
        return f"v{self._count}"


def build_decoder(
    cfg: DecoderConfig,
    ffn_width: int,
    flavor: str = "optimum",
    quantize: str = "none",
    accuracy_level: int = 4,
    min_onnxruntime: str = DEFAULT_FLOOR,
) -> tuple[ir.Model, list[Binding]]:
    """The decoder graph for a model whose FFN keeps `ffn_width` neurons per layer.

    Initializers are declared (name, dtype, shape) with no data: bind them with `bind_lazy` (or replace each
    `const_value`) before saving. Same arguments, same graph bytes. `accuracy_level` is MatMulNBits' compute
    type: 4 (int8 activations, fast) ships; 0 (float activations) over the same weights is exact against
    PyTorch run with `dequantized_sources`, which is what a validator can check at the fp32 bound.
    `min_onnxruntime` is the oldest onnxruntime release the graph must run on (floor.py): it picks the ops.
    """
    if flavor not in FLAVORS:
        raise ValueError(f"unknown ONNX flavor {flavor!r} (expected one of {', '.join(FLAVORS)})")
    if quantize not in QUANT_BITS:
        raise ValueError(f"unknown quantization {quantize!r} (expected one of {', '.join(QUANT_BITS)})")
    if not 0 < ffn_width <= cfg.intermediate_size:
        raise ValueError(f"ffn_width must be in 1..{cfg.intermediate_size}, got {ffn_width}")
    if flavor == "genai" and cfg.head_dim % 16:
        raise IFPError(
            f"onnxruntime's GroupQueryAttention needs head_dim to be a multiple of 16, got {cfg.head_dim}",
            "config.json",
            "export the optimum flavour only for this model",
        )
    floor = parse_floor(min_onnxruntime)
    g = _Builder(quantize, accuracy_level, floor)
    batch_seq = ir.Shape(["batch", "seq"])
    input_ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=batch_seq)
    attention_mask = ir.Value(
        name="attention_mask", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "total"])
    )
    inputs = [input_ids, attention_mask]
    if flavor == "optimum":
        position_ids = ir.Value(name="position_ids", type=ir.TensorType(ir.DataType.INT64), shape=batch_seq)
        inputs.append(position_ids)
    pasts = []
    kv_shape = ir.Shape(["batch", cfg.num_key_value_heads, "past", cfg.head_dim])
    for i in range(cfg.num_hidden_layers):
        pair = tuple(
            ir.Value(name=f"past_key_values.{i}.{kind}", type=ir.TensorType(FLOAT), shape=kv_shape)
            for kind in ("key", "value")
        )
        pasts.append(pair)
        inputs.extend(pair)

    embed = g.weight("embed", ("model.embed_tokens.weight",), "as_is", (cfg.vocab_size, cfg.hidden_size), False)
    x = g.op("Gather", embed, input_ids)
    if flavor == "optimum":
        attend = _onnx_attention if floor >= OPSET_23 else _grouped_attention
        attention = _optimum_attention(g, cfg, input_ids, attention_mask, position_ids, attend)
    else:
        attention = _gqa_attention(g, cfg, attention_mask)

    eps = float(cfg.rms_norm_eps)
    norm_in = g.weight("l0.in_norm", ("model.layers.0.input_layernorm.weight",), "as_is", (cfg.hidden_size,), False)
    h = _first_norm(g, x, norm_in, eps)
    residual = x
    presents = []
    for i in range(cfg.num_hidden_layers):
        attn, present = attention(h, i, pasts[i])
        presents.extend(g.out(v, f"present.{i}.{kind}") for v, kind in zip(present, ("key", "value"), strict=True))
        post = g.weight(
            f"l{i}.post_norm", (f"model.layers.{i}.post_attention_layernorm.weight",), "as_is", (cfg.hidden_size,),
            False,
        )  # fmt: skip
        h, residual = _skip_norm(g, attn, residual, post, eps)
        mlp = _mlp(g, cfg, h, i, ffn_width)
        if i + 1 < cfg.num_hidden_layers:
            name, source = f"l{i + 1}.in_norm", f"model.layers.{i + 1}.input_layernorm.weight"
        else:
            name, source = "norm", "model.norm.weight"
        norm = g.weight(name, (source,), "as_is", (cfg.hidden_size,), False)
        h, residual = _skip_norm(g, mlp, residual, norm, eps)
    if cfg.tie_word_embeddings and not g.bits:
        logits = g.op("FusedMatMul", h, embed, domain=MS, transA=0, transB=1, alpha=1.0)
    else:
        source = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        logits = g.linear(h, "lm_head", (source,), cfg.hidden_size, cfg.vocab_size, False)
    outputs = [g.out(logits, "logits"), *presents]
    logits.type, logits.shape = ir.TensorType(FLOAT), ir.Shape(["batch", "seq", cfg.vocab_size])
    present_shape = ir.Shape(["batch", cfg.num_key_value_heads, "total", cfg.head_dim])
    for value in presents:
        value.type, value.shape = ir.TensorType(FLOAT), present_shape
    graph = ir.Graph(
        inputs, outputs, nodes=g.nodes, initializers=g.initializers, name="decoder",
        opset_imports={"": NEW_OPSET if floor >= OPSET_23 else PORTABLE_OPSET, MS: MS_OPSET},
    )  # fmt: skip
    return ir.Model(graph, ir_version=IR_VERSION, producer_name="ifp-export"), g.bindings


def bind_lazy(model: ir.Model, bindings: list[Binding], get: Callable[[str], np.ndarray]) -> ir.Model:
    """Point every initializer at a lazy tensor that materializes it from `get` when saved (streams)."""
    initializers = model.graph.initializers
    for binding in bindings:
        value = initializers[binding.initializer]
        dtype, shape = value.const_value.dtype, value.const_value.shape

        def make(b: Binding = binding, name: str = binding.initializer) -> ir.TensorProtocol:
            return ir.tensor(materialize(b, get), name=name)

        value.const_value = ir.LazyTensor(make, dtype, shape, name=binding.initializer)
    return model


def _first_norm(g: _Builder, x: ir.Value, weight: ir.Value, eps: float) -> ir.Value:
    """RMSNorm of the embeddings (no residual yet): ONNX's RMSNormalization from the 1.24 floor on, else the
    Pow/ReduceMean/Add/Sqrt/Div/Mul chain that onnxruntime's SimplifiedLayerNormFusion turns back into one
    SimplifiedLayerNormalization kernel when the session loads (ORT's own op fails onnx.checker in the default
    domain). One node per model either way."""
    if g.floor >= OPSET_23:
        return g.op("RMSNormalization", x, weight, axis=-1, epsilon=eps, stash_type=1)
    mean_square = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32)), g.const([-1]), keepdims=1)
    rms = g.op("Sqrt", g.op("Add", mean_square, g.const(eps, np.float32)))
    return g.op("Mul", g.op("Div", x, rms), weight)


def _skip_norm(g: _Builder, x: ir.Value, skip: ir.Value, weight: ir.Value, eps: float) -> tuple[ir.Value, ir.Value]:
    """RMSNorm(x + skip) and x + skip (the residual stream), in one kernel; mean / inv_std are not computed."""
    out, mean, inv_std, residual = g.op("SkipSimplifiedLayerNormalization", x, skip, weight, domain=MS, outputs=4,
                                        epsilon=eps)  # fmt: skip
    mean.name = inv_std.name = ""  # omitted optional outputs
    return out, residual


def _qkv(g: _Builder, cfg: DecoderConfig, h: ir.Value, i: int) -> ir.Value:
    """The packed Q/K/V projection [B, T, (H + 2 KVH) D], with Qwen2's biases."""
    prefix = f"model.layers.{i}.self_attn."
    sources = tuple(f"{prefix}{p}_proj.weight" for p in "qkv")
    width = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    qkv = g.linear(h, f"l{i}.qkv", sources, cfg.hidden_size, width, False)
    if cfg.qkv_bias:
        bias = g.weight(f"l{i}.qkv.b", tuple(f"{prefix}{p}_proj.bias" for p in "qkv"), "concat", (width,), False)
        qkv = g.op("Add", qkv, bias)
    return qkv


def _o_proj(g: _Builder, cfg: DecoderConfig, attn: ir.Value, i: int) -> ir.Value:
    prefix = f"model.layers.{i}.self_attn.o_proj."
    q_size = cfg.num_attention_heads * cfg.head_dim
    out = g.linear(attn, f"l{i}.o", (prefix + "weight",), q_size, cfg.hidden_size, False)
    if cfg.o_bias:
        out = g.op("Add", out, g.weight(f"l{i}.o.b", (prefix + "bias",), "as_is", (cfg.hidden_size,), False))
    return out


def _mlp(g: _Builder, cfg: DecoderConfig, h: ir.Value, i: int, width: int) -> ir.Value:
    """SwiGLU with gate/up packed in one projection: down(silu(gate) * up)."""
    prefix = f"model.layers.{i}.mlp."
    sources = (prefix + "gate_proj.weight", prefix + "up_proj.weight")
    gate_up = g.linear(h, f"l{i}.gate_up", sources, cfg.hidden_size, 2 * width, True)
    gate, up = g.op("Split", gate_up, g.const([width, width]), axis=-1, outputs=2)
    act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
    return g.linear(act, f"l{i}.down", (prefix + "down_proj.weight",), width, cfg.hidden_size, True)


def _inverse_frequencies(g: _Builder, cfg: DecoderConfig) -> ir.Value:
    return g.const(rope_inverse_frequencies(cfg).numpy(), np.float32)


def _optimum_attention(
    g: _Builder,
    cfg: DecoderConfig,
    input_ids: ir.Value,
    attention_mask: ir.Value,
    position_ids: ir.Value,
    attend: Callable,
) -> Callable:
    """Optimum flavour: fused RoPE + attention over a boolean mask (exact with left padding); `attend` is the
    attention proper (`_onnx_attention` or `_grouped_attention`)."""
    heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    batch = g.op("Shape", input_ids, start=0, end=1)
    seq = g.op("Shape", input_ids, start=1, end=2)
    total = g.op("Shape", attention_mask, start=1, end=2)
    scalar = g.const([0])

    # Boolean mask [B, 1, T, S]: padding & causal (& window), plus the diagonal (as our decoder does).
    key_pos = g.op("Range", g.const(0), g.op("Squeeze", total, scalar), g.const(1))
    query_pos = g.op("Range", g.op("Squeeze", g.op("Sub", total, seq), scalar), g.op("Squeeze", total, scalar),
                     g.const(1))  # fmt: skip
    query_col = g.op("Unsqueeze", query_pos, g.const([1]))
    allowed = g.op("LessOrEqual", key_pos, query_col)
    if cfg.sliding_window is not None:
        in_window = g.op("Less", g.op("Sub", query_col, key_pos), g.const(cfg.sliding_window))
        allowed = g.op("And", allowed, in_window)
    padding = g.op("Reshape", g.op("Cast", attention_mask, to=ir.DataType.BOOL), g.const([0, 1, 1, -1]))
    allowed = g.op("Or", g.op("And", padding, allowed), g.op("Equal", key_pos, query_col))

    # RoPE tables for exactly these tokens: row r of cos/sin is token r of the flattened batch.
    freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", position_ids, to=FLOAT), g.const([-1])),
                 _inverse_frequencies(g, cfg))  # fmt: skip
    freqs = g.op("Reshape", freqs, g.const([-1, d // 2]))
    cos, sin = g.op("Cos", freqs), g.op("Sin", freqs)
    rows = g.op("Range", g.const(0), g.op("Squeeze", g.op("Mul", batch, seq), scalar), g.const(1))
    rows = g.op("Reshape", rows, g.op("Concat", batch, seq, axis=0))
    split = g.const([heads * d, kv_heads * d, kv_heads * d])
    layer_attention = attend(g, cfg, allowed)

    def attention(h: ir.Value, i: int, past: tuple[ir.Value, ir.Value]) -> tuple[ir.Value, list[ir.Value]]:
        q, k, v = g.op("Split", _qkv(g, cfg, h, i), split, axis=-1, outputs=3)
        q = g.op("RotaryEmbedding", q, rows, cos, sin, domain=MS, interleaved=0, num_heads=heads)
        k = g.op("RotaryEmbedding", k, rows, cos, sin, domain=MS, interleaved=0, num_heads=kv_heads)
        out, k, v = layer_attention(q, k, v, past)
        return _o_proj(g, cfg, out, i), [k, v]

    return attention


def _onnx_attention(g: _Builder, cfg: DecoderConfig, allowed: ir.Value) -> Callable:
    """ONNX's `Attention` (opset 23: the 1.24 floor) on [B, T, heads x D] with past/present caches and the boolean
    mask [B, 1, T, S]: one node per layer."""
    attrs = dict(q_num_heads=cfg.num_attention_heads, kv_num_heads=cfg.num_key_value_heads, scale=_scale(cfg))

    def attend(q: ir.Value, k: ir.Value, v: ir.Value, past: tuple[ir.Value, ir.Value]) -> tuple[ir.Value, ...]:
        return g.op("Attention", q, k, v, allowed, *past, outputs=3, **attrs)

    return attend


def _grouped_attention(g: _Builder, cfg: DecoderConfig, allowed: ir.Value) -> Callable:
    """MatMul/Softmax attention that any onnxruntime since 1.20 runs: the query heads grouped as [B, KVH, G, T, D]
    so the KV heads broadcast and are never repeated; scores by one FusedMatMul (K transposed and the 1/sqrt(D)
    scale inside the GEMM, as Attention does); an additive mask [B, 1, 1, T, S] built once from `allowed`."""
    heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    blocked = float(np.finfo(np.float32).min)
    bias = g.op("Where", g.op("Unsqueeze", allowed, g.const([1])), g.const(0.0, np.float32),
                g.const(blocked, np.float32))  # fmt: skip
    grouped, merged = g.const([0, 0, kv_heads, heads // kv_heads, d]), g.const([0, 0, heads * d])
    per_kv_head, by_kv_head = g.const([0, 0, kv_heads, d]), g.const([2])

    def attend(q: ir.Value, k: ir.Value, v: ir.Value, past: tuple[ir.Value, ir.Value]) -> tuple[ir.Value, ...]:
        q = g.op("Transpose", g.op("Reshape", q, grouped), perm=[0, 2, 3, 1, 4])  # [B, KVH, G, T, D]
        k, v = (
            g.op("Concat", p, g.op("Transpose", g.op("Reshape", t, per_kv_head), perm=[0, 2, 1, 3]), axis=2)
            for p, t in zip(past, (k, v), strict=True)
        )  # present [B, KVH, S, D]
        scores = g.op("FusedMatMul", q, g.op("Unsqueeze", k, by_kv_head), domain=MS, transA=0, transB=1,
                      alpha=_scale(cfg))  # fmt: skip
        probs = g.op("Softmax", g.op("Add", scores, bias), axis=-1)
        out = g.op("MatMul", probs, g.op("Unsqueeze", v, by_kv_head))  # [B, KVH, G, T, D]
        return g.op("Reshape", g.op("Transpose", out, perm=[0, 3, 1, 2, 4]), merged), k, v

    return attend


def _scale(cfg: DecoderConfig) -> float:
    return 1.0 / math.sqrt(cfg.head_dim)


def _gqa_attention(g: _Builder, cfg: DecoderConfig, attention_mask: ir.Value) -> Callable:
    """GenAI flavour: one GroupQueryAttention per layer with rotary fused (right padding only)."""
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    lengths = g.op("ReduceSum", attention_mask, g.const([1]), keepdims=0)
    seqlens_k = g.op("Cast", g.op("Sub", lengths, g.const(1)), to=ir.DataType.INT32)
    total = g.op("Cast", g.op("Squeeze", g.op("Shape", attention_mask, start=1, end=2), g.const([0])),
                 to=ir.DataType.INT32)  # fmt: skip
    positions = g.op("Cast", g.op("Range", g.const(0), g.const(cfg.max_position_embeddings), g.const(1)), to=FLOAT)
    freqs = g.op("Mul", g.op("Unsqueeze", positions, g.const([1])), _inverse_frequencies(g, cfg))
    cos, sin = g.op("Cos", freqs), g.op("Sin", freqs)
    attrs = dict(
        num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0, scale=_scale(cfg),
        local_window_size=cfg.sliding_window if cfg.sliding_window is not None else -1,
    )  # fmt: skip

    def attention(h: ir.Value, i: int, past: tuple[ir.Value, ir.Value]) -> tuple[ir.Value, list[ir.Value]]:
        out, k, v = g.op("GroupQueryAttention", _qkv(g, cfg, h, i), None, None, *past, seqlens_k, total, cos, sin,
                         domain=MS, outputs=3, **attrs)  # fmt: skip
        return _o_proj(g, cfg, out, i), [k, v]

    return attention
