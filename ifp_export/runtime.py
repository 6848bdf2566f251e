"""The reference client: open an export, route a prompt with the predictor graph, generate on ONNX Runtime.

Switching variants creates no session: every tensor stored in the shared data file is memory-mapped once and
handed to the session with `SessionOptions.add_initializer`, and the variants (one graph, their own FFN slices)
share one session whose FFN tensors are inputs, fed from the variant's memory-mapped data file.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from ifp_export.artifacts import MANIFEST_FILE, OutputDir, open_output
from ifp_export.chat import format_chat
from ifp_export.checkpoint import read_tokenizer
from ifp_export.errors import IFPError
from ifp_export.masks import encode_prompts
from ifp_export.ort import OrtDecoder, ResidentWeights, decode_tokens
from ifp_export.targets.onnx import DENSE_NAME, DYNAMIC_NAME, SHARED_DATA, gather_dynamic_feeds

INCOMPLETE = "\ufffd"  # what a byte-level decoder makes of a partial UTF-8 character


@dataclass(frozen=True)
class Route:
    variant: str
    scores: dict[str, float]
    truncated: bool = False  # the predictor read only the prompt's first max_length tokens


class Prediction(NamedTuple):
    scores: np.ndarray  # [L, d_ff] neuron scores
    variant_scores: np.ndarray  # [V]
    truncated: bool  # the prompt was longer than the manifest's predictor.max_length (its first tokens were read)


class Runtime:
    def __init__(self, root: str | Path, threads: int = 0, verify_hashes: bool = True) -> None:
        self.output: OutputDir = open_output(root, verify_hashes)
        manifest = self.output.manifest
        self.tokenizer: Tokenizer = read_tokenizer(self.output.path(manifest["tokenizer"]["file"]))
        eos = manifest["tokenizer"].get("eos_token_id")
        self.chat_template: str | None = manifest["tokenizer"].get("chat_template")
        self.special_tokens: dict = manifest["tokenizer"].get("special_tokens", {})
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.threads = threads
        self.predictor = ort.InferenceSession(
            str(self.output.path(manifest["predictor"]["onnx"]["model"])),
            self.options(),
            providers=["CPUExecutionProvider"],
        )
        self.resident = ResidentWeights(SHARED_DATA)
        self.shared = self.resident.values  # (offset, length) in the shared file -> value
        self.decoders: dict[str, OrtDecoder] = {}  # by variant name (and DYNAMIC_NAME)
        self.sources: dict[tuple[str, int], np.memmap] = {}

    def options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        # Pre-packing copies every MatMul weight per session, including the resident shared ones; without it a
        # variant switch reads only the FFN slices (measured: 0.4 s -> 0.1 s on the benchmark model, same tok/s).
        options.add_session_config_entry("session.disable_prepacking", "1")
        return options

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids; an empty prompt (or one that encodes to nothing) is refused."""
        ids = self.tokenizer.encode(prompt).ids if prompt else []
        if not ids:
            raise IFPError(f"the prompt {prompt!r} encodes to no tokens", None, "pass a non-empty --prompt")
        return ids

    def decoder_ids(self, message: str, raw: bool = False) -> list[int]:
        """What the decoder reads: the message formatted with the chat template and encoded as transformers'
        `apply_chat_template` does (no tokenizer-added special tokens: the template writes them), or, with `raw` or
        without a template, the message encoded as it is. The predictor always reads the message itself."""
        ids = self.encode(message)
        if raw or self.chat_template is None:
            return ids
        text = format_chat(self.chat_template, self.special_tokens, message)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def predict(self, prompt: str) -> Prediction:
        """The predictor graph on one prompt (its first max_length tokens, `masks.TRUNCATION`)."""
        self.encode(prompt)
        ids, mask, truncated = encode_prompts(self.tokenizer, [prompt], self.output.manifest["predictor"]["max_length"])
        scores, variant_scores = self.predictor.run(
            ["scores", "variant_scores"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        )
        return Prediction(scores[0], variant_scores[0], truncated[0])

    def route(self, prompt: str) -> Route:
        """Run the predictor graph once and pick the argmax variant."""
        prediction = self.predict(prompt)
        order = self.output.manifest["predictor"]["routing"]["variant_order"]
        scores = {name: float(s) for name, s in zip(order, prediction.variant_scores, strict=True)}
        return Route(order[int(prediction.variant_scores.argmax())], scores, prediction.truncated)

    def model_path(self, name: str) -> Path:
        files = self.output.manifest["dense"] if name == DENSE_NAME else self.output.variant(name)
        return self.output.path(files["files"]["onnx"]["model"])

    def decoder(self, name: str) -> OrtDecoder:
        """The variant's decoder: the session of its graph (made once for all variants) fed its own FFN slices."""
        if name not in self.decoders:
            self.decoders[name] = self.resident.decoder(self.model_path(name), self.threads)
        return self.decoders[name]

    def dynamic_decoder(self, prompt: str) -> OrtDecoder:
        """A dynamic-mode decoder of its own, bound to this prompt's FFN neurons (the predictor's top-k per layer);
        every call returns a new one over the one shared session, so concurrent generations never share weights.

        The kept rows/columns are gathered from the dense model's FFN tensors, memory-mapped from disk.
        """
        spec = self.output.manifest.get("dynamic")
        if spec is None:
            raise IFPError(
                "this export has no dynamic-mode decoder",
                self.output.root / MANIFEST_FILE,
                "export with --mode dynamic",
            )
        if DYNAMIC_NAME not in self.decoders:
            self.decoders[DYNAMIC_NAME] = self.resident.decoder(self.output.path(spec["model"]), self.threads)
        shared = self.decoders[DYNAMIC_NAME]
        kept = top_k_indices(self.predict(prompt).scores, self.output.manifest["model"]["k"])
        decoder = copy.copy(shared)  # same session, its own feeds: a generation still decoding keeps its weights
        decoder.extra_feeds = {**shared.extra_feeds, **gather_dynamic_feeds(spec["ffn_inputs"], kept, self.source)}
        return decoder

    def source(self, source: dict) -> np.memmap:
        """A dense FFN tensor, memory-mapped from the data file the manifest names."""
        key = (source["file"], source["offset"])
        if key not in self.sources:
            self.sources[key] = np.memmap(
                self.output.path(source["file"]), np.float32, "r", source["offset"], tuple(source["shape"])
            )
        return self.sources[key]

    def unload(self, name: str) -> None:
        """Drop a variant's decoder (its FFN slices' mappings); the shared weights and the session stay."""
        self.decoders.pop(name, None)

    def generate(
        self,
        prompt: str,
        variant: str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int = 0,
        dynamic: bool = False,
        raw: bool = False,
    ) -> Iterator[int]:
        """Yield new token ids one at a time (greedy when temperature is 0, else seeded sampling).

        The model is `variant`, else the dynamic decoder pruned for this prompt if `dynamic`, else the variant
        the predictor routes the prompt to. The decoder reads `decoder_ids(prompt, raw)`.
        """
        ids = self.decoder_ids(prompt, raw)
        if dynamic and variant is None:
            decoder = self.dynamic_decoder(prompt)
        else:
            decoder = self.decoder(variant or self.route(prompt).variant)
        yield from decode_tokens(decoder, ids, max_new_tokens, self.eos_ids, temperature, np.random.default_rng(seed))

    def stream_text(self, tokens: Iterator[int]) -> Iterator[str]:
        """Decoded text pieces as tokens arrive. The whole prefix is decoded each time (multi-token characters come
        out right), and text ending in an incomplete UTF-8 character (a byte-level BPE token holding only its first
        bytes decodes to U+FFFD) is held back until the character is complete, as transformers' TextStreamer does."""
        ids: list[int] = []
        shown = 0
        text = ""
        for token in tokens:
            if token in self.eos_ids:
                break
            ids.append(token)
            text = self.tokenizer.decode(ids)
            if not text.endswith(INCOMPLETE):
                yield text[shown:]
                shown = len(text)
        if len(text) > shown:  # the stream ended inside a character: show what decoding all of it shows
            yield text[shown:]


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """[L, k] ascending indices of each layer's k highest scores, ties to the lower index (as hard_topk_mask)."""
    return np.sort(np.argsort(-scores, axis=-1, kind="stable")[:, :k], axis=-1)
