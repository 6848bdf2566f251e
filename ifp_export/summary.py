"""The machine-readable result of `export --json` / `validate --json` (schema: schemas/summary.schema.json).

One JSON object for CI: status and exit code, per pass its time, peak RSS and the files it made, per model (variant,
dense, predictor, dynamic) and target its files and bytes, every validation check with its measured figure, bound
and verdict, the targets' dedup ratios, the variants report, tool versions and the output path. The JUnit file is
written from the same checks (ifp_export/junit.py), so the two never disagree.

Validation figures are read from `ctx.report["onnx_validation"]` / `["coreml_validation"]` defensively: the
targets own those records and may add or rename fields; a missing field becomes `null`, never a crash.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ifp_export.errors import EXIT_OK, IFPError, ValidationFailed

SUMMARY_SCHEMA_VERSION = 1
STATUS = {EXIT_OK: "ok", 2: "bad_input", 3: "validation_failed", 4: "environment"}
DENSE, PREDICTOR, DYNAMIC = "dense", "predictor", "dynamic"


def exit_code_of(error: BaseException | None) -> int:
    if error is None:
        return EXIT_OK
    if isinstance(error, IFPError | ValidationFailed):
        return error.exit_code
    return 1  # an internal error (a bug): the traceback is the report


def model_name(label: Any) -> str:
    """A model as the targets label it in their records (`dense.onnx`, `predictor.mlpackage`, `add`) -> `dense`."""
    return str(label).removesuffix(".onnx").removesuffix(".mlpackage")


def number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def check(name: str, value: Any, bound: Any, ok: Any, detail: str | None = None) -> dict[str, Any]:
    """One validation check: the measured figure, the bound it is held to, and the verdict."""
    return {
        "name": name,
        "value": value if isinstance(value, bool) else number(value),
        "bound": bound if isinstance(bound, str) else number(bound),
        "ok": bool(ok),
        **({"detail": detail} if detail else {}),
    }


def onnx_bound(row: dict[str, Any], quantize: str) -> float | None:
    """The bound `ValidationRow.ok` holds prefill/decode max|Δlogits| to (targets/onnx.py), from the row's figures."""
    from ifp_export.targets import onnx

    scale = number(row.get("logits_scale"))
    if "bound" in row:
        return number(row["bound"])
    if scale is None:
        return None
    if quantize == "none":
        return getattr(onnx, "PARITY_TOLERANCE", 1e-4) * max(1.0, scale)
    relative = getattr(onnx, "RELATIVE_TOLERANCE", {}).get(quantize)
    return None if relative is None else relative * scale


def onnx_checks(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Model name -> its ONNX checks, from ctx.report["onnx_validation"]."""
    from ifp_export.targets import onnx

    quantize = report.get("quantize", "none")
    checks: dict[str, list[dict[str, Any]]] = {}
    for row in report.get("models", []):
        bound, ok = onnx_bound(row, quantize), row.get("ok", False)
        rows = [check("prefill_max_abs_diff", row.get("prefill_diff"), bound, ok)]
        if quantize == "none":
            rows.append(check("decode_max_abs_diff", row.get("decode_diff"), bound, ok))
            rows.append(check("greedy_tokens_identical", row.get("greedy_match"), True, row.get("greedy_match")))
        checks[model_name(row.get("model"))] = rows
    tolerance = getattr(onnx, "PARITY_TOLERANCE", 1e-4)
    if "predictor_scores_max_abs_diff" in report:
        diff = number(report["predictor_scores_max_abs_diff"])
        agreement = number(report.get("predictor_routing_agreement"))
        checks[PREDICTOR] = [
            check("scores_max_abs_diff", diff, tolerance, diff is not None and diff <= tolerance),
            check("routing_agreement", agreement, 1.0, agreement == 1.0),
        ]
    if "dynamic_max_abs_diff" in report:
        diff, bound = number(report["dynamic_max_abs_diff"]), getattr(onnx, "DYNAMIC_TOLERANCE", None)
        checks[DYNAMIC] = [check("masked_dense_max_abs_diff", diff, bound, bound is None or diff <= bound)]
    return checks


def coreml_checks(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Function name -> its Core ML checks (weights read back vs PyTorch; parity where Core ML can predict)."""
    checks: dict[str, list[dict[str, Any]]] = {}
    for row in report.get("functions", []):
        name = model_name(row.get("function"))
        detail = f"max|Δ| {row.get('max_abs_diff')} over {row.get('tensors')} tensors; {report.get('tolerance')}"
        checks[name] = [check("weights_error_over_bound", row.get("bound_ratio"), 1.0, row.get("ok"), detail)]
    for name, diff in (report.get("parity_relative_max_abs_diff") or {}).items():
        checks.setdefault(name, []).append(check("parity_relative_max_abs_diff", diff, None, True))
    return checks


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def onnx_files(root: Path, name: str) -> list[dict[str, Any]]:
    """`onnx/NAME.onnx` and the external data files it references, with their sizes (empty if not written)."""
    from ifp_export.targets import onnx

    graph = root / "onnx" / f"{name}.onnx"
    if not graph.is_file():
        return []
    paths = [graph, *(graph.parent / location for location in onnx.external_data_files(graph))]
    return [{"path": p.relative_to(root).as_posix(), "bytes": tree_bytes(p)} for p in paths]


def model_entries(ctx: Any, root: Path) -> list[dict[str, Any]]:
    """Per model and target: files, bytes and checks. Reads the files under `root` (the staging dir during an
    export, OUT for validate), so call it before a failed export's staging dir is removed."""
    report = ctx.report
    by_target = {
        "onnx": onnx_checks(report.get("onnx_validation") or {}),
        "coreml": coreml_checks(report.get("coreml_validation") or {}),
    }
    kinds = [(v.name, "variant") for v in ctx.variants] + [(DENSE, DENSE), (PREDICTOR, PREDICTOR)]
    if (root / "onnx" / f"{DYNAMIC}.onnx").is_file():
        kinds.append((DYNAMIC, DYNAMIC))
    entries = []
    for name, kind in kinds:
        for target, checks in by_target.items():
            files = onnx_files(root, name) if target == "onnx" else []
            if target == "coreml":
                package = root / "coreml" / ("predictor.mlpackage" if kind == PREDICTOR else "decoder.mlpackage")
                entry = {"path": package.relative_to(root).as_posix(), "bytes": tree_bytes(package)}
                files = [entry] if package.is_dir() else []
            if not files and name not in checks:
                continue
            own = checks.get(name, [])
            verdict = "not_run" if not own else "pass" if all(c["ok"] for c in own) else "fail"
            entries.append(
                {"name": name, "kind": kind, "target": target, "files": files, "checks": own, "verdict": verdict}
            )
    uses = Counter(f["path"] for entry in entries for f in entry["files"])
    for entry in entries:  # shared weights are stored once: a file several models reference is marked, not re-counted
        entry["files"] = [{**f, "shared": uses[f["path"]] > 1} for f in entry["files"]]
    return entries


def target_entries(report: dict[str, Any]) -> dict[str, Any]:
    """Per target: dedup ratio (bytes on disk / shared weights once + FFN slices), quantization, tolerance."""
    targets = {}
    for target in ("onnx", "coreml"):
        record = report.get(f"{target}_validation")
        if isinstance(record, dict):
            targets[target] = {
                "dedup_ratio": number(record.get("dedup_ratio")),
                "quantize": record.get("quantize"),
                "tolerance": record.get("tolerance"),
            }
    return targets


def build_summary(
    command: str,
    output: Path,
    ctx: Any | None,
    models: list[dict[str, Any]] | None,
    error: BaseException | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole summary object; `ctx` may be None (refused before any work) and `models` None (not gathered)."""
    from ifp_export.passes.manifest import tool_versions

    code = exit_code_of(error)
    passes = []
    if ctx is not None:
        for name, seconds in ctx.timings:
            passes.append(
                {
                    "name": name,
                    "seconds": round(seconds, 3),
                    "peak_rss_bytes": ctx.peak_rss.get(name),
                    "made": ctx.made.get(name, []),
                }
            )
    report = {} if ctx is None else ctx.report
    failed = sorted({f"{m['target']}:{m['name']}" for m in models or [] if m["verdict"] == "fail"})
    return {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "command": command,
        "status": STATUS.get(code, "internal_error"),
        "exit_code": code,
        "error": None if error is None else str(error).splitlines()[0] if str(error) else type(error).__name__,
        "output": str(output.absolute()),
        "passes": passes,
        "models": models or [],
        "failed": failed,
        "targets": target_entries(report),
        "report": report,
        "versions": tool_versions(),
        **(extra or {}),
    }
