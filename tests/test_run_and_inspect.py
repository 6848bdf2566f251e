"""Issue 18.8/18.11: one truncation rule for long prompts (stated in the manifest, reported by the runtime, warned by
`ifp-export run`), an empty prompt is a one-line error, `run` ends with a newline, `inspect` matches files exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_one_line_error, run_cli

from ifp_export.cli import variant_own_files
from ifp_export.pipeline import ExportContext
from ifp_export.runtime import Runtime

SHORT = "add 1+2="


def long_prompt(runtime: Runtime) -> str:
    max_length = runtime.output.manifest["predictor"]["max_length"]
    return "add " + "1+" * max_length + "1="


def test_long_prompt_keeps_its_first_max_length_tokens_and_says_so(tiny_export: ExportContext) -> None:
    runtime = Runtime(tiny_export.workdir, threads=1)
    predictor = runtime.output.manifest["predictor"]
    assert predictor["truncation"] == "keep_first"
    long = long_prompt(runtime)
    head = runtime.tokenizer.decode(runtime.tokenizer.encode(long).ids[: predictor["max_length"]])
    full, cut = runtime.predict(long), runtime.predict(head)
    assert full.truncated and not cut.truncated and not runtime.predict(SHORT).truncated
    assert np.array_equal(full.scores, cut.scores) and np.array_equal(full.variant_scores, cut.variant_scores)
    assert runtime.route(long).truncated and not runtime.route(SHORT).truncated


def test_run_warns_on_truncation_and_ends_with_a_newline(
    tiny_export: ExportContext, capsys: pytest.CaptureFixture[str]
) -> None:
    long = long_prompt(Runtime(tiny_export.workdir, threads=1))
    code, out, err = run_cli(capsys, "run", str(tiny_export.workdir), "--prompt", long, "--max-new-tokens", "3")
    assert code == 0, err
    assert "warning" in err and "truncated" in err
    assert out.endswith("\n")
    code, out, err = run_cli(capsys, "run", str(tiny_export.workdir), "--prompt", SHORT, "--max-new-tokens", "3")
    assert code == 0 and "truncated" not in err and out.endswith("\n")


@pytest.mark.parametrize("extra", [[], ["--variant", "add"], ["--variant", "dense"]])
def test_empty_prompt_is_a_one_line_error(
    tiny_export: ExportContext, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    code, _, err = run_cli(capsys, "run", str(tiny_export.workdir), "--prompt", "", *extra)
    assert_one_line_error(code, err, "prompt", "Fix:")


def test_inspect_counts_only_a_variants_own_files() -> None:
    manifest = {
        "variants": [
            {"name": "a", "files": {"onnx": {"model": "onnx/a.onnx", "data": ["onnx/decoder_shared.onnx_data"]}}},
            {
                "name": "data",
                "files": {
                    "onnx": {
                        "model": "onnx/data.onnx",
                        "data": ["onnx/decoder_shared.onnx_data", "onnx/data.onnx_data"],
                    }
                },
            },
        ],
        "dense": {"files": {"onnx": {"model": "onnx/dense.onnx", "data": ["onnx/decoder_shared.onnx_data"]}}},
    }
    assert variant_own_files(manifest, manifest["variants"][0]) == ["onnx/a.onnx"]
    assert variant_own_files(manifest, manifest["variants"][1]) == ["onnx/data.onnx", "onnx/data.onnx_data"]


def test_inspect_json_lists_the_manifest(tiny_export: ExportContext, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "inspect", str(tiny_export.workdir), "--json")
    assert code == 0, err
    assert [v["name"] for v in json.loads(out)["variants"]] == [v.name for v in tiny_export.variants]


def test_predictor_onnx_applies_the_same_rule(tiny_export: ExportContext) -> None:
    """predictor.onnx fed more than max_length tokens reads their first max_length, like the runtime and Core ML."""
    runtime = Runtime(tiny_export.workdir, threads=1)
    limit = runtime.output.manifest["predictor"]["max_length"]
    ids = np.random.default_rng(0).integers(4, 40, (1, 3 * limit)).astype(np.int64)
    run = runtime.predictor.run
    full = run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    head = run(None, {"input_ids": ids[:, :limit], "attention_mask": np.ones_like(ids[:, :limit])})
    for a, b in zip(full, head, strict=True):
        assert np.array_equal(a, b)
