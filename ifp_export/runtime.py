"""The reference client: open an export, route a prompt with the predictor graph, generate on ONNX Runtime.

Switching variants keeps the shared weights resident: every tensor stored in the shared data file is
memory-mapped once and handed to each variant's session with `SessionOptions.add_initializer`, so a new
variant session only reads its own FFN slices.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from tokenizers import Tokenizer

from ifp_export.artifacts import OutputDir, open_output
from ifp_export.checkpoint import read_tokenizer
from ifp_export.masks import encode_prompts
from ifp_export.ort import OrtDecoder, decode_tokens
from ifp_export.targets.onnx import DENSE_NAME, SHARED_DATA

ONNX_TO_NUMPY = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


@dataclass(frozen=True)
class Route:
    variant: str
    scores: dict[str, float]


class Runtime:
    def __init__(self, root: str | Path, threads: int = 0, verify_hashes: bool = True) -> None:
        self.output: OutputDir = open_output(root, verify_hashes)
        manifest = self.output.manifest
        self.tokenizer: Tokenizer = read_tokenizer(self.output.path(manifest["tokenizer"]["file"]))
        eos = manifest["tokenizer"].get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.threads = threads
        self.predictor = ort.InferenceSession(
            str(self.output.path(manifest["predictor"]["onnx"]["model"])),
            self.options(),
            providers=["CPUExecutionProvider"],
        )
        self.shared: dict[tuple[int, int], ort.OrtValue] = {}  # (offset, length) in the shared file -> value
        self.sessions: dict[str, OrtDecoder] = {}

    def options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        return options

    def route(self, prompt: str) -> Route:
        """Run the predictor graph once and pick the argmax variant."""
        ids, mask, _ = encode_prompts(self.tokenizer, [prompt], self.output.manifest["predictor"]["max_length"])
        (variant_scores,) = self.predictor.run(
            ["variant_scores"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        )
        order = self.output.manifest["predictor"]["routing"]["variant_order"]
        scores = {name: float(s) for name, s in zip(order, variant_scores[0], strict=True)}
        return Route(order[int(variant_scores[0].argmax())], scores)

    def model_path(self, name: str) -> Path:
        files = self.output.manifest["dense"] if name == DENSE_NAME else self.output.variant(name)
        return self.output.path(files["files"]["onnx"]["model"])

    def decoder(self, name: str) -> OrtDecoder:
        """The variant's decoder session (created once; shared weights come from the resident cache)."""
        if name not in self.sessions:
            path = self.model_path(name)
            options = self.options()
            for init_name, value in self.shared_initializers(path):
                options.add_initializer(init_name, value)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.sessions[name] = OrtDecoder(session)
        return self.sessions[name]

    def unload(self, name: str) -> None:
        """Drop a variant's session (its FFN weights); the shared weights stay resident."""
        self.sessions.pop(name, None)

    def shared_initializers(self, path: Path) -> Iterator[tuple[str, ort.OrtValue]]:
        """(name, OrtValue) for every initializer of `path` stored in the shared file, memory-mapped once."""
        model = onnx.load(str(path), load_external_data=False)
        shared_file = path.parent / SHARED_DATA
        for init in model.graph.initializer:
            info = {entry.key: entry.value for entry in init.external_data}
            if info.get("location") != SHARED_DATA:
                continue
            offset, length = int(info.get("offset", 0)), int(info["length"])
            if (offset, length) not in self.shared:
                array = np.memmap(shared_file, ONNX_TO_NUMPY[init.data_type], "r", offset, tuple(init.dims), order="C")
                self.shared[(offset, length)] = ort.OrtValue.ortvalue_from_numpy(array)
            yield init.name, self.shared[(offset, length)]

    def generate(
        self,
        prompt: str,
        variant: str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> Iterator[int]:
        """Yield new token ids one at a time (greedy when temperature is 0, else seeded sampling)."""
        name = variant or self.route(prompt).variant
        ids = self.tokenizer.encode(prompt).ids
        yield from decode_tokens(
            self.decoder(name), ids, max_new_tokens, self.eos_ids, temperature, np.random.default_rng(seed)
        )

    def stream_text(self, tokens: Iterator[int]) -> Iterator[str]:
        """Decoded text pieces as tokens arrive (decoding the whole prefix keeps multi-token characters right)."""
        ids: list[int] = []
        shown = ""
        for token in tokens:
            if token in self.eos_ids:
                return
            ids.append(token)
            text = self.tokenizer.decode(ids)
            yield text[len(shown) :]
            shown = text
