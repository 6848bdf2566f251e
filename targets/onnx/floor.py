"""The onnxruntime floor of an export: the oldest release its graphs must load and run on, and the check of a graph
against what that floor supports.

Apps pin an onnxruntime release for months (mobile and web packages lag the Python one), so the export's default
floor is the oldest release it supports, 1.20, and the builder picks ops that release has; newer ops only behind an
explicit higher floor (`ifp-export export --min-onnxruntime 1.24`). What each release supports was measured by
loading and running graphs in every release from 1.20 on (tests/test_onnxruntime_releases.py installs them):

- ai.onnx opset / IR version: 1.20 loads opset 21 and IR 10, 1.21-1.22 opset 22, 1.23 opset 23 and IR 11, 1.24
  opset 25 and IR 13, 1.25 and newer opset 26 or more (the probe stopped at 26).
- opset-23 `Attention` loads in 1.23, but onnxruntime-node 1.23.2's CPU kernel fails on an empty past (the first
  step; issue 25): 1.24.
- `com.microsoft.MatMulNBits` with bits=8 has no CPU kernel before 1.22 ("Only 4b quantization is supported").
- the other contrib ops the builder uses (RotaryEmbedding, GroupQueryAttention with do_rotary,
  SkipSimplifiedLayerNormalization, FusedMatMul, MatMulNBits bits=4) run from 1.20 on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from ifp_export.errors import IFPError, ValidationFailed

if TYPE_CHECKING:
    from ifp_export.pipeline import ExportContext

DEFAULT_FLOOR = "1.20"
OLDEST = (1, 20)
OPSET_23 = (1, 24)  # RMSNormalization + Attention (opset 23): Attention runs an empty past from 1.24 on
MATMUL_NBITS_8 = (1, 22)  # MatMulNBits bits=8 CPU kernel

# release -> (max ai.onnx opset, max IR version) it loads; a release newer than the last row supports at least that
LIMITS = {
    (1, 20): (21, 10),
    (1, 21): (22, 10),
    (1, 22): (22, 10),
    (1, 23): (23, 11),
    (1, 24): (25, 13),
    (1, 25): (26, 13),
}
# contrib (com.microsoft) ops the builder emits -> the first release whose CPU kernel runs them as built
CONTRIB_OPS = {
    "FusedMatMul": OLDEST,
    "GroupQueryAttention": OLDEST,
    "MatMulNBits": OLDEST,  # bits=4; bits=8: MATMUL_NBITS_8
    "RotaryEmbedding": OLDEST,
    "SkipSimplifiedLayerNormalization": OLDEST,
}
# ai.onnx ops whose CPU kernel runs our graphs only from a release later than their opset implies
ONNX_OPS = {"Attention": OPSET_23}


def parse_floor(text: str) -> tuple[int, int]:
    """'1.24' (or '1.24.3': the patch is ignored) -> (1, 24); anything below 1.20 or malformed is bad input."""
    parts = text.strip().split(".")
    if not (2 <= len(parts) <= 3 and all(p.isdigit() for p in parts)):
        raise IFPError(f"--min-onnxruntime must be a release like 1.24, got {text!r}", None, "pass e.g. 1.20 or 1.24")
    floor = (int(parts[0]), int(parts[1]))
    if floor < OLDEST:
        raise IFPError(
            f"--min-onnxruntime {text} is older than the oldest supported release {DEFAULT_FLOOR}",
            None,
            f"pass {DEFAULT_FLOOR} or newer",
        )
    return floor


def floor_text(floor: tuple[int, int]) -> str:
    return f"{floor[0]}.{floor[1]}"


def limits(floor: tuple[int, int]) -> tuple[int, int]:
    """(max ai.onnx opset, max IR version) a floor's release loads."""
    return LIMITS[max(release for release in LIMITS if release <= floor)]


def graph_problems(model: onnx.ModelProto, floor: tuple[int, int]) -> list[str]:
    """What in `model` the release `floor` cannot load or run (empty: it can)."""
    max_opset, max_ir = limits(floor)
    release = floor_text(floor)
    problems = []
    if model.ir_version > max_ir:
        problems.append(f"IR version {model.ir_version} > {max_ir} (onnxruntime {release})")
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > max_opset:
            problems.append(f"ai.onnx opset {opset.version} > {max_opset} (onnxruntime {release})")
        elif opset.domain not in ("", "ai.onnx", "com.microsoft"):
            problems.append(f"opset domain {opset.domain!r} is not one onnxruntime ships")
    for node in model.graph.node:
        need = _node_floor(node)
        if need is None:
            problems.append(f"contrib op {node.op_type} is not known to run on onnxruntime {release}")
        elif need > floor:
            problems.append(f"{node.domain or 'ai.onnx'}.{node.op_type} needs onnxruntime {floor_text(need)}")
    return sorted(set(problems))


def _node_floor(node: onnx.NodeProto) -> tuple[int, int] | None:
    """The first release that runs this node as built (None: a contrib op we know nothing about)."""
    if node.domain in ("", "ai.onnx"):
        return ONNX_OPS.get(node.op_type, OLDEST)
    if node.domain != "com.microsoft" or node.op_type not in CONTRIB_OPS:
        return None
    bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
    return MATMUL_NBITS_8 if node.op_type == "MatMulNBits" and bits == 8 else CONTRIB_OPS[node.op_type]


def check_floor(paths: list[Path], floor: str) -> list[str]:
    """'file: problem' for every graph in `paths` that its recorded floor's release cannot run."""
    parsed = parse_floor(floor)
    return [
        f"{path.name}: {problem}"
        for path in paths
        for problem in graph_problems(onnx.load(str(path), load_external_data=False), parsed)
    ]


def validate_floor(ctx: ExportContext) -> None:
    """Validation: every ONNX graph of the export against the floor its manifest records (a graph that its floor's
    release cannot run fails validation, exit 3); the result goes to report.json."""
    artifacts = ctx.emitted["onnx"]
    floor = artifacts.min_onnxruntime
    problems = check_floor(artifacts.graphs, floor)
    max_opset, max_ir = limits(parse_floor(floor))
    ctx.report["onnx_floor"] = {
        "min_onnxruntime": floor,
        "graphs": len(artifacts.graphs),
        "files": sorted(path.name for path in artifacts.graphs),
        "problems": problems,
    }
    ctx.console.log(
        f"ONNX floor: {len(artifacts.graphs)} graphs checked against onnxruntime {floor} (ai.onnx opset <= "
        f"{max_opset}, IR <= {max_ir}, its contrib kernels): {'; '.join(problems) or 'all run there'}"
    )
    if problems:
        raise ValidationFailed(f"ONNX graphs exceed their floor onnxruntime {floor}: {'; '.join(problems)}")
