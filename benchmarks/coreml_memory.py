"""Peak memory of the Core ML emit on a random decoder (run under `/usr/bin/time -v`; Maximum resident set size).

    OMP_NUM_THREADS=1 /usr/bin/time -v python benchmarks/coreml_memory.py --hidden 512 --layers 8 --vocab 16000 \
        --variants 8 [--quantize int4]

Prints the weight bytes (fp16 model; ideal package: shared once + every function's FFN slices) and the emit
time, so the RSS can be read against them. Random weights: sizes and memory only, no quality.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from ifp_export.fold import kept_indices
from ifp_export.model.config import DecoderConfig
from ifp_export.model.decoder import CausalLM
from ifp_export.model.predictor import PredictorConfig, SparsityPredictor
from ifp_export.model.softtopk import hard_topk_mask
from ifp_export.targets.coreml import emit
from ifp_export.weights import ModuleWeights


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--variants", type=int, default=8)
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--quantize", default="none")
    args = parser.parse_args()
    torch.manual_seed(0)
    d_ff = 4 * args.hidden
    cfg = DecoderConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=d_ff,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 128,
        head_dim=64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.model.rotary_emb.reset_parameters()
    k = int(d_ff * args.keep)
    masks = torch.stack([hard_topk_mask(torch.randn(args.layers, d_ff), torch.tensor(k)) for _ in range(args.variants)])
    kept = {f"v{i}": kept_indices(m).numpy() for i, m in enumerate(masks)}
    predictor = SparsityPredictor(
        PredictorConfig(vocab_size=args.vocab, target_layers=args.layers, target_intermediate_size=d_ff)
    ).eval()
    params = sum(p.numel() for p in model.parameters())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        art = emit(Path(tmp) / "coreml", ModuleWeights(model), kept, predictor, masks, quantize=args.quantize)
        seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "params": params,
                "model_fp16_bytes": params * 2,
                "package_ideal_bytes": art.ideal_bytes,
                "package_disk_bytes": art.disk_bytes,
                "dedup_ratio": round(art.dedup_ratio, 4),
                "functions": len(art.functions),
                "emit_seconds": round(seconds, 1),
                "rss_before_emit_bytes": rss_before,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
