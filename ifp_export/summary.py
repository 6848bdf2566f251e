"""The machine-readable result of `export --json` / `validate --json` (schema: schemas/summary.schema.json).

One JSON object for CI: status and exit code, per pass its time, peak RSS and the files it made, per model (variant,
dense, predictor, dynamic) and target (onnx, coreml; fold and transformers for the checks of those passes) its files
and bytes, every check that can make the exit code 3 with its measured figure, bound and verdict (an exactness
record of `ifp_export.bounds` becomes `NAME_max_rel_diff` and `NAME_top1_disagreements`), the targets' dedup ratios,
the variants report, tool versions and the output path. The JUnit file is written from the same checks
(ifp_export/junit.py), so the two never disagree.

Validation figures are read from `ctx.report["fold_validation"]`, `["transformers_check"]`, `["onnx_validation"]` and
`["coreml_validation"]` defensively: the passes and targets own those records and may add or rename fields; a missing
field becomes `null`, never a crash.
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


def exactness_checks(record: dict[str, Any], prefix: str | None = None) -> list[dict[str, Any]]:
    """An `ifp_export.bounds.Exactness` record as two checks: the relative max |Δ| against its bound, and the number of
    decisive top-1 disagreements (bound 0; near ties, which never fail, in its detail)."""
    name = prefix or record.get("name", "logits")
    error, bound, disagreements = (number(record.get(key)) for key in ("error", "bound", "top1_disagreements"))
    noise = number(record.get("noise"))
    detail = f"fp32 noise {noise:.2e}, {record.get('positions')} positions" if noise is not None else None
    ties = f"{record.get('near_ties')} near ties (reference top-2 margin within the bound, not failed)"
    return [
        check(f"{name}_max_rel_diff", error, bound, error is not None and bound is not None and error <= bound, detail),
        check(f"{name}_top1_disagreements", disagreements, 0, disagreements == 0, ties),
    ]


def onnx_checks(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Model name -> its ONNX checks, from ctx.report["onnx_validation"] (`targets/onnx/validate.py`)."""
    checks: dict[str, list[dict[str, Any]]] = {}
    for row in report.get("models", []):
        rows = [c for record in row.get("checks", []) for c in exactness_checks(record)]
        checks[model_name(row.get("model"))] = rows
    if report.get("predictor"):
        checks[PREDICTOR] = [c for record in report["predictor"] for c in exactness_checks(record)]
    if report.get("dynamic"):
        checks[DYNAMIC] = exactness_checks(report["dynamic"], "masked_dense")
    return checks


def floor_checks(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Model name -> whether its graphs (`NAME.onnx`, `NAME.genai.onnx`) run on the export's recorded onnxruntime floor
    (`targets/onnx/floor.py`): the number of problems found, bound 0, each problem in the detail."""
    problems: dict[str, list[str]] = {}
    for file in report.get("files", []):
        mine = [str(p) for p in report.get("problems", []) if str(p).startswith(f"{file}: ")]
        problems.setdefault(model_name(str(file).removesuffix(".onnx").removesuffix(".genai")), []).extend(mine)
    floor = f"onnxruntime {report.get('min_onnxruntime')}"
    return {
        name: [check("min_onnxruntime_problems", len(found), 0, not found, "; ".join([floor, *found]))]
        for name, found in problems.items()
    }


def fold_checks(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Variant name -> its fold check (folded vs masked PyTorch model, `passes/fold.py`)."""
    return {str(r.get("variant")): exactness_checks(r) for r in report.get("variants", [])}


def transformers_checks(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The dense model's check against `transformers` (`ifp_export/hf_check.py`); a skipped check is a passing
    check whose detail says why it did not run."""
    if not report:
        return {}
    if report.get("check"):
        return {DENSE: exactness_checks(report["check"])}
    return {DENSE: [check("transformers_max_rel_diff", None, None, report.get("ok"), report.get("skipped"))]}


def coreml_checks(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Function name -> its Core ML checks (weights read back vs PyTorch; parity where Core ML can predict)."""
    checks: dict[str, list[dict[str, Any]]] = {}
    for row in report.get("functions", []):
        name = model_name(row.get("function"))
        detail = f"max|Δ| {row.get('max_abs_diff')} over {row.get('tensors')} tensors; {report.get('tolerance')}"
        checks[name] = [check("weights_error_over_bound", row.get("bound_ratio"), 1.0, row.get("ok"), detail)]
    for name, record in (report.get("parity") or {}).items():
        checks.setdefault(name, []).extend(exactness_checks(record, "parity"))
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
        "fold": fold_checks(report.get("fold_validation") or {}),
        "transformers": transformers_checks(report.get("transformers_check") or {}),
        "onnx": onnx_checks(report.get("onnx_validation") or {}),
        "coreml": coreml_checks(report.get("coreml_validation") or {}),
    }
    for name, rows in floor_checks(report.get("onnx_floor") or {}).items():
        by_target["onnx"].setdefault(name, []).extend(rows)
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
            if "checks" in record:  # full, or quick: which models were checked in full (the others by one forward)
                targets[target] |= {"checks": record["checks"], "checked_in_full": record.get("checked_in_full")}
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
