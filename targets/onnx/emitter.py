"""Emit: one decoder graph per distinct FFN width, each model's weights bound tensor by tensor into external data.

Every variant shares the pruned graph (uniform k) and the dense model has its own (width d_ff), both built from
the config (`build_decoder`, milliseconds, no weights). Weights stream from the checkpoint's `WeightSource` at
write time: a tensor every model uses is written once to `decoder_shared.onnx_data` (the dense model and every
variant point at it), each model's FFN tensors (a variant's gathered with `ffn_slice`) to `<name>.onnx_data`.
No model's weights are ever all in memory.

Two graph files per model when the GenAI flavour can be built (head_dim a multiple of 16): `<name>.onnx`
(Optimum flavour: what Optimum and our runtime load, exact on left-padded batches) and `<name>.genai.onnx`
(GroupQueryAttention, what onnxruntime-genai loads; exact on unpadded sequences), over the same data files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch

from ifp_export.digests import Digests, identity
from ifp_export.errors import IFPError
from ifp_export.fsutil import write_json
from ifp_export.model.config import GENERATION_CONFIG_FILE, DecoderConfig, generation_config
from ifp_export.model.decoder import CausalLM
from ifp_export.targets.onnx.build import build_decoder
from ifp_export.targets.onnx.dynamic import DYNAMIC_NAME, emit_dynamic
from ifp_export.targets.onnx.floor import DEFAULT_FLOOR
from ifp_export.targets.onnx.genai import GENAI_SUFFIX, write_genai_config
from ifp_export.targets.onnx.ops import Binding, Materializer
from ifp_export.targets.onnx.predictor import PREDICTOR_NAME, PredictorTrace
from ifp_export.weights import WeightSource, ffn_slice

SHARED_DATA = "decoder_shared.onnx_data"
DENSE_NAME = "dense"
EXTERNAL_THRESHOLD = 256  # bytes; smaller tensors stay inside each .onnx file
ALIGNMENT = 64
FFN_PARAMS = ("gate_proj", "up_proj", "down_proj")

Progress = Callable[[int], None]


@contextmanager
def no_progress(description: str, total: int) -> Iterator[Progress]:
    yield lambda n=1: None


@dataclass
class DataWriter:
    """Appends tensors to data files under `root` (64-byte aligned) and remembers where each shared one went."""

    root: Path
    sizes: dict[str, int] = field(default_factory=dict)
    shared: dict[tuple, tuple[str, int, int]] = field(default_factory=dict)  # (sources, layout) -> location
    ffn_bytes: int = 0  # bytes of every model's own tensors (the ideal counts them all)
    hashes: dict[str, Any] = field(default_factory=dict)  # file name -> sha256 of what was appended, its identity

    def write(self, file_name: str, array: np.ndarray) -> tuple[str, int, int]:
        data = np.ascontiguousarray(array).tobytes()
        offset = self.sizes.get(file_name, 0)
        padding = -offset % ALIGNMENT
        chunk = b"\0" * padding + data
        with open(self.root / file_name, "ab") as f:
            f.write(chunk)
        digest, _ = self.hashes.get(file_name, (hashlib.sha256(), None))
        digest.update(chunk)
        self.hashes[file_name] = digest, identity(self.root / file_name)
        self.sizes[file_name] = offset + padding + len(data)
        return file_name, offset + padding, len(data)

    def record(self, digests: Digests) -> None:
        """Every data file's digest, from the bytes written (the manifest need not read them back)."""
        for file_name, (digest, seen) in self.hashes.items():
            digests.record(self.root / file_name, seen, digest.hexdigest())

    @property
    def ideal_bytes(self) -> int:
        """Shared tensors once plus every model's FFN tensors: what a perfect layout would store."""
        return sum(length for _, _, length in self.shared.values()) + self.ffn_bytes


def external(name: str, array_dtype: np.dtype, shape: tuple, location: tuple[str, int, int], root: Path) -> ir.Tensor:
    file_name, offset, length = location
    dtype = ir.DataType.from_numpy(array_dtype)
    return ir.ExternalTensor(file_name, offset, length, dtype, shape=ir.Shape(shape), name=name, base_dir=root)


def bind_model(
    graph: ir.Model,
    bindings: list[Binding],
    make: Callable[[Binding], np.ndarray],
    writer: DataWriter,
    own_file: str,
    advance: Progress,
    release: Callable[[], None],
) -> None:
    """Fill `graph`'s bound initializers for one model: shared tensors from (or first into) the shared file, FFN
    tensors into `own_file`; tiny tensors inline. `release()` after each tensor written drops the source pages it
    read, so binding the dense model does not leave every weight of the checkpoint resident."""
    for binding in bindings:
        value = graph.graph.initializers[binding.initializer]
        key = (binding.sources, binding.layout)
        if not binding.ffn and key in writer.shared:
            location = writer.shared[key]
            array = None
        else:
            array = make(binding)
        if array is not None and array.nbytes < EXTERNAL_THRESHOLD:
            value.const_value = ir.tensor(array, name=binding.initializer)
            advance(1)
            continue
        if array is not None:
            location = writer.write(own_file if binding.ffn else SHARED_DATA, array)
            release()
            if binding.ffn:
                writer.ffn_bytes += array.nbytes
            else:
                writer.shared[key] = location
        dtype, shape = (array.dtype, array.shape) if array is not None else shared_meta(value)
        value.const_value = external(binding.initializer, dtype, shape, location, writer.root)
        advance(1)


def shared_meta(value: ir.Value) -> tuple[np.dtype, tuple]:
    return value.dtype.numpy(), tuple(int(d) for d in value.shape)


def model_getter(source: WeightSource, kept: np.ndarray | None) -> Callable[[str], np.ndarray | torch.Tensor]:
    """`get(hf_name)` for one model: a variant's FFN projections gathered for `kept` (float32), the rest as stored
    (no copy: `quantize_rows` upcasts a few rows at a time)."""

    def get(name: str) -> np.ndarray | torch.Tensor:
        parts = name.split(".")
        if kept is not None and len(parts) == 6 and parts[3] == "mlp" and parts[4] in FFN_PARAMS:
            return ffn_slice(source, int(parts[2]), parts[4], kept[int(parts[2])])
        return source.tensor(name)

    return get


class DenseRows:
    """The dense model's quantized packed gate/up (blocks and scales), kept while the variants are bound: MatMulNBits
    quantizes each output column on its own, so a variant's are the dense arrays' rows for its neurons, bit for bit,
    and need no quantization. (down_proj keeps fewer input channels, so its blocks change: it is quantized anew.)"""

    def __init__(self, intermediate_size: int) -> None:
        self.intermediate_size = intermediate_size
        self.arrays: dict[str, np.ndarray] = {}

    @staticmethod
    def applies(binding: Binding) -> bool:
        quantized = binding.layout.endswith(("_blocks", "_scales"))
        return binding.ffn and quantized and not any(s.endswith("down_proj.weight") for s in binding.sources)

    def maker(self, source: WeightSource, kept: np.ndarray | None) -> Callable[[Binding], np.ndarray]:
        """How to make one model's arrays: the dense model's are made and (gate/up) kept, a variant's gate/up are
        rows of those."""
        materialize = Materializer(model_getter(source, kept))

        def make(binding: Binding) -> np.ndarray:
            if not self.applies(binding):
                return materialize(binding)
            if kept is None:
                self.arrays[binding.initializer] = materialize(binding)
                return self.arrays[binding.initializer]
            rows = kept[int(binding.sources[0].split(".")[2])]
            packed = np.concatenate([rows + i * self.intermediate_size for i in range(len(binding.sources))])
            return self.arrays[binding.initializer][packed]

        return make


def decoder_graph(cfg: DecoderConfig, ffn_width: int, quantize: str, floor: str) -> tuple[ir.Model, list[Binding]]:
    """The Optimum-flavour graph of one FFN width, initializers declared but not bound."""
    return build_decoder(cfg, ffn_width, "optimum", quantize, min_onnxruntime=floor)


def genai_graph(cfg: DecoderConfig, ffn_width: int, quantize: str, floor: str) -> ir.Model | None:
    """The GenAI-flavour graph of one FFN width, or None when GroupQueryAttention cannot run it."""
    if cfg.head_dim % 16:
        return None
    return build_decoder(cfg, ffn_width, "genai", quantize, min_onnxruntime=floor)[0]


def share_initializers(source: ir.Model, target: ir.Model) -> None:
    """Point every initializer of `target` at the same (already bound) data as `source`'s of the same name."""
    for name, value in target.graph.initializers.items():
        value.const_value = source.graph.initializers[name].const_value


@dataclass
class OnnxArtifacts:
    directory: Path
    models: dict[str, Path]  # variant name (and "dense") -> .onnx
    predictor: Path
    ideal_bytes: int  # shared weights once + every model's FFN tensors
    disk_bytes: int  # every decoder file on disk (graphs + data)
    quantize: str = "none"
    dynamic_inputs: list[dict] | None = None  # per FFN input of dynamic.onnx: where to gather it from
    genai: Path | None = None  # genai_config.json (dense; a model's overlay sets its file and KV buffer mode)
    clients: tuple[str, ...] = ("ifp_export.runtime", "onnxruntime-genai", "optimum")
    genai_models: dict[str, Path] = field(default_factory=dict)  # model name -> <name>.genai.onnx (og's graph)
    min_onnxruntime: str = DEFAULT_FLOOR  # every graph's floor: the oldest onnxruntime release it runs on

    @property
    def graphs(self) -> list[Path]:
        """Every .onnx file: decoders, their GenAI twins, the dynamic graph if any, the predictor."""
        dynamic = [self.directory / f"{DYNAMIC_NAME}.onnx"] if self.dynamic_inputs is not None else []
        return [*self.models.values(), *self.genai_models.values(), *dynamic, self.predictor]

    @property
    def dedup_ratio(self) -> float:
        return self.disk_bytes / self.ideal_bytes


def weight_bytes(model: CausalLM) -> tuple[int, int]:
    """(non-FFN bytes, FFN bytes) of a decoder, counting tied tensors once."""
    shared = ffn = 0
    for name, param in model.named_parameters(remove_duplicate=True):
        if name.rsplit(".", 2)[-2] in FFN_PARAMS:
            ffn += param.nbytes
        else:
            shared += param.nbytes
    return shared, ffn


def supported_clients(cfg: DecoderConfig) -> tuple[str, ...]:
    """Who can load these graphs. Optimum's ORTModelForCausalLM sizes the first (empty) KV cache with
    hidden_size // num_attention_heads for Llama-family types, so a model whose head_dim differs is out of its reach
    (optimum-onnx 0.1.0, modeling_decoder.py: embed_size_per_head); our runtime and onnxruntime-genai read head_dim.
    og 0.18 refuses a config whose eos_token_id is not a vocabulary id."""
    clients = ["ifp_export.runtime"]
    if cfg.eos_token_id is not None:  # og needs an EOS id in the vocabulary
        clients.append("onnxruntime-genai")
    if cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size:
        clients.append("optimum")
    return tuple(clients)


def hf_config(cfg: DecoderConfig) -> dict:
    return {**cfg.to_hf_dict(), "use_cache": True}


def emit(
    directory: Path,
    source: WeightSource,
    kept: dict[str, np.ndarray],
    predictor_dir: Path,
    variant_masks: torch.Tensor,
    quantize: str = "none",
    dynamic: bool = False,
    progress: Callable[[str, int], AbstractContextManager[Progress]] | None = None,
    generation: dict | None = None,
    min_onnxruntime: str = DEFAULT_FLOOR,
    digests: Digests | None = None,
) -> OnnxArtifacts:
    """Write every variant (`kept`: name -> [L, k] kept indices), the dense model and the predictor (read from
    `predictor_dir`, traced in a child process while the decoders are written) under `directory` (created, must be
    new). `generation`: the checkpoint's generation_config.json (its EOS ids join
    config.json's in what Optimum and og read). `min_onnxruntime`: the oldest onnxruntime release every graph must
    run on (it picks the decoder's ops: floor.py). `digests` gets the data files' sha256, taken as they are written."""
    if dynamic and quantize != "none":
        raise IFPError("--mode dynamic gathers fp32 FFN rows at run time", None, "drop --quantize or --mode dynamic")
    cfg = source.config
    directory.mkdir(parents=True)
    writer = DataWriter(directory)
    widths = {int(k.shape[1]) for k in kept.values()}
    if len(widths) != 1:
        raise IFPError(f"variants keep different FFN widths {sorted(widths)}", None, "use one k for every variant")
    width = widths.pop()
    pruned = decoder_graph(cfg, width, quantize, min_onnxruntime)
    dense = decoder_graph(cfg, cfg.intermediate_size, quantize, min_onnxruntime)
    genai_graphs = {
        width: genai_graph(cfg, width, quantize, min_onnxruntime),
        cfg.intermediate_size: genai_graph(cfg, cfg.intermediate_size, quantize, min_onnxruntime),
    }
    # the dense model first: its quantized gate/up rows are the variants' (DenseRows)
    plan = [(DENSE_NAME, None, dense, cfg.intermediate_size)]
    plan += [(name, idx, pruned, width) for name, idx in kept.items()]
    dense_rows = DenseRows(cfg.intermediate_size)
    paths: dict[str, Path] = {}
    genai_paths: dict[str, Path] = {}
    total = sum(len(bindings) for _, _, (_, bindings), _ in plan)
    with PredictorTrace(directory, predictor_dir, variant_masks) as predictor_trace:
        with (progress or no_progress)("ONNX: tensors written", total) as advance:
            for name, idx, (graph, bindings), graph_width in plan:
                bind_model(
                    graph, bindings, dense_rows.maker(source, idx), writer, f"{name}.onnx_data", advance, source.release
                )
                paths[name] = directory / f"{name}.onnx"
                ir.save(graph, paths[name])
                if (twin := genai_graphs[graph_width]) is not None:
                    share_initializers(graph, twin)
                    genai_paths[name] = directory / f"{name}{GENAI_SUFFIX}"
                    ir.save(twin, genai_paths[name])
        predictor_path = predictor_trace.wait()
    del dense_rows
    order = [*kept, DENSE_NAME]  # variants, then dense, as everywhere else
    paths = {n: paths[n] for n in order}
    genai_paths = {n: genai_paths[n] for n in order if n in genai_paths}
    dynamic_inputs = emit_dynamic(directory, *pruned, *dense) if dynamic else None

    if digests is not None:
        writer.record(digests)
        predictor_data = directory / f"{PREDICTOR_NAME}.onnx_data"  # written by the child, hashed while cached
        if predictor_data.is_file():
            digests.hash_soon(predictor_data)

    write_json(directory / "config.json", hf_config(cfg.replace(intermediate_size=next(iter(kept.values())).shape[1])))
    token_ids = generation_config(cfg, generation or {})
    write_json(directory / GENERATION_CONFIG_FILE, token_ids)
    genai = None
    if "eos_token_id" in token_ids:  # og refuses a config without an EOS id in the vocabulary
        genai_dense = genai_paths.get(DENSE_NAME, paths[DENSE_NAME])
        genai = write_genai_config(directory, genai_dense, cfg, not genai_paths, token_ids)
    decoder_files = [*paths.values(), *genai_paths.values(), *(directory / f for f in writer.sizes)]
    disk = sum(p.stat().st_size for p in decoder_files)
    return OnnxArtifacts(
        directory,
        paths,
        predictor_path,
        writer.ideal_bytes,
        disk,
        quantize,
        dynamic_inputs,
        genai,
        supported_clients(cfg),
        genai_paths,
        min_onnxruntime,
    )


def external_data_files(path: Path) -> list[str]:
    """The external data locations an .onnx file references, as written (relative to its directory)."""
    model = onnx.load(str(path), load_external_data=False)
    return sorted(
        {entry.value for init in model.graph.initializer for entry in init.external_data if entry.key == "location"}
    )


def stored_tensor_bytes(paths: list[Path]) -> int:
    """Bytes of the distinct external tensors the given graphs reference (each (file, offset) once)."""
    seen: dict[tuple[str, int], int] = {}
    for path in paths:
        for init in onnx.load(str(path), load_external_data=False).graph.initializer:
            info = {entry.key: entry.value for entry in init.external_data}
            if "location" in info:
                seen[(info["location"], int(info.get("offset", 0)))] = int(info["length"])
    return sum(seen.values())
