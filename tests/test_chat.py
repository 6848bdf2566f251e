"""Instruct models' text files: new-checkpoint keeps the tokenizer's companion files and the chat template, the loader
checks them like every checkpoint file, and the ONNX directory carries what AutoTokenizer and og.Tokenizer read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_one_line_error, assert_one_line_ifp_error, run_cli, snapshot
from tiny import save_backbone, write_tasks
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from ifp_export.chat import (
    CHAT_TEMPLATE_FILE,
    SPECIAL_TOKENS_FILE,
    TOKENIZER_CONFIG_FILE,
    client_tokenizer_config,
    format_chat,
    read_tokenizer_text,
    write_client_files,
)
from ifp_export.checkpoint import TOKENIZER_FILE, create_checkpoint, load_checkpoint
from ifp_export.pipeline import ExportContext
from ifp_export.targets.onnx import ONNX_DIR

CONFIG_TEMPLATE = "{% for m in messages %}{{ bos_token }}q: {{ m['content'] }}{% endfor %}"
JINJA_TEMPLATE = "{% for m in messages %}{{ bos_token }}{{ m['role'][0] }}: {{ m['content'] }}\n{% endfor %}"
JINJA_TEMPLATE += "{% if add_generation_prompt %}a:{% endif %}"


def chat_backbone(directory: Path) -> Path:
    """A tiny backbone directory shipped as an instruct model is: tokenizer_config.json with a template,
    chat_template.jinja (which wins), special_tokens_map.json and generation_config.json."""
    save_backbone(directory)
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "chat_template": CONFIG_TEMPLATE}
    (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config))
    (directory / SPECIAL_TOKENS_FILE).write_text(json.dumps({"bos_token": {"content": "<bos>"}, "pad_token": "<pad>"}))
    (directory / CHAT_TEMPLATE_FILE).write_text(JINJA_TEMPLATE)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    return directory


def test_new_checkpoint_keeps_the_tokenizer_companion_files(tmp_path: Path) -> None:
    backbone = chat_backbone(tmp_path / "src")
    out = tmp_path / "ckpt"
    out.mkdir()
    ckpt = create_checkpoint(backbone, write_tasks(tmp_path / "tasks.jsonl"), out, 0.5)
    for name in (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE, CHAT_TEMPLATE_FILE):
        assert (out / name).read_bytes() == (backbone / name).read_bytes(), name
    assert (out / "backbone/generation_config.json").read_bytes() == (backbone / "generation_config.json").read_bytes()
    assert ckpt.text.chat_template == JINJA_TEMPLATE  # the .jinja file wins, as in transformers
    assert ckpt.text.special_tokens == {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    assert ckpt.eos_token_ids == [2, 3]


def test_the_chat_template_renders_as_transformers_renders_it(tmp_path: Path) -> None:
    """format_chat (what `ifp-export run` uses) against AutoTokenizer.apply_chat_template on the same files."""
    backbone = chat_backbone(tmp_path / "src")
    text = read_tokenizer_text(backbone)
    hf = AutoTokenizer.from_pretrained(backbone)
    messages = [{"role": "user", "content": "add 1+2="}]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert format_chat(text.chat_template, text.special_tokens, "add 1+2=") == expected == "<bos>u: add 1+2=\na:"


def test_a_named_template_list_uses_its_default(tmp_path: Path) -> None:
    save_backbone(tmp_path)
    templates = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CONFIG_TEMPLATE}]
    (tmp_path / TOKENIZER_CONFIG_FILE).write_text(json.dumps({"bos_token": "<bos>", "chat_template": templates}))
    assert read_tokenizer_text(tmp_path).chat_template == CONFIG_TEMPLATE


def test_a_broken_chat_template_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    backbone = chat_backbone(tmp_path / "src")
    (backbone / CHAT_TEMPLATE_FILE).write_text("{% for m in messages %}{{ m['content'] }")
    tasks = write_tasks(tmp_path / "tasks.jsonl")
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, "new-checkpoint", "--backbone", str(backbone), "--tasks", str(tasks), "-o", "x")
    assert_one_line_error(code, err, CHAT_TEMPLATE_FILE, "chat template", "Fix:")
    assert snapshot(tmp_path) == before


def test_a_template_failing_at_render_time_is_a_one_line_error(tmp_path: Path) -> None:
    save_backbone(tmp_path)
    config = {"chat_template": "{{ messages[0]['content'] + 1 }}"}  # TypeError inside the template
    (tmp_path / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config))
    assert_one_line_ifp_error(lambda: read_tokenizer_text(tmp_path), TOKENIZER_CONFIG_FILE, "TypeError")


def test_a_tokenizer_config_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    save_backbone(tmp_path)
    (tmp_path / TOKENIZER_CONFIG_FILE).write_text("[1, 2]")
    assert_one_line_ifp_error(lambda: read_tokenizer_text(tmp_path), TOKENIZER_CONFIG_FILE, "JSON object")


def test_a_symlinked_companion_file_is_refused(tmp_path: Path) -> None:
    backbone = chat_backbone(tmp_path / "src")
    out = tmp_path / "ckpt"
    out.mkdir()
    create_checkpoint(backbone, write_tasks(tmp_path / "tasks.jsonl"), out, 0.5)
    outside = tmp_path / "elsewhere.jinja"
    (out / CHAT_TEMPLATE_FILE).rename(outside)
    (out / CHAT_TEMPLATE_FILE).symlink_to(outside)
    assert_one_line_ifp_error(lambda: load_checkpoint(out), CHAT_TEMPLATE_FILE, "symlink")


def test_the_onnx_dir_loads_in_autotokenizer_without_companion_files(tiny_export: ExportContext) -> None:
    """A checkpoint without tokenizer_config.json (the tiny models, the sample) still gets one beside the models,
    made from what is known; AutoTokenizer then reads the ids tokenizers reads, and the manifest has no template."""
    directory = tiny_export.workdir / ONNX_DIR
    config = json.loads((directory / TOKENIZER_CONFIG_FILE).read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<bos>", "<eos>", "<pad>")
    hf = AutoTokenizer.from_pretrained(directory)
    for task in tiny_export.checkpoint.tasks:
        assert hf(task.prompt).input_ids == tiny_export.checkpoint.tokenizer.encode(task.prompt).ids
    manifest = json.loads((tiny_export.workdir / "manifest.json").read_text())
    assert manifest["tokenizer"]["chat_template"] is None
    assert manifest["predictor"]["reads"] == "message"


def test_client_files_carry_the_template_inside_tokenizer_config(tmp_path: Path) -> None:
    """og reads the template only from tokenizer_config.json: one shipped as chat_template.jinja is moved inside,
    and AutoTokenizer on the written directory formats as the backbone directory does."""
    backbone = chat_backbone(tmp_path / "src")
    text = read_tokenizer_text(backbone)
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "config.json").write_bytes((backbone / "config.json").read_bytes())  # as the ONNX target writes one
    config = client_tokenizer_config(text, Tokenizer.from_file(str(backbone / TOKENIZER_FILE)), {}, 128)
    write_client_files(out, text, backbone / TOKENIZER_FILE, config)
    assert json.loads((out / TOKENIZER_CONFIG_FILE).read_text())["chat_template"] == JINJA_TEMPLATE
    assert not (out / CHAT_TEMPLATE_FILE).exists()
    messages = [{"role": "user", "content": "reverse abc:"}]
    ours = AutoTokenizer.from_pretrained(out).apply_chat_template(messages, add_generation_prompt=True)
    assert ours == AutoTokenizer.from_pretrained(backbone).apply_chat_template(messages, add_generation_prompt=True)
