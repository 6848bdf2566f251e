"""Atomic output directories: build everything in a temp dir beside the target, then rename into place.

An export killed at any point leaves the previous output untouched; a failed one leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import errno
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
        if not target.exists():
            os.replace(stage, target)
        elif exchange(stage, target):
            shutil.rmtree(stage, ignore_errors=True)  # now holds the previous output
        else:  # no atomic exchange here: the old output is out of the way only between two renames
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / "previous")
            os.replace(stage, target)
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE); False where unsupported.

    With it, the target name always points at a complete output, old or new, even under SIGKILL.
    """
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))
