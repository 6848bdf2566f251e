"""Shared test helpers: tiny random Hugging Face models, padded batches, reference decoding loops."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from ifp_export.cli import main
from ifp_export.digests import sha256_file
from ifp_export.errors import IFPError
from ifp_export.fold import read_kept_indices, write_kept_indices
from ifp_export.targets.onnx.ops import BLOCK_SIZE, quantized_shapes

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # with head_dim 16 and theta 1e4 the wavelengths (6.3, 19.9, 62.8, ...) hit all three llama3 bands
    "original_max_position_embeddings": 32,
}

TINY = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def make_hf_model(arch: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny random fp32 HF causal LM in eval mode.

    Every parameter (including norm weights and biases, which HF initialises to 1 / 0) is randomised so that
    biases, norms and tied embeddings all influence the logits.
    """
    config_cls, model_cls = ARCHITECTURES[arch]
    config = config_cls(**{**TINY, **overrides})
    config._attn_implementation = "eager"  # an implementation independent of ours (we use SDPA)
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    return model


def save_hf_model(model: PreTrainedModel, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    assert (directory / "model.safetensors").is_file()
    return directory


def edit_config(directory: Path, **changes: Any) -> None:
    """Rewrite keys of `directory/config.json` (a value of `None` deletes the key)."""
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))


def assert_one_line_ifp_error(call: Callable[[], object], *expected: str) -> IFPError:
    """`call()` must raise an IFPError whose message is one line containing each of `expected`."""
    with pytest.raises(IFPError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("error: ")
    for text in expected:
        assert text in message, (text, message)
    return info.value


def left_padded_batch(
    lengths: list[int], vocab_size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (input_ids, attention_mask, position_ids), rows right-aligned, pad id 0, HF-style positions."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab_size, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask, positions_from_mask(mask)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def assert_close_on_mask(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor, atol: float) -> float:
    """Max |actual - expected| over positions where mask ([B, T]) is 1; fails above `atol`."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    keep = mask.bool()
    assert keep.any()
    diff = (actual - expected).abs()[keep].max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol:g}"
    return diff


@torch.no_grad()
def hf_greedy_logits(
    model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, steps: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Prefill + `steps` cached greedy decode steps with HF (explicit position ids).

    Returns per-call logits, per-call attention masks (for the new positions) and the fed tokens [B, steps].
    """
    positions = positions_from_mask(mask)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    logits, masks, tokens = [out.logits], [mask], []
    cache = out.past_key_values
    for _ in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        mask = torch.cat((mask, torch.ones_like(token)), dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits)
        masks.append(mask[:, -1:])
    return logits, masks, torch.cat(tokens, dim=1)


@torch.no_grad()
def ours_logits_for_tokens(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    tokens: torch.Tensor,
    ffn_masks: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Our decoder fed the same prompt + token stream as `hf_greedy_logits` (prefill, then one token a step)."""
    positions = positions_from_mask(mask)
    logits, past = model(ids, mask, positions, None, ffn_masks)
    out = [logits]
    for step in range(tokens.shape[1]):
        token = tokens[:, step : step + 1]
        mask = torch.cat((mask, torch.ones_like(token)), dim=1)
        positions = positions[:, -1:] + 1
        logits, past = model(token, mask, positions, past, ffn_masks)
        out.append(logits)
    return out


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`ifp-export ARGS` in-process: (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (or 'dir', or 'symlink -> target') of everything under root.

    Walks by directory file descriptor (os.fwalk) and never follows symlinks, so a directory renamed or swapped
    while it is read still yields the consistent content of one directory.
    """
    if not root.exists():
        return {}
    entries: dict[str, str] = {}
    for dirpath, dirnames, filenames, dirfd in os.fwalk(root):
        relative = Path(dirpath).relative_to(root)
        for name in dirnames + filenames:
            key = (relative / name).as_posix()
            mode = os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                entries[key] = f"symlink -> {os.readlink(name, dir_fd=dirfd)}"
            elif stat.S_ISDIR(mode):
                entries[key] = "dir"
            else:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dirfd)
                with os.fdopen(fd, "rb") as f:
                    entries[key] = hashlib.sha256(f.read()).hexdigest()
    return dict(sorted(entries.items()))


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit code 2 and exactly one stderr line, `error: ...`, containing each of `needles`, no traceback."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@torch.no_grad()
def zero_hf_neurons(hf: PreTrainedModel, masks: torch.Tensor) -> None:
    """Switch off, in a `transformers` model, the FFN neurons a [L, d_ff] 0/1 mask drops (rows of gate/up, columns of
    down): the reference a pruned variant must equal."""
    for layer, keep in zip(hf.model.layers, masks, strict=True):
        off = keep == 0
        layer.mlp.gate_proj.weight[off] = 0
        layer.mlp.up_proj.weight[off] = 0
        layer.mlp.down_proj.weight[:, off] = 0


def og_greedy(model: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens from an `onnxruntime_genai.Model` after `prompt` (its own generator loop, as an app runs it)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


# --- damaging a written export (validation must catch it) ---------------------------------------------------


def refresh(out: Path, relative: str) -> None:
    """Make the manifest agree with a replaced file (so only the file's content is wrong, not its hash)."""
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == relative:
            entry.update(size=(out / relative).stat().st_size, sha256=sha256_file(out / relative))
    (out / "manifest.json").write_text(json.dumps(manifest))


def wrong_kept_index(out: Path, name: str) -> None:
    """One kept neuron index of layer 2 replaced by a neuron the variant drops (the export's data unchanged)."""
    kept = read_kept_indices(out / "variants.safetensors")
    indices = {n: idx for n, _, idx in kept}
    row = indices[name][2]
    dropped = next(i for i in range(int(row.max()) + 2) if i not in set(row.tolist()))
    row[0] = dropped
    indices[name][2] = row.sort().values
    write_kept_indices(out / "variants.safetensors", indices, {n: task for n, task, _ in kept})
    refresh(out, "variants.safetensors")


def ort_quantize(matrix: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """ORT's own symmetric block quantizer (the C++ routines `MatMulNBitsQuantizer` calls) on a [K, N] MatMul weight:
    (blocks, scales), the oracle `ops.quantize_rows` is held to."""
    k, n = matrix.shape
    block_shape, scale_shape = quantized_shapes(k, n, bits)
    padded = block_shape[1] * BLOCK_SIZE
    matrix = np.ascontiguousarray(np.pad(matrix, ((0, padded - k), (0, 0))), dtype=np.float32)
    blocks, scales = np.zeros(block_shape, np.uint8), np.zeros(scale_shape, np.float32)
    zero_points = np.zeros((n, -(-block_shape[1] // (8 // bits))), np.uint8)  # unused when symmetric
    routine = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    routine(blocks, matrix, scales, zero_points, BLOCK_SIZE, n, k, True)
    return blocks, scales


def assert_rows_checked_as_dense_rows(
    art: Any, full: Callable[[str], Any], dense: Any, kept: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Core ML validation as it runs (`FunctionReferences`: a variant's gate/up checked as the dense function's rows,
    byte for byte) gives every function's figures, and each variant gate/up's per-row figures, exactly as comparing
    every weight of every full fold with PyTorch does, without gathering a variant's gate/up."""
    from ifp_export.targets import coreml
    from ifp_export.targets.coreml import validate
    from ifp_export.weights import kept_neurons

    expected = coreml.check_decoder_package(art, full)
    check, compared = validate.DenseRows.check, []

    def per_row(self, weights, name, ref, tensor, compare, indices) -> tuple[np.ndarray, np.ndarray]:
        got = check(self, weights, name, ref, tensor, compare, indices)
        if indices is not None:  # this variant's rows gathered and compared with PyTorch, as the full check does
            rows = kept_neurons(self.dense.get_parameter(name).detach(), indices[int(name.split(".")[2])], 0)
            compared.append(all(np.array_equal(g, e) for g, e in zip(got, compare(rows), strict=True)))
        return got

    def gathered(*args: Any) -> None:
        raise AssertionError("a variant's gate/up were gathered: their bytes should have matched the dense rows")

    monkeypatch.setattr(validate.DenseRows, "check", per_row)
    monkeypatch.setattr(validate, "kept_neurons", gathered)
    assert coreml.check_decoder_package(art, coreml.FunctionReferences(dense, kept)) == expected
    assert compared and all(compared), compared
