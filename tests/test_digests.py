"""The manifest's sha256, taken as the passes write the files: right, and never stale."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ifp_export.artifacts import MANIFEST_FILE
from ifp_export.digests import Digests, identity, sha256_file
from ifp_export.pipeline import ExportContext
from ifp_export.targets.coreml.package import package_weights_path

STAND_IN = "0" * 64  # not the file's digest: returned only while the recorded file is unchanged


def test_a_digest_taken_early_is_used_only_while_the_file_is_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"a" * 100)
    digests = Digests()
    digests.record(path, identity(path), STAND_IN)
    assert digests.sha256(path) == STAND_IN  # taken early: the file is not read again
    with open(path, "ab") as f:
        f.write(b"b")
    assert digests.known(path) is None
    assert digests.sha256(path) == sha256_file(path) != STAND_IN

    replacement = tmp_path / "replacement.bin"
    replacement.write_bytes(b"c" * 101)  # same size, another inode, as an atomic rewrite makes it
    digests.record(path, identity(path), STAND_IN)
    os.replace(replacement, path)
    assert digests.known(path) is None
    assert digests.sha256(path) == sha256_file(path)


def test_a_file_hashed_in_the_background_gets_its_own_digest(tmp_path: Path) -> None:
    path = tmp_path / "weight.bin"
    path.write_bytes(os.urandom(3 << 20))
    gone = tmp_path / "gone.bin"
    digests = Digests()
    digests.hash_soon(path)
    digests.hash_soon(gone)  # fails in the background: nothing known, the manifest would read it (and fail loudly)
    assert digests.known(path) == sha256_file(path)
    assert digests.known(gone) is None


def test_the_export_hashes_its_large_files_as_it_writes_them(sample_export: ExportContext) -> None:
    root = sample_export.workdir
    large = [*sorted((root / "onnx").glob("*.onnx_data")), package_weights_path(root / "coreml" / "decoder.mlpackage")]
    assert len(large) >= 3
    for path in large:
        assert sample_export.digests.known(path) == sha256_file(path), path
    listed = {e["path"]: e["sha256"] for e in json.loads((root / MANIFEST_FILE).read_text())["files"]}
    for path in large:
        assert listed[path.relative_to(root).as_posix()] == sha256_file(path)
