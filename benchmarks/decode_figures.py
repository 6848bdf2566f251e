"""`benchmarks.run.Bench`'s sections that time the exported models in ONNX Runtime: P3, P4b (decode), P5, P5-lm
(routing) and P6 (variant switch). A mixin: it uses the Bench's work dir, checkpoint, exports, prompts and rows."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.clients import SHORT_PROMPT
from benchmarks.decode_child import rates_in_children
from benchmarks.model import build_lm_predictor
from benchmarks.rows import Row, Stats
from ifp_export.model.hf_io import load_decoder
from ifp_export.ort import OrtDecoder, session


def prefill_seconds(decoder: OrtDecoder, prompt: list[int]) -> float:
    ids = np.asarray([prompt], np.int64)
    start = time.perf_counter()
    decoder(ids, np.ones_like(ids), np.arange(len(prompt), dtype=np.int64)[None], decoder.empty_cache(1))
    return time.perf_counter() - start


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def per_token_weight_bytes(hf_dir: Path) -> int:
    """Weight bytes a decode step reads: every parameter except the embedding matrix (a one-row gather);
    lm_head counts (even when tied to the embeddings)."""
    model = load_decoder(hf_dir)
    total = sum(p.nbytes for p in model.parameters())  # parameters() yields a tied tensor once
    embed = model.model.embed_tokens.weight.nbytes
    lm_head = model.lm_head.weight.nbytes
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    return total - embed + (lm_head if tied else 0)


class DecodeFigures:
    def decode(self) -> None:
        """P3 (pruned vs dense, ours) and P4b (our dense vs Optimum's dense): every timing a fresh process
        (`benchmarks.decode_child`), models interleaved per repeat."""
        onnx_dir = self.out / "onnx"
        models = {"dense": onnx_dir / "dense.onnx", "pruned": onnx_dir / f"{self.variants[0]}.onnx"}
        if self.optimum_dense is not None:
            models["optimum"] = self.optimum_dense
        ideal = per_token_weight_bytes(self.ckpt / "backbone") / per_token_weight_bytes(
            self.work / "variants" / self.variants[0]
        )
        prompt = self.prompt(SHORT_PROMPT)
        steps = self.args.decode_steps
        decode_raw: dict[str, dict[str, list[float]]] = {}
        for threads in self.args.threads:
            raw = rates_in_children(models, prompt, steps, threads, self.args.repeats)
            rates = {name: Stats(values) for name, values in raw.items()}
            decode_raw[str(threads)] = {name: s.values for name, s in rates.items()}
            plural = f"{threads} thread{'s' * (threads > 1)}"
            speedup = Stats([p / d for p, d in zip(rates["pruned"].values, rates["dense"].values, strict=True)])
            ratio = Stats([s / ideal for s in speedup.values])
            self.rows.append(
                Row(
                    f"P3 {threads}t",
                    f"decode tok/s pruned / dense, ÷ ideal bytes ratio {ideal:.3f} ({plural})",
                    f"pruned {rates['pruned'].fmt('tok/s')}",
                    f"dense {rates['dense'].fmt('tok/s')}",
                    ratio.median,
                    f"{ratio.range()} (speedup {speedup.median:.3f})",
                    "≥ 0.95",
                    ratio.median >= 0.95,
                    f"{steps} decode steps after a {len(prompt)}-token prefill",
                )
            )
            if "optimum" in rates:
                p4 = Stats([o / b for o, b in zip(rates["dense"].values, rates["optimum"].values, strict=True)])
                self.rows.append(
                    Row(
                        f"P4b {threads}t",
                        f"dense decode tok/s in our runtime's loop (OrtDecoder), ours / Optimum's export of the same "
                        f"weights ({plural})",
                        f"ours {rates['dense'].fmt('tok/s')}",
                        f"optimum {rates['optimum'].fmt('tok/s')}",
                        p4.median,
                        p4.range(),
                        "≥ 1.0 (aim 1.15)",
                        p4.median >= 1.0,
                        "same ORT session options (ifp_export.ort.session), same loop, one process per timing",
                    )
                )
        if self.optimum_dense is None:
            self.rows.append(
                Row(
                    "P4b",
                    "dense decode ours / Optimum's (OrtDecoder loop)",
                    "-",
                    "skipped",
                    None,
                    "",
                    "≥ 1.0",
                    None,
                    self.optimum_skipped or "",
                )
            )
        self.raw["decode_tokens_per_second"] = decode_raw
        self.raw["ideal_bytes_ratio"] = ideal

    def routing(self) -> None:
        """P5: predictor + routing (Runtime.route on predictor.onnx) vs dense prefill of a 512-token prompt."""
        from ifp_export.runtime import Runtime

        threads = max(self.args.threads)
        runtime = Runtime(self.out, threads=threads, verify_hashes=False)
        prompt_ids = self.prompt(self.args.prefill)
        text = self.tokenizer.decode(prompt_ids)
        dense = OrtDecoder(session(self.out / "onnx" / "dense.onnx", threads))
        runtime.route(text)
        prefill_seconds(dense, prompt_ids)  # warm-up
        route, prefill = Stats(), Stats()
        for _ in range(self.args.repeats):
            route.values.append(timed(lambda: runtime.route(text)))
            prefill.values.append(prefill_seconds(dense, prompt_ids))
        ratio = Stats([r / p for r, p in zip(route.values, prefill.values, strict=True)])
        self.rows.append(
            Row(
                "P5",
                f"predictor + routing / dense prefill of a {len(prompt_ids)}-token prompt ({threads} threads)",
                f"route {route.fmt()}",
                f"prefill {prefill.fmt()}",
                ratio.median,
                ratio.range(),
                "≤ 0.10",
                ratio.median <= 0.10,
                f"route = tokenize + predictor.onnx (first {runtime.output.manifest['predictor']['max_length']} "
                "tokens) + argmax",
            )
        )
        self.raw["p5_seconds"] = {"route": route.values, "prefill": prefill.values}
        self.routing_lm(prompt_ids, dense, threads)

    def routing_lm(self, prompt_ids: list[int], dense: OrtDecoder, threads: int) -> None:
        """P5 with the paper's predictor (issue 17): an HF LM of ~1/10 of the backbone's parameters + MLP head,
        traced to ONNX with the routing head folded in, as the export does; route = tokenize + graph + argmax."""
        import onnx_ir as ir
        import torch

        from ifp_export.masks import encode_prompts
        from ifp_export.model.softtopk import hard_topk_mask
        from ifp_export.targets.onnx.predictor import trace_predictor

        predictor = build_lm_predictor(self.work, self.args.size)
        cfg, n_params = predictor.config, sum(p.numel() for p in predictor.parameters())
        # random variant masks with the export's k: the routing head costs the same whichever neurons they keep
        scores = torch.randn(len(self.variants), cfg.target_layers, cfg.target_intermediate_size)
        masks = hard_topk_mask(scores, torch.as_tensor(self.raw["model"]["k"]))
        path = self.work / "lm_predictor.onnx"
        ir.save(trace_predictor(predictor, masks), path, external_data=f"{path.name}_data")
        del predictor
        graph = session(path, threads)
        text = self.tokenizer.decode(prompt_ids)

        def route() -> int:
            ids, mask, _ = encode_prompts(self.tokenizer, [text], cfg.max_length)
            feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
            return int(graph.run(["variant_scores"], feeds)[0][0].argmax())

        route()  # warm-up
        routes, prefill = Stats(), Stats()
        for _ in range(self.args.repeats):
            routes.values.append(timed(route))
            prefill.values.append(prefill_seconds(dense, prompt_ids))
        ratio = Stats([r / p for r, p in zip(routes.values, prefill.values, strict=True)])
        share = n_params / self.raw["model"]["parameters"]
        self.rows.append(
            Row(
                "P5-lm",
                f"LM predictor ({n_params / 1e6:.1f}M = {share:.3f} of the backbone) + routing / dense prefill of a "
                f"{len(prompt_ids)}-token prompt ({threads} threads)",
                f"route {routes.fmt()}",
                f"prefill {prefill.fmt()}",
                ratio.median,
                ratio.range(),
                "≤ 0.10",
                ratio.median <= 0.10,
                f"LM {cfg.lm.num_hidden_layers}x{cfg.lm.hidden_size} (d_ff {cfg.lm.intermediate_size}) over the first "
                f"{cfg.max_length} tokens, {cfg.head.pooling}-token pooling, head {list(cfg.head.hidden_sizes)}",
            )
        )
        self.raw["p5_lm"] = {"route": routes.values, "prefill": prefill.values, "parameters": n_params}

    def switching(self) -> None:
        """P6: Runtime.decoder(name) for a variant not yet loaded (its graph's session already made by another
        variant) vs a cold dense session; then each one's first prefill (where the weights are first read)."""
        from ifp_export.runtime import Runtime

        threads = max(self.args.threads)
        runtime = Runtime(self.out, threads=threads, verify_hashes=False)
        runtime.decoder(self.variants[0])  # makes the shared weights resident and the variants' session
        others = self.variants[1:] or self.variants
        switch, cold, switch_prefill, cold_prefill = Stats(), Stats(), Stats(), Stats()
        dense_path = str(self.out / "onnx" / "dense.onnx")
        prompt = self.prompt(SHORT_PROMPT)
        for i in range(self.args.repeats):
            name = others[i % len(others)]
            runtime.unload(name)
            gc.collect()
            switch.values.append(timed(lambda name=name: runtime.decoder(name)))
            switch_prefill.values.append(prefill_seconds(runtime.decoder(name), prompt))
            gc.collect()
            start = time.perf_counter()
            dense = ort.InferenceSession(dense_path, runtime.options(), providers=["CPUExecutionProvider"])
            cold.values.append(time.perf_counter() - start)
            cold_prefill.values.append(prefill_seconds(OrtDecoder(dense), prompt))
            del dense
            gc.collect()
        ratio = Stats([s / c for s, c in zip(switch.values, cold.values, strict=True)])
        self.rows.append(
            Row(
                "P6",
                "variant switch in ifp_export.runtime (new variant: its graph matched to the variants' session, its "
                "FFN slices memory-mapped as inputs) / cold dense session load",
                f"switch {switch.fmt()}",
                f"cold dense {cold.fmt()}",
                ratio.median,
                ratio.range(),
                "≤ 0.25",
                ratio.median <= 0.25,
                f"files in the page cache for both (warm disk); the first {len(prompt)}-token prefill after them: "
                f"switch {switch_prefill.fmt()}, cold dense {cold_prefill.fmt()}",
            )
        )
        self.raw["p6_seconds"] = {
            "switch": switch.values,
            "cold_dense": cold.values,
            "first_prefill_after_switch": switch_prefill.values,
            "first_prefill_after_cold_dense": cold_prefill.values,
        }
