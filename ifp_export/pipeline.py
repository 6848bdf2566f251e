"""The pass pipeline: small pass objects run in order over one typed context, timed and logged.

A pass has a `name` and `run(ctx) -> ctx`. `Pipeline.run(ctx, until=NAME)` stops after that pass.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ifp_export.checkpoint import Checkpoint, TaskPrompt
from ifp_export.digests import Digests
from ifp_export.errors import IFPError
from ifp_export.memory import release_freed_memory, survivors_frozen

LOG_WIDTH = 200  # columns of a log that is not a terminal: the validation tables' 13 columns need ~170


def log_console() -> Console:
    """The export's log on stderr. Rich draws for 80 columns when stderr is not a terminal (a CI log, a file), which
    cuts every cell of the validation tables to a letter or two; there it is `LOG_WIDTH` wide unless COLUMNS says."""
    console = Console(stderr=True)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = LOG_WIDTH
    return console


@dataclass(frozen=True)
class ExportOptions:
    checkpoint: Path
    output: Path
    keep: float | None = None
    variants: int | None = None
    heldout: Path | None = None
    until: str | None = None
    batch_size: int = 64
    seed: int = 0
    quantize: str = "none"  # none | int8 | int4 (weight-only, per target)
    mode: str = "static"  # static | dynamic (also emit the per-prompt pruned decoder)
    min_onnxruntime: str = "1.20"  # the oldest onnxruntime release the ONNX graphs must run on (targets/onnx/floor.py)
    keep_massive_neurons: bool = False  # force the dense model's massive-activation neurons into every variant
    checks: str = "full"  # full | quick (validation: dense + one variant in full, the others by one forward)


@dataclass
class Predictions:
    """Predictor output for a list of prompts (calibration or held-out), in file order."""

    prompts: list[TaskPrompt]
    scores: torch.Tensor  # [N, L, d_ff] float32
    masks: torch.Tensor  # [N, L, d_ff] 0/1 hard top-k
    truncated: int = 0

    @property
    def tasks(self) -> list[str]:
        return [p.task for p in self.prompts]


@dataclass
class Variant:
    """One statically pruned model: which neurons each layer keeps, and how well that fits its prompts."""

    name: str
    task: str | None
    mask: torch.Tensor  # [L, d_ff] 0/1
    prompt_indices: list[int]
    coverage: float = 0.0
    routing_accuracy: float | None = None
    fold_error: float | None = None
    quality: dict[str, Any] = field(default_factory=dict)  # set name -> figures against dense (quality pass)
    massive_dropped: list[Any] = field(default_factory=list)  # the MassiveNeurons its mask drops
    quality_with_massive_kept: dict[str, Any] | None = None  # its figures with those neurons forced in
    residual_peak: float | None = None  # its largest fp32 |residual stream| on the quality pass's rows run with it

    @property
    def kept(self) -> torch.Tensor:
        """[L, k] ascending kept neuron indices (int64): what the targets gather this variant's FFN slices by."""
        return torch.stack([row.nonzero().flatten() for row in self.mask])


@dataclass
class ExportContext:
    options: ExportOptions
    workdir: Path
    console: Console = field(default_factory=log_console)
    checkpoint: Checkpoint | None = None
    k_per_layer: list[int] = field(default_factory=list)
    predictions: Predictions | None = None
    heldout_prompts: list[TaskPrompt] = field(default_factory=list)  # read and checked by the load pass
    heldout: Predictions | None = None
    variants: list[Variant] = field(default_factory=list)
    massive_neurons: list[Any] | None = None  # the dense model's massive-activation neurons, once detected
    dense_residual_peak: float | None = None  # the dense model's, on its quality pass rows (Variant.residual_peak)
    emitted: dict[str, Any] = field(default_factory=dict)  # target name -> what its emit pass wrote
    report: dict[str, Any] = field(default_factory=dict)
    timings: list[tuple[str, float]] = field(default_factory=list)
    peak_rss: dict[str, int] = field(default_factory=dict)  # pass name -> process peak RSS (bytes) at its end
    made: dict[str, list[str]] = field(default_factory=dict)  # pass name -> files it added under workdir
    digests: Digests = field(default_factory=Digests)  # output files' sha256 taken as they were written

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """A progress bar for long work (tensors written, models validated); `advance(n)` moves it by n.

        Drawn only on a terminal, so logs, `--json` and CI output stay clean.
        """
        if not self.console.is_terminal:
            yield lambda n=1: None
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)

    def require(self, attribute: str, by: str) -> Any:
        value = getattr(self, attribute)
        if value is None or (isinstance(value, list | dict) and not value):
            raise RuntimeError(f"pass {by!r} needs {attribute!r}; run the passes that produce it first")
        return value


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} if root.is_dir() else set()


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (VmHWM; ru_maxrss where /proc is missing), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class Pass(Protocol):
    name: str

    def run(self, ctx: ExportContext) -> ExportContext: ...


class Pipeline:
    def __init__(self, passes: Sequence[Pass]) -> None:
        self.passes = list(passes)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def check_until(self, until: str | None) -> None:
        if until is not None and until not in self.names:
            raise IFPError(f"unknown pass {until!r} for --until", None, f"use one of: {', '.join(self.names)}")

    def run(self, ctx: ExportContext, until: str | None = None) -> ExportContext:
        """Run passes in order (stopping after `until`), recording each one's wall time."""
        self.check_until(until)
        seen = files_under(ctx.workdir)
        with survivors_frozen():
            for p in self.passes:
                start = time.perf_counter()
                ctx = p.run(ctx)
                if ctx.checkpoint is not None:
                    ctx.checkpoint.drop_resident_weights()
                release_freed_memory()
                seconds = time.perf_counter() - start
                ctx.timings.append((p.name, seconds))
                ctx.peak_rss[p.name] = peak_rss_bytes()
                now = files_under(ctx.workdir)
                ctx.made[p.name], seen = sorted(now - seen), now
                ctx.console.log(f"pass [bold]{p.name}[/bold] done in {seconds:.2f}s")
                if p.name == until:
                    break
        return ctx
