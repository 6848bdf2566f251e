"""An app's use of an export, run by tests/test_onnxruntime_releases.py in a child process whose PYTHONPATH puts one
onnxruntime release first: plain `InferenceSession`s on the manifest's files (external data loaded by onnxruntime
itself), nothing from ifp_export.

    python onnxruntime_app.py REQUEST.json  ->  JSON on stdout

REQUEST: {"exports": {label: {"dir": path, "prompts": [[token ids], ...]}}, "max_new_tokens": N}. Per export and
prompt: the
route (argmax of predictor.onnx's variant_scores on the prompt's first max_length tokens), then greedy tokens with
the KV cache from the routed variant's graph, its GenAI-flavour twin (no position_ids), the dense graph and, when
the export has one, the dynamic graph fed the prompt's own top-k FFN rows gathered from the dense data file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def greedy(sess: ort.InferenceSession, prompt: list[int], steps: int, eos: set[int], extra: dict) -> list[int]:
    """Greedy decoding with the KV cache: prefill, then one token per step; stops after an EOS id (kept)."""
    names = {i.name: i for i in sess.get_inputs()}
    pasts = [n for n in names if n.startswith("past_key_values.")]
    heads, head_dim = names[pasts[0]].shape[1], names[pasts[0]].shape[3]
    past = {n: np.zeros((1, heads, 0, head_dim), np.float32) for n in pasts}
    outputs = [o.name for o in sess.get_outputs()]
    ids = np.asarray([prompt], np.int64)
    total = len(prompt)
    tokens: list[int] = []
    while True:
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64), **past, **extra}
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(total - ids.shape[1], total, dtype=np.int64)[None]
        logits, *present = sess.run(outputs, feeds)
        token = int(logits[0, -1].argmax())
        tokens.append(token)
        if token in eos or len(tokens) == steps:
            return tokens
        past = {n.replace("present.", "past_key_values.", 1): v for n, v in zip(outputs[1:], present, strict=True)}
        ids = np.asarray([[token]], np.int64)
        total += 1


def dynamic_feeds(root: Path, spec: dict, scores: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The dynamic graph's FFN inputs: each layer's k best-scored neurons (ties to the lower index), gathered from
    the dense FFN tensors the manifest points at (gate and up packed side by side)."""
    kept = np.sort(np.argsort(-scores, axis=-1, kind="stable")[:, :k], axis=-1)
    feeds = {}
    for ffn in spec["ffn_inputs"]:
        source = ffn["source"]
        dense = np.memmap(root / source["file"], np.float32, "r", source["offset"], tuple(source["shape"]))
        width = dense.shape[ffn["neuron_axis"]] // ffn.get("packed", 1)
        index = np.concatenate([kept[ffn["layer"]] + j * width for j in range(ffn.get("packed", 1))])
        feeds[ffn["name"]] = np.ascontiguousarray(np.take(dense, index, axis=ffn["neuron_axis"]))
    return feeds


def run_export(root: Path, prompts: list[list[int]], steps: int) -> list[dict]:
    manifest = json.loads((root / "manifest.json").read_text())
    eos = manifest["tokenizer"]["eos_token_id"] or []
    eos = set(eos if isinstance(eos, list) else [eos])
    predictor = session(root / manifest["predictor"]["onnx"]["model"])
    order = manifest["predictor"]["routing"]["variant_order"]
    limit = manifest["predictor"]["max_length"]
    files = {v["name"]: v["files"]["onnx"] for v in manifest["variants"]} | {
        "dense": manifest["dense"]["files"]["onnx"]
    }
    sessions: dict[str, ort.InferenceSession] = {}

    def model(path: str) -> ort.InferenceSession:
        if path not in sessions:
            sessions[path] = session(root / path)
        return sessions[path]

    results = []
    for prompt in prompts:
        ids = np.asarray([prompt[:limit]], np.int64)
        scores, variant_scores = predictor.run(
            ["scores", "variant_scores"], {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        )
        route = order[int(variant_scores[0].argmax())]
        result = {"route": route}
        result["variant"] = greedy(model(files[route]["model"]), prompt, steps, eos, {})
        result["dense"] = greedy(model(files["dense"]["model"]), prompt, steps, eos, {})
        if "genai" in files[route]:
            twin = str(
                Path(files[route]["model"]).parent / files[route]["genai"]["overlay"]["model"]["decoder"]["filename"]
            )
            result["genai"] = greedy(model(twin), prompt, steps, eos, {})
        if "dynamic" in manifest:
            feeds = dynamic_feeds(root, manifest["dynamic"], scores[0], manifest["model"]["k"])
            result["dynamic"] = greedy(model(manifest["dynamic"]["model"]), prompt, steps, eos, feeds)
        results.append(result)
    return results


def main() -> None:
    request = json.loads(Path(sys.argv[1]).read_text())
    report = {"onnxruntime": ort.__version__, "exports": {}}
    for label, export in request["exports"].items():
        try:
            report["exports"][label] = run_export(Path(export["dir"]), export["prompts"], request["max_new_tokens"])
        except Exception as err:  # reported per export: the parent shows which release failed on which export
            report["exports"][label] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    main()
