"""validate: check the checkpoint's backbone against `transformers`, then every emitted target against PyTorch
(ONNX Runtime numerics; Core ML structure, weights and numerics)."""

from __future__ import annotations

from ifp_export.errors import ValidationFailed
from ifp_export.hf_check import check_checkpoint
from ifp_export.memory import release_freed_memory
from ifp_export.pipeline import ExportContext
from ifp_export.targets import coreml, onnx

VALIDATORS = {"onnx": onnx.validate_export, "coreml": coreml.validate_export}


class ValidatePass:
    name = "validate"

    def run(self, ctx: ExportContext) -> ExportContext:
        hf = check_checkpoint(ctx.require("checkpoint", self.name))
        ctx.report["transformers_check"] = hf.record()
        ctx.console.log(hf.summary())
        if not hf.ok:
            raise ValidationFailed(
                f"dense: our decoder differs from transformers' {hf.model_type}: {hf.exactness.text()}"
            )
        for target in ctx.emitted:
            release_freed_memory()
            VALIDATORS[target](ctx)
        return ctx
