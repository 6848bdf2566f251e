"""Export passes, one module each; `default_passes()` is the export pipeline in order."""

from __future__ import annotations

from ifp_export.passes.fold import FoldPass
from ifp_export.passes.group import GroupPass
from ifp_export.passes.load import LoadPass
from ifp_export.passes.manifest import ManifestPass
from ifp_export.passes.predict import PredictPass
from ifp_export.passes.quality import QualityPass
from ifp_export.passes.report import ReportPass
from ifp_export.passes.validate import ValidatePass
from ifp_export.pipeline import Pass
from ifp_export.targets.coreml import EmitCoreMLPass
from ifp_export.targets.onnx import EmitOnnxPass


def default_passes() -> list[Pass]:
    return [
        LoadPass(),
        PredictPass(),
        GroupPass(),
        QualityPass(),
        FoldPass(),
        EmitOnnxPass(),
        EmitCoreMLPass(),
        ValidatePass(),
        ReportPass(),
        ManifestPass(),
    ]
