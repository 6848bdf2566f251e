"""The memory-mapped weight source: sharded bf16/fp16 checkpoints written by `transformers` load zero-copy, run in
fp32 exactly like `transformers` upcasting them, fold and stream back as bf16/fp16 HF checkpoints; bad indexes are
one-line errors; `release` drops the mapped pages."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    assert_close_on_mask,
    assert_one_line_ifp_error,
    hf_greedy_logits,
    left_padded_batch,
    make_hf_model,
    ours_logits_for_tokens,
    run_cli,
)
from safetensors.torch import load_file
from tiny import char_tokenizer, make_checkpoint, run_export, write_tasks
from transformers import AutoModelForCausalLM

from ifp_export.checkpoint import PREDICTOR_DIR, load_checkpoint
from ifp_export.fold import fold_decoder, mask_from_indices, read_kept_indices
from ifp_export.fsutil import TensorEntry, read_safetensors, stream_safetensors, write_safetensors
from ifp_export.memory import drop_clean_file_pages
from ifp_export.model.hf_io import load_decoder, open_decoder
from ifp_export.passes.fold import KEPT_INDICES_FILE
from ifp_export.targets.onnx import emit
from ifp_export.weights import FFN_PROJECTIONS, INDEX_FILE, SafetensorsWeights, ffn_name, ffn_slice

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SHARD = "20KB"  # the tiny model is ~90 KB in 16 bits: several shards


def save_low_precision(directory: Path, dtype: torch.dtype, **overrides: object) -> Path:
    """A tiny random HF Llama saved by `transformers` in `dtype`, sharded, with the tests' character tokenizer."""
    model = make_hf_model("llama", **{"vocab_size": char_tokenizer().get_vocab_size(), **overrides})
    model.to(dtype).save_pretrained(directory, safe_serialization=True, max_shard_size=SHARD)
    char_tokenizer().save(str(directory / "tokenizer.json"))
    assert len(list(directory.glob("model-*.safetensors"))) > 1
    return directory


def hf_upcast(directory: Path) -> torch.nn.Module:
    """`transformers` loading the same low-precision checkpoint upcast to fp32: the reference."""
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module", params=list(DTYPES))
def low_precision(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    return request.param, save_low_precision(tmp_path_factory.mktemp(request.param), DTYPES[request.param])


def test_parameters_are_zero_copy_views_in_the_stored_dtype(low_precision: tuple[str, Path]) -> None:
    name, directory = low_precision
    model, weights = open_decoder(directory)
    stored = {}
    for shard in sorted(directory.glob("model-*.safetensors")):
        stored.update(load_file(shard))
    assert weights.names() == sorted(stored)
    params = dict(model.named_parameters())
    for tensor_name, tensor in stored.items():
        param = params[tensor_name]
        assert param.dtype == DTYPES[name] and torch.equal(param, tensor), tensor_name
        assert param.data_ptr() == weights.tensor(tensor_name).data_ptr(), tensor_name  # the mapping itself
        upcast = weights.get(tensor_name)
        assert upcast.dtype == np.float32 and np.array_equal(upcast, tensor.float().numpy()), tensor_name
    assert weights.nbytes == sum(t.numel() * t.element_size() for t in stored.values())


def test_low_precision_weights_in_fp32_match_transformers_upcast(low_precision: tuple[str, Path]) -> None:
    """bf16/fp16 weights, fp32 compute: prefill + cached greedy decode equal `transformers` (fp32 upcast)."""
    _, directory = low_precision
    hf, ours = hf_upcast(directory), load_decoder(directory)
    ids, mask, _ = left_padded_batch([12, 7], hf.config.vocab_size)
    hf_logits, new_masks, tokens = hf_greedy_logits(hf, ids, mask, 8)
    our_logits = ours_logits_for_tokens(ours, ids, mask, tokens)
    assert our_logits[0].dtype == torch.float32
    for ours_step, hf_step, step_mask in zip(our_logits, hf_logits, new_masks, strict=True):
        assert_close_on_mask(ours_step, hf_step, step_mask, 1e-4)


def test_fold_keeps_the_stored_dtype_and_shares_the_rest(low_precision: tuple[str, Path]) -> None:
    name, directory = low_precision
    model = load_decoder(directory)
    kept = torch.stack([torch.arange(0, 48, 4), torch.arange(1, 48, 4)])
    folded = fold_decoder(model, kept)
    assert folded.model.layers[1].mlp.down_proj.weight.dtype == DTYPES[name]
    assert folded.model.embed_tokens.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    dense, own = model.model.layers[1].mlp, folded.model.layers[1].mlp
    assert torch.equal(own.gate_proj.weight, dense.gate_proj.weight[kept[1]])  # neuron j: row j of gate/up
    assert torch.equal(own.down_proj.weight, dense.down_proj.weight[:, kept[1]])  # and column j of down


def test_ffn_slice_from_the_source_equals_the_folded_reference(low_precision: tuple[str, Path]) -> None:
    """What the targets bind (`ffn_slice` over the mapped source, float32) is the folded model's weight, upcast."""
    model, weights = open_decoder(low_precision[1])
    kept = torch.stack([torch.arange(3, 48, 5), torch.arange(0, 45, 5)])
    folded = dict(fold_decoder(model, kept).named_parameters())
    for layer in range(2):
        for proj in FFN_PROJECTIONS:
            expected = folded[ffn_name(layer, proj)].float().numpy()
            assert np.array_equal(ffn_slice(weights, layer, proj, kept[layer].numpy()), expected), (layer, proj)


def test_streamed_safetensors_equal_the_in_memory_writer(tmp_path: Path) -> None:
    tensors = {"b": torch.randn(3, 5).to(torch.bfloat16), "a": torch.randn(7).to(torch.bfloat16)}
    write_safetensors(tmp_path / "memory.safetensors", tensors)
    entries = {
        name: TensorEntry("BF16", tuple(t.shape), t.numel() * 2, lambda t=t: t.view(torch.int16).numpy())
        for name, t in tensors.items()
    }
    stream_safetensors(tmp_path / "stream.safetensors", entries)
    assert (tmp_path / "stream.safetensors").read_bytes() == (tmp_path / "memory.safetensors").read_bytes()


def test_release_drops_the_mapped_pages(tmp_path: Path) -> None:
    """Reading every tensor makes the mapping resident; `release` gives those pages back (RssFile falls)."""
    directory = save_low_precision(tmp_path / "m", torch.float32, vocab_size=8192, hidden_size=256)
    weights = SafetensorsWeights(directory, load_decoder(directory).config)
    weights.release()
    before = rss_file_kib()
    touched = sum(float(weights.get(name).sum()) for name in weights.names())
    resident = rss_file_kib()
    weights.release()
    after = rss_file_kib()
    assert np.isfinite(touched)
    assert resident - before > 0.8 * weights.nbytes / 1024, (before, resident)
    assert resident - after > 0.8 * weights.nbytes / 1024, (resident, after)


def test_clean_file_pages_are_dropped_and_written_mappings_left_alone(tmp_path: Path) -> None:
    """`drop_clean_file_pages` gives back the touched pages of safetensors' private mappings (the predictor's weights)
    and the values read again are the file's; a mapping with a written page keeps it (dropping it would lose the
    write)."""
    arrays = {"a": torch.arange(1 << 20, dtype=torch.float32), "b": torch.ones(1 << 20)}
    write_safetensors(tmp_path / "clean.safetensors", arrays)
    write_safetensors(tmp_path / "written.safetensors", arrays)
    clean, written = (read_safetensors(tmp_path / f"{n}.safetensors") for n in ("clean", "written"))
    touched = [float(t.sum()) for t in (*clean.values(), *written.values())]
    written["b"][0] = 42.0
    resident = rss_file_kib()
    drop_clean_file_pages([*clean.values(), *written.values()])
    dropped = resident - rss_file_kib()
    assert 0.9 * 8 * 1024 < dropped < 1.1 * 8 * 1024, dropped  # the clean file's 8 MiB, not the written one's
    assert torch.equal(clean["a"], arrays["a"]) and float(written["b"][0]) == 42.0
    assert np.isfinite(touched).all()


def test_the_pipeline_drops_the_predictor_pages_after_each_pass(tmp_path: Path) -> None:
    """The predict pass reads every predictor weight; once it is done none of them is resident."""
    ctx = run_export(make_checkpoint(tmp_path), tmp_path / "out", until="predict")
    path = str((ctx.checkpoint.root / PREDICTOR_DIR / "model.safetensors").resolve())
    assert mapped_kib(path) == 0
    with torch.no_grad():
        ctx.checkpoint.predictor(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))
    assert mapped_kib(path) > 0  # what the test measures does see the predictor's pages


def mapped_kib(path: str) -> int:
    """Resident KiB of this process's mappings of `path`."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) > 4 and ":" in fields[3]:
            inside = fields[-1] == path
        elif inside and line.startswith("Rss:"):
            total += int(fields[1])
    return total


def test_streaming_forward_keeps_about_one_layer_resident(tmp_path: Path) -> None:
    """A forward pass maps every weight in; inside `streaming` each layer's pages go once it has run."""
    directory = save_low_precision(tmp_path / "m", torch.float32, vocab_size=8192, hidden_size=256)
    model, weights = open_decoder(directory)
    folded = fold_decoder(model, torch.stack([torch.arange(0, 48, 2)] * 2))
    ids = torch.tensor([[1, 5, 9, 4000, 8000]])
    resident = []
    for streamed in (False, True):
        weights.release()
        before = rss_file_kib()
        with torch.no_grad(), weights.streaming(model, folded) if streamed else contextlib.nullcontext():
            logits = model(ids)[0], folded(ids)[0]
        resident.append(rss_file_kib() - before)
        assert all(torch.isfinite(t).all() for t in logits)
    read = (weights.nbytes - weights.info("model.embed_tokens.weight").nbytes) / 1024  # the lookup reads 5 rows
    assert resident[0] > 0.8 * read, (resident, read)
    assert resident[1] < 0.1 * read, (resident, read)


def test_onnx_emit_keeps_about_one_tensor_resident(tmp_path: Path) -> None:
    """Binding a model reads each weight once from the mapped checkpoint; the emitter drops those pages after every
    tensor it writes, so the dense model's bind does not leave the whole checkpoint resident (RssFile, sampled after
    every tensor, rises by about one tensor, not by the model)."""
    ckpt = load_checkpoint(make_checkpoint(tmp_path, hidden_size=256, intermediate_size=1024, num_hidden_layers=4))
    weights, d_ff = ckpt.weights, ckpt.backbone.config.intermediate_size
    kept = {"half": np.stack([np.arange(0, d_ff, 2)] * 4)}
    weights.release()
    before, rises = rss_file_kib(), []

    @contextlib.contextmanager
    def sampling(description: str, total: int):
        yield lambda n=1: rises.append(rss_file_kib() - before)

    emit(tmp_path / "onnx", weights, kept, ckpt.root / PREDICTOR_DIR, torch.ones(1, 4, d_ff), progress=sampling)
    largest = max(weights.info(name).nbytes for name in weights.names()) / 1024
    assert rises and max(rises) < 3 * largest < 0.5 * weights.nbytes / 1024, (max(rises), largest, weights.nbytes)


def rss_file_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssFile:")))


def broken_index(directory: Path, edit) -> Path:
    index = directory / INDEX_FILE
    raw = json.loads(index.read_text())
    edit(raw["weight_map"], directory)
    index.write_text(json.dumps(raw))
    return index


def first_shard(weight_map: dict) -> str:
    return sorted(set(weight_map.values()))[0]


def absolute_shard(weight_map: dict, directory: Path) -> None:
    shard = first_shard(weight_map)
    for name, value in weight_map.items():
        if value == shard:
            weight_map[name] = str(directory / shard)


def symlinked_shard(weight_map: dict, directory: Path) -> None:
    shard = first_shard(weight_map)
    os.rename(directory / shard, directory.parent / "elsewhere.safetensors")
    os.symlink(directory.parent / "elsewhere.safetensors", directory / shard)


def number_shard(weight_map: dict, directory: Path) -> None:
    weight_map[next(iter(weight_map))] = 3


def misplaced_tensor(weight_map: dict, directory: Path) -> None:
    shards = sorted(set(weight_map.values()))
    name = next(n for n, s in weight_map.items() if s == shards[0])
    weight_map[name] = shards[1]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (absolute_shard, "outside the model directory"),
        (symlinked_shard, "symbolic link"),
        (number_shard, "not a shard file name"),
        (misplaced_tensor, "does not hold it"),
    ],
)
def test_bad_shard_index_is_one_line_error(
    edit, expected: str, low_precision: tuple[str, Path], tmp_path: Path
) -> None:
    directory = Path(shutil.copytree(low_precision[1], tmp_path / "model"))
    index = broken_index(directory, edit)
    assert_one_line_ifp_error(lambda: load_decoder(directory), str(index), expected)


def test_bf16_sharded_checkpoint_exports_until_fold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`new-checkpoint` + `export --until fold` on a bf16, sharded `transformers` checkpoint: every variant is
    written as a bf16 HF checkpoint that `transformers` loads and that equals the masked model."""
    backbone = save_low_precision(tmp_path / "backbone", torch.bfloat16)
    tasks = write_tasks(tmp_path / "tasks.jsonl")
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    new = run_cli(capsys, "new-checkpoint", "--backbone", str(backbone), "--tasks", str(tasks), "-o", str(ckpt))
    assert new[0] == 0, new
    assert sorted(p.name for p in (ckpt / "backbone").glob("model-*")) == sorted(
        p.name for p in backbone.glob("model-*")
    )
    export = run_cli(capsys, "export", str(ckpt), "-o", str(out), "--until", "fold")
    assert export[0] == 0, export
    dense = load_decoder(ckpt / "backbone")
    kept = read_kept_indices(out / KEPT_INDICES_FILE)
    assert sorted(p.name for p in (out / "variants").iterdir()) == sorted(name for name, _, _ in kept)
    ids = torch.tensor([[1, 4, 7, 7, 40, 31, 32, 41]])
    for name, _, idx in kept:
        directory = out / "variants" / name
        stored = load_file(directory / "model.safetensors")
        assert {t.dtype for t in stored.values()} == {torch.bfloat16}
        assert stored["model.layers.0.mlp.down_proj.weight"].shape == (32, 12)
        with torch.no_grad():
            theirs = hf_upcast(directory)(ids).logits
            masked, _ = dense(ids, ffn_masks=mask_from_indices(idx, 48))
        assert float((theirs - masked).abs().max()) <= 1e-5, name
