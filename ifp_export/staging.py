"""Atomic output directories: build everything in a temp dir beside the target, then rename into place.

An export killed at any point leaves the previous output untouched; a failed one leaves nothing behind. Each run's
staging dir `.OUT.staging-XXXX` has a sibling lock file `.OUT.staging-XXXX.lock`, created and `flock`ed before the
dir exists and held until the dir is gone: the kernel drops the lock when its owner dies (even by SIGKILL), so
the next run to the same output can tell debris (lock free) from a run in progress (lock held) and reclaims only
the debris.

The swap re-checks the target (something may have appeared there meanwhile) and is one renameat2 (RENAME_EXCHANGE,
or RENAME_NOREPLACE when there is no previous output). Without renameat2 (macOS, some filesystems) it is two renames
with the previous output parked at `.OUT.staging-XXXX.previous`, under the same lock: a run killed between them is
restored by the next run (`reclaim_debris`).
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
PREVIOUS_SUFFIX = ".previous"  # the previous output, parked during a swap made of two renames
# Tests set this to exercise the two-rename swap (what runs where renameat2 is missing) on Linux.
NO_RENAMEAT2_ENV = "IFP_EXPORT_NO_RENAMEAT2"
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


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


def unlisted_entries(root: Path, listed: set[str]) -> list[str]:
    """Entries below `root` that are neither a listed file nor a directory holding one (relative paths; a
    directory is named once, with a trailing `/`): what replacing `root` would delete that no one wrote down."""
    keep_dirs = {parent.as_posix() for path in listed for parent in Path(path).parents}
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath).relative_to(root)
        for name in sorted(dirnames):
            relative = (base / name).as_posix()
            if relative not in keep_dirs or (Path(dirpath) / name).is_symlink():
                found.append(relative + "/")
        dirnames[:] = sorted(d for d in dirnames if (base / d).as_posix() in keep_dirs)
        found += [(base / name).as_posix() for name in sorted(filenames) if (base / name).as_posix() not in listed]
    return sorted(found)


def check_nothing_unlisted(target: Path, listed: set[str], what: str) -> None:
    """`--force` never deletes what `target`'s own listing does not name (DESIGN.md section 10): refuse, naming it."""
    extra = unlisted_entries(target, listed)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise IFPError(
            f"--force replaces only {what} that holds nothing else; this one also holds {shown}",
            target,
            "move those files out of it, or choose another -o",
        )


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
            if not settle_parked_previous(stage, target):
                continue  # a previous output that cannot be put back: kept, with its lock file, never deleted
            if stage.is_dir() and not stage.is_symlink():
                shutil.rmtree(stage, ignore_errors=True)
                removed.append(stage.name)
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return removed


def settle_parked_previous(stage: Path, target: Path) -> bool:
    """A dead run's previous output parked beside `stage` (a two-rename swap, killed between or after the renames):
    put it back if the target is missing (killed between them), drop it if the new output took its place (the
    stage was renamed). False when neither holds (something else now sits at the target): it is left alone."""
    previous = stage.with_name(stage.name + PREVIOUS_SUFFIX)
    if not previous.is_dir() or previous.is_symlink():
        return True
    if not os.path.lexists(target):
        os.rename(previous, target)
        return True
    if not os.path.lexists(stage):
        shutil.rmtree(previous, ignore_errors=True)
        return True
    return False


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
            swap_into_place(stage, target, force, inputs, replaceable)
    except Exception as err:
        failure = environment_failure(err, target)
        if failure is None:
            raise
        raise failure from None


def swap_into_place(
    stage: Path, target: Path, force: bool, inputs: tuple[Path, ...], replaceable: Callable[[Path], None] | None
) -> None:
    """Put the finished `stage` at `target`. The target is checked again first: what appeared there during the run
    (another export, a user's directory) is refused like at the start (exit 2), never deleted."""
    if os.path.lexists(target):
        check_output_target(target, force, inputs, replaceable)
    if not os.path.lexists(target):
        try:
            if not renameat2(stage, target, RENAME_NOREPLACE):
                os.rename(stage, target)  # replaces at most an empty directory that appeared meanwhile
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                raise
            raise IFPError(
                "output path appeared during the run", target, "pass --force to replace it, or choose another -o"
            ) from None
    elif renameat2(stage, target, RENAME_EXCHANGE):
        shutil.rmtree(stage, ignore_errors=True)  # now holds the previous output
    else:  # two renames; killed between them, the next run puts the parked previous output back
        previous = stage.with_name(stage.name + PREVIOUS_SUFFIX)
        os.rename(target, previous)
        try:
            os.rename(stage, target)
        except BaseException:
            os.rename(previous, target)  # a failed (not killed) second rename: the previous output goes back now
            raise
        shutil.rmtree(previous, ignore_errors=True)


def renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux renameat2 (RENAME_EXCHANGE: atomically swap two entries; RENAME_NOREPLACE: rename unless `b`
    exists); False where unsupported. With it, the target name always points at a complete output, old or new,
    even under SIGKILL."""
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is None or os.environ.get(NO_RENAMEAT2_ENV):
        return False
    at_fdcwd = -100
    if function(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))
