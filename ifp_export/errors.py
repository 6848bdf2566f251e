"""The one error type users see: a single line naming what is wrong, where, and how to fix it."""

from __future__ import annotations

from pathlib import Path


class IFPError(Exception):
    """Bad input. The CLI prints `str(err)` as one line and exits with code 2."""

    exit_code = 2

    def __init__(self, what: str, path: str | Path | None = None, fix: str | None = None) -> None:
        self.what = what
        self.path = None if path is None else str(path)
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        fix = f" Fix: {self.fix}" if self.fix else ""
        return " ".join(f"error: {where}{self.what}.{fix}".split())


class ValidationFailed(Exception):
    """An emitted artifact does not match PyTorch: a bug in the export, not in the input. Exit code 1."""

    exit_code = 1
