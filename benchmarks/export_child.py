"""One export in its own process, instrumented for the benchmarks (P1 timings, P2 dedup ratios, P7 peak RSS).

    python -m benchmarks.export_child CKPT OUT RESULT.json [--until PASS] [--skip PASS] [--quantize int4]

Runs the default pipeline like `ifp-export export` (without the staging rename) and writes to RESULT.json:
per-pass seconds, peak RSS after each pass (VmHWM), the ONNX emit broken down into the first variant (trace +
bind + save) and each further variant (re-bind + save), and the ONNX / Core ML bytes-on-disk ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

START = time.perf_counter()


def vm_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmHWM = peak RSS, VmRSS = current)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("result", type=Path)
    parser.add_argument("--until")
    parser.add_argument("--skip", action="append", default=[], help="leave this pass out (e.g. coreml)")
    parser.add_argument("--quantize", default="none", help="as `ifp-export export --quantize`")
    args = parser.parse_args()

    import onnx_ir
    from rich.console import Console

    import ifp_export.targets.onnx.emitter as onnx_emit
    from ifp_export.passes import default_passes
    from ifp_export.pipeline import ExportContext, ExportOptions, Pipeline
    from ifp_export.targets.onnx import DENSE_NAME

    imported = time.perf_counter() - START
    calls: list[tuple[str, str, float, float]] = []  # (function, detail, start, end) inside the ONNX emit

    def timed(name: str, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                detail = Path(str(a[1])).stem if name == "save" and len(a) > 1 else ""
                if name == "bind":
                    detail = str(a[4]).removesuffix(".onnx_data")  # bind_model(graph, bindings, make, writer, own_file)
                calls.append((name, detail, start, time.perf_counter()))

        return wrapper

    # emit() looks these up as module globals (ir.save as an attribute of onnx_ir): each model's iteration starts
    # with bind_model (its weights streamed into the data files; the model is named by its own data file) and ends
    # when its .onnx file is saved. The first model bound (the dense one) also writes every shared tensor and pays
    # its graph (one per FFN width, built before any weights are bound).
    onnx_emit.decoder_graph = timed("graph", onnx_emit.decoder_graph)
    onnx_emit.bind_model = timed("bind", onnx_emit.bind_model)
    onnx_ir.save = timed("save", onnx_ir.save)

    passes = [p for p in default_passes() if p.name not in args.skip]
    rss: dict[str, float] = {}
    for p in passes:  # peak RSS so far after each pass
        run = p.run

        def measured(ctx, run=run, name=p.name):
            out = run(ctx)
            rss[name] = vm_kib("VmHWM") * 1024
            return out

        p.run = measured
    args.output.mkdir(parents=True)
    options = ExportOptions(checkpoint=args.checkpoint, output=args.output, until=args.until, quantize=args.quantize)
    ctx = ExportContext(options=options, workdir=args.output, console=Console(file=io.StringIO(), width=160))
    ctx = Pipeline(passes).run(ctx, until=args.until)

    result: dict = {
        "import_seconds": imported,
        "wall_seconds": time.perf_counter() - START,
        "passes": dict(ctx.timings),
        "peak_rss_after_pass": rss,
        # VmHWM belongs to this process's own address space (reset at exec). ru_maxrss is not used: Linux carries
        # the pre-exec high-water mark over exec, so it would include the forking (benchmark) process's RSS.
        "peak_rss_bytes": vm_kib("VmHWM") * 1024,
        "variants": [v.name for v in ctx.variants],
        "skipped_passes": args.skip,
        "log": ctx.console.file.getvalue(),
    }
    if "onnx" in ctx.emitted:
        art = ctx.emitted["onnx"]
        starts = [(detail, start) for fn, detail, start, _ in calls if fn == "bind"]
        saved = {detail: end for fn, detail, _, end in calls if fn == "save"}
        iterations = {name: saved[name] - begin for name, begin in starts}
        first = starts[0][0]
        graphs = [end - start for fn, _, start, end in calls if fn == "graph"]  # the variants' width, then dense
        graph = graphs[-1] if first == DENSE_NAME else graphs[0]
        result["onnx"] = {
            "emit_seconds": dict(ctx.timings)["onnx"],
            "first_model": first,
            "first_model_seconds": graph + iterations[first],  # graph + bind every tensor + save
            "extra_variant_seconds": [t for n, t in iterations.items() if n in result["variants"] and n != first],
            "disk_bytes": art.disk_bytes,
            "ideal_bytes": art.ideal_bytes,
            "dedup_ratio": art.dedup_ratio,
            "calls": [(fn, detail, round(end - start, 4)) for fn, detail, start, end in calls],
        }
    if "coreml" in ctx.emitted:
        art = ctx.emitted["coreml"]
        result["coreml"] = {
            "emit_seconds": dict(ctx.timings)["coreml"],
            "disk_bytes": art.disk_bytes,
            "ideal_bytes": art.ideal_bytes,
            "dedup_ratio": art.dedup_ratio,
        }
    args.result.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
