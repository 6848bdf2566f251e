"""The errors users see, each a single line naming what is wrong, where, and how to fix it, with its exit code.

Exit codes (documented in `ifp-export --help` and the README): 0 ok, 2 bad input, 3 the export's own validation
failed, 4 environment (out of disk or memory).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

EXIT_OK, EXIT_BAD_INPUT, EXIT_VALIDATION, EXIT_ENVIRONMENT = 0, 2, 3, 4


class IFPError(Exception):
    """Bad input. The CLI prints `str(err)` as one line and exits with code 2."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, what: str, path: str | Path | None = None, fix: str | None = None) -> None:
        self.what = what
        self.path = None if path is None else str(path)
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        fix = f" Fix: {self.fix}" if self.fix else ""
        return " ".join(f"error: {where}{self.what}.{fix}".split())


class EnvironmentFailure(IFPError):
    """The machine, not the input: out of disk or memory. Same one-line form, exit code 4, so CI can retry
    elsewhere instead of blaming the checkpoint."""

    exit_code = EXIT_ENVIRONMENT


class ValidationFailed(Exception):
    """An emitted artifact does not match PyTorch: a bug in the export, not in the input. Exit code 3."""

    exit_code = EXIT_VALIDATION


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def out_of_space(err: BaseException) -> bool:
    """ENOSPC / EDQUOT anywhere in `err`: its errno, a `shutil.Error` batch (copytree), a C++ library's message
    (coremltools, protobuf raise RuntimeError with the strerror text), or the exception it was raised from."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            return True
        if any(os.strerror(code) in str(err) for code in NO_SPACE):
            return True
        err = err.__cause__ or err.__context__
    return False


def environment_failure(err: BaseException, path: str | Path | None = None) -> EnvironmentFailure | None:
    """The EnvironmentFailure `err` stands for (out of disk or memory), else None (not the environment's fault)."""
    if isinstance(err, IFPError | ValidationFailed):
        return None
    if out_of_space(err):
        return EnvironmentFailure(
            "no space left on device (the previous output, if any, is unchanged)",
            path or getattr(err, "filename", None),
            "free disk space on the output's filesystem or choose another -o",
        )
    if isinstance(err, MemoryError) or (isinstance(err, OSError) and err.errno == errno.ENOMEM):
        return EnvironmentFailure("out of memory", path, "free memory or run on a machine with more RAM")
    return None
