"""What every Core ML module shares: names and layout of the output, the quiet coremltools import, saving an
mlpackage byte-reproducibly."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from ifp_export.quiet import quiet

COREML_DIR = "coreml"
DECODER_PACKAGE = "decoder.mlpackage"
PREDICTOR_PACKAGE = "predictor.mlpackage"
MAX_CONTEXT = 512  # KV-cache length: min(max_position_embeddings, MAX_CONTEXT)
QUANTIZE_MODES = ("none", "int8", "int4")
CONVERSION_DATE_KEY = "com.github.apple.coremltools.conversion_date"


def coremltools() -> Any:
    with quiet():
        import coremltools as ct
    return ct


def context_length(max_position_embeddings: int) -> int:
    return min(max_position_embeddings, MAX_CONTEXT)


def causal_mask(past: int, length: int) -> torch.Tensor:
    """[1, 1, length, past + length]: 0 where query i may see key j (j <= past + i), -inf elsewhere."""
    keys = torch.arange(past + length)[None, :]
    queries = torch.arange(length)[:, None] + past
    return torch.where(keys <= queries, 0.0, float("-inf"))[None, None]


def save_model(mlmodel: Any, path: Path) -> None:
    """Save without the conversion date, so the same model gives the same bytes on another day. A package in
    coremltools' temporary directory is moved there, not copied as `MLModel.save` does (a rename on one file system;
    at 8B int4 a 6 GB copy), and only its spec written."""
    mlmodel.user_defined_metadata.pop(CONVERSION_DATE_KEY, None)
    if mlmodel.is_temp_package:
        shutil.move(mlmodel.package_path, path)
        package_spec_path(path).write_bytes(mlmodel.get_spec().SerializeToString())
    else:
        with quiet():
            mlmodel.save(str(path))
    normalize_package(path)


def package_spec_path(package: Path) -> Path:
    return package / "Data" / "com.apple.CoreML" / "model.mlmodel"


def package_weights_path(package: Path) -> Path:
    return package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"


def normalize_package(package: Path) -> None:
    """Make a saved .mlpackage byte-reproducible: Manifest.json item identifiers are random UUIDs, so derive
    them from the item paths; the spec's protobuf maps (op attributes) are serialized in dict order, which
    follows Python's per-process string hashing, so re-serialize deterministically (sorted map keys); fix file
    modes (coremltools writes model.mlmodel 0600)."""
    from coremltools.proto import Model_pb2

    spec_path = package_spec_path(package)
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    spec_path.write_bytes(spec.SerializeToString(deterministic=True))
    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    renamed: dict[str, str] = {}
    entries = {}
    for key, item in manifest["itemInfoEntries"].items():
        renamed[key] = str(uuid.uuid5(uuid.NAMESPACE_URL, "ifp-export:" + item["path"])).upper()
        entries[renamed[key]] = item
    manifest["itemInfoEntries"] = entries
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")
    for path in [package, *package.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def package_bytes(package: Path) -> int:
    return sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
