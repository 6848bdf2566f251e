"""validate: check every emitted target against PyTorch (ONNX Runtime numerics; Core ML structure)."""

from __future__ import annotations

from ifp_export.pipeline import ExportContext
from ifp_export.targets import coreml, onnx

VALIDATORS = {"onnx": onnx.validate_export, "coreml": coreml.validate_export}


class ValidatePass:
    name = "validate"

    def run(self, ctx: ExportContext) -> ExportContext:
        for target in ctx.emitted:
            VALIDATORS[target](ctx)
        return ctx
