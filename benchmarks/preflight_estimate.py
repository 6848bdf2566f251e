"""Print the disk pre-flight's estimate for the benchmark shapes (DESIGN.md section 9) without any weights.

Writes header-only safetensors files (the estimate reads shapes, never data) into a temp dir and prints the ONNX /
Core ML estimates per quantization, to compare with the bytes a real export of that shape wrote
(benchmarks/README.md: ONNX decoder files 2,091,759,314 B, Core ML 1,049,600,342 B for the 246M model).

    python benchmarks/preflight_estimate.py
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

from ifp_export.preflight import estimate_export

# name: hidden, layers, d_ff, heads, kv heads, vocab, keep, variants
SHAPES = {
    "bench-246M": (1024, 16, 2816, 16, 4, 32000, 0.25, 8),
    "tinyllama-1.1B": (2048, 22, 5632, 32, 4, 32000, 0.25, 8),
    "llama3.2-3B-like": (3072, 28, 8192, 24, 8, 32000, 0.25, 8),
}


def header_only(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    offset, header = 0, {}
    for name, shape in shapes.items():
        size = 4
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def fake_checkpoint(root: Path, shape: tuple) -> None:
    hidden, layers, d_ff, heads, kv, vocab, keep, variants = shape
    head_dim = hidden // heads
    tensors = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    tensors["lm_head.weight"] = (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": (d_ff, hidden),
            p + "mlp.up_proj.weight": (d_ff, hidden),
            p + "mlp.down_proj.weight": (hidden, d_ff),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    header_only(root / "backbone" / "model.safetensors", tensors)
    header_only(root / "predictor" / "model.safetensors", {})  # the predictor is left out of these figures
    config = {"num_hidden_layers": layers, "intermediate_size": d_ff, "tie_word_embeddings": False}
    (root / "backbone" / "config.json").write_text(json.dumps(config))
    (root / "ifp.json").write_text(json.dumps({"k_per_layer": [round(keep * d_ff)] * layers}))
    tasks = "".join(json.dumps({"task": f"t{i}", "prompt": "x"}) + "\n" for i in range(variants))
    (root / "tasks.jsonl").write_text(tasks)
    (root / "tokenizer.json").write_text("{}")


def main() -> None:
    print(f"{'shape':18} {'quantize':8} {'ONNX B':>16} {'Core ML B':>16} {'total B':>16}")
    for name, shape in SHAPES.items():
        with tempfile.TemporaryDirectory() as tmp:
            fake_checkpoint(Path(tmp), shape)
            for quantize in ("none", "int8", "int4"):
                e = estimate_export(Path(tmp), None, None, quantize, "static", None)
                print(f"{name:18} {quantize:8} {e.onnx:16,} {e.coreml:16,} {e.total:16,}")


if __name__ == "__main__":
    main()
