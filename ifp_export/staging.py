"""Atomic output directories: build everything in a temp dir beside the target, then rename into place.

An export killed at any point leaves the previous output untouched; a failed one leaves nothing behind. Each run's
staging dir `.OUT.staging-XXXX` has a sibling lock file `.OUT.staging-XXXX.lock`, created and `flock`ed before the
dir exists and held until the dir is gone: the kernel drops the lock when its owner dies (even by SIGKILL), so
the next run to the same output can tell debris (lock free) from a run in progress (lock held) and reclaims only
the debris.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ifp_export.errors import IFPError, environment_failure

LOCK_SUFFIX = ".lock"


def staging_prefix(target: Path) -> str:
    return f".{target.name}.staging-"


def check_not_input(target: Path, inputs: tuple[Path, ...]) -> None:
    """Refuse an output that is, holds or lies inside an input: `--force` would delete it (issue 18.9)."""
    real_target = Path(os.path.realpath(target))
    for source in inputs:
        real_source = Path(os.path.realpath(source))
        if real_target == real_source or real_target in real_source.parents or real_source in real_target.parents:
            relation = (
                "is"
                if real_target == real_source
                else "contains"
                if real_target in real_source.parents
                else "lies inside"
            )
            raise IFPError(
                f"output directory {relation} the input {source}; replacing it would delete the input",
                target,
                "choose an -o outside the input",
            )


def check_output_target(
    target: Path,
    force: bool,
    inputs: tuple[Path, ...] = (),
    replaceable: Callable[[Path], None] | None = None,
) -> None:
    """Refuse, before any work, a target that is a file, an input (or holds / lies in one), non-empty (without
    force; with force unless `replaceable` accepts it: a previous output of this tool) or not writable."""
    if target.is_symlink():
        raise IFPError("output path is a symlink", target, "choose a real directory path")
    if target.exists() and not target.is_dir():
        raise IFPError("output path exists and is not a directory", target, "choose another -o path")
    check_not_input(target, inputs)
    if target.is_dir() and any(target.iterdir()):
        if not force:
            raise IFPError("output directory exists and is not empty", target, "pass --force to replace it")
        if replaceable is not None:
            replaceable(target)
    parent = target.absolute().parent
    if not parent.is_dir():
        raise IFPError("parent of the output directory does not exist", parent, "create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise IFPError("no write permission in the output's parent directory", parent, "choose a writable -o path")


def reclaim_debris(target: Path) -> list[str]:
    """Remove the staging dirs beside `target` whose runs are dead (their lock is free); names removed.

    A staging dir without its lock file is left alone: its owner cannot be told apart from a live run.
    """
    removed = []
    for lock in sorted(target.parent.glob(f"{glob.escape(staging_prefix(target))}*{LOCK_SUFFIX}")):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a run in progress
            os.close(fd)
            continue
        try:
            stage = lock.with_name(lock.name.removesuffix(LOCK_SUFFIX))
            if stage.is_dir() and not stage.is_symlink():
                shutil.rmtree(stage, ignore_errors=True)
                removed.append(stage.name)
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return removed


@contextmanager
def locked_stage(target: Path) -> Iterator[Path]:
    """A fresh staging dir beside `target`, its lock held for as long as the context (and the process) lives."""
    fd, lock = tempfile.mkstemp(prefix=staging_prefix(target), suffix=LOCK_SUFFIX, dir=target.parent)
    lock_path = Path(lock)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        stage = lock_path.with_name(lock_path.name.removesuffix(LOCK_SUFFIX))
        stage.mkdir(mode=0o700)
        try:
            yield stage
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def staged_directory(
    target: Path,
    force: bool = False,
    inputs: tuple[Path, ...] = (),
    replaceable: Callable[[Path], None] | None = None,
    checked: bool = False,
) -> Iterator[Path]:
    """Yield a fresh temp dir beside `target`; on success it replaces `target`, on failure it is removed.

    Dead runs' staging dirs beside `target` are reclaimed first. Out of disk (ENOSPC) anywhere inside becomes the
    one-line EnvironmentFailure (exit 4); the previous output is untouched either way. `checked`: the caller has
    already run `check_output_target`.
    """
    if not checked:
        check_output_target(target, force, inputs, replaceable)
    target = target.absolute()
    reclaim_debris(target)
    try:
        with locked_stage(target) as stage:
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
    except Exception as err:
        failure = environment_failure(err, target)
        if failure is None:
            raise
        raise failure from None


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
