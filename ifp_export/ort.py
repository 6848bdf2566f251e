"""ONNX Runtime helpers shared by validation, the runtime and benchmarks: sessions and KV-cache decoding."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ifp_export.errors import IFPError


def session(path: Path, threads: int = 0, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = threads
    if threads == 1:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class ResidentWeights:
    """The initializers stored in one shared data file, memory-mapped once and handed to every session that uses
    them (`SessionOptions.add_initializer`), so N decoder sessions hold the shared weights once and a new session
    reads only its own tensors. Sessions made with `options` skip weight pre-packing, which would copy them.

    `decoder` goes further: graphs that differ only in the data of their own tensors (the variants of one export:
    same shapes, own FFN slices) run on one session, with those tensors as inputs fed from memory-mapped files, so
    switching to another such graph creates no session."""

    def __init__(self, shared_file: str) -> None:
        self.shared_file = shared_file
        self.values: dict[tuple[int, int], ort.OrtValue] = {}  # (offset, length) in the shared file -> value
        self.sessions: dict[tuple[bytes, int], ort.InferenceSession] = {}  # (graph with own tensors as inputs, threads)
        self.lock = threading.Lock()

    def initializers(self, path: Path) -> Iterator[tuple[str, ort.OrtValue]]:
        """(name, OrtValue) for every initializer of the graph at `path` stored in the shared file."""
        model = onnx.load(str(path), load_external_data=False)
        for init in model.graph.initializer:
            info = external_data(init)
            if info.get("location") != self.shared_file:
                continue
            offset, length = int(info.get("offset", 0)), int(info["length"])
            with self.lock:  # sessions may be built on two threads (each value mapped once)
                if (offset, length) not in self.values:
                    dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
                    array = np.memmap(path.parent / self.shared_file, dtype, "r", offset, tuple(init.dims), order="C")
                    self.values[(offset, length)] = ort.OrtValue.ortvalue_from_numpy(array)
            yield init.name, self.values[(offset, length)]

    def options(self, path: Path, threads: int = 0, prepack: bool = False) -> ort.SessionOptions:
        """Session options binding the resident shared weights. Pre-packing copies every MatMul weight per session,
        including the resident shared ones; without it a variant switch reads only the FFN slices (measured: 0.4 s
        -> 0.1 s on the benchmark model, same tok/s). But an unpacked `MatMulNBits` dequantizes its whole weight on
        every run (3B int4, 2 prompts, 4 greedy tokens: 61 s unpacked, 3 s packed), so `prepack` for int4/int8
        graphs run more than a few steps."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if threads == 1:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        options.add_session_config_entry("session.disable_prepacking", "0" if prepack else "1")
        for name, value in self.initializers(path):
            options.add_initializer(name, value)
        return options

    def session_from_bytes(
        self, graph: bytes, path: Path, threads: int = 0, prepack: bool = False
    ) -> ort.InferenceSession:
        """A session of `graph`, an edited copy of the graph at `path`, with `options(path)`; its external data
        resolves beside `path` (ORT checks even the files of initializers the options override)."""
        options = self.options(path, threads, prepack)
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
        return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def decoder(self, path: Path, threads: int = 0) -> OrtDecoder:
        """A decoder for the graph at `path` whose own tensors (every external one outside the shared file) are
        inputs fed from memory-mapped arrays; the session is made once per distinct remaining graph."""
        model = onnx.load(str(path), load_external_data=False)
        own = own_tensor_feeds(model, path.parent, self.shared_file)
        key = (model.SerializeToString(), threads)
        if key not in self.sessions:
            self.sessions[key] = self.session_from_bytes(key[0], path, threads)
        decoder = OrtDecoder(self.sessions[key])
        decoder.extra_feeds = own
        return decoder


def external_data(init: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in init.external_data}


def own_tensor_feeds(model: onnx.ModelProto, directory: Path, shared_file: str) -> dict[str, np.ndarray]:
    """Turn every initializer of `model` stored in an external file other than `shared_file` into a graph input of
    the same name, shape and type (in place); returns those tensors memory-mapped from their files, by name."""
    feeds: dict[str, np.ndarray] = {}
    files: dict[str, np.ndarray] = {}  # location -> the whole file, mapped once
    kept = []
    for init in model.graph.initializer:
        info = external_data(init)
        location = info.get("location")
        if init.data_location != onnx.TensorProto.EXTERNAL or location == shared_file:
            kept.append(init)
            continue
        if location not in files:
            file = (directory / location).resolve()
            if not file.is_relative_to(directory.resolve()):
                raise IFPError(
                    f"tensor {init.name!r} points outside its export ({location!r})",
                    directory,
                    "re-export it; an ifp-export graph keeps its data files beside it",
                )
            files[location] = np.memmap(file, np.uint8, "r")
        offset, length = int(info.get("offset", 0)), int(info["length"])
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        count = length // dtype.itemsize
        feeds[init.name] = np.frombuffer(files[location], dtype, count, offset).reshape(tuple(init.dims))
        model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return feeds


def graph_skeleton(path: Path, shared_file: str) -> bytes:
    """The graph at `path` with its own tensors (every external one outside `shared_file`) as inputs, serialized: two
    graphs with equal skeletons compute the same function of their own tensors (the variants of one export)."""
    model = onnx.load(str(path), load_external_data=False)
    own_tensor_feeds(model, path.parent, shared_file)
    return model.SerializeToString()


class OrtDecoder:
    """Runs a decoder graph in Optimum's layout with an explicit numpy KV cache."""

    def __init__(self, sess: ort.InferenceSession) -> None:
        self.session = sess
        self.past_names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
        first = next(i for i in sess.get_inputs() if i.name == "past_key_values.0.key")
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.output_names = [o.name for o in sess.get_outputs()]
        self.extra_feeds: dict[str, np.ndarray] = {}  # e.g. the per-prompt FFN weights of a dynamic decoder

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for _ in self.past_names]

    def __call__(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feeds.update(zip(self.past_names, past, strict=True))
        feeds.update(self.extra_feeds)
        logits, *present = self.session.run(self.output_names, feeds)
        return logits, present

    def greedy(self, prompt: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
        """Greedy continuation of one prompt (stops after `eos_id`, which is kept)."""
        return list(decode_tokens(self, prompt, max_new_tokens, set() if eos_id is None else {eos_id}))


def decode_tokens(
    decoder: OrtDecoder,
    prompt: list[int],
    max_new_tokens: int,
    eos_ids: set[int],
    temperature: float = 0.0,
    rng: np.random.Generator | None = None,
) -> Iterator[int]:
    """Yield new tokens one at a time with the KV cache (greedy at temperature 0, else sampled with `rng`)."""
    rng = rng or np.random.default_rng(0)
    ids = np.asarray([prompt], np.int64)
    mask = np.ones_like(ids)
    logits, past = decoder(ids, mask, np.arange(len(prompt), dtype=np.int64)[None], decoder.empty_cache(1))
    for step in range(max_new_tokens):
        token = pick(logits[0, -1], temperature, rng)
        yield token
        if token in eos_ids or step == max_new_tokens - 1:
            return
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
        position = np.asarray([[mask.shape[1] - 1]], np.int64)
        logits, past = decoder(np.asarray([[token]], np.int64), mask, position, past)


def pick(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))
