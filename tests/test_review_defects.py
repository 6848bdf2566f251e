"""Issue 27: defects from a code review, each pinned by a test that failed before its fix."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ifp_export.pipeline import ExportContext
from ifp_export.runtime import Runtime


def byte_level_tokenizer() -> Tokenizer:
    """A byte-level BPE (as Qwen2's and Llama 3's) with no merges: every UTF-8 byte is its own token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["ok"], trainer)
    return tokenizer


# --- 27.1: a character split over two tokens is streamed whole -------------------------------------------------


def test_stream_text_holds_back_an_incomplete_character(tiny_export: ExportContext) -> None:
    runtime = Runtime(tiny_export.workdir, threads=1)
    runtime.tokenizer, runtime.eos_ids = byte_level_tokenizer(), set()
    ids = runtime.tokenizer.encode("café ok").ids
    assert len(ids) == len("café ok".encode())  # é is two tokens
    pieces = list(runtime.stream_text(iter(ids)))
    assert "".join(pieces) == runtime.tokenizer.decode(ids) == "café ok", pieces
    assert all("\ufffd" not in piece for piece in pieces), pieces
    # a stream that ends inside a character shows what decoding all of its ids shows
    cut = ids[:4]
    assert "".join(runtime.stream_text(iter(cut))) == runtime.tokenizer.decode(cut) == "caf\ufffd"
