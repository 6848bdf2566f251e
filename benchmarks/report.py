"""`benchmarks.run.Bench`'s output: the rich table, the markdown table, the ratio chart, results.json and the table
block of benchmarks/README.md. A mixin over the Bench's rows, sections and arguments."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import time
from dataclasses import asdict
from pathlib import Path

import onnxruntime as ort
from rich.table import Table

from benchmarks.proc import ROOT

README = ROOT / "README.md"
TABLE_BEGIN, TABLE_END = "<!-- results:begin -->", "<!-- results:end -->"


def machine() -> dict[str, str | int]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count() or 0,
        "ram_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "load_average_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


class Report:
    def table(self) -> Table:
        table = Table(title=f"IFPruning export benchmarks ({self.args.size} model) — ratios measured in one run")
        for column in ("id", "figure", "ours", "baseline", "ratio", "spread", "target", "met"):
            table.add_column(column, justify="right" if column in ("ratio",) else "left", overflow="fold")
        for r in self.rows:
            met = "-" if r.met is None else ("[green]yes" if r.met else "[red]NO")
            ratio = "n/a" if r.ratio is None else f"{r.ratio:.3f}"
            table.add_row(
                r.id,
                r.figure + (f" [dim]({r.note})" if r.note else ""),
                r.ours,
                r.baseline,
                ratio,
                r.spread,
                r.target,
                met,
            )
        return table

    def markdown(self) -> str:
        lines = [
            "| id | figure | ours | baseline | ratio | spread | target | met |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            ratio = "n/a" if r.ratio is None else f"{r.ratio:.3f}"
            met = "-" if r.met is None else ("yes" if r.met else "**no**")
            figure = r.figure + (f" ({r.note})" if r.note else "")
            cells = [r.id, figure, r.ours, r.baseline, ratio, r.spread, r.target, met]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return "\n".join(lines)

    def chart(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.rows if r.ratio is not None and math.isfinite(r.ratio) and r.ratio > 0]
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5), layout="constrained")
        colors = ["tab:gray" if r.met is None else ("tab:green" if r.met else "tab:red") for r in rows]
        ax.barh([r.id for r in rows], [r.ratio for r in rows], color=colors)
        for i, r in enumerate(rows):
            ax.text(r.ratio, i, f" {r.ratio:.3g}  (target {r.target})", va="center", fontsize=8)
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel("ratio (log scale); green = target met, red = missed")
        ax.set_title(f"IFPruning export benchmarks ({self.args.size} model)")
        ax.set_xlim(min(r.ratio for r in rows) / 2, max(r.ratio for r in rows) * 20)
        fig.savefig(path, dpi=100, metadata={"Software": None})
        plt.close(fig)

    def command(self) -> str:
        return (
            "python -m benchmarks.run " + shlex.join(self.args.argv) if self.args.argv else "python -m benchmarks.run"
        )

    def write(self) -> None:
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        result = {
            "command": self.command(),
            "machine": self.machine,
            "size": self.args.size,
            "repeats": self.args.repeats,
            "sections_seconds": self.sections,
            "total_seconds": time.perf_counter() - self.start,
            "rows": [asdict(r) for r in self.rows],
            "raw": self.raw,
        }
        (out / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        self.chart(out / "ratios.png")
        if self.args.readme:
            self.update_readme(result)
        self.console.log(f"wrote {out / 'results.json'} and {out / 'ratios.png'}")

    def update_readme(self, result: dict) -> None:
        m = self.machine
        block = "\n".join(
            [
                TABLE_BEGIN,
                f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {m['cpu']}, {m['cores']} cores, "
                f"{m['ram_gib']} GiB RAM (load average at start {m['load_average_at_start']}; other jobs running), "
                f"onnxruntime {m['onnxruntime']}, Python {m['python']}. Command: `{result['command']}` "
                f"(wall {result['total_seconds'] / 60:.1f} min).",
                "",
                self.markdown(),
                "",
                "Section times: "
                + ", ".join(f"{k} {v:.0f}s" for k, v in self.sections.items())
                + "."
                + (
                    " Checkpoint, export and Optimum runs were reused from an earlier run (--reuse)."
                    if self.args.reuse
                    else ""
                ),
                TABLE_END,
            ]
        )
        text = README.read_text() if README.is_file() else f"# Benchmarks\n\n{TABLE_BEGIN}\n{TABLE_END}\n"
        if TABLE_BEGIN not in text:
            text += f"\n{TABLE_BEGIN}\n{TABLE_END}\n"
        head, rest = text.split(TABLE_BEGIN, 1)
        tail = rest.split(TABLE_END, 1)[1]
        README.write_text(head + block + tail)
