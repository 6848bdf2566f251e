"""Validation sized to the model: every ONNX decoder against its PyTorch reference, all references in one pass.

ORT runs first, model by model (dense first): each generates a greedy continuation of a left-padded
batch through its KV cache (Optimum's layout, as clients run it), runs the same tokens again in one uncached forward,
and the GenAI-flavour graph on the first prompt unpadded (prefill, one decode step, the rest at once); only the
logits are kept. Then the PyTorch references of every model, reading the mapped checkpoint a layer at a time for all
of them (`reference.reference_runs`), run teacher-forced over those tokens: one forward in float32 and one in float64
per model, not one per generated token. Every position of every row is compared with the float64 logits under the
bound its own fp32 noise gives (`ifp_export.bounds`); the cached logits' top-1 is the greedy check, and a KV-cache
bug shows as cached logits that differ where the uncached ones agree. At most two ORT sessions (built side by side,
`SessionPairs`), and one layer of the references' weights, are resident at a time. The variants' graphs are one graph
fed their own tensors (`ifp_export.ort.graph_skeleton`), so the paths only that graph decides (the padded batch, the
GenAI graph, a quantized graph's uncached and cached replay and its shipped kernels) run on the first model of each
graph, and every later model's own tensors are checked through its cache on the first tokens of its first prompt
and a few tokens it generates.

fp32 exports are held to fp32 parity. A quantized export is held to the same tight bound against PyTorch running
the *same dequantized weights* (that is what catches graph and binding bugs): the shipped graph's MatMulNBits
quantize activations to int8 (accuracy_level 4, the fast CPU path), so the shipped graph generates and its exact
twin (the same file and data with accuracy_level 0, loaded from memory) re-runs the tokens uncached, then through
the cache in two pieces from the prompt's part of the uncached forward's cache; the shipped graph's error against the
dequantized and the fp32 model (max |Δ|, top-1 agreement) is reported as a quality figure, not gated on. A later
model of a graph already run as shipped loads only the twin, which generates: one pre-packed session per model instead
of two (the shipped one loads in 1.4 s at 3B, 8.8 s at 8B), and no quality figure.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from rich.table import Table
from tokenizers import Tokenizer

from ifp_export.bounds import RULE, Exactness, compare, float64, relative_noise
from ifp_export.errors import ValidationFailed
from ifp_export.generate import left_pad
from ifp_export.masks import encode_prompts
from ifp_export.memory import release_freed_memory
from ifp_export.model.decoder import CausalLM, DecoderLayer
from ifp_export.model.predictor import SparsityPredictor
from ifp_export.ort import OrtDecoder, ResidentWeights, graph_skeleton, session
from ifp_export.pipeline import ExportContext
from ifp_export.targets.onnx.dynamic import DYNAMIC_NAME, check_dynamic
from ifp_export.targets.onnx.emitter import DENSE_NAME, PREDICTOR_NAME, SHARED_DATA, OnnxArtifacts
from ifp_export.targets.onnx.floor import validate_floor
from ifp_export.targets.onnx.predictor import PredictorRouter
from ifp_export.targets.onnx.reference import ReferenceRun, reference_members, reference_runs
from ifp_export.weights import WeightSource

VALIDATION_PROMPTS = 2
GREEDY_TOKENS = 16  # ORT's greedy continuation of every prompt, cached; the reference checks it in one forward
# ... of a model whose graph an earlier one ran in full (same graph, own tensors): every position already reads each own
# tensor, the second decode step reads back the cache entry the first one wrote, and the greedy choice is its own (more
# steps run the same graph paths again, which the first model of the graph ran for 16); and it runs on the first
# tokens of its first prompt alone: more positions read the same tensors again (one wrong kept neuron, in any layer of
# the trained SmolLM2-135M, 120 random swaps: its first 8 tokens' logits moved >= 9.4e-04, median 1.6e-02, against a
# bound ~1e-04; the least move over all 19 tokens was the same), and a prompt's length would otherwise set the cost of
# every variant's check (at 3B, 7 later variants on 8 of their 24 prompt tokens: the reference ~a sixth faster)
SHARED_GRAPH_TOKENS = 2
SHARED_GRAPH_PROMPT_TOKENS = 8
THREADS = 2  # ORT runs alone (the reference after it): both cores; fixed, so the figures are the same on any machine


@dataclass
class OrtRun:
    """What a model's ORT sessions computed, kept small so the reference runs after them (never beside them)."""

    ids: np.ndarray  # [B, T] left-padded prompts + the greedy continuation ORT chose, cached
    mask: np.ndarray  # [B, T]
    cached: np.ndarray | None  # [B, T, V] prefill logits, then each cached decode step's (argmax: the next token)
    uncached: np.ndarray | None  # [B, T, V] one forward over `ids` with an empty cache
    genai: np.ndarray | None = None  # [T0, V] the GenAI-flavour graph, first prompt unpadded, cached, same tokens
    shipped: np.ndarray | None = None  # quantized only: the shipped graph's (accuracy_level 4) cached greedy logits
    load_seconds: float = 0.0


@dataclass
class ValidationRow:
    model: str
    load_seconds: float
    quantize: str
    greedy_tokens: int
    checks: list[Exactness]  # uncached, cached (its top-1 is the greedy check), genai: each vs float64 PyTorch
    fp32_prefill_diff: float | None = None  # quantized only, the shipped graph: vs the fp32 model (reported)
    fp32_top1_agreement: float | None = None
    shipped_prefill_diff: float | None = None  # quantized only: the shipped graph vs the dequantized weights
    same_graph_as: str | None = None  # its graphs equal this model's but for its own tensors: cache paths checked there

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def check(self, name: str) -> Exactness | None:
        return next((c for c in self.checks if c.name == name), None)

    def record(self) -> dict:
        """The report's row (no wall-clock figure: the same inputs give the same bytes)."""
        skip = ("checks", "load_seconds")
        row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        return row | {"checks": [c.record() for c in self.checks], "ok": self.ok}


def decoder_session(path: Path, resident: ResidentWeights, prepack: bool = False) -> ort.InferenceSession:
    """`THREADS` threads, shared weights from the resident memory-mapped cache (held once across every model checked);
    `prepack` for quantized graphs (see `ResidentWeights.options`)."""
    options = resident.options(path, threads=THREADS, prepack=prepack)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def exact_session(path: Path, resident: ResidentWeights) -> ort.InferenceSession:
    """The graph at `path` with every MatMulNBits computing in float (accuracy_level 0) over the same data files,
    pre-packed if it has any (an fp32 graph is returned unchanged in a session without pre-packing)."""
    proto = onnx.load(str(path), load_external_data=False)
    quantized = False
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            quantized = True
            for attribute in node.attribute:
                if attribute.name == "accuracy_level":
                    attribute.i = 0
    return resident.session_from_bytes(proto.SerializeToString(), path, threads=THREADS, prepack=quantized)


def positions_of(mask: np.ndarray) -> np.ndarray:
    return np.maximum(mask.cumsum(-1) - 1, 0)


def generate_cached(decoder: OrtDecoder, prompts: list[list[int]], tokens: int) -> tuple[np.ndarray, ...]:
    """Greedy continuation of the left-padded batch through the KV cache (Optimum's layout, as clients run it):
    (ids, mask, logits) [B, T(, V)], the prefill's logits then each decode step's (its argmax is the next token)."""
    ids, mask = (t.numpy() for t in left_pad(prompts))
    logits, past = decoder(ids, mask, positions_of(mask), decoder.empty_cache(len(prompts)))
    steps = [logits]
    for _ in range(tokens):
        token = steps[-1][:, -1].argmax(-1)[:, None]
        ids, mask = np.concatenate((ids, token), axis=1), np.concatenate((mask, np.ones_like(token)), axis=1)
        logits, past = decoder(token, mask, positions_of(mask)[:, -1:], past)
        steps.append(logits)
    return ids, mask, np.concatenate(steps, axis=1)


def uncached_logits(decoder: OrtDecoder, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return decoder(ids, mask, positions_of(mask), decoder.empty_cache(len(ids)))[0]


def chunk_ends(prompt_width: int, total: int) -> list[int]:
    """Where the cached re-run of known tokens splits them: the prompt, one decode step (the single-token path), then
    the rest at once (the path with a cache and several new tokens): three runs instead of one per token. Re-running
    a graph whose MatMulNBits compute in float (accuracy_level 0) dequantizes every weight per run."""
    return sorted({prompt_width, min(prompt_width + 1, total), total})


def replay_cached(
    decoder: OrtDecoder, ids: np.ndarray, mask: np.ndarray, prompt_width: int
) -> tuple[np.ndarray, np.ndarray]:
    """The logits of known tokens (left-padded prompts of `prompt_width` + a continuation), [B, T, V]: uncached (one
    forward with an empty cache), then through the KV cache. The uncached forward's cache of the prompt's columns is
    what a prefill of the prompt leaves (a key or value depends only on the tokens up to its own), so the cached
    replay goes on from it in `chunk_ends` pieces: one decode step, then the rest at once (a prefill of the prompt
    alone would run the uncached forward's path again)."""
    uncached, present = decoder(ids, mask, positions_of(mask), decoder.empty_cache(len(ids)))
    chunks, past, start = [uncached[:, :prompt_width]], [p[:, :, :prompt_width] for p in present], prompt_width
    for end in chunk_ends(prompt_width, ids.shape[1])[1:]:
        logits, past = decoder(ids[:, start:end], mask[:, :end], positions_of(mask[:, :end])[:, start:], past)
        chunks.append(logits)
        start = end
    return uncached, np.concatenate(chunks, axis=1)


def genai_cached(sess: ort.InferenceSession, tokens: list[int], prompt_length: int) -> np.ndarray:
    """A GenAI-flavour graph (no position_ids) on one unpadded sequence through its cache as og runs it, in
    `chunk_ends` pieces (the prompt's prefill, one decode step, the rest); the logits of every position [T, V]."""
    first = next(i for i in sess.get_inputs() if i.name.startswith("past_key_values."))
    empty = np.zeros((1, int(first.shape[1]), 0, int(first.shape[3])), np.float32)
    outputs = [o.name for o in sess.get_outputs()]
    past = {i.name: empty for i in sess.get_inputs() if i.name.startswith("past_key_values.")}
    chunks, start = [], 0
    for end in chunk_ends(prompt_length, len(tokens)):
        feeds = {"input_ids": np.asarray([tokens[start:end]], np.int64), "attention_mask": np.ones((1, end), np.int64)}
        got, *present = sess.run(outputs, feeds | past)
        past = {n.replace("present.", "past_key_values.", 1): v for n, v in zip(outputs[1:], present, strict=True)}
        chunks.append(got[0])
        start = end
    return np.concatenate(chunks)


class SessionPairs:
    """The sessions a validation uses, built two at a time on two threads, in the order they are used. Building one
    (graph optimization, weight pre-packing) runs on one core: a 3B int4 variant's twin takes 1.2 s, the dense
    model's shipped and twin sessions 3-4 s each, 3.0 s for both built side by side. A pair is built only when the
    first of it is needed, so nothing else runs beside the builds (ORT's own runs use both cores, and a build beside
    them slows them as much as it gains), and at most the pair is alive (a pre-packed 3B dense session: 1.4 GB)."""

    def __init__(self, builders: list[Callable[[], ort.InferenceSession]]) -> None:
        self.builders = deque(builders)
        self.built: deque[tuple[ort.InferenceSession, float]] = deque()

    def next(self) -> tuple[ort.InferenceSession, float]:
        """The next session and the seconds its own build took."""
        if not self.built:
            pair = [self.builders.popleft() for _ in range(min(2, len(self.builders)))]
            with ThreadPoolExecutor(len(pair), thread_name_prefix="ort-session") as pool:
                self.built.extend(pool.map(timed, pair))
        return self.built.popleft()


def timed(build: Callable[[], ort.InferenceSession]) -> tuple[ort.InferenceSession, float]:
    start = time.perf_counter()
    return build(), time.perf_counter() - start


def twin_only(quantize: str, tokens: int, graph_checked: bool) -> bool:
    """A quantized model whose graph an earlier one ran in full, or checked by its prefill alone (`--checks quick`),
    runs on its accuracy_level 0 twin alone."""
    return quantize != "none" and (graph_checked or not tokens)


def session_builders(
    path: Path, quantize: str, resident: ResidentWeights, genai_path: Path | None, tokens: int, graph_checked: bool
) -> list[Callable[[], ort.InferenceSession]]:
    """The sessions `run_onnx` uses for one model, in the order it uses them (see there)."""
    quantized, twin = quantize != "none", twin_only(quantize, tokens, graph_checked)
    builders: list[Callable[[], ort.InferenceSession]] = [
        partial(exact_session, path, resident) if twin else partial(decoder_session, path, resident, quantized)
    ]
    builders += [partial(exact_session, path, resident)] if quantized and not twin else []
    return builders + ([partial(exact_session, genai_path, resident)] if genai_path is not None else [])


def run_onnx(
    path: Path,
    prompts: list[list[int]],
    quantize: str,
    sessions: SessionPairs,
    genai_path: Path | None,
    tokens: int = GREEDY_TOKENS,
    graph_checked: bool = False,
) -> OrtRun:
    """ONNX checker, the cached greedy continuation of `tokens` tokens and the uncached forward, and the
    GenAI-flavour graph on the first prompt (if given), on the sessions `session_builders` lists, taken from
    `sessions`. A quantized graph generates as shipped (int8 activations, fast), then its accuracy_level 0 twin,
    which the reference can match at the fp32 bound, re-runs those tokens uncached and through the cache
    (`replay_cached`); the shipped graph's logits are the quality figure.

    `graph_checked`: an earlier model ran this graph in full (the same graph but for its own tensors), so only its own
    tensors are left to check: it loads one session (a quantized one its twin), generates through the cache, and
    those logits are its check (no uncached forward, no shipped figure). With no tokens to generate (`--checks quick`)
    the prefill, one forward with an empty cache, is the check."""
    onnx.checker.check_model(str(path))
    quantized = quantize != "none"
    first, load_seconds = sessions.next()
    decoder = OrtDecoder(first)
    del first
    ids, mask, cached = generate_cached(decoder, prompts, tokens)
    if tokens == 0:
        run = OrtRun(ids, mask, None, cached)
    elif graph_checked:
        run = OrtRun(ids, mask, cached, None)
    elif not quantized:
        run = OrtRun(ids, mask, cached, uncached_logits(decoder, ids, mask))
    del decoder  # gone before the next session runs (`SessionPairs` holds at most the pair built with it)
    if quantized and not twin_only(quantize, tokens, graph_checked):
        uncached, replayed = replay_cached(OrtDecoder(sessions.next()[0]), ids, mask, ids.shape[1] - tokens)
        run = OrtRun(ids, mask, replayed, uncached, shipped=cached)
    run.load_seconds = load_seconds
    if genai_path is not None:
        onnx.checker.check_model(str(genai_path))
        genai = sessions.next()[0]  # accuracy_level 0 (a no-op for fp32 graphs)
        row = run.ids[0][run.mask[0].astype(bool)].tolist()
        run.genai = genai_cached(genai, row, len(prompts[0]))
    return run


def compare_run(
    name: str, run: OrtRun, expected: ReferenceRun, layers: int, quantize: str, tokens: int
) -> ValidationRow:
    """Every position of every row, cached and uncached (each if run), against the float64 reference, under the bound
    its own fp32 noise gives (`ifp_export.bounds`); the cached logits' top-1 is the greedy check."""
    valid = run.mask.astype(bool)
    ref32, ref64 = expected.ref32[valid], expected.ref64[valid]
    noise = relative_noise(ref32, ref64)
    checks = [
        compare(check, logits[valid], ref32, ref64, layers, noise)
        for check, logits in (("uncached", run.uncached), ("cached", run.cached))
        if logits is not None
    ]
    if run.genai is not None:
        first = valid[0]
        checks.append(compare("genai", run.genai, expected.ref32[0][first], expected.ref64[0][first], layers))
    quality = {}
    if run.shipped is not None:
        shipped = run.shipped[valid]
        quality["shipped_prefill_diff"] = float(np.abs(shipped - ref32).max())
    if run.shipped is not None and expected.fp32 is not None:  # over the prompts (the prefill)
        prompts = valid[:, : expected.fp32.shape[1]]
        shipped, fp32 = run.shipped[:, : prompts.shape[1]][prompts], expected.fp32[prompts]
        quality["fp32_prefill_diff"] = float(np.abs(shipped - fp32).max())
        quality["fp32_top1_agreement"] = float((shipped.argmax(-1) == fp32.argmax(-1)).mean())
    return ValidationRow(name, run.load_seconds, quantize, tokens, checks, **quality)


@torch.no_grad()
def check_predictor(
    path: Path, predictor: SparsityPredictor, variant_masks: torch.Tensor, tokenizer: Tokenizer, prompts: list[str]
) -> list[Exactness]:
    """predictor.onnx's scores and routing (variant_scores, whose top-1 is the routing decision) vs PyTorch in
    float64, under the bound the predictor's own fp32 noise gives (a float64 copy: the predictor is small)."""
    ids, mask, _ = encode_prompts(tokenizer, prompts, predictor.config.max_length)
    router = PredictorRouter(predictor, variant_masks).eval()
    scores32, routes32 = router(ids, mask)
    router64 = copy.deepcopy(router).double()
    with float64(router64):
        scores64, routes64 = router64(ids, mask)
    del router64
    scores, routes = session(path, threads=1).run(
        ["scores", "variant_scores"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    )
    layers = sum(isinstance(m, DecoderLayer) for m in predictor.modules())
    return [
        compare("scores", scores, scores32.numpy(), scores64.numpy(), layers),
        compare("routing", routes, routes32.numpy(), routes64.numpy(), layers),
    ]


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
    checks: str = "full",
) -> tuple[list[ValidationRow], list[Exactness]]:
    """Check every decoder model: each one's ORT sessions generate in turn (cached and uncached logits kept, one
    session alive at a time), then the PyTorch references of all of them run teacher-forced over the same tokens in
    float32 and float64, together a layer at a time (`reference_runs`: the mapped checkpoint is read once, not once per
    model); then the predictor graph's scores and routing. `checks="quick"`: the dense model and the first variant in
    full, every other variant by one forward over its first prompt (its weights, graph and binding; no generation, no
    GenAI graph). A model checked in full whose graphs equal an earlier one's but for its own tensors
    (`graph_skeleton`: the variants after the first) skips what only tests the graph, the padded batch, the uncached
    forward, the GenAI graph, and a quantized graph's shipped session (its twin generates instead): it generates
    `SHARED_GRAPH_TOKENS` tokens from the first `SHARED_GRAPH_PROMPT_TOKENS` tokens of its first prompt through the
    cache, whose logits at every position test every own tensor (as the one forward of a model `quick` does not check
    in full does, on the twin alone too). A model checked in full generates from `padded_batch`. A quantized
    export's figure against the fp32 model is the dense model's, over its prompts (one more reference member)."""
    resident = ResidentWeights(SHARED_DATA)  # shared weights mapped once for every model's sessions
    layers = backbone.config.num_hidden_layers
    in_full = full_models(kept, checks)
    cache_checked: dict[tuple[bytes, bytes], str] = {}  # graph skeletons -> the model whose cache paths ran on them
    plan, same_graph_as, tokens = {}, {}, {}
    for name in sorted(kept, key=lambda name: name != DENSE_NAME):  # the largest first: no other's logits beside it
        path, genai, same_as = artifacts.models[name], artifacts.genai_models.get(name), None
        if name in in_full:
            shape = (graph_skeleton(path, SHARED_DATA), b"" if genai is None else graph_skeleton(genai, SHARED_DATA))
            first = cache_checked.setdefault(shape, name)
            same_as = None if first == name else first
            # a graph already run in full needs only its own tensors checked: its first prompt's start, 2 tokens
            tokens[name] = SHARED_GRAPH_TOKENS if same_as else GREEDY_TOKENS
            chosen = [prompts[name][0][:SHARED_GRAPH_PROMPT_TOKENS]] if same_as else padded_batch(prompts[name])
        else:
            tokens[name], chosen, genai = 0, prompts[name][:1], None
        genai = None if same_as else genai
        plan[name] = (path, chosen, genai, name not in in_full or same_as is not None)  # ..., graph_checked
        same_graph_as[name] = same_as
    builders = [
        build
        for name, (path, _, genai, graph_checked) in plan.items()
        for build in session_builders(path, artifacts.quantize, resident, genai, tokens[name], graph_checked)
    ]
    sessions = SessionPairs(builders)
    runs = {}
    for name, (path, chosen, genai, graph_checked) in plan.items():
        runs[name] = run_onnx(path, chosen, artifacts.quantize, sessions, genai, tokens[name], graph_checked)
        release_freed_memory()
    del resident, sessions  # the sessions' shared weights: not beside the reference's
    release_freed_memory()
    models = [
        reference_members(
            torch.from_numpy(runs[name].ids), torch.from_numpy(runs[name].mask), artifacts.quantize, idx,
            figure_width=runs[name].ids.shape[1] - tokens[name] if name == DENSE_NAME else None,
        )
        for name, idx in kept.items()
    ]  # fmt: skip
    rows = []
    release = lambda module: weights.release()  # noqa: E731  (each layer's mapped pages, once every model ran it)
    for name, expected in zip(kept, reference_runs(backbone, models, artifacts.quantize, release), strict=True):
        run = runs.pop(name)
        rows.append(compare_run(artifacts.models[name].name, run, expected, layers, artifacts.quantize, tokens[name]))
        rows[-1].same_graph_as = same_graph_as[name]
        del run, expected  # this model's logits: not beside the next one's
    routing = check_predictor(artifacts.predictor, predictor, variant_masks, tokenizer, routing_prompts)
    return rows, routing


def padded_batch(prompts: list[list[int]]) -> list[list[int]]:
    """The batch a model checked in full generates from: its first prompt whole and every other one cut to at most
    half its length, so the left-padded batch always has padding to check (prompts of one length, as the scale
    benchmarks' are, would leave the padded path unexercised) and a second prompt costs half the positions."""
    first, *others = prompts
    width = max(1, len(first) // 2)
    return [first, *(prompt[:width] for prompt in others)]


def full_models(kept: dict[str, torch.Tensor | None], checks: str) -> set[str]:
    """The models checked in full: all, or (`quick`) the dense model and the first variant."""
    if checks == "full":
        return set(kept)
    return {DENSE_NAME, next(name for name in kept if name != DENSE_NAME)}


def tolerance_text(quantize: str) -> str:
    tokens = (
        f"prompts (the second cut to half the first's length) + {GREEDY_TOKENS} greedy tokens (for a graph already "
        f"checked: its first {SHARED_GRAPH_PROMPT_TOKENS} prompt tokens + {SHARED_GRAPH_TOKENS})"
    )
    if quantize == "none":
        return f"fp32 vs float64 PyTorch, every position of {tokens}: {RULE}"
    return (
        f"{quantize} weights (MatMulNBits at accuracy_level 0) vs PyTorch on the same dequantized weights in float64, "
        f"every position of {tokens}: {RULE}; the shipped graph (int8 activations) vs "
        "dequantized and vs fp32 reported only"
    )


def validation_table(rows: list[ValidationRow], routing: list[Exactness]) -> Table:
    table = Table(title=f"ONNX validation vs PyTorch ({tolerance_text(rows[0].quantize)})")
    quantized = rows[0].quantize != "none"
    genai = any(r.check("genai") is not None for r in rows)
    columns = ["model", "load s", "fp32 noise", "bound", "uncached |Δ|", "cached |Δ|"]
    columns += ["genai |Δ|"] if genai else []
    columns += ["top-1 differs", "near ties"]
    columns += ["shipped max|Δ|", "vs fp32 max|Δ|", "vs fp32 top-1"] if quantized else []
    for column in [*columns, "ok"]:
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        uncached, cached, genai_check = r.check("uncached"), r.check("cached"), r.check("genai")
        cells = [r.model, f"{r.load_seconds:.2f}", f"{r.checks[0].noise:.1e}", f"{r.checks[0].bound:.1e}"]
        same = "-" if r.same_graph_as is None else f"= {r.same_graph_as}"  # its graph's own paths ran there
        cells += [same if check is None else f"{check.error:.1e}" for check in (uncached, cached)]
        if genai:
            cells.append(same if genai_check is None else f"{genai_check.error:.1e}")
        cells += [str(sum(c.top1_disagreements for c in r.checks)), str(sum(c.near_ties for c in r.checks))]
        if quantized:
            versus, shipped = r.fp32_prefill_diff is not None, r.shipped_prefill_diff is not None
            cells += [
                f"{r.shipped_prefill_diff:.2e}" if shipped else same,
                f"{r.fp32_prefill_diff:.2e}" if versus else "-",
            ]
            cells += [f"{r.fp32_top1_agreement:.1%}" if versus else "-"]
        table.add_row(*cells, "yes" if r.ok else "NO")
    table.caption = "predictor.onnx: " + "; ".join(c.text() for c in routing)
    if any(r.same_graph_as for r in rows):
        table.caption += (
            f"; = NAME: the same graph as NAME's but for its own tensors (its paths checked there), its own tensors "
            f"checked through its cache on the first {SHARED_GRAPH_PROMPT_TOKENS} tokens of its first prompt + "
            f"{SHARED_GRAPH_TOKENS} greedy tokens"
        )
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
    """Run `validate` on the context's ONNX artifacts (and the dynamic graph), print the table, record every check
    in the report, raise one line naming the first failed check, its figure and its bound."""
    artifacts: OnnxArtifacts = ctx.emitted["onnx"]
    validate_floor(ctx)
    inputs = validation_inputs(ctx)
    rows, routing = validate(artifacts, **inputs, checks=ctx.options.checks)
    ctx.console.print(validation_table(rows, routing))
    in_full = sorted(full_models(inputs["kept"], ctx.options.checks))
    if ctx.options.checks == "quick":
        ctx.console.log(f"--checks quick: {', '.join(in_full)} checked in full, the other variants by one forward")
    ctx.report["onnx_validation"] = {
        "checks": ctx.options.checks,
        "checked_in_full": in_full,
        "models": [r.record() for r in rows],
        "predictor": [c.record() for c in routing],
        "dedup_ratio": artifacts.dedup_ratio,
        "quantize": artifacts.quantize,
        "tolerance": tolerance_text(artifacts.quantize),
    }
    failed = [(r.model, c) for r in rows for c in r.checks if not c.ok]
    failed += [(PREDICTOR_NAME + ".onnx", c) for c in routing if not c.ok]
    if artifacts.dynamic_inputs is not None:
        dynamic = check_dynamic(
            artifacts.directory,
            artifacts.dynamic_inputs,
            ctx.checkpoint.backbone,
            ctx.checkpoint.predictor,
            ctx.checkpoint.tokenizer,
            inputs["routing_prompts"][: VALIDATION_PROMPTS * 2],
            ctx.k_per_layer[0],
        )
        ctx.report["onnx_validation"]["dynamic"] = dynamic.record()
        ctx.console.log(f"dynamic.onnx vs the masked dense model (per-prompt masks, cached decode): {dynamic.text()}")
        failed += [] if dynamic.ok else [(DYNAMIC_NAME + ".onnx", dynamic)]
    if failed:
        model, check = failed[0]
        more = f" (and {len(failed) - 1} more failed checks, see the table)" if len(failed) > 1 else ""
        raise ValidationFailed(f"onnx {model} {check.text()}{more}")
