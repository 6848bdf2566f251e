"""One decoder function, built op by op with the coremltools MIL builder from the config and fp16 weights.

No tracing: the graph is written here, so the numerics are ours to choose. Two places where a plain fp16 program
goes wrong on real checkpoints are built differently (issue 18.3):

- RoPE: cos/sin are tables [C, D] computed in fp32 (`rope_inverse_frequencies`, positions 0..C-1) and stored as
  fp16 constants; the program gathers rows P..P+T-1 (P from the mask width). No angle is computed in fp16.
- RMSNorm: x is divided by max|x| (per token) before squaring, so mean(y²) <= 1 never overflows fp16 for
  residual activations in the thousands; the result is y * rsqrt(mean(y²) + eps / m²), which equals
  x * rsqrt(mean(x²) + eps). All ops are plain fp16 elementwise/reductions, so the Neural Engine can run them.

Every weight const is named `const_name(hf_name)`; shared tensors (everything but the FFN) are the same numpy
arrays in every function, so `emit` can give them one `weight_id` and the backend writes them once. With
`--quantize`, every 2-D weight is a `constexpr_blockwise_shift_scale` over quantized arrays (`quantize`). Matrices
are placeholders until the backend writes them (`ProgramWeights`, `deferred`): the program never holds the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ifp_export.model.config import DecoderConfig, rope_inverse_frequencies
from ifp_export.quiet import quiet
from ifp_export.targets.coreml.deferred import DeferredWeights
from ifp_export.targets.coreml.quantize import QuantizedWeight, quantize_weight, quantized_layout, weight_const
from ifp_export.weights import FFN_PROJECTIONS, WeightSource, as_float32, ffn_slice, is_ffn

with quiet():
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, get_new_symbol, types

DECODER_INPUTS = ("inputIds", "causalMask")
DECODER_STATES = ("keyCache", "valueCache")
ROPE_TABLES = ("rope_cos_table", "rope_sin_table")
ZEROS_PREFIX = "zeros"  # bias of a linear without one (else the backend adds one per linear, per function)
NORM_FLOOR = 2.0**-14  # smallest max|x| the norm divides by (fp16's smallest normal); an all-zero token stays 0


def const_name(param: str) -> str:
    """The const name of a weight in the program (HF name, dots to underscores)."""
    return "model_" + param.replace(".", "_") + "_to_fp16"


def rope_tables(cfg: DecoderConfig, max_context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [C, D] in fp32 exactly as `RotaryEmbedding` computes them (fp32 angles, HF rotate_half layout)."""
    positions = torch.arange(max_context, dtype=torch.float32)[:, None]
    freqs = positions * rope_inverse_frequencies(cfg)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().numpy(), emb.sin().numpy()


Weight = np.ndarray | QuantizedWeight  # fp16, or quantized (2-D weights with --quantize)


def program_weight(array: np.ndarray | torch.Tensor, quantize: str) -> Weight:
    """A tensor (float32 or as stored) as the program stores it: fp16, and quantized if it is a 2-D weight and
    `quantize` is not none."""
    if quantize == "none" or array.ndim != 2:
        return as_float32(array).numpy().astype(np.float16)
    return quantize_weight(array, quantize)


class ProgramWeights:
    """Every weight of the program as it stores them, read from the source only when the backend writes it
    (`deferred`): a 2-D weight is a placeholder const (fp16, or int data + fp16 scales), the same object in every
    function for a shared tensor (one `weight_id`, one blob); vectors (norms, biases) and the RoPE tables are held.
    A variant's FFN slices are gathered and quantized on their own (equal to rows of the dense function's quantized
    arrays for gate/up: one scale row per output channel; anew for down_proj, whose input blocks change)."""

    def __init__(self, source: WeightSource, max_context: int, quantize: str, deferred: DeferredWeights) -> None:
        self.source, self.quantize, self.deferred = source, quantize, deferred
        self.shared_names = [n for n in source.names() if not is_ffn(n)]
        self._shared: dict[str, Weight] = {}
        cos, sin = rope_tables(source.config, max_context)
        self.rope = (cos.astype(np.float16), sin.astype(np.float16))

    def names(self) -> list[str]:
        """Const names of the shared weights (what gets one `weight_id` across functions)."""
        return [const_name(n) for n in self.shared_names] + list(ROPE_TABLES) + [ZEROS_PREFIX]

    def shared(self, name: str) -> Weight:
        if name not in self._shared:
            shape = self.source.shape(name)
            if len(shape) == 2:
                self._shared[name] = self._deferred(shape, lambda: self.source.tensor(name))
            else:
                self._shared[name] = program_weight(self.source.tensor(name), self.quantize)
                self.source.release()
        return self._shared[name]

    def ffn(self, indices: np.ndarray | None) -> FFNWeights:
        """One function's FFN weights: the dense ones (None) or a variant's kept neurons ([L, k])."""

        def weight(layer: int, proj: str) -> Weight:
            rows = None if indices is None else indices[layer]
            hidden, width = self.source.config.hidden_size, self.source.config.intermediate_size
            width = width if rows is None else len(rows)
            shape = (hidden, width) if proj == "down_proj" else (width, hidden)
            return self._deferred(shape, lambda: ffn_slice(self.source, layer, proj, rows))

        return weight

    def _deferred(self, shape: tuple[int, ...], read: Callable[[], np.ndarray | torch.Tensor]) -> Weight:
        def produced() -> Weight:
            value = program_weight(read(), self.quantize)
            self.source.release()
            return value

        if self.quantize == "none":
            return self.deferred.placeholder(shape, np.dtype(np.float16), produced)
        key = object()  # the data and scale blobs of this weight come from one quantization
        quantized = lambda: self.deferred.once(key, produced)  # noqa: E731
        data_dtype, scale_shape = quantized_layout(self.quantize, shape)
        return QuantizedWeight(
            self.deferred.placeholder(shape, data_dtype, lambda: quantized().data),
            self.deferred.placeholder(scale_shape, np.dtype(np.float16), lambda: quantized().scale),
        )


FFNWeights = Callable[[int, str], Weight]  # (layer, projection) -> [out, in], fp16 or quantized


def decoder_function(cfg: DecoderConfig, shared: ProgramWeights, ffn: FFNWeights, max_context: int) -> Function:
    """The stateful decoder step: inputIds [1, T], causalMask [1, 1, T, P+T] -> logits [1, T, V]; the KV cache
    states [L, 1, KVH, C, D] get keys/values written at P..P+T-1."""
    cache = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, max_context, cfg.head_dim)
    t, s = get_new_symbol(), get_new_symbol()
    specs = {
        DECODER_INPUTS[0]: mb.TensorSpec((1, t), dtype=types.int32),
        DECODER_INPUTS[1]: mb.TensorSpec((1, 1, t, s), dtype=types.fp16),
        DECODER_STATES[0]: mb.StateTensorSpec(cache, dtype=types.fp16),
        DECODER_STATES[1]: mb.StateTensorSpec(cache, dtype=types.fp16),
    }
    mb.name_count.clear()  # op names come from a process-wide counter: restart it, so same inputs -> same spec
    with Function(specs, opset_version=ct.target.iOS18) as fn:
        ids, mask, key_state, value_state = (fn.inputs[n] for n in specs)
        fn.set_outputs([_decoder_body(cfg, shared, ffn, ids, mask, key_state, value_state)])
    rng = ct.RangeDim(lower_bound=1, upper_bound=max_context, default=1)
    fn.input_types = [
        ct.TensorType(name=DECODER_INPUTS[0], shape=(1, rng), dtype=np.int32),
        ct.TensorType(name=DECODER_INPUTS[1], shape=(1, 1, rng, rng), dtype=np.float16),
    ]
    return fn


def weight(shared: ProgramWeights, name: str) -> Any:
    return weight_const(shared.shared(name), const_name(name))


def _decoder_body(cfg, shared, ffn, ids, mask, key_state, value_state):
    h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    embed = weight(shared, "model.embed_tokens.weight")
    length = mb.slice_by_index(x=mb.shape(x=ids), begin=[1], end=[2])  # T, [1] int32
    total = mb.slice_by_index(x=mb.shape(x=mask), begin=[3], end=[4])  # P + T
    past = mb.sub(x=total, y=length)
    positions = mb.range_1d(start=mb.squeeze(x=past), end=mb.squeeze(x=total), step=1)
    cos_table, sin_table = (mb.const(val=table, name=n) for table, n in zip(shared.rope, ROPE_TABLES, strict=True))
    cos = mb.expand_dims(x=mb.gather(x=cos_table, indices=positions, axis=0), axes=[0, 1])  # [1, 1, T, D]
    sin = mb.expand_dims(x=mb.gather(x=sin_table, indices=positions, axis=0), axes=[0, 1])
    x = mb.gather(x=embed, indices=ids, axis=0)  # [1, T, hidden]
    zero = np.zeros(1, np.int32)
    # read each cache once and thread its value through the layers' writes: separate read_state ops per layer
    # would be identical to coremltools' common-subexpression pass, which merges them, so a later layer would
    # write back a copy read before an earlier layer's update (losing it)
    caches = {"key": mb.read_state(input=key_state), "value": mb.read_state(input=value_state)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        y = rms_norm(x, weight(shared, p + "input_layernorm.weight"), cfg.rms_norm_eps)
        q = _heads(_linear(y, shared, p + "self_attn.q_proj", cfg.qkv_bias), h, d)
        k = _heads(_linear(y, shared, p + "self_attn.k_proj", cfg.qkv_bias), kvh, d)
        v = _heads(_linear(y, shared, p + "self_attn.v_proj", cfg.qkv_bias), kvh, d)
        q, k = rope(q, cos, sin, d), rope(k, cos, sin, d)
        begin = mb.concat(values=[np.array([i, 0, 0], np.int32), past, zero], axis=0)
        end = mb.concat(values=[np.array([i + 1, 1, kvh], np.int32), total, np.array([d], np.int32)], axis=0)
        prefix_begin = np.array([i, 0, 0, 0, 0], np.int32)
        caches["key"], keys = _cache_write(key_state, caches["key"], k, begin, end, prefix_begin, kvh, d, h)
        caches["value"], values = _cache_write(value_state, caches["value"], v, begin, end, prefix_begin, kvh, d, h)
        out = mb.scaled_dot_product_attention(query=q, key=keys, value=values, attn_mask=mask)
        out = mb.reshape(x=mb.transpose(x=out, perm=[0, 2, 1, 3]), shape=[1, -1, h * d])
        x = mb.add(x=x, y=_linear(out, shared, p + "self_attn.o_proj", cfg.o_bias))
        y = rms_norm(x, weight(shared, p + "post_attention_layernorm.weight"), cfg.rms_norm_eps)
        gate, up = (_no_bias_linear(y, _ffn_const(ffn, i, proj)) for proj in FFN_PROJECTIONS[:2])
        act = mb.mul(x=mb.silu(x=gate), y=up)
        x = mb.add(x=x, y=_no_bias_linear(act, _ffn_const(ffn, i, "down_proj")))
    y = rms_norm(x, weight(shared, "model.norm.weight"), cfg.rms_norm_eps)
    head = embed if cfg.tie_word_embeddings else weight(shared, "lm_head.weight")
    return _no_bias_linear(y, head, name="logits")


def _ffn_const(ffn: FFNWeights, layer: int, proj: str) -> Any:
    return weight_const(ffn(layer, proj), const_name(f"model.layers.{layer}.mlp.{proj}.weight"))


def _linear(x, shared, prefix, bias):
    w = weight(shared, prefix + ".weight")
    if not bias:
        return _no_bias_linear(x, w)
    return mb.linear(x=x, weight=w, bias=weight(shared, prefix + ".bias"))


def _no_bias_linear(x, w, **kwargs):
    """A linear with an explicit zero bias named by its width, so every function shares it."""
    width = w.shape[0]
    zeros = mb.const(val=np.zeros(width, np.float16), name=f"{ZEROS_PREFIX}_{width}")
    return mb.linear(x=x, weight=w, bias=zeros, **kwargs)


def _heads(x, heads, d):
    """[1, T, heads*d] -> [1, heads, T, d]."""
    return mb.transpose(x=mb.reshape(x=x, shape=[1, -1, heads, d]), perm=[0, 2, 1, 3])


def _cache_write(state, cache, new, begin, end, prefix_begin, kvh, d, heads):
    """Write `new` [1, KVH, T, D] into the layer's rows P..P+T-1 of `cache` (the state's current value) and the
    state; return the new value and the prefix 0..P+T-1 repeated per query group: [1, H, P+T, D]."""
    updated = mb.slice_update(x=cache, update=mb.expand_dims(x=new, axes=[0]), begin=begin, end=end)
    written = mb.coreml_update_state(state=state, value=updated)
    prefix = mb.slice_by_index(x=written, begin=prefix_begin, end=end)  # [1, 1, KVH, P+T, D]
    prefix = mb.reshape(x=prefix, shape=[1, kvh, 1, -1, d])
    if heads != kvh:
        prefix = mb.tile(x=prefix, reps=[1, 1, heads // kvh, 1, 1])
    return written, mb.reshape(x=prefix, shape=[1, heads, -1, d])


def rms_norm(x, w, eps: float):
    """w * x * rsqrt(mean(x²) + eps), overflow-free in fp16: y = x / m (m = max|x| per token, >= NORM_FLOOR),
    then y * rsqrt(mean(y²) + eps / m²). Mirrored op for op by `numerics.rms_norm_fp16`."""
    m = mb.maximum(x=mb.reduce_max(x=mb.abs(x=x), axes=[-1], keep_dims=True), y=np.float16(NORM_FLOOR))
    y = mb.real_div(x=x, y=m)
    mean = mb.reduce_mean(x=mb.mul(x=y, y=y), axes=[-1], keep_dims=True)
    scaled_eps = mb.real_div(x=mb.real_div(x=np.float16(eps), y=m), y=m)  # eps/m/m: underflows to 0, never inf
    return mb.mul(x=w, y=mb.mul(x=y, y=mb.rsqrt(x=mb.add(x=mean, y=scaled_eps))))


def rope(x, cos, sin, d: int):
    """x * cos + rotate_half(x) * sin with the gathered fp16 tables ([1, 1, T, D])."""
    half = d // 2
    first = mb.slice_by_index(x=x, begin=[0, 0, 0, 0], end=[0, 0, 0, half], end_mask=[True, True, True, False])
    second = mb.slice_by_index(x=x, begin=[0, 0, 0, half], end=[0, 0, 0, d], end_mask=[True, True, True, False])
    rotated = mb.concat(values=[mb.mul(x=second, y=np.float16(-1.0)), first], axis=-1)
    return mb.add(x=mb.mul(x=x, y=cos), y=mb.mul(x=rotated, y=sin))
