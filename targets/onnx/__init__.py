"""ONNX target: KV-cache decoder variants in Optimum's layout (also loadable by onnxruntime-genai), shared weights
stored once, and the shared predictor graph with the routing head folded in."""

from ifp_export.targets.onnx.dynamic import DYNAMIC_NAME, gather_dynamic_feeds
from ifp_export.targets.onnx.emitter import (
    DENSE_NAME,
    FFN_PARAMS,
    PREDICTOR_NAME,
    SHARED_DATA,
    OnnxArtifacts,
    emit,
    external_data_files,
    weight_bytes,
)
from ifp_export.targets.onnx.output import ONNX_DIR, EmitOnnxPass, manifest_entries, open_artifacts
from ifp_export.targets.onnx.predictor import PredictorRouter
from ifp_export.targets.onnx.validate import validate, validate_export, validation_inputs

__all__ = [
    "DENSE_NAME",
    "DYNAMIC_NAME",
    "FFN_PARAMS",
    "ONNX_DIR",
    "PREDICTOR_NAME",
    "SHARED_DATA",
    "EmitOnnxPass",
    "OnnxArtifacts",
    "PredictorRouter",
    "emit",
    "external_data_files",
    "gather_dynamic_feeds",
    "manifest_entries",
    "open_artifacts",
    "validate",
    "validate_export",
    "validation_inputs",
    "weight_bytes",
]
