"""What every benchmark measures a child process with: wall time and peak RSS (GNU time), and the checkpoint's
weight bytes that peak RSS is compared with (P7, S1, S2)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from ifp_export.checkpoint import BACKBONE_DIR, PREDICTOR_DIR
from ifp_export.weights import shard_files

ROOT = Path(__file__).resolve().parent


def checkpoint_weight_bytes(ckpt: Path) -> int:
    """Bytes of the checkpoint's weight files: every backbone shard (or model.safetensors) plus the predictor."""
    files = [*shard_files(ckpt / BACKBONE_DIR)[0], ckpt / PREDICTOR_DIR / "model.safetensors"]
    return sum(f.stat().st_size for f in files)


def run_child(cmd: list[str], log: Path, timeout: float | None = None) -> tuple[float, int, int | None]:
    """Run `cmd` (stdout+stderr to `log`); (wall seconds, exit code, the command's peak RSS in bytes or None).

    The peak RSS comes from GNU time (`/usr/bin/time -f %M`), whose own child is forked from a small process:
    os.wait4's ru_maxrss would include this (large) process's RSS, which Linux carries over fork + exec.
    """
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    rss_file = log.with_suffix(".maxrss")
    full = [gnu_time, "-f", "%M", "-o", str(rss_file), *cmd] if gnu_time else cmd
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT.parent)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return time.perf_counter() - start, -9, None
    wall = time.perf_counter() - start
    try:
        rss = int(rss_file.read_text().split()[-1]) * 1024
    except (OSError, ValueError, IndexError):
        rss = None
    return wall, code, rss
