"""Unit tests of the predict / group / fold / report passes on tiny random checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import TASK_PROMPTS, console_text, make_checkpoint, run_export, write_tasks
from transformers import AutoModelForCausalLM

from ifp_export.errors import IFPError, ValidationFailed
from ifp_export.fold import fold_decoder, fold_layer
from ifp_export.masks import mask_iou
from ifp_export.model.hf_io import load_decoder, save_decoder
from ifp_export.pipeline import ExportContext


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_predict_keeps_k_per_layer(checkpoint: Path, tmp_path: Path) -> None:
    ctx = run_export(checkpoint, tmp_path, until="predict")
    n = sum(len(v) for v in TASK_PROMPTS.values())
    assert ctx.predictions.scores.shape == (n, 2, 48)
    assert torch.equal(ctx.predictions.masks.sum(-1), torch.full((n, 2), 12.0))
    top = ctx.predictions.scores.topk(12, dim=-1).indices
    assert bool(ctx.predictions.masks.gather(-1, top).all())


def test_long_prompt_is_truncated_with_warning(tmp_path: Path) -> None:
    prompts = {**TASK_PROMPTS, "add": ["add " + "1+" * 200 + "1="]}
    ckpt = make_checkpoint(tmp_path / "c")
    write_tasks(ckpt / "tasks.jsonl", prompts)
    ctx = run_export(ckpt, tmp_path / "out", until="group")
    assert ctx.predictions.truncated == 1
    assert "truncated" in console_text(ctx)
    assert [v.name for v in ctx.variants] == ["add", "reverse", "brackets"]


def test_group_per_task_coverage_and_routing(checkpoint: Path, tmp_path: Path) -> None:
    ctx = run_export(checkpoint, tmp_path, until="group", heldout=checkpoint / "tasks.jsonl")
    preds = ctx.predictions
    for variant in ctx.variants:
        assert variant.mask.sum(-1).tolist() == [12.0, 12.0]
        assert {preds.tasks[i] for i in variant.prompt_indices} == {variant.task}
        own = mask_iou(preds.masks[variant.prompt_indices], variant.mask).mean()
        assert variant.coverage == pytest.approx(float(own))
        assert 0.0 <= variant.routing_accuracy <= 1.0


def test_one_task_with_one_prompt_covers_it_exactly(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "c")
    write_tasks(ckpt / "tasks.jsonl", {"only": ["add 1+1="]})
    ctx = run_export(ckpt, tmp_path / "out", until="fold")
    (variant,) = ctx.variants
    assert variant.name == "only"
    assert variant.coverage == 1.0
    assert torch.equal(variant.mask, ctx.predictions.masks[0])


def test_clustering_is_deterministic(checkpoint: Path, tmp_path: Path) -> None:
    a = run_export(checkpoint, tmp_path / "a", until="group", variants=2)
    b = run_export(checkpoint, tmp_path / "b", until="group", variants=2)
    assert [v.name for v in a.variants] == ["cluster_0", "cluster_1"]
    assert [v.prompt_indices for v in a.variants] == [v.prompt_indices for v in b.variants]
    assert all(torch.equal(x.mask, y.mask) for x, y in zip(a.variants, b.variants, strict=True))
    assert sorted(i for v in a.variants for i in v.prompt_indices) == list(range(10))


def test_too_many_variants_is_a_user_error(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(IFPError, match="exceeds the 10 calibration prompts"):
        run_export(checkpoint, tmp_path, until="group", variants=11)


def test_unknown_heldout_task_is_a_user_error(checkpoint: Path, tmp_path: Path) -> None:
    heldout = write_tasks(tmp_path / "heldout.jsonl", {"translate": ["translate x:"]})
    with pytest.raises(IFPError, match="'translate' has no calibration prompts"):
        run_export(checkpoint, tmp_path / "out", until="predict", heldout=heldout)


def test_keep_all_folds_to_the_dense_model_exactly(checkpoint: Path, tmp_path: Path) -> None:
    ctx = run_export(checkpoint, tmp_path, until="fold", keep=1.0)
    ids = torch.tensor([[1, 4, 7, 7, 40, 31, 32]])
    dense, _ = ctx.checkpoint.backbone(ids)
    for variant in ctx.variants:
        folded = fold_decoder(ctx.checkpoint.backbone, variant.kept)
        assert folded.config.intermediate_size == 48
        assert torch.equal(folded(ids)[0], dense)


def test_keep_one_neuron_folds_within_tolerance(checkpoint: Path, tmp_path: Path) -> None:
    ctx = run_export(checkpoint, tmp_path, until="fold", keep=1 / 48)
    assert ctx.k_per_layer == [1, 1]
    for variant in ctx.variants:
        assert variant.kept.shape == (2, 1)
        assert variant.fold_error <= 1e-5


def test_a_wrong_fold_fails_the_fold_check(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pass compares every folded variant with the batched masked reference: folding the last variant with one
    neuron of its last layer swapped for a dropped one must stop the export."""
    import ifp_export.bounds as bounds

    def wrong_fold(layer, config, kept, ffn=True):
        if torch.equal(kept, last_layer_kept):
            dropped = next(j for j in range(48) if j not in kept)
            kept = torch.cat((kept[1:], torch.tensor([dropped]))).sort().values
        return fold_layer(layer, config, kept, ffn)

    ctx_variants = run_export(checkpoint, tmp_path / "ok", until="group").variants
    last_layer_kept = ctx_variants[-1].kept[-1]
    assert not any(torch.equal(v.kept[-1], last_layer_kept) for v in ctx_variants[:-1])  # only the last one is hit
    monkeypatch.setattr(bounds, "fold_layer", wrong_fold)
    with pytest.raises(ValidationFailed, match=f"fold: variant '{ctx_variants[-1].name}' folded_vs_masked: max"):
        run_export(checkpoint, tmp_path / "bad", until="fold")


def test_non_uniform_k_cannot_fold(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path)
    spec = json.loads((ckpt / "ifp.json").read_text())
    (ckpt / "ifp.json").write_text(json.dumps({**spec, "k_per_layer": [12, 6]}))
    with pytest.raises(IFPError, match="same k in every layer"):
        run_export(ckpt, tmp_path / "out", until="fold")


def test_until_fold_saves_hf_checkpoints_that_transformers_loads(checkpoint: Path, tmp_path: Path) -> None:
    ctx = run_export(checkpoint, tmp_path, until="fold")
    ids = torch.tensor([[1, 4, 7, 7, 40, 31, 32, 41]])
    for variant in ctx.variants:
        directory = tmp_path / "variants" / variant.name
        hf = AutoModelForCausalLM.from_pretrained(directory).eval()
        assert hf.config.intermediate_size == 12
        with torch.no_grad():
            theirs = hf(ids).logits
        masked, _ = ctx.checkpoint.backbone(ids, ffn_masks=variant.mask)
        assert float((theirs - masked).abs().max()) <= 1e-5
        folded = fold_decoder(ctx.checkpoint.backbone, variant.kept)
        assert torch.equal(load_decoder(directory)(ids)[0], folded(ids)[0])
        reference = tmp_path / "save_decoder" / variant.name  # the in-memory writer: same bytes as the streamed one
        save_decoder(folded, reference)
        for name in ("model.safetensors", "config.json"):
            assert (directory / name).read_bytes() == (reference / name).read_bytes(), name


def test_report_writes_json_and_heatmap(tiny_export: ExportContext) -> None:
    out = tiny_export.workdir
    report = json.loads((out / "report.json").read_text())
    assert [v["name"] for v in report["variants"]] == ["add", "reverse", "brackets"]
    assert report["variants"][0]["keep_ratio"] == 0.25
    mean = torch.tensor(report["variant_iou"]["mean"])
    assert torch.allclose(mean.diagonal(), torch.ones(3))
    assert torch.allclose(mean, mean.T)
    assert (out / "mask_overlap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "coverage" in console_text(tiny_export)
