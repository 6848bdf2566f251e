"""The onnxruntime-genai side of `benchmarks.run`: P1 vs the GenAI model builder, P4a / P4c in `og.Generator`, and
P4c's bandwidth limit.

The builder exports the bench checkpoint's dense HF backbone (the same weights our export read) in fp32 and int4;
its fp32 build time is P1's baseline. Our dense model is loaded in `og` exactly as the manifest tells an app to
(`onnx/genai_config.json` + the model's overlay, i.e. whichever graph file `og` is meant to use for it), and decoded
alternately with the builder's export of the same weights, each timing in a fresh process, per thread count.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx

from benchmarks.decode_child import rates_in_children
from benchmarks.genai import build, our_overlay, write_hf_tokenizer
from benchmarks.proc import run_child
from benchmarks.rows import Row, Stats

SHORT_PROMPT = 16  # tokens prefilled before timing decode steps (P3, P4)

PRECISIONS = ("fp32", "int4")


def builder_exports(ckpt: Path, work: Path, reuse: bool, log: Callable[[str], None]) -> dict[str, dict]:
    """The GenAI builder's fp32 and int4 exports of the checkpoint's dense backbone: {precision: {dir, seconds,
    peak_rss_bytes}}. The builder saves a tokenizer with the model, so it reads a copy of the backbone dir (symlinks)
    with the checkpoint's tokenizer added."""
    saved = work / "genai-builds.json"
    if reuse and saved.is_file():
        return json.loads(saved.read_text())
    hf_dir = work / "genai-hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    for f in (ckpt / "backbone").iterdir():
        link = hf_dir / f.name
        if not link.exists() and not f.name.startswith("tokenizer"):
            link.symlink_to(f.resolve())
    write_hf_tokenizer(ckpt / "tokenizer.json", hf_dir)
    builds = {}
    for precision in PRECISIONS:
        out = work / f"genai-{precision}"
        seconds, rss = build(hf_dir, out, precision, work / f"genai-{precision}.log")
        builds[precision] = {"dir": str(out), "seconds": seconds, "peak_rss_bytes": rss}
        log(f"GenAI builder -p {precision}: {seconds:.1f}s, peak RSS {(rss or 0) / 2**20:,.0f} MiB")
    saved.write_text(json.dumps(builds, indent=2))
    return builds


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 3) -> float:
    """This machine's memory read bandwidth in bytes/s with `threads` readers: the best of `repeats` numpy sums over
    a `gib` GiB array (far larger than any cache), split in one slice per thread (numpy releases the GIL)."""
    array = np.ones(int(gib * 2**30) // 4, np.float32)
    slices = np.array_split(array, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.sum, slices))
            best = min(best, time.perf_counter() - start)
    return array.nbytes / best


def last_level_cache_bytes() -> int | None:
    """The CPU's last-level cache size (Linux sysfs), or None where it is not reported."""
    caches = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"))
    if not caches:
        return None
    size = caches[-1].read_text().strip()
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)


def decode_read_bytes(model_file: Path) -> int:
    """Bytes of initializers a decode step reads from `model_file`: every initializer consumed by a node other than
    a Gather (the embedding lookup reads one row); a tied embedding that also feeds the lm_head counts."""
    model = onnx.load(str(model_file), load_external_data=False)
    graph = model.graph
    sizes = {}
    for init in graph.initializer:
        length = next((int(e.value) for e in init.external_data if e.key == "length"), None)
        sizes[init.name] = length if length is not None else len(init.raw_data)
    read = {name for node in graph.node if node.op_type != "Gather" for name in node.input if name in sizes}
    return sum(sizes[name] for name in read)


class GenaiFigures:
    """`benchmarks.run.Bench`'s sections for the onnxruntime-genai figures (a mixin: it uses the Bench's work dir,
    checkpoint, export, prompt and rows)."""

    def export_int4(self) -> None:
        """Our default export again with `--quantize int4` (Core ML left out): P4c compares it with the builder's
        int4 export of the same weights."""
        self.out_int4 = self.work / "export-int4"
        result = self.work / "export-int4.json"
        if self.args.reuse and result.is_file():
            return
        shutil.rmtree(self.out_int4, ignore_errors=True)
        cmd = [sys.executable, "-m", "benchmarks.export_child", str(self.ckpt), str(self.out_int4), str(result)]
        wall, code, rss = run_child([*cmd, "--quantize", "int4", "--skip", "coreml"], self.work / "export-int4.log")
        if code != 0:
            raise SystemExit(f"int4 export failed (exit {code}); see {self.work / 'export-int4.log'}")
        self.console.log(f"export --quantize int4: {wall:.1f}s wall, peak RSS {(rss or 0) / 2**20:,.0f} MiB")

    def genai_builds(self) -> None:
        """P1d: our whole default export process vs one GenAI-builder fp32 build per variant (measured once)."""
        self.builds = builder_exports(self.ckpt, self.work, self.args.reuse, self.console.log)
        self.raw["genai_builder"] = self.builds
        ours, one = self.export_result["process_wall_seconds"], self.builds["fp32"]["seconds"]
        n = len(self.variants)
        self.rows.append(
            Row(
                "P1d",
                f"export time, whole `ifp-export export` process ({n} variants + dense, all passes) vs {n} × the "
                "GenAI builder's fp32 build of the dense model",
                f"{ours:.1f} s (n=1)",
                f"{n * one:.1f} s = {n} × {one:.1f} s (n=1)",
                n * one / ours,
                "n=1 each",
                "≥ 1.0 (ours ≤ builder × variants)",
                n * one / ours >= 1.0,
                f"ratio = builder / ours; builder int4 build {self.builds['int4']['seconds']:.1f} s",
            )
        )

    def genai_decode(self) -> None:
        """P4a (fp32) and P4c (int4): our dense model / the builder's export of the same weights, both in
        og.Generator, alternating, each timing in a fresh process; P4c also vs this machine's bandwidth limit."""
        prompt, steps = self.prompt(SHORT_PROMPT), self.args.og_steps
        genai_file = our_overlay(self.out_int4)["model"]["decoder"]["filename"]
        read_bytes = decode_read_bytes(self.out_int4 / "onnx" / genai_file)
        self.raw["p4c_bandwidth"] = {"decode_read_bytes": read_bytes, "read_bytes_per_second": {}}
        cache = last_level_cache_bytes()
        cached = (
            f"; the weights fit in the {cache / 2**20:.0f} MiB last-level cache, so this memory limit does not bind"
            if cache and read_bytes <= cache
            else ""
        )
        og_raw: dict[str, dict[str, list[float]]] = {}
        for threads in self.args.threads:
            plural = f"{threads} thread{'s' * (threads > 1)}"
            bandwidth = read_bandwidth(threads)
            limit = bandwidth / read_bytes
            self.raw["p4c_bandwidth"]["read_bytes_per_second"][str(threads)] = bandwidth
            og_raw[str(threads)] = {}
            for rid, precision, out in (("P4a", "fp32", self.out), ("P4c", "int4", self.out_int4)):
                overlay = our_overlay(out)
                models = {"ours": out / "onnx", "builder": Path(self.builds[precision]["dir"])}
                rates = rates_in_children(models, prompt, steps, threads, self.args.repeats)
                og_raw[str(threads)].update({f"{k}_{precision}": v for k, v in rates.items()})
                ours, builder = Stats(rates["ours"]), Stats(rates["builder"])
                ratio = Stats([o / b for o, b in zip(ours.values, builder.values, strict=True)])
                self.rows.append(
                    Row(
                        f"{rid} {threads}t",
                        f"dense {precision} decode tok/s in og.Generator, ours / the GenAI builder's "
                        f"{'-p int4 ' if precision == 'int4' else ''}export of the same weights ({plural})",
                        f"ours {ours.fmt('tok/s')}",
                        f"builder {builder.fmt('tok/s')}",
                        ratio.median,
                        ratio.range(),
                        "≥ 1.0" if precision == "int4" else "≥ 1.0 (aim 1.1)",
                        ratio.median >= 1.0,
                        f"{steps} greedy steps after a {len(prompt)}-token prefill; ours loaded through "
                        f"genai_config.json + the manifest's overlay ({overlay['model']['decoder']['filename']})",
                    )
                )
                if precision == "int4":
                    self.rows.append(
                        Row(
                            f"P4c-bw {threads}t",
                            f"our int4 dense decode tok/s in og.Generator / this machine's bandwidth limit ({plural})",
                            f"ours {ours.fmt('tok/s')}",
                            f"limit {limit:.3g} tok/s = {bandwidth / 1e9:.2f} GB/s ÷ {read_bytes / 2**20:.1f} MiB",
                            ours.median / limit,
                            Stats([v / limit for v in ours.values]).range(),
                            "≥ 0.5",
                            ours.median / limit >= 0.5,
                            f"bandwidth = best of 3 numpy sums over a 1 GiB array in {threads} slices/threads; "
                            "bytes = initializers a decode step reads (all but the embedding Gather)" + cached,
                        )
                    )
        self.raw["og_tokens_per_second"] = og_raw

    def genai_skipped(self, why: str) -> None:
        for rid, figure in (
            ("P1d", "export time vs the GenAI builder"),
            ("P4a", "dense fp32 decode in og.Generator, ours / builder"),
            ("P4c", "dense int4 decode in og.Generator, ours / builder, and vs the bandwidth limit"),
        ):
            self.rows.append(Row(rid, figure, "-", "skipped", None, "", "-", None, why))
