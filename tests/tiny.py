"""Tiny random IFPruning checkpoints for tests (built with the project's own writers, no hub)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from rich.console import Console
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from ifp_export.checkpoint import create_checkpoint
from ifp_export.cli import bundled_sample
from ifp_export.model.config import DecoderConfig
from ifp_export.model.decoder import CausalLM
from ifp_export.model.hf_io import save_decoder
from ifp_export.passes import (
    EmitOnnxPass,
    FoldPass,
    GroupPass,
    LoadPass,
    ManifestPass,
    PredictPass,
    ValidatePass,
    default_passes,
)
from ifp_export.pipeline import ExportContext, ExportOptions, Pass, Pipeline

ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789 +=()-:")
TASK_PROMPTS = {
    "add": ["add 12+7=", "add 3+45=", "add 60+1=", "add 9+9="],
    "reverse": ["reverse abc:", "reverse hello:", "reverse xy:"],
    "brackets": ["brackets (()):", "brackets ((:", "brackets ()():"],
}


def char_tokenizer() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *ALPHABET])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


def save_backbone(directory: Path, seed: int = 0, **overrides: object) -> CausalLM:
    """A random Llama-style backbone (hidden 32, 2 layers, d_ff 48) saved in HF format with a tokenizer."""
    torch.manual_seed(seed)
    vocab = char_tokenizer().get_vocab_size()
    fields = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    fields.update(overrides)
    model = CausalLM(DecoderConfig(**fields)).eval()
    save_decoder(model, directory)
    char_tokenizer().save(str(directory / "tokenizer.json"))
    return model


def write_tasks(path: Path, prompts: dict[str, list[str]] = TASK_PROMPTS) -> Path:
    rows = [{"task": task, "prompt": p} for task, items in prompts.items() for p in items]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_checkpoint(root: Path, keep: float = 0.25, seed: int = 0, **backbone_overrides: object) -> Path:
    """backbone/ + tasks.jsonl under root/src, wrapped into root/ckpt by `create_checkpoint`."""
    src = root / "src"
    save_backbone(src / "backbone", seed, **backbone_overrides)
    write_tasks(src / "tasks.jsonl")
    out = root / "ckpt"
    out.mkdir(parents=True)
    create_checkpoint(src / "backbone", src / "tasks.jsonl", out, keep, seed=seed)
    return out


def run_export(
    checkpoint: Path, workdir: Path, until: str | None = None, passes: list[Pass] | None = None, **options: object
) -> ExportContext:
    """Run the export pipeline (every pass, or `passes`) in-process into `workdir`, with the console captured in a
    string."""
    workdir.mkdir(parents=True, exist_ok=True)
    opts = ExportOptions(checkpoint=checkpoint, output=workdir, until=until, **options)
    ctx = ExportContext(options=opts, workdir=workdir, console=Console(file=io.StringIO(), width=200))
    return Pipeline(default_passes() if passes is None else passes).run(ctx, until=until)


def onnx_passes(validate: bool = False) -> list[Pass]:
    """The passes an ONNX app needs (no quality, Core ML or report: seconds less per export), with the ONNX
    validation if `validate`."""
    passes = [LoadPass(), PredictPass(), GroupPass(), FoldPass(), EmitOnnxPass()]
    return [*passes, ValidatePass(), ManifestPass()] if validate else [*passes, ManifestPass()]


def onnx_only_export(root: Path, **options: object) -> Path:
    """The bundled sample through `onnx_passes()`."""
    sample = bundled_sample()
    run_export(sample, root, passes=onnx_passes(), heldout=sample.parent / "heldout.jsonl", **options)
    return root


def console_text(ctx: ExportContext) -> str:
    return ctx.console.file.getvalue()


def export_process(
    checkpoint: Path,
    out: Path,
    *args: str,
    hash_seed: str = "0",
    stderr: object = subprocess.PIPE,
    stdout: object = subprocess.DEVNULL,
) -> subprocess.Popen:
    """`python -m ifp_export export CHECKPOINT -o OUT --heldout CHECKPOINT/tasks.jsonl ARGS` as a subprocess,
    with the options and the single intra-op thread of the in-process `tiny_export` fixture (conftest.py)."""
    argv = [sys.executable, "-m", "ifp_export", "export", str(checkpoint), "-o", str(out)]
    argv += ["--heldout", str(checkpoint / "tasks.jsonl"), *args]
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # the log's width as in CI: no terminal
    env |= {"PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv, env=env, stdout=stdout, stderr=stderr, text=True)
