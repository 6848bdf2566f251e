"""`ifp-export validate OUT`: verify OUT (hashes, paths), rebuild the variants from the checkpoint and OUT's
kept indices, then rerun the validate pass over what OUT holds."""

from __future__ import annotations

from pathlib import Path

from ifp_export.artifacts import open_output
from ifp_export.checkpoint import load_checkpoint
from ifp_export.errors import IFPError
from ifp_export.fold import mask_from_indices, read_kept_indices
from ifp_export.model.config import DecoderConfig
from ifp_export.passes.fold import KEPT_INDICES_FILE
from ifp_export.passes.validate import ValidatePass
from ifp_export.pipeline import ExportContext, ExportOptions, Variant, log_console
from ifp_export.targets import coreml, onnx


def validate_output(output: Path, checkpoint: Path, checks: str = "full") -> ExportContext:
    return ValidatePass().run(validation_context(output, checkpoint, checks))


MODEL_FACTS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


def check_model_facts(recorded: dict, config: DecoderConfig, checkpoint: Path) -> None:
    """A checkpoint of another shape is the user's mistake (exit 2 naming the difference), not a failed export."""
    differ = [
        f"{key} {getattr(config, key)} (export: {recorded.get(key)})"
        for key in MODEL_FACTS
        if getattr(config, key) != recorded.get(key)
    ]
    if differ:
        raise IFPError(
            f"this checkpoint is not the one the export was made from: {', '.join(differ)}",
            checkpoint,
            "pass the --checkpoint OUTPUT was exported from",
        )


def validation_context(output: Path, checkpoint: Path, checks: str = "full") -> ExportContext:
    """The context `ValidatePass` checks OUT in (kept separate so a caller still has the figures it recorded
    when validation fails)."""
    manifest = open_output(output).manifest  # schema, containment, sha256 of every file
    ckpt = load_checkpoint(checkpoint)
    check_model_facts(manifest["model"], ckpt.backbone.config, checkpoint)
    d_ff = ckpt.backbone.config.intermediate_size
    kept = read_kept_indices(output / KEPT_INDICES_FILE)
    for name, _, idx in kept:
        if idx.dim() != 2 or idx.shape[0] != ckpt.backbone.config.num_hidden_layers or int(idx.max()) >= d_ff:
            raise IFPError(
                f"kept indices of {name!r} do not fit this checkpoint's backbone",
                output / KEPT_INDICES_FILE,
                "pass the --checkpoint this output was exported from",
            )
    options = ExportOptions(checkpoint=checkpoint, output=output, checks=checks)
    ctx = ExportContext(options, workdir=output, console=log_console())
    # k is the output's (an export made with --keep differs from the checkpoint's ifp.json)
    ctx.checkpoint, ctx.k_per_layer = ckpt, [int(manifest["model"]["k"])] * ckpt.backbone.config.num_hidden_layers
    for name, task, idx in kept:
        prompts = [i for i, t in enumerate(ckpt.tasks) if t.task == task] or list(range(len(ckpt.tasks)))
        ctx.variants.append(Variant(name, task, mask_from_indices(idx, d_ff), prompts))
    names = [name for name, _, _ in kept]
    ctx.emitted["onnx"] = onnx.open_artifacts(output / onnx.ONNX_DIR, names, manifest)
    if (output / coreml.COREML_DIR).is_dir():
        quantize = manifest.get("quantization", {}).get("coreml", "none")
        max_positions = ckpt.backbone.config.max_position_embeddings
        ctx.emitted["coreml"] = coreml.open_artifacts(output / coreml.COREML_DIR, max_positions, names, quantize)
    return ctx
