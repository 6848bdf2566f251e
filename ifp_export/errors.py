"""The errors users see, each a single line naming what is wrong, where, and how to fix it, with its exit code.

Exit codes (documented in `ifp-export --help` and the README): 0 ok, 2 bad input, 3 the export's own validation
failed, 4 environment (out of disk or memory).
"""

from __future__ import annotations

import errno
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


def environment_failure(err: BaseException, path: str | Path | None = None) -> EnvironmentFailure | None:
    """The EnvironmentFailure an OSError / MemoryError stands for (ENOSPC, EDQUOT, ENOMEM), else None."""
    if isinstance(err, MemoryError):
        return EnvironmentFailure("out of memory", path, "free memory or run on a machine with more RAM")
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        where = path or err.filename
        return EnvironmentFailure(
            "no space left on device (the previous output, if any, is unchanged)",
            where,
            "free disk space on the output's filesystem or choose another -o",
        )
    if isinstance(err, OSError) and err.errno == errno.ENOMEM:
        return EnvironmentFailure("out of memory", path, "free memory or run on a machine with more RAM")
    return None
