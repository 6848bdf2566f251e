"""S1 / S2 / S3 / P7 at real model sizes: a random seeded HF Llama through `ifp-export` as a user runs it.

    python -m benchmarks.scale --size 1b|3b|8b|bench|100m|tiny [--dtype bfloat16] [--quantize int4] [--until PASS]
                               [--export-arg ARG ...] [--workdir DIR] [--reuse] [--json RESULT.json]

Writes a random seeded Llama in `transformers`' sharded layout, one shard at a time (`write_model`: an 8B bf16
model never has more than a shard in RAM), a tokenizer and tasks of 8 x 4 prompts; then runs `ifp-export
new-checkpoint` and `ifp-export export` as subprocesses under GNU time and prints per-pass seconds (from the
export's log), wall time, peak RSS, the checkpoint's weight bytes, the RSS ratio, and whether the size's targets
(DESIGN.md section 9) are met.
Sizes: bench = the P1-P7 benchmark model (fp32, P7); 1b = TinyLlama-1.1B shape (fp32, S1); 3b = Llama-3.2-3B-like
(bf16 sharded, S2, run it with --quantize int4); 8b = Llama-3.1-8B shape (bf16 sharded, S3, --quantize int4);
100m = a 125M-parameter model for the weights' own memory check (`--until fold`); tiny = the smoke test's (bf16
sharded, seconds). --dtype overrides the size's dtype.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.model import synthetic_tokenizer, task_rows
from benchmarks.proc import checkpoint_weight_bytes, run_child

SHAPES: dict[str, dict] = {
    "tiny": dict(hidden=64, layers=2, d_ff=176, heads=4, kv_heads=2, vocab=512, dtype="bfloat16", shard="40KB"),
    "100m": dict(hidden=768, layers=12, d_ff=2048, heads=12, kv_heads=4, vocab=32000, dtype="float32", shard="200MB"),
    "bench": dict(hidden=1024, layers=16, d_ff=2816, heads=16, kv_heads=4, vocab=32000, dtype="float32", shard="2GB"),
    "1b": dict(hidden=2048, layers=22, d_ff=5632, heads=32, kv_heads=4, vocab=32000, dtype="float32", shard="2GB"),
    "3b": dict(hidden=3072, layers=28, d_ff=8192, heads=24, kv_heads=8, vocab=32000, dtype="bfloat16", shard="1GB"),
    "8b": dict(hidden=4096, layers=32, d_ff=14336, heads=32, kv_heads=8, vocab=128256, dtype="bfloat16", shard="2GB"),
}
# (figure, max seconds or None, max peak RSS / checkpoint weight bytes) per size
TARGETS = {
    "tiny": ("smoke", None, None),  # the interpreter alone is ~300x a tiny model's bytes: no target
    "100m": ("P7", None, 1.5),
    "bench": ("P7", None, 1.5),
    "1b": ("S1", 600.0, 1.5),
    "3b": ("S2", 600.0, 1.0),
    "8b": ("S3", 1800.0, 1.0),
}
TASKS, PROMPTS_PER_TASK, KEEP = 8, 4, 0.25
PASS_LINE = re.compile(r"pass (\S+) done in ([0-9.]+)s")


def llama_tensors(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of an untied Hugging Face `LlamaForCausalLM` of `shape`, in the model's order."""
    hidden, d_ff, head_dim = shape["hidden"], shape["d_ff"], shape["hidden"] // shape["heads"]
    q, kv = shape["heads"] * head_dim, shape["kv_heads"] * head_dim
    tensors = [("model.embed_tokens.weight", (shape["vocab"], hidden))]
    for i in range(shape["layers"]):
        prefix = f"model.layers.{i}."
        tensors += [
            (prefix + "self_attn.q_proj.weight", (q, hidden)),
            (prefix + "self_attn.k_proj.weight", (kv, hidden)),
            (prefix + "self_attn.v_proj.weight", (kv, hidden)),
            (prefix + "self_attn.o_proj.weight", (hidden, q)),
            (prefix + "mlp.gate_proj.weight", (d_ff, hidden)),
            (prefix + "mlp.up_proj.weight", (d_ff, hidden)),
            (prefix + "mlp.down_proj.weight", (hidden, d_ff)),
            (prefix + "input_layernorm.weight", (hidden,)),
            (prefix + "post_attention_layernorm.weight", (hidden,)),
        ]
    return [*tensors, ("model.norm.weight", (hidden,)), ("lm_head.weight", (shape["vocab"], hidden))]


def write_model(directory: Path, size: str, dtype: torch.dtype, seed: int = 0) -> None:
    """A random Llama in `transformers`' sharded layout (config.json, model-*.safetensors + index), written one shard
    at a time: an 8B bf16 model (16 GB) never has more than one shard and one fp32 tensor in RAM. Matrices are
    N(0, 0.02) (a Llama-like init keeps activations and logits in a normal range), norms 1; tensor i draws from its
    own generator seeded `seed + i`, so the bytes depend only on the shape, dtype and seed."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    shape = SHAPES[size]
    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["d_ff"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        torch_dtype=dtype,
    )
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    tensors = llama_tensors(shape)
    itemsize, shard_limit = torch.finfo(dtype).bits // 8, parse_bytes(shape["shard"])
    shards: list[list[int]] = [[]]
    shard_bytes = 0
    for i, (_, dims) in enumerate(tensors):
        nbytes = itemsize * math.prod(dims)
        if shards[-1] and shard_bytes + nbytes > shard_limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(i)
        shard_bytes += nbytes
    weight_map = {}
    for number, members in enumerate(shards, 1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        data = {}
        for i in members:
            name, dims = tensors[i]
            tensor = torch.empty(dims)
            if len(dims) == 2:
                tensor.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed + i))
            else:
                tensor.fill_(1.0)
            data[name] = tensor.to(dtype)
            weight_map[name] = filename
        save_file(data, str(directory / filename), metadata={"format": "pt"})
        del data
    total = sum(itemsize * math.prod(dims) for _, dims in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    synthetic_tokenizer(shape["vocab"]).save(str(directory / "tokenizer.json"))


def parse_bytes(text: str) -> int:
    """`transformers`' max_shard_size strings: "40KB", "2GB" (decimal units, as it reads them)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    return int(float(text[:-2]) * units[text[-2:].upper()])


def write_tasks(path: Path, size: str, seed: int = 0) -> None:
    rows = task_rows(SHAPES[size]["vocab"], TASKS, PROMPTS_PER_TASK, seed)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def pass_seconds(log: Path) -> list[tuple[str, float]]:
    """(pass, seconds) in run order, from the export's own log lines (`pass NAME done in S s`)."""
    return [(m.group(1), float(m.group(2))) for m in PASS_LINE.finditer(log.read_text(errors="replace"))]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ifp_export", *args]


def run(args: argparse.Namespace) -> dict:
    work = Path(args.workdir)
    src, ckpt, out = work / "src", work / "ckpt", work / "out"
    console = Console(stderr=True)
    if not (args.reuse and (ckpt / "ifp.json").is_file()):
        shutil.rmtree(work, ignore_errors=True)
        console.log(f"writing a random {args.size} Llama ({args.dtype}) with transformers")
        write_model(src / "backbone", args.size, getattr(torch, args.dtype))
        write_tasks(src / "tasks.jsonl", args.size)
        cmd = cli("new-checkpoint", "--backbone", str(src / "backbone"), "--tasks", str(src / "tasks.jsonl"))
        wall, code, rss = run_child([*cmd, "--keep", str(KEEP), "-o", str(ckpt)], work / "new-checkpoint.log")
        if code != 0:
            raise SystemExit(f"new-checkpoint failed (exit {code}); see {work / 'new-checkpoint.log'}")
        console.log(f"new-checkpoint: {wall:.1f}s, peak RSS {(rss or 0) / 2**20:,.0f} MiB")
        shutil.rmtree(src)  # the checkpoint holds its own copy: an 8B source would be 16 GB more on disk
    shutil.rmtree(out, ignore_errors=True)
    cmd = cli("export", str(ckpt), "-o", str(out), "--quantize", args.quantize)
    cmd += ["--until", args.until] if args.until else []
    cmd += args.export_arg
    console.log(" ".join(cmd[1:]))
    log = work / "export.log"
    wall, code, rss = run_child(cmd, log)
    weight_bytes = checkpoint_weight_bytes(ckpt)
    figure, max_seconds, max_ratio = TARGETS[args.size]
    ratio = None if rss is None else rss / weight_bytes
    return {
        "size": args.size,
        "dtype": args.dtype,
        "command": " ".join(cmd[2:]),
        "exit_code": code,
        "log": str(log),
        "passes": pass_seconds(log),
        "wall_seconds": wall,
        "peak_rss_bytes": rss,
        "checkpoint_weight_bytes": weight_bytes,
        "rss_ratio": ratio,
        "figure": figure,
        "time_met": None if max_seconds is None or args.until else code == 0 and wall <= max_seconds,
        "time_target_seconds": max_seconds,
        "rss_met": None if ratio is None or max_ratio is None else code == 0 and ratio <= max_ratio,
        "rss_target_ratio": max_ratio,
    }


def table(result: dict) -> Table:
    def met(value: bool | None) -> str:
        return "n/a" if value is None else ("yes" if value else "NO")

    title = f"benchmarks.scale --size {result['size']} ({result['dtype']}): {result['command']}"
    out = Table(title=title)
    out.add_column("what")
    out.add_column("value", justify="right")
    for name, seconds in result["passes"]:
        out.add_row(f"pass {name}", f"{seconds:.1f} s")
    rss = result["peak_rss_bytes"]
    out.add_row("exit code", str(result["exit_code"]))
    out.add_row("wall time", f"{result['wall_seconds']:.1f} s")
    out.add_row("peak RSS", "n/a (no GNU time)" if rss is None else f"{rss / 2**20:,.0f} MiB")
    out.add_row("checkpoint weight bytes", f"{result['checkpoint_weight_bytes'] / 2**20:,.0f} MiB")
    out.add_row("RSS / weight bytes", "n/a" if result["rss_ratio"] is None else f"{result['rss_ratio']:.2f}x")
    limit = result["time_target_seconds"]
    if limit is not None:
        out.add_row(f"{result['figure']} time <= {limit / 60:.0f} min", met(result["time_met"]))
    if result["rss_target_ratio"] is not None:
        out.add_row(f"{result['figure']} peak RSS <= {result['rss_target_ratio']}x", met(result["rss_met"]))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SHAPES), default="bench")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the size's")
    parser.add_argument("--quantize", choices=["none", "int8", "int4"], default="none")
    parser.add_argument("--until", help="stop the export after this pass (e.g. fold, for the weights' own memory)")
    parser.add_argument("--export-arg", action="append", default=[], help="passed verbatim to `ifp-export export`")
    parser.add_argument("--workdir", help="default: /tmp/ifp-scale-SIZE (the model is kept for --reuse)")
    parser.add_argument("--reuse", action="store_true", help="reuse WORKDIR's checkpoint instead of writing it")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or SHAPES[args.size]["dtype"]
    args.workdir = args.workdir or f"/tmp/ifp-scale-{args.size}-{args.dtype}"
    result = run(args)
    Console(width=120).print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    if result["exit_code"] != 0:
        raise SystemExit(f"the export failed (exit {result['exit_code']}); see {result['log']}")


if __name__ == "__main__":
    main()
