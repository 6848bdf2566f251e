"""JUnit XML for CI dashboards (`export --junit FILE`, `validate --junit FILE`), written with `junitparser`.

One test suite per target, one test case per model and check (classname `ifp-export.TARGET.MODEL`, name the
check); a failed check carries the measured figure and the bound in its message. A run that stops before its
checks (bad input, out of disk, a crash) is one `ifp-export.COMMAND` case with an error, so the dashboard shows
why nothing was checked. Built from the JSON summary (ifp_export/summary.py): both say the same thing.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from junitparser import Error, Failure, JUnitXml, Skipped, TestCase, TestSuite

from ifp_export.fsutil import atomic_write_bytes


def figure(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def case_for(model: dict[str, Any], check: dict[str, Any]) -> TestCase:
    case = TestCase(check["name"], classname=f"ifp-export.{model['target']}.{model['name']}", time=0.0)
    text = f"measured {figure(check['value'])}, bound {figure(check['bound'])}"
    if check.get("detail"):
        text += f" ({check['detail']})"
    case.system_out = text
    if not check["ok"]:
        case.result = [Failure(f"{model['target']} {model['name']} {check['name']}: {text}", "ValidationFailed")]
    return case


def junit_xml(summary: dict[str, Any]) -> JUnitXml:
    xml = JUnitXml("ifp-export")
    suites: dict[str, TestSuite] = {}
    for model in summary["models"]:
        suite = suites.setdefault(model["target"], TestSuite(f"ifp-export {summary['command']} {model['target']}"))
        for check in model["checks"]:
            suite.add_testcase(case_for(model, check))
        if not model["checks"]:
            case = TestCase("validated", classname=f"ifp-export.{model['target']}.{model['name']}", time=0.0)
            case.result = [Skipped("no check recorded for this model (validation did not reach it)")]
            suite.add_testcase(case)
    run = TestSuite(f"ifp-export {summary['command']}")
    case = TestCase(summary["command"], classname=f"ifp-export.{summary['command']}")
    case.time = sum(p["seconds"] for p in summary["passes"])
    if summary["status"] not in ("ok", "validation_failed"):
        case.result = [Error(summary["error"] or summary["status"], summary["status"])]
    case.system_out = f"status {summary['status']}, exit code {summary['exit_code']}, output {summary['output']}"
    run.add_testcase(case)
    for suite in [run, *suites.values()]:
        suite.update_statistics()
        xml.add_testsuite(suite)
    xml.update_statistics()
    return xml


def write_junit(path: Path, summary: dict[str, Any]) -> None:
    """Atomically write the JUnit file (a CI job may read it while a retry runs)."""
    buffer = io.BytesIO()
    junit_xml(summary).write(buffer, pretty=True)
    atomic_write_bytes(path, buffer.getvalue())
