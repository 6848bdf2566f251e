"""P1–P7 of DESIGN.md section 9, each a ratio measured in one run on this machine.

    python -m benchmarks.run [--size bench|small|tiny] [--out benchmarks/results] [--repeats 5] [--optimum-runs 8]
        [--no-genai]

Builds the benchmark model (benchmarks/model.py) as an IFPruning checkpoint, exports it in a child process
(benchmarks/export_child.py: P1 timings, P2 dedup ratios, P7 peak RSS), exports the same folded variants and
the dense model with `optimum-cli export onnx` (P1, P4b), exports it again with `--quantize int4` and the dense
backbone with the onnxruntime-genai model builder in fp32 and int4 (benchmarks/clients.py: P1d, P4a, P4c), then
times ONNX Runtime sessions and `og.Generator` side by side (P3–P6). Prints a rich table and writes results.json +
ratios.png into --out; with --readme (default for the bench size) also the table into benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from benchmarks.clients import GenaiFigures
from benchmarks.decode_figures import DecodeFigures
from benchmarks.model import SIZES, build_checkpoint, synthetic_prompt
from benchmarks.proc import ROOT, checkpoint_weight_bytes, run_child
from benchmarks.report import Report, machine
from benchmarks.rows import Row, Stats


class Bench(GenaiFigures, DecodeFigures, Report):
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        console = Console()
        self.console = Console(width=max(console.width, 220)) if not console.is_terminal else console
        self.rows: list[Row] = []
        self.sections: dict[str, float] = {}
        self.raw: dict[str, object] = {}
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="ifp-bench-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.start = time.perf_counter()

    def section(self, name: str, fn: Callable[[], None]) -> None:
        self.console.rule(f"[bold]{name}")
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        self.sections[name] = seconds
        self.console.log(f"{name}: {seconds:.1f}s (total {time.perf_counter() - self.start:.0f}s)")

    # --- sections ---------------------------------------------------------------------------------------------

    def build(self) -> None:
        from ifp_export.checkpoint import load_checkpoint

        reuse = self.args.reuse and (self.work / "ckpt" / "ifp.json").is_file()
        if not reuse:  # a --workdir from an earlier run: rebuild (same seed, same bytes) rather than fail on it
            for stale in (self.work / "ckpt", self.work / "src"):
                shutil.rmtree(stale, ignore_errors=True)
        ckpt = load_checkpoint(self.work / "ckpt") if reuse else build_checkpoint(self.work, self.args.size, seed=0)
        self.ckpt = ckpt.root
        cfg = ckpt.backbone.config
        self.weight_bytes = checkpoint_weight_bytes(ckpt.root)
        n_params = sum(p.numel() for p in ckpt.backbone.parameters())
        self.raw["model"] = {
            "parameters": n_params,
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "intermediate_size": cfg.intermediate_size,
            "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads,
            "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "k": ckpt.k_per_layer[0],
            "tasks": len({t.task for t in ckpt.tasks}),
            "checkpoint_weight_bytes": self.weight_bytes,
        }
        self.console.log(
            f"checkpoint {self.ckpt}: {n_params / 1e6:.1f}M parameters, {self.weight_bytes:,} weight bytes"
        )
        self.tokenizer = ckpt.tokenizer
        self.vocab_size = cfg.vocab_size
        del ckpt

    def export(self) -> None:
        """Our export in a child process: every default pass (that process's wall time is P1b's and P1d's); then, in
        another process (untimed), the folded variants saved as HF checkpoints for Optimum
        (`benchmarks.save_variants`: the writer `ifp-export export --until fold` uses)."""
        self.out = self.work / "export"
        result = self.work / "export.json"
        cmd = [sys.executable, "-m", "benchmarks.export_child", str(self.ckpt), str(self.out), str(result)]
        if not self.args.coreml:
            cmd += ["--skip", "coreml"]
        if not (self.args.reuse and result.is_file()):
            for stale in (self.out, self.work / "variants"):
                shutil.rmtree(stale, ignore_errors=True)
            wall, code, rss = run_child(cmd, self.work / "export.log")
            if code != 0:
                raise SystemExit(f"export failed (exit {code}); see {self.work / 'export.log'}")
            save = [sys.executable, "-m", "benchmarks.save_variants", str(self.ckpt), str(self.out)]
            if run_child([*save, str(self.work / "variants")], self.work / "save_variants.log")[1] != 0:
                raise SystemExit(f"saving the variants failed; see {self.work / 'save_variants.log'}")
            raw = json.loads(result.read_text())
            raw["process_wall_seconds"], raw["time_peak_rss_bytes"] = wall, rss
            result.write_text(json.dumps(raw, indent=2))
        self.export_result = json.loads(result.read_text())
        wall = self.export_result["process_wall_seconds"]
        self.raw["export"] = {k: v for k, v in self.export_result.items() if k != "log"}
        self.variants = self.export_result["variants"]
        passes = ", ".join(f"{n} {s:.1f}s" for n, s in self.export_result["passes"].items())
        self.console.log(f"export: {wall:.1f}s wall ({passes})")

    def optimum(self) -> None:
        """`optimum-cli export onnx --task text-generation-with-past` of N folded variants and of the dense model."""
        names = self.variants[: self.args.optimum_runs]
        self.optimum_seconds = Stats()
        self.optimum_rss: list[int] = []
        self.optimum_skipped: str | None = None
        self.optimum_dense: Path | None = None

        def export(model_dir: Path, out: Path) -> tuple[float, int, int]:
            cmd = ["optimum-cli", "export", "onnx", "--task", "text-generation-with-past", "--model"]
            cmd += [str(model_dir), str(out)]
            return run_child(cmd, out.with_suffix(".log"), self.args.optimum_timeout)

        (self.work / "optimum").mkdir(exist_ok=True)
        saved = self.work / "optimum.json"
        if self.args.reuse and saved.is_file():
            self.raw["optimum"] = json.loads(saved.read_text())
            self.optimum_seconds.values = list(self.raw["optimum"]["variant_runs"].values())
            self.optimum_rss = self.raw["optimum"]["variant_peak_rss_bytes"]
            self.optimum_dense = self.work / "optimum" / "dense" / "model.onnx"
            return
        for name in names:
            shutil.rmtree(self.work / "optimum" / name, ignore_errors=True)
            wall, code, rss = export(self.work / "variants" / name, self.work / "optimum" / name)
            if code != 0:
                self.optimum_skipped = f"optimum-cli failed or exceeded {self.args.optimum_timeout}s (exit {code})"
                self.console.log(f"[yellow]{self.optimum_skipped}; see {self.work / 'optimum' / name}.log")
                return
            self.optimum_seconds.values.append(wall)
            self.optimum_rss.append(rss or 0)
            self.console.log(f"optimum-cli {name}: {wall:.1f}s, peak RSS {(rss or 0) / 2**20:.0f} MiB")
        shutil.rmtree(self.work / "optimum" / "dense", ignore_errors=True)
        wall, code, rss = export(self.ckpt / "backbone", self.work / "optimum" / "dense")
        if code != 0:
            self.optimum_skipped = f"optimum-cli (dense) failed or exceeded {self.args.optimum_timeout}s (exit {code})"
            return
        self.optimum_dense = self.work / "optimum" / "dense" / "model.onnx"
        self.raw["optimum"] = {
            "variant_runs": dict(zip(names, self.optimum_seconds.values, strict=True)),
            "variant_peak_rss_bytes": self.optimum_rss,
            "dense_seconds": wall,
            "dense_peak_rss_bytes": rss,
        }
        saved.write_text(json.dumps(self.raw["optimum"], indent=2))
        self.console.log(f"optimum-cli dense: {wall:.1f}s, peak RSS {(rss or 0) / 2**20:.0f} MiB")

    def rows_export(self) -> None:
        """P1, P2, P7 from the export child and the optimum runs."""
        res, n_variants = self.export_result, len(self.variants)
        onnx = res["onnx"]
        emit, whole = onnx["emit_seconds"], res["process_wall_seconds"]
        if self.optimum_seconds.values:
            n = len(self.optimum_seconds.values)
            total = self.optimum_seconds.median * n_variants
            scaled = "" if n == n_variants else f"; {n} of {n_variants} optimum runs made, median × {n_variants}"
            for rid, what, ours in (
                ("P1a", "export time, ONNX emit of 8 variants (+ dense + predictor) vs 8 optimum-cli", emit),
                ("P1b", "export time, whole `ifp-export export` process (all passes) vs 8 optimum-cli", whole),
            ):
                self.rows.append(
                    Row(
                        rid,
                        what.replace("8", str(n_variants)),
                        f"{ours:.1f} s (n=1)",
                        f"{total:.1f} s = {n_variants} × {self.optimum_seconds.fmt()}",
                        total / ours,
                        f"optimum per-run range {self.optimum_seconds.range()}{scaled}",
                        "≥ 5× faster",
                        total / ours >= 5,
                        "ratio = optimum / ours (higher is better)",
                    )
                )
        else:
            self.rows.append(
                Row(
                    "P1a",
                    "export time vs optimum-cli",
                    f"{emit:.1f} s",
                    "skipped",
                    None,
                    "",
                    "≥ 5×",
                    None,
                    self.optimum_skipped or "",
                )
            )
        extra = Stats(onnx["extra_variant_seconds"])
        first = onnx["first_model_seconds"]
        if extra.values:
            self.rows.append(
                Row(
                    "P1c",
                    "marginal variant: re-bind + save of one more variant vs the first model bound "
                    f"({onnx['first_model']}: graph + every tensor, shared ones included, + save)",
                    extra.fmt(),
                    f"{first:.2f} s (n=1)",
                    extra.median / first,
                    f"{min(extra.values) / first:.3f}–{max(extra.values) / first:.3f} over {len(extra.values)} "
                    "variants",
                    "≤ 0.10",
                    extra.median / first <= 0.10,
                )
            )
        self.rows.append(
            Row(
                "P2a",
                "ONNX bytes on disk / (shared + Σ FFN slices)",
                f"{onnx['disk_bytes']:,} B",
                f"{onnx['ideal_bytes']:,} B",
                onnx["dedup_ratio"],
                "exact (n=1)",
                "≤ 1.02",
                onnx["dedup_ratio"] <= 1.02,
            )
        )
        if "coreml" in res:
            cm = res["coreml"]
            self.rows.append(
                Row(
                    "P2b",
                    "Core ML bytes on disk / ideal (fp16, multifunction package)",
                    f"{cm['disk_bytes']:,} B",
                    f"{cm['ideal_bytes']:,} B",
                    cm["dedup_ratio"],
                    "exact (n=1)",
                    "≤ 1.02",
                    cm["dedup_ratio"] <= 1.02,
                )
            )
        else:
            why = "Core ML pass left out of this run (pass --coreml)" if not self.args.coreml else "no Core ML target"
            self.rows.append(Row("P2b", "Core ML bytes / ideal", "-", "-", None, "", "≤ 1.02", None, why))
        rss = max(res["peak_rss_after_pass"].values())  # VmHWM of the export process itself
        worst = max(res["peak_rss_after_pass"].items(), key=lambda kv: kv[1])
        first_pass_at_peak = next(n for n, v in res["peak_rss_after_pass"].items() if v == worst[1])
        opt = ""
        if self.optimum_rss and all(self.optimum_rss):
            inputs = [(self.work / "variants" / n / "model.safetensors").stat().st_size for n in self.variants]
            ratios = [r / b for r, b in zip(self.optimum_rss, inputs, strict=False)]
            opt = f"; optimum-cli peak RSS {statistics.median(ratios):.2f}× its model's weight bytes"
        self.rows.append(
            Row(
                "P7",
                "peak RSS of the export process / checkpoint weight bytes",
                f"{rss / 2**20:,.0f} MiB",
                f"{self.weight_bytes / 2**20:,.0f} MiB",
                rss / self.weight_bytes,
                "n=1",
                "≤ 1.5×",
                rss / self.weight_bytes <= 1.5,
                f"peak reached by the end of pass '{first_pass_at_peak}'{opt}",
            )
        )

    def prompt(self, length: int) -> list[int]:
        import torch

        span = (self.vocab_size - 4) // SIZES[self.args.size]["tasks"]
        text = synthetic_prompt(torch.Generator().manual_seed(1), 4, 4 + span, length)
        return self.tokenizer.encode(text).ids

    def run(self) -> list[Row]:
        self.machine = machine()
        self.console.log(f"machine: {self.machine}; work dir {self.work}")
        try:
            self.section("build checkpoint", self.build)
            self.section("export (ours)", self.export)
            if self.args.optimum_runs > 0:
                self.section("optimum-cli exports", self.optimum)
            else:
                self.optimum_seconds, self.optimum_rss, self.optimum_dense = Stats(), [], None
                self.optimum_skipped = "optimum runs disabled (--optimum-runs 0)"
            if self.args.genai:
                self.section("export --quantize int4 (ours)", self.export_int4)
                self.section("GenAI builder exports", self.genai_builds)
            self.rows_export()
            self.section("P3/P4b decode", self.decode)
            if self.args.genai:
                self.section("P4a/P4c og.Generator", self.genai_decode)
            else:
                self.genai_skipped("GenAI parts left out of this run (--no-genai)")
            self.section("P5 routing", self.routing)
            self.section("P6 switching", self.switching)
            order = ["P1a", "P1b", "P1c", "P1d", "P2a", "P2b", "P3", "P4a", "P4b", "P4c", "P5", "P6", "P7"]
            self.rows.sort(key=lambda r: next(i for i, p in enumerate(order) if r.id.startswith(p)))
            self.console.print(self.table())
            self.write()
        finally:
            if not self.args.keep_work and not self.args.workdir:
                shutil.rmtree(self.work, ignore_errors=True)
        self.console.log(f"benchmarks done in {time.perf_counter() - self.start:.0f}s")
        return self.rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="bench", help="bench = DESIGN.md section 9 model")
    parser.add_argument("--out", default=str(ROOT / "results"), help="where results.json and ratios.png go")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of every timing (P3–P6)")
    parser.add_argument("--decode-steps", type=int, default=32, help="timed decode steps per repeat (P3, P4)")
    parser.add_argument("--og-steps", type=int, default=64, help="timed decode steps per repeat in og (P4a, P4c)")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens for P5")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="ORT intra-op threads for P3/P4")
    parser.add_argument("--optimum-runs", type=int, default=8, help="variants exported with optimum-cli (0 = skip)")
    parser.add_argument("--optimum-timeout", type=float, default=None, help="seconds per optimum-cli run")
    parser.add_argument(
        "--genai",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the onnxruntime-genai parts: builder exports (P1d), og.Generator decode (P4a, P4c), int4 export",
    )
    parser.add_argument("--coreml", action="store_true", help="include the Core ML pass in the timed export")
    parser.add_argument("--workdir", help="keep the models here (default: a temp dir, removed at the end)")
    parser.add_argument("--reuse", action="store_true", help="with --workdir: reuse its checkpoint, export, optimum")
    parser.add_argument("--keep-work", action="store_true", help="do not remove the temp work dir")
    parser.add_argument("--readme", action=argparse.BooleanOptionalAction, default=None, help="update README table")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.readme is None:
        args.readme = args.size == "bench"
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    return Bench(parse(argv)).run()


if __name__ == "__main__":
    main()
