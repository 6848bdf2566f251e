"""A compact Llama-family causal LM (Llama, Mistral, Qwen2) written for export.

Module and parameter names mirror Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so a
`save_pretrained` state dict loads without a mapping table and folded variants save back as HF checkpoints.
The KV cache is explicit tensors in and out (no cache objects), masks are plain tensor arithmetic, and there
is no data-dependent Python control flow, so `torch.onnx.export(dynamo=True)` and `torch.jit.trace` see one
static graph.

Weights may be stored in a lower precision than the activations (a bf16/fp16 checkpoint memory-mapped as it is):
`Linear`, `Embedding` and `RMSNorm` cast their weight to the activation dtype (float32) inside the op, so at most
one matrix is upcast at a time. With float32 weights no cast is made (and none is traced).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from ifp_export.model.config import DecoderConfig, rope_inverse_frequencies

KVCache = list[tuple[torch.Tensor, torch.Tensor]]
COMPUTE_DTYPE = torch.float32


def cast(weight: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`weight` in `dtype`; the same tensor (no op) when it already is."""
    return weight if weight is None or weight.dtype == dtype else weight.to(dtype)


CAST_BUFFERS: ContextVar[dict[tuple[str, torch.dtype], torch.Tensor] | None] = ContextVar("cast_buffers", default=None)


@contextmanager
def reused_casts() -> Iterator[None]:
    """Within this block, a no-grad forward casts each weight stored in a lower precision than its input into a
    buffer per role that every layer reuses (`cast_weight`), instead of into fresh memory: a fresh float32 copy of
    a weight costs as much in new pages as the copy itself (an 8B bf16 model's layers over one 40-token row: 15.0 s
    with fresh casts, 8.9 s reused). The buffers are freed when the block ends."""
    token = CAST_BUFFERS.set({})
    try:
        yield
    finally:
        CAST_BUFFERS.reset(token)


def cast_weight(weight: torch.Tensor, dtype: torch.dtype, role: str = "linear") -> torch.Tensor:
    """`weight` in `dtype`; inside `reused_casts` (no grad) a view of `role`'s buffer, valid until the next cast
    for the same role, so the caller uses it at once (as one op's operand)."""
    buffers = CAST_BUFFERS.get()
    if buffers is None or weight.dtype == dtype or torch.is_grad_enabled():
        return cast(weight, dtype)
    buffer = buffers.get((role, dtype))
    if buffer is None or buffer.numel() < weight.numel():
        buffers.pop((role, dtype), None)  # the old buffer goes before the larger one is made
        buffer = buffers[(role, dtype)] = torch.empty(weight.numel(), dtype=dtype)
    return buffer[: weight.numel()].view(weight.shape).copy_(weight)


class Linear(nn.Linear):
    """`nn.Linear` whose weight may be stored in a lower precision than its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float64 and self.weight.dtype != torch.float64:
            return upcast_linear(x, self.weight, self.bias)
        return F.linear(x, cast_weight(self.weight, x.dtype), cast(self.bias, x.dtype))


FLOAT64_CHUNK = 1 << 20  # weight elements a float64 forward (ifp_export.bounds' noise reference) upcasts at once


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias in x's dtype (float64), upcasting a block of output rows at a time into one buffer: a
    float64 lm_head of a 128k-token vocabulary would otherwise be a 4 GB copy, and a fresh copy per block costs
    more than its product (its new pages: a 14336 x 4096 weight upcast whole takes 0.18 s fresh, 0.02 s into a used
    buffer; the float64 linears of an 8B layer's five weight shapes at 40 tokens: 0.48 s fresh, 0.16 s reused)."""
    rows = min(weight.shape[0], max(1, FLOAT64_CHUNK // weight.shape[1]))
    buffer = weight.new_empty((rows, weight.shape[1]), dtype=x.dtype)
    out = [F.linear(x, buffer[: len(block)].copy_(block)) for block in weight.split(rows)]
    out = torch.cat(out, dim=-1) if len(out) > 1 else out[0]
    return out if bias is None else out + bias.to(x.dtype)


class Embedding(nn.Embedding):
    """`nn.Embedding` returning float32 rows whatever the stored dtype (only the looked-up rows are cast)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return cast(F.embedding(input_ids, self.weight), COMPUTE_DTYPE)

    def reset_parameters(self) -> None:
        """No init on the meta device (weights are assigned from a checkpoint): nn.Embedding's init there imports
        torch._dynamo, seconds of every load."""
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))  # fp32 at least; float64 for the noise reference
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return cast(self.weight, dtype) * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the given positions (HF's `rotate_half` convention)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        with torch.device("cpu"):  # also when the model is built on the meta device: the table is computed, not loaded
            self.register_buffer("inv_freq", rope_inverse_frequencies(cfg), persistent=False)

    def reset_parameters(self) -> None:
        """Recompute the (non-persistent) frequencies, e.g. after building on the meta device."""
        self.inv_freq = rope_inverse_frequencies(self.cfg)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [B, T, D]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def attention_bias(
    attention_mask: torch.Tensor,
    query_length: int,
    dtype: torch.dtype,
    causal: bool = True,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Additive mask [B, 1, T, S] from a 0/1 key mask [B, S] whose last T keys are the queries.

    Blocked entries get the dtype's most negative finite value (not -inf).
    """
    key_length = attention_mask.shape[-1]
    key_pos = torch.arange(key_length, device=attention_mask.device)[None, :]
    query_pos = torch.arange(query_length, device=attention_mask.device)[:, None] + (key_length - query_length)
    allowed = attention_mask[:, None, None, :].bool()
    if causal:
        allowed = allowed & (key_pos <= query_pos)
    if sliding_window is not None:
        allowed = allowed & (query_pos - key_pos < sliding_window)
    # Every query sees at least its own key, so fully padded rows stay finite even where the blocked value
    # rounds to -inf (fp16 conversion); real rows are unchanged since their diagonal is already allowed.
    allowed = torch.logical_or(allowed, key_pos == query_pos)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, blocked)


class Attention(nn.Module):
    """Grouped-query attention with RoPE; returns the full (past + new) keys and values."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        q_size, kv_size = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, q_size, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, kv_size, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(q_size, cfg.hidden_size, bias=cfg.o_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        out, present = self.attend((self.q_proj(x), self.k_proj(x), self.v_proj(x)), (cos, sin, bias), past)
        return self.o_proj(out), present

    def attend(
        self,
        qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        positional: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """What happens between the projections: the projected rows (q, k, v) [B, T, heads * D] with RoPE, the cache
        and the softmax (`positional`: cos, sin, bias); [B, T, heads * D] for o_proj, and the keys and values. Apart
        from `forward` so that several models sharing these weights can project all their rows in one product each
        (`ifp_export.bounds.lockstep_hidden`)."""
        (q, k, v), (cos, sin, bias) = qkv, positional
        b, t, _ = q.shape
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        out = F.scaled_dot_product_attention(
            q, repeat_kv(k, self.num_heads), repeat_kv(v, self.num_heads), attn_mask=bias
        )
        return out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim), (k, v)


def repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, KVH, S, D] -> [B, H, S, D] by repeating each KV head for its query group."""
    b, kv_heads, s, d = x.shape
    if kv_heads == num_heads:
        return x
    return x[:, :, None].expand(b, kv_heads, num_heads // kv_heads, s, d).reshape(b, num_heads, s, d)


class MLP(nn.Module):
    """SwiGLU FFN. `neuron_mask` ([d_ff] or [B, 1, d_ff]) switches intermediate neurons off: a float 0/1 mask
    multiplies them by 0 (differentiable), a bool mask skips them (`kept_width`)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, neuron_mask: torch.Tensor | None = None) -> torch.Tensor:
        if neuron_mask is not None and neuron_mask.dtype == torch.bool:
            return self.kept_width(x, neuron_mask)
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        if neuron_mask is not None:
            h = h * neuron_mask.to(h.dtype)
        return self.down_proj(h)

    def kept_width(self, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The rows of each distinct mask of `kept` ([d_ff] or [B, 1, d_ff] bool) through only its kept neurons: what
        the masked FFN computes without its zeros (the same products, summed in another order), at k / d_ff of the
        FLOPs and weight reads. The projections' modules are not called (no forward hooks run)."""
        kept = kept.reshape(-1, kept.shape[-1]).expand(x.shape[0], -1)
        out = x.new_empty(*x.shape[:-1], self.down_proj.out_features)
        masks, groups = torch.unique(kept, dim=0, return_inverse=True)
        for group, mask in enumerate(masks):
            rows = (groups == group).nonzero().flatten()
            idx = slice(None) if bool(mask.all()) else mask.nonzero().flatten()  # a dense row: no copy of the weights
            gate = cast_weight(self.gate_proj.weight[idx], x.dtype, "gate")  # three casts alive: a buffer each
            up = cast_weight(self.up_proj.weight[idx], x.dtype, "up")
            down = cast_weight(self.down_proj.weight[:, idx], x.dtype, "down")
            xs = x[rows]
            out[rows] = F.linear(F.silu(F.linear(xs, gate)) * F.linear(xs, up), down)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
        neuron_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attn, present = self.self_attn(self.input_layernorm(x), cos, sin, bias, past)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x), neuron_mask)
        return x, present


class DecoderModel(nn.Module):
    """The transformer body (HF's `model.` prefix): embeddings, layers, final norm."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        ffn_masks: torch.Tensor | None = None,
        causal: bool = True,
    ) -> tuple[torch.Tensor, KVCache]:
        """Final-norm hidden states [B, T, hidden] and the updated cache (see `CausalLM.forward`)."""
        b, t = input_ids.shape
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(b, past_len + t, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + t, device=input_ids.device)[None].expand(b, t)
        if ffn_masks is not None and ffn_masks.dim() == 2:
            ffn_masks = ffn_masks[None]
        x = self.embed_tokens(input_ids)
        cos, sin, bias = self.positional(attention_mask, position_ids, x.dtype, causal)
        presents: KVCache = []
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            mask = None if ffn_masks is None else ffn_masks[:, i, None, :]
            x, present = layer(x, cos, sin, bias, past, mask)
            presents.append(present)
        return self.norm(x), presents

    def positional(
        self, attention_mask: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype, causal: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What every layer reads besides its input: RoPE's cos/sin and the additive attention mask, in `dtype`."""
        cos, sin = self.rotary_emb(position_ids, dtype)
        bias = attention_bias(attention_mask, position_ids.shape[-1], dtype, causal, self.config.sliding_window)
        return cos, sin, bias


class CausalLM(nn.Module):
    """Llama-family causal LM with an explicit KV cache and optional FFN neuron masks."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        ffn_masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Logits [B, T, V] and the updated cache (one (key, value) pair per layer, [B, KVH, S, D]).

        attention_mask: [B, past + T] 0/1 (default all ones). position_ids: [B, T] (default: counted from
        the past length). ffn_masks: [L, d_ff] or [B, L, d_ff] 0/1 neuron masks (default: dense).
        """
        hidden, presents = self.model(input_ids, attention_mask, position_ids, past_key_values, ffn_masks)
        return self.lm_head(hidden), presents


def decoder_from_state(cfg: DecoderConfig, state: dict[str, torch.Tensor]) -> CausalLM:
    """A `CausalLM` whose parameters ARE the given tensors (no copy; built on the meta device), in eval mode.

    With tied embeddings `lm_head.weight` may be absent; it is the embedding matrix either way.
    """
    with torch.device("meta"):
        model = CausalLM(cfg)
    if cfg.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    model.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False)
