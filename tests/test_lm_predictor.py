"""The LM predictor (issue 17): a Hugging Face causal LM + MLP head. Exact against `transformers`, padding
invariant, every LM save form (sharded, bf16, bare `*Model`), loader errors; and through `new-checkpoint
--predictor-backbone` and the default export (ONNX parity and routing on every calibration prompt, Core ML)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import (
    assert_one_line_ifp_error,
    edit_config,
    left_padded_batch,
    make_hf_model,
    run_cli,
    save_hf_model,
    snapshot,
)
from rich.console import Console
from safetensors.torch import load_file, save_file
from tiny import char_tokenizer, save_backbone, write_tasks

from ifp_export.checkpoint import create_checkpoint, load_checkpoint
from ifp_export.cli import main
from ifp_export.masks import encode_prompts, routing_scores
from ifp_export.model.lm_predictor import HeadConfig, LMPredictor, new_lm_predictor
from ifp_export.passes import default_passes
from ifp_export.pipeline import ExportContext, ExportOptions, Pipeline
from ifp_export.preflight import estimate_export
from ifp_export.runtime import Runtime

# hidden 32, 4 heads / 2 KV heads (k/v biases of 16 values: Core ML inlines consts under 10 values, which its weight
# check cannot read back), a narrower FFN than the backbone's
LM = {"hidden_size": 32, "intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2}
HEAD = HeadConfig(target_layers=3, target_intermediate_size=24, hidden_sizes=(20,))
ARCHES = {  # name -> make_hf_model arguments
    "llama": ("llama", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "mistral-window3": ("mistral", {"sliding_window": 3}),
}


def hf_lm(directory: Path, arch: str, seed: int = 5, **overrides: object) -> torch.nn.Module:
    kind, extra = ARCHES[arch]
    model = make_hf_model(kind, seed, **{**LM, **extra, **overrides})
    save_hf_model(model, directory)
    return model


def right_padded(lengths: list[int], vocab: int = 96, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(3, vocab, (n,), generator=gen)
        mask[row, :n] = 1
    return ids, mask


def reference_scores(
    hf: torch.nn.Module, predictor: LMPredictor, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """transformers' final hidden states, pooled as the head config says, through the predictor's own head."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        hidden = hf.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        if predictor.config.head.pooling == "mean":
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        else:
            last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
            pooled = hidden[torch.arange(len(ids)), last]
        return predictor.head(pooled).view(len(ids), HEAD.target_layers, HEAD.target_intermediate_size)


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("arch", list(ARCHES))
def test_matches_transformers(tmp_path: Path, arch: str, pooling: str) -> None:
    hf = hf_lm(tmp_path, arch)
    predictor = new_lm_predictor(tmp_path, HeadConfig(**{**HEAD.to_dict(), "pooling": pooling}), seed=0)
    right = right_padded([7, 3, 8, 1])
    left_ids, left_mask, _ = left_padded_batch([7, 3, 8, 1], 96)
    for ids, mask in (right, (left_ids, left_mask)):
        with torch.no_grad():
            ours = predictor(ids, mask)
        expected = reference_scores(hf, predictor, ids, mask)
        assert ours.shape == (4, 3, 24)
        assert (ours - expected).abs().max() <= 1e-5
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # different prompts score differently


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_padding_and_pad_tokens_do_not_matter(tmp_path: Path, pooling: str) -> None:
    hf_lm(tmp_path, "llama")
    predictor = new_lm_predictor(tmp_path, HeadConfig(**{**HEAD.to_dict(), "pooling": pooling}), seed=0)
    ids, mask = right_padded([5, 9, 2])
    with torch.no_grad():
        batch = predictor(ids, mask)
        noisy = predictor(ids.masked_fill(mask == 0, 95), mask)
        alone = predictor(ids[:1, :5], mask[:1, :5])
    assert (batch[0] - alone[0]).abs().max() <= 1e-5
    assert (noisy - batch).abs().max() <= 1e-5


def test_sharded_bf16_and_bare_model_saves_load(tmp_path: Path) -> None:
    hf = make_hf_model("llama", 5, **LM)
    reference = new_lm_predictor(save_hf_model(hf, tmp_path / "fp32"), HEAD, seed=0)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="4KB")
    assert (tmp_path / "bf16" / "model.safetensors.index.json").is_file()
    sharded = new_lm_predictor(tmp_path / "bf16", HEAD, seed=0)
    for name, tensor in sharded.lm.state_dict().items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, reference.lm.state_dict()[name].bfloat16().float()), name
    hf.float().model.save_pretrained(tmp_path / "bare")  # LlamaModel (no `model.` prefix), bf16-rounded weights
    bare = new_lm_predictor(tmp_path / "bare", HEAD, seed=0)
    ids, mask = right_padded([4, 6])
    with torch.no_grad():
        assert torch.equal(bare(ids, mask), sharded(ids, mask))


def test_head_is_seeded(tmp_path: Path) -> None:
    hf_lm(tmp_path, "llama")
    a, b, c = (new_lm_predictor(tmp_path, HEAD, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.head.layers[0].weight, b.head.layers[0].weight)
    assert not torch.equal(a.head.layers[0].weight, c.head.layers[0].weight)


# --- a checkpoint with an LM predictor: loading and its errors ---------------------------------------------------


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lm_checkpoint")
    save_backbone(root / "backbone")
    hf_lm(root / "lm", "llama")
    (root / "ckpt").mkdir()
    create_checkpoint(
        root / "backbone", write_tasks(root / "tasks.jsonl"), root / "ckpt", 0.25, predictor_backbone=root / "lm"
    )
    return root / "ckpt"


@pytest.fixture
def ckpt(lm_checkpoint: Path, tmp_path: Path) -> Path:
    return shutil.copytree(lm_checkpoint, tmp_path / "ckpt")


def test_checkpoint_layout_and_round_trip(ckpt: Path) -> None:
    files = sorted(p.relative_to(ckpt).as_posix() for p in (ckpt / "predictor").rglob("*"))
    assert files == ["predictor/config.json", "predictor/head.safetensors", "predictor/lm", "predictor/lm/config.json",
                     "predictor/lm/generation_config.json", "predictor/lm/model.safetensors"]  # fmt: skip
    raw = json.loads((ckpt / "predictor" / "config.json").read_text())
    assert raw["format"] == "ifp-lm-predictor" and raw["lm"] == "lm" and raw["max_length"] == 128
    assert raw["head"] == {"activation": "gelu", "hidden_sizes": [256], "pooling": "last", "target_layers": 2,
                           "target_intermediate_size": 48}  # fmt: skip
    assert json.loads((ckpt / "ifp.json").read_text())["format_version"] == 2
    loaded = load_checkpoint(ckpt).predictor
    assert isinstance(loaded, LMPredictor) and not loaded.training
    assert (loaded.config.max_length, loaded.config.target_layers, loaded.config.target_intermediate_size) == (
        128,
        2,
        48,
    )


def edit_head(ckpt: Path, **changes: object) -> None:
    path = ckpt / "predictor" / "config.json"
    raw = json.loads(path.read_text())
    raw["head"].update(changes)
    path.write_text(json.dumps(raw))


def set_format_version(ckpt: Path, version: int) -> None:
    path = ckpt / "ifp.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": version}))


def edit_safetensors(path: Path, name: str, value: torch.Tensor | None) -> None:
    tensors = load_file(path)
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    save_file(tensors, path)


def nan_like(path: Path, name: str) -> torch.Tensor:
    tensor = load_file(path)[name].clone()
    tensor.view(-1)[0] = float("nan")
    return tensor


BREAKAGES = {
    "head shape": (
        lambda c: edit_safetensors(c / "predictor/head.safetensors", "layers.1.bias", torch.zeros(5)),
        ("predictor/head.safetensors", "layers.1.bias", "shape"),
    ),
    "head nan": (
        lambda c: edit_safetensors(
            c / "predictor/head.safetensors",
            "layers.0.weight",
            nan_like(c / "predictor/head.safetensors", "layers.0.weight"),
        ),
        ("predictor/head.safetensors", "NaN"),
    ),
    "head missing": (
        lambda c: (c / "predictor/head.safetensors").unlink(),
        ("predictor/head.safetensors", "not found"),
    ),
    "lm tensor missing": (
        lambda c: edit_safetensors(c / "predictor/lm/model.safetensors", "model.norm.weight", None),
        ("predictor/lm/model.safetensors", "missing ['norm.weight']"),
    ),
    "lm nan": (
        lambda c: edit_safetensors(
            c / "predictor/lm/model.safetensors",
            "model.norm.weight",
            nan_like(c / "predictor/lm/model.safetensors", "model.norm.weight"),
        ),
        ("predictor/lm/model.safetensors", "NaN"),
    ),
    "lm dir missing": (lambda c: shutil.rmtree(c / "predictor/lm"), ("predictor/lm", "directory not found")),
    "lm architecture": (
        lambda c: edit_config(c / "predictor/lm", model_type="gpt2"),
        ("predictor/lm/config.json", "model_type='gpt2'"),
    ),
    "lm vocab": (
        lambda c: (
            edit_config(c / "predictor/lm", vocab_size=10),
            edit_safetensors(c / "predictor/lm/model.safetensors", "model.embed_tokens.weight", torch.zeros(10, 32)),
        ),
        ("predictor/lm/config.json", "vocab_size 10 is smaller than the tokenizer"),
    ),
    "pooling": (lambda c: edit_head(c, pooling="max"), ("predictor/config.json", "pooling 'max'")),
    "activation": (lambda c: edit_head(c, activation="tanh"), ("predictor/config.json", "activation 'tanh'")),
    "hidden sizes": (lambda c: edit_head(c, hidden_sizes=[0]), ("predictor/config.json", "positive")),
    "unknown head field": (lambda c: edit_head(c, dropout=0.1), ("predictor/config.json", "'dropout'")),
    "target layers": (lambda c: edit_head(c, target_layers="2"), ("predictor/config.json", "bad head config")),
    "other backbone": (
        lambda c: edit_head(c, target_layers=4, target_intermediate_size=24),
        ("predictor/config.json", "predictor scores [4, 24] but the backbone has [2, 48]"),
    ),
    "max_length": (lambda c: edit_config(c / "predictor", max_length=129), ("predictor/config.json", "1..128")),
    "lm path": (lambda c: edit_config(c / "predictor", lm="../backbone"), ("predictor/config.json", "'lm' must be")),
    "version 1": (lambda c: set_format_version(c, 1), ("ifp.json", "needs ifp.json format_version 2")),
    "version 3": (lambda c: set_format_version(c, 3), ("ifp.json", "format_version 3 is not supported")),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_lm_predictor_is_one_line_error(ckpt: Path, breakage: str) -> None:
    damage, expected = BREAKAGES[breakage]
    damage(ckpt)
    assert_one_line_ifp_error(lambda: load_checkpoint(ckpt), str(ckpt / expected[0]), *expected[1:])


@pytest.mark.parametrize(
    "relative",
    ["predictor/head.safetensors", "predictor/lm/model.safetensors", "predictor/lm/config.json", "predictor/lm"],
)
def test_lm_predictor_files_may_not_be_symlinks(ckpt: Path, relative: str) -> None:
    """27.12: the no-symlink rule of backbone/ holds for the LM predictor's files too (valid content, wrong place)."""
    inside, outside = ckpt / relative, ckpt.parent / ("outside-" + relative.replace("/", "-"))
    shutil.move(inside, outside)
    inside.symlink_to(outside)
    assert_one_line_ifp_error(lambda: load_checkpoint(ckpt), str(inside), "symlink", "Fix:")


def test_new_checkpoint_with_predictor_backbone_is_reproducible(tmp_path: Path) -> None:
    save_backbone(tmp_path / "backbone")
    hf_lm(tmp_path / "lm", "qwen2-tied")
    tasks = write_tasks(tmp_path / "tasks.jsonl")
    args = [
        "--backbone",
        str(tmp_path / "backbone"),
        "--tasks",
        str(tasks),
        "--predictor-backbone",
        str(tmp_path / "lm"),
    ]
    for name in ("a", "b", "c"):
        main(["new-checkpoint", *args, "--seed", "1" if name == "c" else "0", "-o", str(tmp_path / name)])
    a, b, c = (snapshot(tmp_path / name) for name in ("a", "b", "c"))
    assert a == b
    assert {k for k in a if a[k] != c[k]} == {"ifp.json", "predictor/head.safetensors"}  # the seed: head, description
    copied, source = snapshot(tmp_path / "a" / "predictor" / "lm"), snapshot(tmp_path / "lm")
    assert sorted(copied) == ["config.json", "generation_config.json", "model.safetensors"]
    assert all(source[name] == digest for name, digest in copied.items())  # the LM is copied byte for byte


def test_predictor_lm_with_another_tokenizer_is_refused(tmp_path: Path) -> None:
    save_backbone(tmp_path / "backbone")
    hf_lm(tmp_path / "lm", "llama")
    other = char_tokenizer()
    other.add_tokens(["<extra>"])
    other.save(str(tmp_path / "lm" / "tokenizer.json"))
    (tmp_path / "out").mkdir()
    assert_one_line_ifp_error(
        lambda: create_checkpoint(tmp_path / "backbone", write_tasks(tmp_path / "t.jsonl"), tmp_path / "out", 0.25,
                                  predictor_backbone=tmp_path / "lm"),
        str(tmp_path / "lm" / "tokenizer.json"), "tokenizer differs",
    )  # fmt: skip


# --- new-checkpoint --predictor-backbone and the default export (one export per predictor kind) ------------------


@pytest.fixture(scope="module", params=[("llama", "last"), ("qwen2-tied", "mean")], ids=lambda p: f"{p[0]}-{p[1]}")
def lm_export(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ExportContext:
    arch, pooling = request.param
    root = tmp_path_factory.mktemp(f"lm_export_{arch}")
    save_backbone(root / "backbone")
    hf_lm(root / "lm", arch)
    ckpt = root / "ckpt"
    tasks = write_tasks(root / "tasks.jsonl")
    main(
        ["new-checkpoint", "--backbone", str(root / "backbone"), "--tasks", str(tasks), "--predictor-backbone",
         str(root / "lm"), "--predictor-pooling", pooling, "--seed", "3", "-o", str(ckpt)]
    )  # fmt: skip
    opts = ExportOptions(checkpoint=ckpt, output=root / "out", heldout=ckpt / "tasks.jsonl")
    ctx = ExportContext(options=opts, workdir=root / "out", console=Console(file=io.StringIO(), width=200))
    return Pipeline(default_passes()).run(ctx)


def test_export_predictor_onnx_matches_pytorch(lm_export: ExportContext) -> None:
    ckpt = lm_export.checkpoint
    assert isinstance(ckpt.predictor, LMPredictor)
    manifest = json.loads((lm_export.workdir / "manifest.json").read_text())
    assert manifest["predictor"]["max_length"] == 128
    prompts = [p.prompt for p in ckpt.tasks]
    ids, mask, _ = encode_prompts(ckpt.tokenizer, prompts, ckpt.predictor.config.max_length)
    assert (mask == 0).any()  # a right-padded batch: pooling must ignore the padding exactly
    session = ort.InferenceSession(str(lm_export.workdir / manifest["predictor"]["onnx"]["model"]))
    scores, variant_scores = session.run(
        ["scores", "variant_scores"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    )
    with torch.no_grad():
        reference = ckpt.predictor(ids, mask)
    relative = np.abs(scores - reference.numpy()).max() / max(1.0, float(reference.abs().max()))
    assert relative <= 1e-4, relative
    shortest = int(mask.sum(-1).argmin())  # the most padded row, scored alone in ONNX: padding changes nothing
    n = int(mask[shortest].sum())
    alone = {
        "input_ids": ids[shortest : shortest + 1, :n].numpy(),
        "attention_mask": mask[shortest : shortest + 1, :n].numpy(),
    }
    assert np.abs(session.run(["scores"], alone)[0][0] - scores[shortest]).max() <= 1e-5
    masks = torch.stack([v.mask for v in lm_export.variants])
    expected_routes = routing_scores(reference, masks).argmax(-1).numpy()
    assert np.array_equal(variant_scores.argmax(-1), expected_routes)
    runtime = Runtime(lm_export.workdir, threads=1)
    order = manifest["predictor"]["routing"]["variant_order"]
    assert [runtime.route(p).variant for p in prompts] == [order[i] for i in expected_routes]


def test_export_coreml_predictor_package(lm_export: ExportContext) -> None:
    """The Core ML target converted the LM predictor; its validate pass (which raises on any failed row) read every
    predictor weight back from the package against PyTorch (fp32). Here: the package's IO."""
    ct = pytest.importorskip("coremltools", reason="coremltools is not installed")
    spec = ct.utils.load_spec(str(lm_export.workdir / "coreml" / "predictor.mlpackage"))
    assert [f.name for f in spec.description.input] == ["input_ids", "attention_mask"]
    outputs = {f.name: list(f.type.multiArrayType.shape) for f in spec.description.output}
    assert outputs == {"scores": [1, 2, 48], "variant_scores": [1, len(lm_export.variants)]}


def test_preflight_estimate_covers_an_lm_predictor_export(lm_export: ExportContext) -> None:
    """27.11: the disk estimate reads an LM predictor's own files (head + LM body) and covers the real export."""
    real = sum(p.stat().st_size for p in lm_export.workdir.rglob("*") if p.is_file())
    estimate = estimate_export(lm_export.checkpoint.root, None, None, "none", "static", None)
    print(
        f"pre-flight estimate {estimate.total:,} B vs real LM-predictor export {real:,} B: {estimate.total / real:.2f}x"
    )
    assert real <= estimate.total <= 1.5 * real


@pytest.mark.parametrize("small_disk", ["256k"], indirect=True)
def test_preflight_refuses_an_lm_predictor_export_before_any_work(
    lm_checkpoint: Path, small_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """27.11: on a real 256 KB tmpfs the export of an LM-predictor checkpoint is refused by the pre-flight (exit 4,
    no pass run, nothing written), not by ENOSPC after its passes."""
    code, _, err = run_cli(capsys, "export", str(lm_checkpoint), "-o", str(small_disk / "out"))
    assert code == 4, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: ") and "not enough disk space" in err, err[-2000:]
    assert "pass load done" not in err
    assert list(small_disk.iterdir()) == []
