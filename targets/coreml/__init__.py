"""Core ML target: every variant (and the dense model) as one function of a multifunction `decoder.mlpackage`
with a stateful KV cache, plus the predictor (routing head folded in) as `predictor.mlpackage`.

Each decoder function is built with the coremltools MIL builder from the config and the weights (`build`), no
tracing: `mlprogram`, iOS 18, fp16 compute. Inputs follow Apple's stateful Llama example: `inputIds` [1, T] int32
and `causalMask` [1, 1, T, P + T] fp16 (0 where a query may attend, -inf elsewhere; P = tokens already in the
cache), both flexible (1..C), so one function serves prefill and decode; states `keyCache`/`valueCache`
[L, 1, KVH, C, D] fp16; output `logits` [1, T, V] fp16. RoPE uses fp32-computed cos/sin tables and RMSNorm is
max-scaled, so neither overflows nor loses the angle in fp16 (`numerics`).

Shared tensors (embeddings, attention, norms, lm_head, RoPE tables) carry one `weight_id` in every function and
are written once; only the FFN slices differ per function (`emit`). The program holds placeholders for the
matrices, each read from the checkpoint (and, with `--quantize int8|int4`, quantized: `quantize`) as the backend
writes its blob (`deferred`), so about one tensor is resident at a time. Core ML cannot predict on Linux, so
validation is structural plus every weight read back from weight.bin (`validate`); on macOS it also compares
predictions (`parity`).
"""

from ifp_export.targets.coreml.blobs import (
    BlobRef,
    QuantizedRef,
    blob_data_range,
    distinct_blob_bytes,
    function_blobs,
    function_quantized,
    read_blob,
)
from ifp_export.targets.coreml.build import DECODER_INPUTS, DECODER_STATES, const_name
from ifp_export.targets.coreml.emit import CoreMLArtifacts, EmitCoreMLPass, emit, most_general
from ifp_export.targets.coreml.package import (
    CONVERSION_DATE_KEY,
    COREML_DIR,
    DECODER_PACKAGE,
    MAX_CONTEXT,
    PREDICTOR_PACKAGE,
    QUANTIZE_MODES,
    causal_mask,
    context_length,
    coremltools,
    package_weights_path,
)
from ifp_export.targets.coreml.parity import (
    QUANTIZED_PARITY_TOLERANCE,
    coreml_parity,
    reference_cached,
    relative_diff,
    run_cached,
)
from ifp_export.targets.coreml.quantize import INT4_BLOCK_SIZE, QUANTIZED_SUFFIX
from ifp_export.targets.coreml.validate import (
    FunctionCheck,
    FunctionReferences,
    check_decoder_package,
    check_predictor_package,
    feature_signature,
    open_artifacts,
    validate_export,
    validation_table,
)

__all__ = [
    "CONVERSION_DATE_KEY",
    "COREML_DIR",
    "DECODER_INPUTS",
    "DECODER_PACKAGE",
    "DECODER_STATES",
    "INT4_BLOCK_SIZE",
    "MAX_CONTEXT",
    "PREDICTOR_PACKAGE",
    "QUANTIZED_PARITY_TOLERANCE",
    "QUANTIZED_SUFFIX",
    "QUANTIZE_MODES",
    "BlobRef",
    "CoreMLArtifacts",
    "EmitCoreMLPass",
    "FunctionCheck",
    "FunctionReferences",
    "QuantizedRef",
    "blob_data_range",
    "causal_mask",
    "check_decoder_package",
    "check_predictor_package",
    "const_name",
    "context_length",
    "coreml_parity",
    "coremltools",
    "distinct_blob_bytes",
    "emit",
    "feature_signature",
    "function_blobs",
    "function_quantized",
    "most_general",
    "open_artifacts",
    "package_weights_path",
    "read_blob",
    "reference_cached",
    "relative_diff",
    "run_cached",
    "validate_export",
    "validation_table",
]
