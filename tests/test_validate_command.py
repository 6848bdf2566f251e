"""Issue 18.5: `ifp-export validate` re-checks an export made with --keep and --mode dynamic (k from the manifest)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_cli
from tiny import make_checkpoint, run_export


def test_validate_export_with_keep_override_and_dynamic_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = make_checkpoint(tmp_path)
    ctx = run_export(checkpoint, tmp_path / "out", keep=0.5, mode="dynamic")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (
        manifest["model"]["k"]
        == ctx.k_per_layer[0]
        == 24
        != json.loads((checkpoint / "ifp.json").read_text())["k_per_layer"][0]
    )
    code, out, err = run_cli(capsys, "validate", str(tmp_path / "out"), "--checkpoint", str(checkpoint))
    assert code == 0, err
    assert "all checks passed" in out
