"""Issue 10's figures on the bundled sample, measured in one run:

- dynamic mode: per-prompt setup cost (predictor + gathering the prompt's FFN slices) vs the decode time it
  saves against the dense model, and the break-even generation length;
- held-out exact match per task: dense, the routed static variant, dynamic (per-prompt) pruning, and the routed
  variant of the int8 and int4 exports, all through `ifp_export.runtime` on ONNX Runtime.

    python -m benchmarks.quality [--workdir DIR] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.decode_child import decode_rate
from benchmarks.decode_figures import timed
from ifp_export.cli import bundled_sample, main
from ifp_export.fsutil import write_json
from ifp_export.runtime import Runtime
from ifp_export.samples.evaluate import load_heldout

MAX_NEW_TOKENS = 12


def export(out: Path, *flags: str) -> Path:
    if not (out / "manifest.json").exists():
        try:
            main(["export", "-o", str(out), *flags])
        except SystemExit as exit_:
            if exit_.code:
                raise
    return out


def accuracy(runtime: Runtime, examples: list, **options: object) -> dict[str, float]:
    hits: dict[str, list[bool]] = {}
    for ex in examples:
        tokens = list(runtime.generate(ex.prompt, max_new_tokens=MAX_NEW_TOKENS, **options))
        text = runtime.tokenizer.decode([t for t in tokens if t not in runtime.eos_ids])
        ended = bool(tokens) and tokens[-1] in runtime.eos_ids
        hits.setdefault(ex.task, []).append(ended and text == ex.extra["answer"])
    return {task: sum(h) / len(h) for task, h in hits.items()}


def run(workdir: Path, threads: int) -> dict:
    console = Console()
    examples = load_heldout(bundled_sample().parent / "heldout.jsonl")
    fp32 = Runtime(export(workdir / "dynamic", "--mode", "dynamic"), threads=threads)
    prompts = [ex.prompt for ex in examples[:: len(examples) // 40]]
    fp32.dynamic_decoder(prompts[0])  # create the session once; setup below is per prompt
    setup = statistics.median(timed(lambda p=p: fp32.dynamic_decoder(p)) for p in prompts)
    ids = fp32.tokenizer.encode(prompts[0]).ids
    dense_rate = statistics.median(decode_rate(fp32.decoder("dense"), ids, 32) for _ in range(5))
    dynamic_rate = statistics.median(decode_rate(fp32.dynamic_decoder(prompts[0]), ids, 32) for _ in range(5))
    saved_per_token = 1 / dense_rate - 1 / dynamic_rate
    results = {
        "dynamic_setup_ms": setup * 1e3,
        "dense_tokens_per_s": dense_rate,
        "dynamic_tokens_per_s": dynamic_rate,
        "saved_ms_per_token": saved_per_token * 1e3,
        "break_even_tokens": setup / saved_per_token if saved_per_token > 0 else None,
        "accuracy": {
            "dense": accuracy(fp32, examples, variant="dense"),
            "routed variant (fp32)": accuracy(fp32, examples),
            "dynamic (per prompt)": accuracy(fp32, examples, dynamic=True),
        },
    }
    for mode in ("int8", "int4"):
        quantized = Runtime(export(workdir / mode, "--quantize", mode), threads=threads)
        results["accuracy"][f"routed variant ({mode})"] = accuracy(quantized, examples)
    table = Table(title=f"held-out exact match on the sample ({len(examples)} prompts, ONNX Runtime)")
    tasks = list(results["accuracy"]["dense"])
    for column in ("setting", *tasks, "mean"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for setting, by_task in results["accuracy"].items():
        mean = sum(by_task.values()) / len(by_task)
        table.add_row(setting, *(f"{by_task[t]:.0%}" for t in tasks), f"{mean:.1%}")
    console.print(table)
    console.print(
        f"dynamic mode: setup {setup * 1e3:.2f} ms per prompt (median of {len(prompts)}); decode "
        f"{dense_rate:.0f} tok/s dense vs {dynamic_rate:.0f} tok/s pruned, {saved_per_token * 1e3:.3f} ms saved per "
        f"token; break-even after {results['break_even_tokens'] or float('inf'):.0f} generated tokens"
    )
    write_json(workdir / "quality.json", results)
    return results


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="where the three exports go (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ifp-quality-"))
    workdir.mkdir(parents=True, exist_ok=True)
    run(workdir, args.threads)


if __name__ == "__main__":
    cli()
