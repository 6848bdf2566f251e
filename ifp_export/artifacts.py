"""Open an ifp-export output directory trusting nothing (DESIGN.md section 10).

The manifest is schema-checked; every listed file is opened without following symlinks, must be a regular
file with one hard link, inside the directory by canonical path, with the listed size and sha256; every ONNX
external data location must be a listed file. This follows ONNX's own external-data security model.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema

from ifp_export.checkpoint import schema
from ifp_export.errors import IFPError
from ifp_export.targets.onnx import external_data_files

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1
FIX = "re-run ifp-export export into a fresh directory"


def check_manifest(data: Any, path: Path) -> None:
    """Schema version first (a clear message for old/new files), then the full JSON Schema."""
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise IFPError(
            f"manifest schema_version {version!r} is not supported (this ifp-export reads {SCHEMA_VERSION})",
            path,
            "export again with this version of ifp-export",
        )
    manifest_schema = schema("manifest.schema.json")
    try:
        jsonschema.validate(data, manifest_schema)
    except jsonschema.ValidationError as err:
        if err.schema == manifest_schema["$defs"]["relpath"]:
            raise IFPError(f"path {err.instance!r} leaves the output directory", path, FIX) from None
        where = "/".join(str(p) for p in err.absolute_path) or "top level"
        raise IFPError(f"invalid manifest at {where}: {err.message}", path, FIX) from None


def contained_path(root: Path, relative: str, manifest: Path) -> Path:
    """`root/relative`, refusing absolute paths, `..`, and symlinks anywhere below `root`."""
    if "\x00" in relative:
        raise IFPError(f"path {relative!r} holds a NUL byte", manifest, FIX)
    parts = PurePosixPath(relative).parts
    if not parts or PurePosixPath(relative).is_absolute() or ".." in parts or "\\" in relative:
        raise IFPError(f"path {relative!r} leaves the output directory", manifest, FIX)
    current = root
    for part in parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            raise IFPError(f"listed file {relative!r} is missing", manifest, FIX) from None
        except OSError as err:  # e.g. a name too long, or a file where a directory is expected
            raise IFPError(f"listed file {relative!r} cannot be read ({err.strerror})", manifest, FIX) from None
        if stat.S_ISLNK(mode):
            raise IFPError(f"{relative!r} is (or passes through) a symlink, which is never followed", manifest, FIX)
    real_root, real = os.path.realpath(root), os.path.realpath(current)
    if os.path.commonpath([real_root, real]) != real_root:
        raise IFPError(f"path {relative!r} resolves outside the output directory", manifest, FIX)
    return current


def verify_file(path: Path, size: int, sha256: str, manifest: Path, relative: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:  # a symlink swapped in after the checks (ELOOP), no permission, ...
        raise IFPError(f"{relative!r} cannot be opened ({err.strerror})", manifest, FIX) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise IFPError(f"{relative!r} is not a regular file", manifest, FIX)
        if info.st_nlink != 1:
            raise IFPError(f"{relative!r} has {info.st_nlink} hard links; shared inodes are refused", manifest, FIX)
        if info.st_size != size:
            raise IFPError(f"{relative!r} has {info.st_size} bytes, the manifest says {size}", manifest, FIX)
        digest = hashlib.sha256()
        with os.fdopen(os.dup(fd), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != sha256:
            raise IFPError(f"{relative!r} does not match its sha256 (modified or corrupt)", manifest, FIX)
    finally:
        os.close(fd)


@dataclass
class OutputDir:
    root: Path
    manifest: dict[str, Any]

    def path(self, relative: str) -> Path:
        return contained_path(self.root, relative, self.root / MANIFEST_FILE)

    @property
    def variant_names(self) -> list[str]:
        return [v["name"] for v in self.manifest["variants"]]

    def variant(self, name: str) -> dict[str, Any]:
        for v in self.manifest["variants"]:
            if v["name"] == name:
                return v
        raise IFPError(
            f"unknown variant {name!r}", self.root / MANIFEST_FILE, f"use one of: {', '.join(self.variant_names)}"
        )


def open_output(root: str | Path, verify_hashes: bool = True) -> OutputDir:
    """Read and verify an output directory; any problem is one IFPError naming the file."""
    root = Path(root)
    manifest_path = root / MANIFEST_FILE
    if not root.is_dir():
        raise IFPError("output directory not found", root, "pass the -o directory of ifp-export export")
    if manifest_path.is_symlink():
        raise IFPError("manifest is a symlink, which is never followed", manifest_path, FIX)
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IFPError("manifest.json not found", manifest_path, FIX) from None
    except OSError as err:  # e.g. a directory named manifest.json
        raise IFPError(f"manifest cannot be read ({err.strerror})", manifest_path, FIX) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IFPError(f"manifest is not valid JSON ({err})", manifest_path, FIX) from None
    check_manifest(data, manifest_path)
    listed = {entry["path"]: entry for entry in data["files"]}
    for relative, entry in listed.items():
        path = contained_path(root, relative, manifest_path)
        if verify_hashes:
            verify_file(path, entry["size"], entry["sha256"], manifest_path, relative)
    for relative in [p for p in listed if p.endswith(".onnx")]:
        for location in external_data_files(root / relative):
            target = (PurePosixPath(relative).parent / location).as_posix()
            if ".." in PurePosixPath(location).parts or PurePosixPath(location).is_absolute() or target not in listed:
                raise IFPError(f"{relative!r} references unlisted external data {location!r}", manifest_path, FIX)
    return OutputDir(root, data)
