"""The ONNX emit pass, its manifest entries, and re-opening an existing output for `ifp-export validate`."""

from __future__ import annotations

from pathlib import Path

import torch

from ifp_export.chat import client_tokenizer_config, write_client_files
from ifp_export.checkpoint import PREDICTOR_DIR, TOKENIZER_FILE
from ifp_export.errors import IFPError
from ifp_export.model.config import generation_config
from ifp_export.pipeline import ExportContext
from ifp_export.targets.onnx.dynamic import DYNAMIC_NAME
from ifp_export.targets.onnx.emitter import (
    DENSE_NAME,
    PREDICTOR_NAME,
    OnnxArtifacts,
    emit,
    external_data_files,
    stored_tensor_bytes,
)
from ifp_export.targets.onnx.genai import GENAI_CONFIG, GENAI_SUFFIX, genai_overlay

ONNX_DIR = "onnx"
LEGACY_FLOOR = "1.24"  # an export whose manifest records no floor predates the field: its graphs were opset 23


class EmitOnnxPass:
    name = "onnx"

    def run(self, ctx: ExportContext) -> ExportContext:
        ckpt = ctx.require("checkpoint", self.name)
        variants = ctx.require("variants", self.name)
        artifacts = emit(
            ctx.workdir / ONNX_DIR,
            ckpt.weights,
            {v.name: v.kept.numpy() for v in variants},
            ckpt.root / PREDICTOR_DIR,
            torch.stack([v.mask for v in variants]),
            ctx.options.quantize,
            ctx.options.mode == "dynamic",
            ctx.progress,
            ckpt.generation,
            ctx.options.min_onnxruntime,
            ctx.digests,
        )
        ctx.emitted[self.name] = artifacts
        cfg = ckpt.backbone.config
        tokenizer_config = client_tokenizer_config(
            ckpt.text, ckpt.tokenizer, generation_config(cfg, ckpt.generation), cfg.max_position_embeddings
        )
        write_client_files(artifacts.directory, ckpt.text, ckpt.root / TOKENIZER_FILE, tokenizer_config)
        ctx.console.log(
            f"ONNX: {len(artifacts.models)} decoder models + predictor in {artifacts.directory.name}/; bytes on disk "
            f"{artifacts.disk_bytes:,} / ideal {artifacts.ideal_bytes:,} = dedup ratio {artifacts.dedup_ratio:.4f}"
        )
        return ctx


def open_artifacts(directory: Path, names: list[str], manifest: dict) -> OnnxArtifacts:
    """The OnnxArtifacts of an existing, verified output directory (for `ifp-export validate`)."""
    quantize = manifest.get("quantization", {}).get("onnx", "none")
    dynamic = manifest.get("dynamic")
    dynamic_inputs = None
    if dynamic is not None:
        prefix = f"{directory.name}/"
        dynamic_inputs = [
            {**f, "source": {**f["source"], "file": f["source"]["file"].removeprefix(prefix)}}
            for f in dynamic["ffn_inputs"]
        ]
    models = {name: directory / f"{name}.onnx" for name in [*names, DENSE_NAME]}
    missing = [p for p in [*models.values(), directory / f"{PREDICTOR_NAME}.onnx"] if not p.is_file()]
    if missing:
        raise IFPError("ONNX model file missing", missing[0], "re-run ifp-export export")
    data = [p for p in directory.glob("*.onnx_data") if not p.name.startswith(PREDICTOR_NAME)]
    ideal = stored_tensor_bytes(list(models.values()))
    disk = sum(p.stat().st_size for p in [*models.values(), *data])
    genai = directory / GENAI_CONFIG if (directory / GENAI_CONFIG).is_file() else None
    genai_models = {n: p for n in models if (p := directory / f"{n}{GENAI_SUFFIX}").is_file()}
    predictor = directory / f"{PREDICTOR_NAME}.onnx"
    clients = tuple(manifest["dense"]["files"]["onnx"].get("clients", ()))
    disk += sum(p.stat().st_size for p in genai_models.values())
    floor = manifest["dense"]["files"]["onnx"].get("min_onnxruntime", LEGACY_FLOOR)
    return OnnxArtifacts(
        directory, models, predictor, ideal, disk, quantize, dynamic_inputs, genai, clients, genai_models, floor
    )


def manifest_entries(artifacts: OnnxArtifacts, root: Path) -> tuple[dict[str, dict], dict]:
    """Per model name {"model", "data", "clients", "genai"} paths relative to `root`, and the predictor's."""

    def entry(path: Path) -> dict:
        data = [(path.parent / location).relative_to(root).as_posix() for location in external_data_files(path)]
        return {"model": path.relative_to(root).as_posix(), "data": data, "min_onnxruntime": artifacts.min_onnxruntime}

    predictor = {
        **entry(artifacts.predictor),
        "inputs": {"input_ids": "int64 [batch, sequence]", "attention_mask": "int64 [batch, sequence], right-padded"},
        "outputs": {"scores": "float32 [batch, layers, d_ff]", "variant_scores": "float32 [batch, variants]"},
    }
    models = {}
    for name, path in artifacts.models.items():
        models[name] = {**entry(path), "clients": list(artifacts.clients)}
        if artifacts.genai is not None:
            config = artifacts.genai.relative_to(root).as_posix()
            og_file = artifacts.genai_models.get(name, path).name
            models[name]["genai"] = {"config": config, "overlay": genai_overlay(og_file)}
    if artifacts.dynamic_inputs is not None:
        models[DYNAMIC_NAME] = {
            **entry(artifacts.directory / f"{DYNAMIC_NAME}.onnx"),
            "ffn_inputs": [
                {**i, "source": {**i["source"], "file": f"{artifacts.directory.name}/{i['source']['file']}"}}
                for i in artifacts.dynamic_inputs
            ],
        }
    return models, predictor
