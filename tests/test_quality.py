"""The quality pass: teacher-forced agreement / NLL figures against dense, and the massive-activation guard.

A tiny model gets a planted massive activation: every prompt starts with "=", whose embedding alone carries
dimension D_IN; layer 0's neuron `neuron` reads only D_IN and writes only D_OUT, so at position 0 it puts ~9,200 into
one residual dimension (the rest of the stream is O(1)). The neuron is chosen among those every variant drops.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import run_cli, zero_hf_neurons
from safetensors.torch import load_file, save_file
from tiny import char_tokenizer, console_text, run_export, save_backbone, write_tasks
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from ifp_export.checkpoint import TaskPrompt, create_checkpoint, load_checkpoint
from ifp_export.model.hf_io import open_decoder
from ifp_export.passes.report import quality_table
from ifp_export.pipeline import ExportContext
from ifp_export.quality import MassiveProbe, Row, detect_massive_neurons, encode, figures, teacher_forced

PROMPTS = {
    "add": ["=add 12+7", "=add 3+45", "=add 60+1", "=add 9+9"],
    "reverse": ["=reverse abc", "=reverse hello", "=reverse xy"],
    "brackets": ["=brackets (())", "=brackets ((", "=brackets ()()"],
}
D_IN, D_OUT, LAYER = 5, 17, 0


@dataclass
class Planted:
    checkpoint: Path
    neuron: int
    clean: ExportContext  # the same checkpoint before planting, run to the quality pass
    default: ExportContext  # planted, default export, run to the quality pass
    kept: ExportContext  # planted, --keep-massive-neurons


def plant_massive_neuron(weights: Path, neuron: int) -> None:
    """Layer LAYER's `neuron` fires only on "=" (the only token with a D_IN component) and writes 20 x its value
    into D_OUT."""
    state = load_file(weights)
    eq = char_tokenizer().token_to_id("=")
    state["model.embed_tokens.weight"][:, D_IN] = 0
    state["model.embed_tokens.weight"][eq, D_IN] = 20
    state[f"model.layers.{LAYER}.self_attn.o_proj.weight"][D_IN] = 0  # attention never writes D_IN
    for proj in ("gate_proj", "up_proj"):
        rows = state[f"model.layers.{LAYER}.mlp.{proj}.weight"]
        rows[neuron] = 0
        rows[neuron, D_IN] = 4
    columns = state[f"model.layers.{LAYER}.mlp.down_proj.weight"]
    columns[:, neuron] = 0
    columns[D_OUT, neuron] = 20
    save_file(state, weights, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    root = tmp_path_factory.mktemp("planted")
    save_backbone(root / "src" / "backbone")
    write_tasks(root / "src" / "tasks.jsonl", PROMPTS)
    checkpoint = root / "ckpt"
    checkpoint.mkdir()
    create_checkpoint(root / "src" / "backbone", root / "src" / "tasks.jsonl", checkpoint, 0.25, seed=0)
    heldout = checkpoint / "tasks.jsonl"
    clean = run_export(checkpoint, root / "clean", until="quality", heldout=heldout)
    dropped_by_all = torch.stack([v.mask[LAYER] for v in clean.variants]).sum(0) == 0
    neuron = int(dropped_by_all.nonzero()[0])
    plant_massive_neuron(checkpoint / "backbone" / "model.safetensors", neuron)
    default = run_export(checkpoint, root / "default", until="quality", heldout=heldout)
    kept = run_export(checkpoint, root / "kept", until="quality", heldout=heldout, keep_massive_neurons=True)
    return Planted(checkpoint, neuron, clean, default, kept)


def test_dense_against_itself_agrees_fully_with_zero_nll_difference(planted: Planted) -> None:
    ckpt = load_checkpoint(planted.checkpoint)
    ids = encode(ckpt.tokenizer, [p.prompt for p in ckpt.tasks], 128)
    ones = torch.ones(2, 48)
    rows = [Row(i, None) for i in ids] + [Row(i, ones) for i in ids]
    stats = teacher_forced(ckpt.backbone, ckpt.weights, rows, batch_size=7)  # batches split pairs across forwards
    result = figures(stats[len(ids) :], stats[: len(ids)])
    assert result["tokens"] == sum(len(i) - 1 for i in ids)
    assert result["top1_agreement"] == 1.0
    assert abs(result["nll_diff"]) < 1e-6


def test_residual_peaks_match_transformers_and_skip_padding(planted: Planted) -> None:
    """Each row's residual peak (the largest |input| of any RMSNorm, the Core ML validation's headroom figure) equals
    transformers' on the unpadded prompt, dense and pruned; padding, here made huge, never counts."""
    ckpt = load_checkpoint(planted.checkpoint)
    embedding = ckpt.backbone.model.embed_tokens
    embedding.weight = torch.nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
    embedding.weight[0] = 1e6  # the pad token's row: every padded position's residual starts there
    ids = encode(ckpt.tokenizer, [p.prompt for p in ckpt.tasks], 128)
    assert len({len(i) for i in ids}) > 1 and all(0 not in i for i in ids)  # padding, and only there
    mask = planted.default.variants[0].mask
    stats = teacher_forced(ckpt.backbone, ckpt.weights, [Row(i, None) for i in ids] + [Row(i, mask) for i in ids], 4)
    dense = AutoModelForCausalLM.from_pretrained(planted.checkpoint / "backbone").eval()
    pruned = AutoModelForCausalLM.from_pretrained(planted.checkpoint / "backbone").eval()
    zero_hf_neurons(pruned, mask)
    expected = []
    for model in (dense, pruned):
        norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
        for row in ids:
            seen: list[torch.Tensor] = []
            record = lambda _, args, seen=seen: seen.append(args[0].abs().max())  # noqa: E731
            handles = [m.register_forward_pre_hook(record) for m in norms]
            with torch.no_grad():
                model(torch.tensor([row]))
            for handle in handles:
                handle.remove()
            expected.append(float(max(seen)))
    ours = [s.residual_peak for s in stats]
    print(f"residual peaks, ours vs transformers: {list(zip(ours, expected, strict=True))}")
    assert ours == pytest.approx(expected, rel=1e-5)
    assert max(ours) < 1e5  # the padded positions' 1e6 never counted


def test_the_quality_pass_records_each_functions_residual_peak(planted: Planted) -> None:
    """Each function's peak comes from its own rows: the planted neuron writes thousands into the dense residual
    stream; the default variants all drop it (peaks of ~20, the "=" embedding), the --keep-massive-neurons ones keep
    it (the dense peak again)."""
    default, kept = planted.default, planted.kept
    dropped = [v.residual_peak for v in default.variants]
    keeping = [v.residual_peak for v in kept.variants]
    print(f"dense {default.dense_residual_peak:.1f}; default variants {dropped}; kept variants {keeping}")
    assert default.dense_residual_peak > 1000
    assert all(peak is not None and 0 < peak < 100 for peak in dropped)
    assert keeping == pytest.approx([kept.dense_residual_peak] * len(keeping), rel=1e-3)


def reference_figures(checkpoint: Path, prompts: list[str], mask: torch.Tensor) -> tuple[float, float, float]:
    """(top-1 agreement, mean NLL, dense mean NLL) from `transformers`, each prompt unpadded, the variant's other
    neurons zeroed."""
    dense = AutoModelForCausalLM.from_pretrained(checkpoint / "backbone").eval()
    pruned = AutoModelForCausalLM.from_pretrained(checkpoint / "backbone").eval()
    zero_hf_neurons(pruned, mask)
    tokenizer = char_tokenizer()
    agree = nll = dense_nll = tokens = 0.0
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer.encode(prompt).ids])
            out_dense, out_pruned = dense(ids).logits[0, :-1], pruned(ids).logits[0, :-1]
            target = ids[0, 1:, None]
            nll -= float(out_pruned.log_softmax(-1).gather(-1, target).sum())
            dense_nll -= float(out_dense.log_softmax(-1).gather(-1, target).sum())
            agree += float((out_pruned.argmax(-1) == out_dense.argmax(-1)).sum())
            tokens += len(target)
    return agree / tokens, nll / tokens, dense_nll / tokens


@pytest.mark.parametrize("run", ["default", "kept"])
def test_figures_match_transformers(planted: Planted, run: str) -> None:
    ctx: ExportContext = getattr(planted, run)
    for variant in ctx.variants:
        prompts = [ctx.checkpoint.tasks[i].prompt for i in variant.prompt_indices]
        agreement, nll, dense_nll = reference_figures(planted.checkpoint, prompts, variant.mask)
        ours = variant.quality["calibration"]
        assert ours["top1_agreement"] == pytest.approx(agreement, abs=1e-6)
        assert ours["nll"] == pytest.approx(nll, abs=1e-4)
        assert ours["dense_nll"] == pytest.approx(dense_nll, abs=1e-4)


def test_detection_finds_exactly_the_planted_neuron(planted: Planted) -> None:
    assert planted.clean.massive_neurons == []
    for ctx in (planted.default, planted.kept):
        [found] = ctx.massive_neurons
        assert (found.layer, found.neuron, found.dimension, found.position) == (LAYER, planted.neuron, D_OUT, 0)
        assert found.contribution > 1000
        assert found.contribution == pytest.approx(found.activation, rel=0.01)
        assert ctx.report["massive_activations"]["neurons"] == [found.as_dict()]


def test_detection_alone_finds_the_same_neuron(planted: Planted) -> None:
    ckpt = load_checkpoint(planted.checkpoint)
    found = detect_massive_neurons(ckpt.backbone, ckpt.weights, ckpt.tokenizer, ckpt.tasks, batch_size=4)
    assert found == planted.default.massive_neurons


def test_detection_ignores_masked_rows(planted: Planted) -> None:
    """Rows run with a mask are never probed: the same prompts masked and unprobed find nothing."""
    ckpt = load_checkpoint(planted.checkpoint)
    ids = encode(ckpt.tokenizer, [p.prompt for p in ckpt.tasks], 128)
    probe = MassiveProbe(ckpt.backbone)
    with probe.attached():
        teacher_forced(ckpt.backbone, ckpt.weights, [Row(i, None) for i in ids], 64, probe)
    assert probe.neurons == []


def test_a_variant_dropping_the_neuron_is_flagged_and_worse(planted: Planted) -> None:
    ctx = planted.default
    text = console_text(ctx)
    assert len(ctx.report["warnings"]) == len(ctx.variants)
    for variant, kept in zip(ctx.variants, planted.kept.variants, strict=True):
        assert [(n.layer, n.neuron) for n in variant.massive_dropped] == [(LAYER, planted.neuron)]
        assert f"variant {variant.name!r} drops massive-activation neurons (layer 0 neuron {planted.neuron})" in text
        assert variant.quality_with_massive_kept == kept.quality  # what --keep-massive-neurons exports
        for name in ("calibration", "heldout"):
            now, better = variant.quality[name], kept.quality[name]
            assert now["top1_agreement"] < better["top1_agreement"]
            assert now["nll_diff"] > better["nll_diff"] > 0
    routed, routed_kept = ctx.report["quality"]["routed"], planted.kept.report["quality"]["routed"]
    assert routed["heldout"]["top1_agreement"] < routed_kept["heldout"]["top1_agreement"]


def test_keep_massive_neurons_keeps_them_in_every_variant_with_k_unchanged(planted: Planted) -> None:
    ctx = planted.kept
    assert "warnings" not in ctx.report
    assert ctx.report["massive_activations"]["kept_by_option"] is True
    for variant, before in zip(ctx.variants, planted.default.variants, strict=True):
        assert variant.mask[LAYER, planted.neuron] == 1
        assert variant.mask.sum(-1).tolist() == [float(k) for k in ctx.k_per_layer]
        assert variant.massive_dropped == [] and variant.quality_with_massive_kept is None
        # one neuron swapped in for the lowest-ranked other one, in that layer only
        assert int((variant.mask != before.mask).sum()) == 2
        assert torch.equal(variant.mask[1:], before.mask[1:])


def test_variants_table_shows_figures_and_dropped_neurons(planted: Planted) -> None:
    ctx = planted.default
    ctx.report["variants"] = [
        {"name": v.name, "task": v.task, "keep_ratio": 0.25, "prompts": 1, "coverage": 1.0, "routing_accuracy": None}
        | {"fold_max_abs_diff": None, "quality": v.quality}
        | {"massive_neurons_dropped": [{"layer": n.layer, "neuron": n.neuron} for n in v.massive_dropped]}
        for v in ctx.variants
    ]
    console = ctx.console.__class__(width=250, record=True)
    console.print(quality_table(ctx.report))
    table = console.export_text()
    first = ctx.variants[0].quality
    assert f"{first['calibration']['top1_agreement']:.1%}" in table
    assert f"{first['heldout']['nll_diff']:+.3f}" in table
    assert f"0:{planted.neuron}" in table
    assert f"{ctx.report['quality']['dense']['calibration']['nll']:.3f}" in table
    assert "routed" in table and "dense" in table


def test_cli_option_and_json_summary(capsys: pytest.CaptureFixture[str], planted: Planted, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        capsys, "export", str(planted.checkpoint), "-o", str(out), "--until", "quality", "--json"
    )
    assert code == 0, err
    report = json.loads(stdout)["report"]
    assert report["massive_activations"]["neurons"][0]["neuron"] == planted.neuron
    assert len(report["warnings"]) == len(planted.default.variants)
    assert err.count("warning:") == len(planted.default.variants)  # one per variant, in the log (stderr)
    code, stdout, err = run_cli(
        capsys, "export", str(planted.checkpoint), "-o", str(out), "--until", "quality", "--json", "--force",
        "--keep-massive-neurons",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(stdout)["report"]
    assert report["massive_activations"]["kept_by_option"] is True
    assert "warnings" not in report


REAL_MODEL_PROMPTS = ["What is the capital of France?", "Translate to French: Good morning.", "What is 12 plus 7?"]


def test_real_model_massive_neurons_are_layer_11s_two() -> None:
    """SmolLM2-135M-Instruct (issue 24): layer 11's neurons 1229 and 1487 write ~18,000 and ~6,700 of dimension
    507's ~24,900 at position 0; nothing else passes the rule. Dropping just those two breaks the model (measured
    with transformers: top-1 agreement 3 %, NLL +4.3), dropping two others of that layer does not."""
    real_model = pytest.importorskip("real_model", reason="tests/real_model.py (branch 'real', issue 24) is absent")
    hf_dir = real_model.real_model_dir()
    model, weights = open_decoder(hf_dir)
    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    prompts = [TaskPrompt("any", p) for p in REAL_MODEL_PROMPTS]
    found = detect_massive_neurons(model, weights, tokenizer, prompts, batch_size=8)
    assert [(n.layer, n.neuron, n.dimension, n.position) for n in found] == [(11, 1229, 507, 0), (11, 1487, 507, 0)]
    assert [n.contribution for n in found] == pytest.approx([18_000, 6_700], rel=0.05)
    assert [n.activation for n in found] == pytest.approx([24_900, 24_900], rel=0.02)
    ids = encode(tokenizer, REAL_MODEL_PROMPTS, 8192)
    masks = {}
    for label, neurons in (("massive", [1229, 1487]), ("others", [1228, 1486])):
        mask = torch.ones(model.config.num_hidden_layers, model.config.intermediate_size)
        mask[11, neurons] = 0
        masks[label] = mask
    rows = [Row(i, mask) for mask in (None, *masks.values()) for i in ids]
    stats = teacher_forced(model, weights, rows, batch_size=16)
    dense, without_massive, without_others = (stats[n * len(ids) : (n + 1) * len(ids)] for n in range(3))
    broken, fine = figures(without_massive, dense), figures(without_others, dense)
    assert broken["top1_agreement"] < 0.2 and broken["nll_diff"] > 2
    assert fine["top1_agreement"] > 0.9 and abs(fine["nll_diff"]) < 0.1


def test_report_and_manifest_carry_the_figures(tiny_export: ExportContext) -> None:
    """A full export: report.json's variant rows and the manifest (schema-checked by the manifest pass) carry each
    variant's figures, dense's NLL and the (here empty) massive-activation list."""
    report = json.loads((tiny_export.workdir / "report.json").read_text())
    manifest = json.loads((tiny_export.workdir / "manifest.json").read_text())
    assert manifest["massive_activations"] == report["massive_activations"]
    assert report["massive_activations"]["neurons"] == [] and "warnings" not in report
    assert manifest["dense"]["quality"] == report["quality"]["dense"]
    for entry, row, variant in zip(manifest["variants"], report["variants"], tiny_export.variants, strict=True):
        assert entry["quality"] == row["quality"] == variant.quality
        assert entry["massive_neurons_dropped"] == row["massive_neurons_dropped"] == []
        for name in ("calibration", "heldout"):
            figures_ = entry["quality"][name]
            assert 0 <= figures_["top1_agreement"] <= 1 and figures_["tokens"] > 0
            assert figures_["nll_diff"] == pytest.approx(figures_["nll"] - figures_["dense_nll"], abs=2e-6)
