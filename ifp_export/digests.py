"""SHA-256 of output files, taken while their bytes are at hand, for the manifest.

At 8B the artifacts (tens of GB) and the checkpoint do not fit the page cache together, so hashing every file at
the end read most of them back from disk (the manifest pass: 75-109 s). A writer that has the bytes hashes them as
it writes and `record`s the digest; a file another library wrote is hashed by a background thread right after
(`hash_soon`), while its pages are still cached. Each digest is kept with the file's identity at that time (inode,
size, mtime, ctime): `sha256` returns it only while the file is unchanged and hashes the file anew otherwise.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

FileIdentity = tuple[int, int, int, int]


def identity(path: Path) -> FileIdentity:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hashed(path: Path) -> tuple[FileIdentity, str]:
    """The file's identity and digest, refused if the file changed while it was read."""
    before = identity(path)
    digest = sha256_file(path)
    if identity(path) != before:
        raise RuntimeError(f"{path} changed while it was hashed")
    return before, digest


class Digests:
    """Digests taken early, by absolute path; `sha256` falls back to reading the file."""

    def __init__(self) -> None:
        self._known: dict[Path, Future[tuple[FileIdentity, str]]] = {}
        self._pool: ThreadPoolExecutor | None = None

    def record(self, path: Path, seen: FileIdentity, sha256: str) -> None:
        """`sha256` of the bytes the caller wrote to `path`, whose identity right after its last write was `seen`."""
        done: Future[tuple[FileIdentity, str]] = Future()
        done.set_result((seen, sha256))
        self._known[path.absolute()] = done

    def hash_soon(self, path: Path) -> None:
        """Hash the complete file `path` in a background thread, now, while its pages are likely cached."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._known[path.absolute()] = self._pool.submit(hashed, path)

    def known(self, path: Path) -> str | None:
        """The digest taken early, if there is one and the file has not changed since; waits for `hash_soon`."""
        taken = self._known.get(path.absolute())
        if taken is None or taken.exception() is not None:
            return None
        seen, digest = taken.result()
        return digest if seen == identity(path) else None

    def sha256(self, path: Path) -> str:
        return self.known(path) or sha256_file(path)
