"""The benchmark model of DESIGN.md section 9, wrapped as an IFPruning checkpoint.

A random-weight (seeded) Llama: hidden 1024, 16 layers, d_ff 2816, 16 heads / 4 KV heads, vocab 32000, untied
lm_head (245M parameters, 0.98 GB fp32), with a WordLevel tokenizer over 32000 synthetic tokens and a tasks.jsonl
of 8 tasks (8 variants), keep 25 %. `SIZES["tiny"]` is the same recipe at smoke-test size, `SIZES["small"]` a
~40M one to check figures on shared cores. `build_lm_predictor` makes the paper's kind of predictor for P5: an LM
(a quarter of the backbone's width, depth and d_ff, same vocabulary) + a 2-layer MLP head, ~1/10 of its parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from ifp_export.checkpoint import Checkpoint, create_checkpoint
from ifp_export.model.config import DecoderConfig
from ifp_export.model.decoder import CausalLM
from ifp_export.model.hf_io import save_decoder
from ifp_export.model.lm_predictor import HeadConfig, LMPredictor, new_lm_predictor

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
SIZES: dict[str, dict[str, int]] = {
    "bench": dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        tasks=8,
    ),
    "small": dict(
        vocab_size=16000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        tasks=4,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tasks=2,
    ),
}
PROMPTS_PER_TASK = 4
KEEP = 0.25


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """WordLevel over `vocab_size` tokens: the specials, then w4 ... w{vocab_size-1}; whitespace-split."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tokenizer


def synthetic_prompt(rng: torch.Generator, lo: int, hi: int, length: int) -> str:
    return " ".join(f"w{int(i)}" for i in torch.randint(lo, hi, (length,), generator=rng))


def task_rows(vocab_size: int, tasks: int, per_task: int = PROMPTS_PER_TASK, seed: int = 0) -> list[dict[str, str]]:
    """Prompts of task t draw their words from the t-th slice of the vocabulary, so tasks differ."""
    rng = torch.Generator().manual_seed(seed)
    span = (vocab_size - len(SPECIALS)) // tasks
    rows = []
    for t in range(tasks):
        lo = len(SPECIALS) + t * span
        for _ in range(per_task):
            rows.append({"task": f"task_{t}", "prompt": synthetic_prompt(rng, lo, lo + span, 24)})
    return rows


def decoder_config(size: str) -> DecoderConfig:
    fields = {k: v for k, v in SIZES[size].items() if k != "tasks"}
    return DecoderConfig(
        **fields, max_position_embeddings=2048, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )


def random_llama(cfg: DecoderConfig, directory: Path) -> None:
    """A seeded random Llama saved in HF format; a Llama-like init (std 0.02) keeps activations in a normal range."""
    model = CausalLM(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.02)
    save_decoder(model, directory)


def build_lm_predictor(root: Path, size: str = "bench", seed: int = 0) -> LMPredictor:
    """The backbone's quarter (hidden, layers, d_ff; head_dim 64 or less; same vocab) as an HF LM in root/predictor_lm,
    wrapped with a seeded 2-layer MLP head that scores the backbone's [L, d_ff] neurons."""
    cfg = decoder_config(size)
    hidden = cfg.hidden_size // 4
    head_dim = min(64, hidden)
    heads = hidden // head_dim
    lm = cfg.replace(
        hidden_size=hidden,
        intermediate_size=cfg.intermediate_size // 4,
        num_hidden_layers=max(1, cfg.num_hidden_layers // 4),
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim,
    )
    torch.manual_seed(seed + 1)
    random_llama(lm, root / "predictor_lm")
    head = HeadConfig(cfg.num_hidden_layers, cfg.intermediate_size, hidden_sizes=(256,))
    return new_lm_predictor(root / "predictor_lm", head, seed)


def build_checkpoint(root: Path, size: str = "bench", seed: int = 0) -> Checkpoint:
    """Write root/src/{backbone/, tasks.jsonl} and wrap them into root/ckpt (must not exist)."""
    cfg = decoder_config(size)
    src = root / "src"
    torch.manual_seed(seed)
    random_llama(cfg, src / "backbone")
    synthetic_tokenizer(cfg.vocab_size).save(str(src / "backbone" / "tokenizer.json"))
    rows = task_rows(cfg.vocab_size, SIZES[size]["tasks"], seed=seed)
    (src / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "ckpt"
    out.mkdir(parents=True)
    return create_checkpoint(src / "backbone", src / "tasks.jsonl", out, KEEP, seed=seed)
