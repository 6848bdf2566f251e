"""manifest: copy the tokenizer, then write manifest.json last, listing every file with size and sha256.

The manifest is what apps and `ifp_export.runtime` read: model facts, tokenizer, the predictor per target
and how to route, every variant with its files per target, the KV-cache layout and the tool versions.
No absolute paths and no timestamps, so the same inputs give the same bytes.
"""

from __future__ import annotations

import os
import platform
import shutil
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

from ifp_export.artifacts import MANIFEST_FILE, SCHEMA_VERSION, check_manifest
from ifp_export.chat import PREDICTOR_READS, manifest_fields
from ifp_export.checkpoint import TOKENIZER_FILE
from ifp_export.digests import Digests
from ifp_export.fsutil import write_json
from ifp_export.masks import TRUNCATION
from ifp_export.passes.fold import KEPT_INDICES_FILE
from ifp_export.passes.report import REPORT_FILE, variant_quality
from ifp_export.pipeline import ExportContext
from ifp_export.targets import onnx

VERSIONED_PACKAGES = (
    "ifp-export",
    "torch",
    "numpy",
    "onnx",
    "onnxscript",
    "onnx-ir",
    "onnxruntime",
    "coremltools",
    "transformers",
    "optimum-onnx",
    "safetensors",
    "tokenizers",
)


def file_entries(root: Path, known: Digests | None = None) -> list[dict[str, Any]]:
    """Every file under `root` but the manifest, sorted, with its size and SHA-256: from `known` where a pass took
    it as it wrote the file (unchanged since), else hashed here a file per core (hashlib and file reads release the
    GIL)."""
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        digests = list(pool.map((known or Digests()).sha256, files))
    return [
        {"path": p.relative_to(root).as_posix(), "size": p.stat().st_size, "sha256": digest}
        for p, digest in zip(files, digests, strict=True)
    ]


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def build_manifest(ctx: ExportContext) -> dict[str, Any]:
    ckpt, root = ctx.checkpoint, ctx.workdir
    cfg = ckpt.backbone.config
    k = ctx.k_per_layer[0]
    per_model: dict[str, dict[str, Any]] = {}
    predictor: dict[str, Any] = {
        "max_length": ckpt.predictor.config.max_length,
        "truncation": TRUNCATION,
        "reads": PREDICTOR_READS,
        "routing": {
            "rule": "standardize scores per layer, variant_scores = mean over layers of the mean standardized "
            "score of each variant's kept neurons; run the variant at argmax(variant_scores)",
            "variant_order": [v.name for v in ctx.variants],
        },
    }
    if "onnx" in ctx.emitted:
        models, predictor["onnx"] = onnx.manifest_entries(ctx.emitted["onnx"], root)
        for name, entry in models.items():
            per_model.setdefault(name, {})["onnx"] = entry
    for target, artifacts in ctx.emitted.items():
        if target != "onnx" and hasattr(artifacts, "manifest_entries"):
            models, predictor[target] = artifacts.manifest_entries(root)
            for name, entry in models.items():
                per_model.setdefault(name, {})[target] = entry
    return {
        "format": "ifp-export",
        "schema_version": SCHEMA_VERSION,
        "model": {
            "model_type": cfg.model_type,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim,
            "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size,
            "intermediate_size": cfg.intermediate_size,
            "k": k,
            "keep_ratio": k / cfg.intermediate_size,
            "sliding_window": cfg.sliding_window,
        },
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": ckpt.eos_token_ids or None,
            "pad_token_id": cfg.pad_token_id,
            **manifest_fields(ckpt.text),
        },
        "kv_cache": {
            "layout": "optimum",
            "inputs": "past_key_values.{layer}.key / past_key_values.{layer}.value",
            "outputs": "present.{layer}.key / present.{layer}.value",
            "shape": ["batch", "num_key_value_heads", "sequence", "head_dim"],
            "dtype": "float32",
            "first_step": "past tensors with sequence length 0",
        },
        "predictor": predictor,
        "quantization": {target: getattr(a, "quantize", "none") for target, a in ctx.emitted.items()},
        "variants": [
            {
                "name": v.name,
                "task": v.task,
                "keep_ratio": k / cfg.intermediate_size,
                "coverage": round(v.coverage, 6),
                "routing_accuracy": None if v.routing_accuracy is None else round(v.routing_accuracy, 6),
                "kept_indices": {"file": KEPT_INDICES_FILE, "tensor": v.name},
                "files": per_model.get(v.name, {}),
                **(variant_quality(v) if v.quality else {}),
            }
            for v in ctx.variants
        ],
        "dense": {"files": per_model.get(onnx.DENSE_NAME, {}), **dense_quality(ctx.report)},
        **massive_activations(ctx.report),
        **({"dynamic": per_model[onnx.DYNAMIC_NAME]["onnx"]} if onnx.DYNAMIC_NAME in per_model else {}),
        "files": file_entries(root, ctx.digests),
        "report": REPORT_FILE,
        "versions": tool_versions(),
    }


def dense_quality(report: dict[str, Any]) -> dict[str, Any]:
    """The dense model's NLL per prompt set, when the quality pass ran."""
    return {"quality": report["quality"]["dense"]} if "quality" in report else {}


def massive_activations(report: dict[str, Any]) -> dict[str, Any]:
    """The massive-activation neurons (layer, neuron, where and how much they write) and the rule that found them."""
    return {"massive_activations": report["massive_activations"]} if "massive_activations" in report else {}


class ManifestPass:
    name = "manifest"

    def run(self, ctx: ExportContext) -> ExportContext:
        ckpt = ctx.require("checkpoint", self.name)
        shutil.copyfile(ckpt.root / TOKENIZER_FILE, ctx.workdir / TOKENIZER_FILE)
        manifest = build_manifest(ctx)
        check_manifest(manifest, ctx.workdir / MANIFEST_FILE)
        write_json(ctx.workdir / MANIFEST_FILE, manifest)
        return ctx
