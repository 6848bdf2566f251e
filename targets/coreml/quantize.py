"""Weight-only quantization of one decoder function, on its MIL program before the functions are merged.

int8: symmetric, one scale per output channel. int4: symmetric, one scale per `INT4_BLOCK_SIZE` input channels of
an output channel (iOS 18 block-wise), or per output channel where the input width is not a multiple of the block
(a pruned `down_proj` with k % 32 != 0), which coremltools would otherwise skip. Every 2-D model weight is named
explicitly (no size threshold); norms, biases and the RoPE tables stay fp16. The quantizer is deterministic, so a
shared weight gives the same data/scale arrays in every function and keeps a single `weight_id`.
"""

from __future__ import annotations

from typing import Any

from ifp_export.quiet import quiet
from ifp_export.targets.coreml.build import ROPE_TABLES

with quiet():
    from coremltools.converters.mil.mil.passes.pass_pipeline import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.optimize import coreml as cto

INT4_BLOCK_SIZE = 32  # input channels per int4 scale (as ONNX MatMulNBits)
QUANTIZED_SUFFIX = "_quantized"  # coremltools names the constexpr op replacing const `w` as `w_quantized`


def op_config(mode: str, in_features: int) -> Any:
    if mode == "int8":
        return cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0
        )
    if in_features % INT4_BLOCK_SIZE == 0:
        return cto.OpLinearQuantizerConfig(
            mode="linear_symmetric",
            dtype="int4",
            granularity="per_block",
            block_size=INT4_BLOCK_SIZE,
            weight_threshold=0,
        )
    return cto.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int4", granularity="per_channel", weight_threshold=0
    )


def quantize_program(prog: Any, mode: str) -> None:
    """Quantize every 2-D weight const (`model_*_weight_to_fp16`) of the single-function program in place."""
    configs = {}
    for op in prog.functions["main"].operations:
        name = op.name
        if op.op_type != "const" or name in ROPE_TABLES or not name.endswith("_weight_to_fp16"):
            continue
        shape = op.outputs[0].shape
        if len(shape) == 2:
            configs[name] = op_config(mode, int(shape[1]))
    quantizer = PASS_REGISTRY["compression::linear_quantize_weights"]
    quantizer.set_options(
        [PassOption("config", cto.OptimizationConfig(op_name_configs=configs)), PassOption("joint_compression", False)]
    )
    quantizer(prog)
