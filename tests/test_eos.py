"""Issue 18.7: end-of-sequence ids also come from the backbone's generation_config.json (instruct models list their
end-of-turn tokens only there): the runtime stops on any of them and the emitted generation_config.json carries them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_one_line_ifp_error
from tiny import make_checkpoint, onnx_passes, run_export

from ifp_export.checkpoint import load_checkpoint
from ifp_export.generate import greedy_generate
from ifp_export.model.config import DecoderConfig, eos_token_ids, read_generation_config
from ifp_export.runtime import Runtime

PROMPT = "add 12+7="


def test_generation_config_eos_stops_the_runtime_and_reaches_optimum(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path)
    ckpt = load_checkpoint(checkpoint)
    free = greedy_generate(ckpt.backbone, [ckpt.tokenizer.encode(PROMPT).ids], 8)[0]
    stop = next(t for t in free[2:] if t not in free[:2] and t != 2)  # a token greedy decoding emits, not yet EOS
    (checkpoint / "backbone" / "generation_config.json").write_text(json.dumps({"eos_token_id": [stop, 2]}))

    run_export(checkpoint, tmp_path / "out", passes=onnx_passes())  # what the ONNX runtime reads
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["tokenizer"]["eos_token_id"] == [stop, 2]
    emitted = json.loads((tmp_path / "out" / "onnx" / "generation_config.json").read_text())
    assert emitted["eos_token_id"] == [stop, 2]
    tokens = list(Runtime(tmp_path / "out", threads=1).generate(PROMPT, variant="dense", max_new_tokens=8))
    assert tokens == free[: free.index(stop) + 1]


def test_eos_ids_join_config_and_generation_config() -> None:
    cfg = DecoderConfig(96, 32, 48, 2, 4, 2, 8, eos_token_id=2)
    assert eos_token_ids(cfg, {}) == [2]
    assert eos_token_ids(cfg, {"eos_token_id": 7}) == [7, 2]
    assert eos_token_ids(cfg.replace(eos_token_id=[2, 9]), {"eos_token_id": [9, 5]}) == [9, 5, 2]
    assert eos_token_ids(cfg.replace(eos_token_id=None), {}) == []


@pytest.mark.parametrize("content", ['{"eos_token_id": "x"}', "[1]", '{"eos_token_id": [1, true]}', "{"])
def test_bad_generation_config_is_refused(tmp_path: Path, content: str) -> None:
    (tmp_path / "generation_config.json").write_text(content)
    assert_one_line_ifp_error(lambda: read_generation_config(tmp_path), "generation_config.json", "Fix:")


def test_missing_generation_config_is_empty(tmp_path: Path) -> None:
    assert read_generation_config(tmp_path) == {}
