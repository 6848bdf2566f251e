"""Atomic output directories: build everything in a temp dir beside the target, then rename into place.

An export killed at any point leaves the previous output untouched; a failed one leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ifp_export.errors import IFPError


def check_output_target(target: Path, force: bool) -> None:
    """Refuse, before any work, a target that is a file, non-empty (without force) or not writable."""
    if target.is_symlink():
        raise IFPError("output path is a symlink", target, "choose a real directory path")
    if target.exists() and not target.is_dir():
        raise IFPError("output path exists and is not a directory", target, "choose another -o path")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise IFPError("output directory exists and is not empty", target, "pass --force to replace it")
    parent = target.absolute().parent
    if not parent.is_dir():
        raise IFPError("parent of the output directory does not exist", parent, "create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise IFPError("no write permission in the output's parent directory", parent, "choose a writable -o path")


@contextmanager
def staged_directory(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temp dir beside `target`; on success it replaces `target`, on failure it is removed."""
    check_output_target(target, force)
    target = target.absolute()
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        yield stage
        os.chmod(stage, 0o755)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / "previous")
            os.replace(stage, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(stage, target)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
