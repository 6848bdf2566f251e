"""Validation sized to the model: every ONNX decoder against its PyTorch reference, built on demand one at a time.

Per model the reference runs first, streaming the mapped checkpoint a layer at a time, and keeps only its logits
and tokens (`reference.ReferenceRun`); then the model's ORT sessions run one at a time over the resident shared
weights, so at most one model's weights are resident (the dense model's session sets validation's peak).

fp32 exports are held to fp32 parity. A quantized export is held to the same tight bound against PyTorch running
the *same dequantized weights* (that is what catches graph and binding bugs): the shipped graph's MatMulNBits
quantize activations to int8 (accuracy_level 4, the fast CPU path), so the check runs its exact twin (the same
file and data with accuracy_level 0, loaded from memory); the shipped graph's error against the dequantized and
the fp32 model (max |Δ|, top-1 agreement) is reported as a quality figure, not gated on.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from rich.table import Table
from tokenizers import Tokenizer

from ifp_export.errors import ValidationFailed
from ifp_export.fold import fold_decoder, relative_difference
from ifp_export.generate import left_pad
from ifp_export.masks import encode_prompts
from ifp_export.memory import release_freed_memory
from ifp_export.model.decoder import CausalLM
from ifp_export.model.predictor import SparsityPredictor
from ifp_export.ort import OrtDecoder, ResidentWeights, session
from ifp_export.pipeline import ExportContext
from ifp_export.targets.onnx.dynamic import DYNAMIC_TOLERANCE, check_dynamic
from ifp_export.targets.onnx.emitter import DENSE_NAME, SHARED_DATA, OnnxArtifacts
from ifp_export.targets.onnx.floor import validate_floor
from ifp_export.targets.onnx.predictor import PredictorRouter
from ifp_export.targets.onnx.reference import ReferenceRun, reference_run
from ifp_export.weights import WeightSource

PARITY_TOLERANCE = 1e-4  # max |Δlogits| / max(1, max |logits|), fp32 (or dequantized) PyTorch vs ORT
VALIDATION_PROMPTS = 2


@dataclass
class ValidationRow:
    model: str
    load_seconds: float
    prefill_diff: float
    decode_diff: float
    decode_steps: int
    greedy_tokens: int
    greedy_match: bool
    logits_scale: float
    quantize: str = "none"
    fp32_prefill_diff: float | None = None  # quantized only, the shipped graph: vs the fp32 model (reported)
    fp32_top1_agreement: float | None = None
    shipped_prefill_diff: float | None = None  # quantized only: the shipped graph vs the dequantized weights
    genai_diff: float | None = None  # the GenAI-flavour graph, unpadded, relative to max(1, max|logits|)

    @property
    def ok(self) -> bool:
        worst = max(self.prefill_diff, self.decode_diff)
        genai_ok = self.genai_diff is None or self.genai_diff <= PARITY_TOLERANCE
        return worst <= PARITY_TOLERANCE * max(1.0, self.logits_scale) and self.greedy_match and genai_ok


def decoder_session(path: Path, resident: ResidentWeights) -> OrtDecoder:
    """One thread, shared weights from the resident memory-mapped cache (held once across every model checked)."""
    options = resident.options(path, threads=1)
    return OrtDecoder(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))


def exact_session(path: Path, resident: ResidentWeights) -> ort.InferenceSession:
    """The graph at `path` with every MatMulNBits computing in float (accuracy_level 0) over the same data files."""
    proto = onnx.load(str(path), load_external_data=False)
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            for attribute in node.attribute:
                if attribute.name == "accuracy_level":
                    attribute.i = 0
    return resident.session_from_bytes(proto.SerializeToString(), path, threads=1)


def check_decoder(
    path: Path,
    expected: ReferenceRun,
    prompts: list[list[int]],
    quantize: str = "none",
    resident: ResidentWeights | None = None,
    genai_path: Path | None = None,
) -> ValidationRow:
    """ONNX checker, ORT load, prefill + cached decode parity on a left-padded batch, and greedy generation against
    the reference's run on `prompts` (`reference_run`: fp32, or the dequantized weights for quantized exports);
    the model's GenAI-flavour graph, if any, on the first prompt unpadded (how onnxruntime-genai runs it)."""
    onnx.checker.check_model(str(path))
    resident = resident or ResidentWeights(SHARED_DATA)
    start = time.perf_counter()
    decoder = decoder_session(path, resident)
    load_seconds = time.perf_counter() - start
    ids, mask = (t.numpy() for t in left_pad(prompts))
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    valid = mask.astype(bool)
    ref = expected.padded[0]
    quality: dict[str, float] = {}
    if quantize != "none":
        shipped, _ = decoder(ids, mask, positions, decoder.empty_cache(len(prompts)))
        fp32 = expected.fp32_prefill
        quality["fp32_prefill_diff"] = float(np.abs(shipped - fp32)[valid].max())
        quality["fp32_top1_agreement"] = float((shipped.argmax(-1) == fp32.argmax(-1))[valid].mean())
        quality["shipped_prefill_diff"] = float(np.abs(shipped - ref)[valid].max())
        del decoder  # one session of this model at a time
        decoder = OrtDecoder(exact_session(path, resident))
    got, past = decoder(ids, mask, positions, decoder.empty_cache(len(prompts)))
    prefill_diff = float(np.abs(got - ref)[valid].max())
    scale = float(np.abs(ref).max())
    decode_diff = 0.0
    for step in expected.padded[1:]:
        token = ref[:, -1].argmax(-1)[:, None]
        mask = np.concatenate((mask, np.ones_like(token)), axis=1)
        positions = positions[:, -1:] + 1
        got, past = decoder(token, mask, positions, past)
        decode_diff = max(decode_diff, float(np.abs(got - step).max()))
        scale = max(scale, float(np.abs(step).max()))
        ref = step
    produced = decoder.greedy(prompts[0], len(expected.greedy))
    del decoder  # one session of this model at a time: its own FFN weights are not held twice
    if genai_path is not None:
        onnx.checker.check_model(str(genai_path))
        genai = exact_session(genai_path, resident)  # accuracy_level 0 (a no-op for fp32 graphs)
        quality["genai_diff"] = check_unpadded(genai, expected.unpadded, prompts[0])
    return ValidationRow(
        path.name,
        load_seconds,
        prefill_diff,
        decode_diff,
        len(expected.padded) - 1,
        len(expected.greedy),
        produced == expected.greedy,
        scale,
        quantize,
        **quality,
    )


def check_unpadded(sess: ort.InferenceSession, expected: list[np.ndarray], prompt: list[int]) -> float:
    """Max |Δlogits| / max(1, max|logits|) of a GenAI-flavour graph (no position_ids) vs the reference's logits on
    one unpadded prompt (`unpadded_logits`: prefill, then cached decode steps feeding the reference's greedy token)."""
    first = next(i for i in sess.get_inputs() if i.name.startswith("past_key_values."))
    empty = np.zeros((1, int(first.shape[1]), 0, int(first.shape[3])), np.float32)
    outputs = [o.name for o in sess.get_outputs()]
    past = {i.name: empty for i in sess.get_inputs() if i.name.startswith("past_key_values.")}
    ids = np.asarray([prompt], np.int64)
    mask = np.ones_like(ids)
    worst = 0.0
    for step, ref in enumerate(expected):
        got, *present = sess.run(outputs, {"input_ids": ids, "attention_mask": mask, **past})
        worst = max(worst, relative_difference(got[:, -ids.shape[1] :], ref))
        if step == len(expected) - 1:
            break
        past = {n.replace("present.", "past_key_values.", 1): v for n, v in zip(outputs[1:], present, strict=True)}
        ids = ref[:, -1].argmax(-1)[:, None]
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
    return worst


@torch.no_grad()
def check_predictor(
    path: Path, predictor: SparsityPredictor, variant_masks: torch.Tensor, tokenizer: Tokenizer, prompts: list[str]
) -> tuple[float, float]:
    """(max |scores diff|, routing agreement) of the predictor graph vs PyTorch on the given prompts."""
    ids, mask, _ = encode_prompts(tokenizer, prompts, predictor.config.max_length)
    ref_scores, ref_routes = PredictorRouter(predictor, variant_masks).eval()(ids, mask)
    scores, routes = session(path, threads=1).run(
        ["scores", "variant_scores"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    )
    diff = float(np.abs(scores - ref_scores.numpy()).max())
    agreement = float((routes.argmax(-1) == ref_routes.argmax(-1).numpy()).mean())
    return diff, agreement


def references(
    backbone: CausalLM, weights: WeightSource, kept: dict[str, torch.Tensor | None]
) -> Iterator[tuple[str, CausalLM]]:
    """Each model's PyTorch reference, built when asked for and dropped by the caller before the next; the mapped
    pages a fold's gather read are dropped layer by layer (else every FFN matrix stays resident)."""
    for name, idx in kept.items():
        yield name, (backbone if idx is None else fold_decoder(backbone, idx, lambda _: weights.release()))


def validate(
    artifacts: OnnxArtifacts,
    backbone: CausalLM,
    weights: WeightSource,
    kept: dict[str, torch.Tensor | None],
    prompts: dict[str, list[list[int]]],
    predictor: SparsityPredictor,
    variant_masks: torch.Tensor,
    tokenizer: Tokenizer,
    routing_prompts: list[str],
) -> tuple[list[ValidationRow], tuple[float, float]]:
    """Check every decoder model against its PyTorch reference (one reference alive at a time, its forward passes
    streaming the mapped checkpoint a layer at a time, run and dropped before the model's ORT sessions) and the
    predictor graph's routing."""
    rows = []
    resident = ResidentWeights(SHARED_DATA)  # shared weights mapped once for every model's sessions
    for name, reference in references(backbone, weights, kept):
        genai = artifacts.genai_models.get(name)
        with weights.streaming(backbone, reference):
            expected = reference_run(reference, prompts[name], artifacts.quantize, genai is not None, weights.release)
        del reference  # then the ORT sessions: the reference's pages and the session's are never resident together
        weights.release()
        release_freed_memory()
        rows.append(check_decoder(artifacts.models[name], expected, prompts[name], artifacts.quantize, resident, genai))
    routing = check_predictor(artifacts.predictor, predictor, variant_masks, tokenizer, routing_prompts)
    return rows, routing


def tolerance_text(quantize: str) -> str:
    if quantize == "none":
        return f"fp32: max|Δlogits| <= {PARITY_TOLERANCE:g} x max(1, max|logits|) and greedy tokens identical"
    return (
        f"{quantize} weights (MatMulNBits at accuracy_level 0) vs PyTorch on the same dequantized weights: "
        f"max|Δlogits| <= {PARITY_TOLERANCE:g} x max(1, max|logits|) and greedy tokens identical; the shipped graph "
        "(int8 activations) vs dequantized and vs fp32 reported only"
    )


def validation_table(rows: list[ValidationRow], routing: tuple[float, float]) -> Table:
    table = Table(title=f"ONNX validation vs PyTorch ({tolerance_text(rows[0].quantize)})")
    quantized = rows[0].quantize != "none"
    columns = ["model", "load s", "prefill max|Δ|", "decode max|Δ|", "steps", "greedy", "ok"]
    if quantized:
        columns[-1:-1] = ["shipped max|Δ|", "vs fp32 max|Δ|", "vs fp32 top-1"]
    genai = any(r.genai_diff is not None for r in rows)
    if genai:
        columns[-1:-1] = ["genai rel|Δ|"]
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        greedy = f"{r.greedy_tokens} tok {'same' if r.greedy_match else 'DIFFERENT'}"
        cells = [r.model, f"{r.load_seconds:.2f}", f"{r.prefill_diff:.1e}", f"{r.decode_diff:.1e}"]
        cells += [str(r.decode_steps), greedy]
        if quantized:
            cells += [f"{r.shipped_prefill_diff:.2e}", f"{r.fp32_prefill_diff:.2e}", f"{r.fp32_top1_agreement:.1%}"]
        if genai:
            cells.append("-" if r.genai_diff is None else f"{r.genai_diff:.1e}")
        table.add_row(*cells, "yes" if r.ok else "NO")
    diff, agreement = routing
    table.caption = f"predictor.onnx: scores max|Δ| {diff:.1e}, routing = PyTorch's on {agreement:.1%} of prompts"
    return table


def validation_inputs(ctx: ExportContext) -> dict:
    """Backbone, kept indices, prompts and routing inputs for `validate` from an export context."""
    ckpt = ctx.checkpoint
    encode = ckpt.tokenizer.encode
    prompts = {
        v.name: [encode(ckpt.tasks[i].prompt).ids for i in v.prompt_indices[:VALIDATION_PROMPTS]] for v in ctx.variants
    }
    firsts = [v.prompt_indices[0] for v in ctx.variants][:VALIDATION_PROMPTS]
    prompts[DENSE_NAME] = [encode(ckpt.tasks[i].prompt).ids for i in firsts]
    return {
        "backbone": ckpt.backbone,
        "weights": ckpt.weights,
        "kept": {**{v.name: v.kept for v in ctx.variants}, DENSE_NAME: None},
        "prompts": prompts,
        "predictor": ckpt.predictor,
        "variant_masks": torch.stack([v.mask for v in ctx.variants]),
        "tokenizer": ckpt.tokenizer,
        "routing_prompts": [t.prompt for t in ckpt.tasks],
    }


def validate_export(ctx: ExportContext) -> None:
    """Run `validate` on the context's ONNX artifacts, print the table, raise if anything is off."""
    artifacts: OnnxArtifacts = ctx.emitted["onnx"]
    validate_floor(ctx)
    inputs = validation_inputs(ctx)
    rows, routing = validate(artifacts, **inputs)
    ctx.console.print(validation_table(rows, routing))
    for row in (models := [dataclasses.asdict(r) | {"ok": r.ok} for r in rows]):
        del row["load_seconds"]  # wall-clock: kept out of report.json so the same inputs give the same bytes
    ctx.report["onnx_validation"] = {
        "models": models,
        "predictor_scores_max_abs_diff": routing[0],
        "predictor_routing_agreement": routing[1],
        "dedup_ratio": artifacts.dedup_ratio,
        "quantize": artifacts.quantize,
        "tolerance": tolerance_text(artifacts.quantize),
    }
    if artifacts.dynamic_inputs is not None:
        dynamic_diff = check_dynamic(
            artifacts.directory,
            artifacts.dynamic_inputs,
            ctx.checkpoint.backbone,
            ctx.checkpoint.predictor,
            ctx.checkpoint.tokenizer,
            inputs["routing_prompts"][: VALIDATION_PROMPTS * 2],
            ctx.k_per_layer[0],
        )
        ctx.report["onnx_validation"]["dynamic_max_abs_diff"] = dynamic_diff
        ctx.console.log(
            f"dynamic.onnx vs masked dense model (per-prompt masks): max|Δlogits| / max(1, max|logits|) "
            f"{dynamic_diff:.1e} (tolerance {DYNAMIC_TOLERANCE:g})"
        )
        if dynamic_diff > DYNAMIC_TOLERANCE:
            raise ValidationFailed(f"dynamic.onnx differs from the masked dense model by {dynamic_diff:.2e}")
    bad = [r.model for r in rows if not r.ok]
    if bad or routing[1] < 1.0 or routing[0] > PARITY_TOLERANCE:
        raise ValidationFailed(f"ONNX models {bad or ['predictor.onnx']} differ from PyTorch (see table)")
