"""The tokenizer's companion files and the chat template: what instruct models ship beside `tokenizer.json`.

A Hugging Face directory may carry `tokenizer_config.json` (special tokens, often the chat template),
`special_tokens_map.json` and `chat_template.jinja` (transformers ≥ 4.47 saves the template there; it wins over
the config's). `new-checkpoint` keeps them, the checkpoint loader reads them, the ONNX target writes what
onnxruntime-genai's `og.Tokenizer` and `AutoTokenizer` look for next to the models, and the manifest carries the
template so an app (and `ifp-export run`) formats a user's message the way the model was trained to read it.

The predictor reads the user's message as typed, like the calibration prompts of tasks.jsonl; only the decoder
reads the message formatted with the chat template.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from ifp_export.errors import IFPError
from ifp_export.fsutil import read_json, write_json

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TEXT_FILES = (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE, CHAT_TEMPLATE_FILE)
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the names a chat template may use (apply_chat_template passes them)
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
    "additional_special_tokens",
)
PREDICTOR_READS = "message"  # the manifest's predictor.reads: the user's message, never the chat-formatted prompt
FIX = "re-save the tokenizer with transformers' save_pretrained, or remove the file"


@dataclass(frozen=True)
class TokenizerText:
    """A checkpoint's tokenizer companion files, validated ({} / None where a file is absent)."""

    config: dict[str, Any] = field(default_factory=dict)
    special_tokens_map: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None

    @property
    def special_tokens(self) -> dict[str, Any]:
        """The special tokens as strings (or a list of strings), as transformers hands them to a chat template:
        tokenizer_config.json's, overridden by special_tokens_map.json's."""
        merged = {**self.config, **self.special_tokens_map}
        tokens: dict[str, Any] = {}
        for key in SPECIAL_TOKEN_KEYS:
            value = merged.get(key)
            if isinstance(value, list):
                tokens[key] = [token_text(v) for v in value]
            elif token_text(value):
                tokens[key] = token_text(value)
        return tokens


def token_text(value: Any) -> str | None:
    """A special token as written by transformers: a string, or an AddedToken dict with its `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def format_chat(chat_template: str, special_tokens: dict[str, Any], message: str) -> str:
    """`message` as one user turn, formatted with the template and a generation prompt, exactly as transformers'
    `apply_chat_template(..., add_generation_prompt=True, tokenize=False)` does (its own renderer)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    conversation = [[{"role": "user", "content": message}]]
    try:
        rendered, _ = render_jinja_template(
            conversation, chat_template=chat_template, add_generation_prompt=True, **special_tokens
        )
    except Exception as err:  # the template is the checkpoint's code: any error in it is bad input, one line
        detail = f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"
        raise IFPError(f"the chat template fails on a user message ({detail})", None, FIX) from None
    return rendered[0]


def read_tokenizer_text(directory: Path) -> TokenizerText:
    """The companion files of the tokenizer in `directory`; a malformed one is the one-line error."""
    config_path = directory / TOKENIZER_CONFIG_FILE
    config = read_object(config_path, "tokenizer config") if config_path.is_file() else {}
    special_path = directory / SPECIAL_TOKENS_FILE
    special = read_object(special_path, "special tokens map") if special_path.is_file() else {}
    template_path = directory / CHAT_TEMPLATE_FILE
    if template_path.is_file():
        try:
            template: str | None = template_path.read_text(encoding="utf-8", errors="strict")
        except UnicodeDecodeError as err:
            raise IFPError(f"chat template is not UTF-8 ({err.reason})", template_path, FIX) from None
        where = template_path
    else:
        template, where = config_template(config, config_path), config_path
    text = TokenizerText(config, special, template)
    if template is not None:
        try:
            format_chat(template, text.special_tokens, "hello")
        except IFPError as err:
            raise IFPError(err.what, where, FIX) from None
    return text


def read_object(path: Path, what: str) -> dict[str, Any]:
    raw = read_json(path, what)
    if not isinstance(raw, dict):
        raise IFPError(f"{what} must be a JSON object", path, FIX)
    return raw


def config_template(config: dict[str, Any], path: Path) -> str | None:
    """tokenizer_config.json's `chat_template`: a string, or transformers' list of named templates (the default)."""
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise IFPError("chat_template must be a string or a list holding a 'default' named template", path, FIX)


def copy_tokenizer_text(source: Path, destination: Path) -> None:
    """The companion files `source` ships, byte for byte (validate them first with `read_tokenizer_text`)."""
    for name in TEXT_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, destination / name)


def client_tokenizer_config(text: TokenizerText, tokenizer: Tokenizer, token_ids: dict, max_length: int) -> dict:
    """The tokenizer_config.json written beside the ONNX models: the checkpoint's own with the chat template inside
    (og reads it only there), or, for a checkpoint without one, what is known: the fast tokenizer class (so
    `AutoTokenizer` uses tokenizer.json as it is) and the special tokens of `token_ids` (generation_config.json's)."""
    if text.config:
        config = dict(text.config)
    else:
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "model_max_length": max_length,
        }
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            ids = token_ids.get(key)
            token = tokenizer.id_to_token(ids[0] if isinstance(ids, list) else ids) if ids is not None else None
            if token is not None:
                config[key.removesuffix("_id")] = token
    if text.chat_template is not None:
        config["chat_template"] = text.chat_template
    return config


def write_client_files(directory: Path, text: TokenizerText, tokenizer_file: Path, config: dict) -> None:
    """tokenizer.json, tokenizer_config.json (and special_tokens_map.json when the checkpoint has one) in
    `directory`: what og.Tokenizer and AutoTokenizer.from_pretrained read from a model's directory."""
    shutil.copyfile(tokenizer_file, directory / tokenizer_file.name)
    write_json(directory / TOKENIZER_CONFIG_FILE, config)
    if text.special_tokens_map:
        write_json(directory / SPECIAL_TOKENS_FILE, text.special_tokens_map)


def manifest_fields(text: TokenizerText) -> dict[str, Any]:
    """The manifest's tokenizer entries for apps: the chat template (null without one) and the special tokens the
    template reads."""
    return {"chat_template": text.chat_template, "special_tokens": text.special_tokens}
