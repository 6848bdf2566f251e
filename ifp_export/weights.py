"""Where the targets read weights from: one tensor at a time, by Hugging Face name, as float32.

Every target builds its graphs from the config and binds weights tensor by tensor through a `WeightSource`, so no
pass holds a second full copy of the model. A variant is its kept FFN neuron indices ([L, k]) until it is written:
`ffn_slice` gathers one layer's projection for it at write time (`kept_neurons`).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ifp_export.errors import IFPError
from ifp_export.fsutil import open_safetensors, read_json
from ifp_export.model.config import DecoderConfig
from ifp_export.model.decoder import CausalLM

FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def ffn_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def is_ffn(name: str) -> bool:
    return name.rsplit(".", 2)[-2] in FFN_PROJECTIONS


class WeightSource(Protocol):
    """Read-only access to a decoder's weights by HF name (`model.layers.0.self_attn.q_proj.weight`, ...).

    `names()` lists every stored tensor once (no `lm_head.weight` when the embeddings are tied); `get` returns a
    float32 array of one tensor (upcast from bf16/fp16 if the source is), never the whole model.
    """

    config: DecoderConfig

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> np.ndarray: ...

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor as stored (its dtype), without a copy: for reading part of it before any upcast."""
        ...

    def release(self) -> None:
        """Drop whatever the source keeps resident (memory-mapped pages) between tensors; a no-op if nothing."""
        ...

    def streaming(self, *models: nn.Module) -> AbstractContextManager[None]:
        """A block in which forward passes of `models` (built over this source) keep about one layer resident."""
        ...


def ffn_slice(source: WeightSource, layer: int, proj: str, kept: np.ndarray | None) -> np.ndarray:
    """One layer's FFN projection for a model keeping `kept` neurons (ascending; None: dense), float32, [out, in].

    Neuron j is row j of gate_proj/up_proj and column j of down_proj. A variant's neurons are gathered in the stored
    dtype and only they are upcast (at 8B bf16 a variant keeps a quarter of each projection).
    """
    name = ffn_name(layer, proj)
    if kept is None:
        return source.get(name)
    return kept_neurons(source.tensor(name), kept, neuron_axis(proj)).float().numpy()


def neuron_axis(name: str) -> int:
    """The axis of an FFN projection (its name or a tensor name ending in it) that runs over the neurons."""
    return 1 if name.removesuffix(".weight").endswith("down_proj") else 0


RAW_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # element size -> an integer dtype numpy can hold


def kept_neurons(weight: torch.Tensor, kept: np.ndarray | torch.Tensor, axis: int) -> torch.Tensor:
    """`weight.index_select(axis, kept)` in its own dtype. Columns (axis 1, down_proj) are gathered by `np.take` on
    the raw bits, each half of the rows on its own thread (numpy releases the GIL; a gather from the mapped
    checkpoint also waits on its page faults): torch's index_select along dim 1 is ~5x slower (bf16
    [4096, 14336], torch 2.13 CPU), which at 8B cost tens of seconds in each pass that folds variants."""
    index = np.asarray(kept, dtype=np.int64)
    if axis == 0:
        return weight.index_select(0, torch.from_numpy(index))
    bits = weight.detach().view(RAW_BITS[weight.element_size()]).numpy()  # bf16 has no numpy dtype
    if len(index) and not 0 <= index.min() <= index.max() < bits.shape[1]:
        raise IndexError(f"kept neurons {index.min()}..{index.max()} outside 0..{bits.shape[1] - 1}")
    out = np.empty((bits.shape[0], len(index)), bits.dtype)
    # "clip": the indices are checked above, and "raise" would gather into a buffer, then copy it to `out`
    take = lambda rows: np.take(bits[rows], index, axis=1, out=out[rows], mode="clip")  # noqa: E731
    half = (bits.shape[0] + 1) // 2
    list(gather_pool().map(take, (np.s_[:half], np.s_[half:])))
    return torch.from_numpy(out).view(weight.dtype)


@functools.cache
def gather_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(2, thread_name_prefix="gather")


def as_float32(rows: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Rows of a weight as a float32 tensor to read (a view of float32 data, else an upcast copy)."""
    if isinstance(rows, torch.Tensor):
        return rows.float()
    with warnings.catch_warnings():  # a read-only mapped weight: torch only reads it here
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(rows, np.float32))


class ModuleWeights:
    """A `WeightSource` over an in-memory `CausalLM` (tests and small models; tensors are shared, not copied)."""

    def __init__(self, model: CausalLM) -> None:
        self.config = model.config
        state = model.state_dict()
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        self._state = state

    def names(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def get(self, name: str) -> np.ndarray:
        return self.tensor(name).to(torch.float32).numpy()

    def tensor(self, name: str) -> torch.Tensor:
        """The module's own tensor (no copy, its dtype)."""
        return self._state[name].detach()

    def release(self) -> None:
        return None

    def streaming(self, *models: nn.Module) -> AbstractContextManager[None]:
        return nullcontext()  # the tensors are in memory already


INDEX_FILE, SINGLE_FILE = "model.safetensors.index.json", "model.safetensors"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # non-persistent buffers some old checkpoints still carry
# safetensors dtype -> (torch dtype, numpy dtype of the raw bytes); bf16 has no numpy dtype, its bits are uint16
FLOAT_DTYPES = {
    "F32": (torch.float32, np.dtype("<f4")),
    "F16": (torch.float16, np.dtype("<f2")),
    "BF16": (torch.bfloat16, np.dtype("<u2")),
}
FINITE_CHUNK = 1 << 22  # elements checked at once: the finiteness check never allocates a tensor-sized mask


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lives: its shard's mapping, byte offset in it, safetensors dtype and shape."""

    shard: int
    offset: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def itemsize(self) -> int:
        return FLOAT_DTYPES[self.dtype][1].itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


class SafetensorsWeights:
    """A `WeightSource` over a Hugging Face directory's `model.safetensors` or shards, memory-mapped.

    Nothing is read until asked: `get` upcasts ONE tensor to float32, `tensor` is a zero-copy torch view in the
    stored dtype (what the PyTorch reference runs on), `raw` the stored bytes (what a streamed copy writes).
    Pages touched stay file-backed (private copy-on-write mapping, never written), so `release` can drop them.
    """

    def __init__(self, directory: Path, config: DecoderConfig) -> None:
        self.config = config
        self.directory = directory
        self.path = weights_file(directory)
        self._maps: list[mmap.mmap] = []
        self._bases: list[int] = []  # the mappings' addresses, to find which one a tensor views
        self._tensors: dict[str, StoredTensor] = {}
        shards, weight_map = shard_files(directory)
        for shard in shards:
            self._map_shard(shard)
        for name, shard in (weight_map or {}).items():
            stored = self._tensors.get(name)
            if stored is None or shards[stored.shard].name != Path(shard).name:
                raise IFPError(
                    f"the index maps {name!r} to {shard!r}, which does not hold it",
                    self.path,
                    "re-save with save_pretrained",
                )
        self._tensors = {
            n: t
            for n, t in sorted(self._tensors.items())
            if not n.endswith(IGNORED_SUFFIXES) and not (config.tie_word_embeddings and n == "lm_head.weight")
        }

    def _map_shard(self, path: Path) -> None:
        header = open_safetensors(path)  # validates the header and offsets exactly as safetensors does
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as err:
            raise IFPError(f"cannot open weights file ({err.strerror})", path, "use a plain file") from None
        try:
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)
        start = 8 + int.from_bytes(mapped[:8], "little")
        self._maps.append(mapped)
        self._bases.append(ctypes.addressof(ctypes.c_char.from_buffer(mapped)))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in FLOAT_DTYPES:
                raise IFPError(
                    f"tensor {name!r} is stored as {info['dtype']}; ifp-export reads F32, F16 and BF16 weights",
                    path,
                    "save the model in float32, float16 or bfloat16",
                )
            if name in self._tensors:
                raise IFPError(f"tensor {name!r} is stored in two shards", self.path, "re-save with save_pretrained")
            shape = tuple(int(d) for d in info["shape"])
            self._tensors[name] = StoredTensor(
                len(self._maps) - 1, start + info["data_offsets"][0], info["dtype"], shape
            )

    def names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> StoredTensor:
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name].shape

    @property
    def nbytes(self) -> int:
        """Bytes of every weight tensor as stored (the checkpoint's weight bytes)."""
        return sum(t.nbytes for t in self._tensors.values())

    def raw(self, name: str) -> np.ndarray:
        """The stored elements, zero-copy, read-only (bf16 as its uint16 bits)."""
        t = self._tensors[name]
        array = np.frombuffer(self._maps[t.shard], FLOAT_DTYPES[t.dtype][1], t.numel, t.offset).reshape(t.shape)
        array.flags.writeable = False
        return array

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy torch view in the stored dtype (the mapping is private: writes never reach the file)."""
        t = self._tensors[name]
        if t.numel == 0:
            return torch.empty(t.shape, dtype=FLOAT_DTYPES[t.dtype][0])
        flat = torch.frombuffer(self._maps[t.shard], dtype=FLOAT_DTYPES[t.dtype][0], count=t.numel, offset=t.offset)
        return flat.view(t.shape)

    def get(self, name: str) -> np.ndarray:
        """One tensor as float32: a read-only view of an F32 tensor, an upcast copy of an F16/BF16 one."""
        if self._tensors[name].dtype == "F32":
            return self.raw(name)
        return self.tensor(name).float().numpy()  # exact; torch's cast runs on both cores (numpy's on one)

    def check_finite(self) -> None:
        """Refuse NaN/Inf tensor by tensor, in chunks, then drop the pages read."""
        for name in self._tensors:
            flat = self.tensor(name).view(-1)
            for start in range(0, flat.numel(), FINITE_CHUNK):
                if not bool(torch.isfinite(flat[start : start + FINITE_CHUNK]).all()):
                    raise IFPError(
                        f"tensor {name!r} holds NaN or Inf values", self.path, "use a checkpoint with finite weights"
                    )
            self.release()

    def release(self) -> None:
        for mapped in self._maps:
            mapped.madvise(mmap.MADV_DONTNEED)

    def release_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        """Drop the resident pages under these tensors if they are views of this source's mapping (others are
        ignored). Safe for neighbouring bytes too: nothing ever writes the mapping, so a dropped page is re-read
        from the file when touched again."""
        for tensor in tensors:
            start = tensor.data_ptr()
            for base, mapped in zip(self._bases, self._maps, strict=True):
                if base <= start < base + len(mapped):
                    offset = (start - base) // mmap.PAGESIZE * mmap.PAGESIZE
                    end = min(len(mapped), start - base + tensor.numel() * tensor.element_size())
                    mapped.madvise(mmap.MADV_DONTNEED, offset, end - offset)

    @contextmanager
    def streaming(self, *models: nn.Module) -> Iterator[None]:
        """Within this block, each decoder layer (and embeddings, final norm, lm_head) of `models` drops its mapped
        pages once it has run, so a forward pass over the whole model keeps about one layer resident instead of
        every weight (at the price of re-reading pages from the page cache on the next pass)."""
        handles = [
            module.register_forward_hook(lambda module, args, output: self.release_tensors(module.parameters()))
            for model in models
            for module in (model.model.embed_tokens, *model.model.layers, model.model.norm, model.lm_head)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def weights_file(directory: Path) -> Path:
    """The file errors about the weights should name: the shard index if there is one."""
    index = directory / INDEX_FILE
    return index if index.is_file() else directory / SINGLE_FILE


def check_weight_map(raw: Any, path: str | Path) -> dict[str, str]:
    """The `weight_map` of a parsed `model.safetensors.index.json`: tensor name -> shard file name (strings only)."""
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict):
        raise IFPError("safetensors index has no weight_map object", path, "re-save with save_pretrained")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise IFPError(
                f"weight_map entry {name!r} is {shard!r}, not a shard file name", path, "re-save with save_pretrained"
            )
    return weight_map


def shard_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """`model.safetensors`, or the shards a `model.safetensors.index.json` names (plain files beside it) and its
    weight_map."""
    index = directory / INDEX_FILE
    if not index.is_file():
        return [directory / SINGLE_FILE], None
    weight_map = check_weight_map(read_json(index, "safetensors index"), index)
    root = directory.resolve()
    shards = []
    for shard in sorted(set(weight_map.values())):
        path = directory / shard
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise IFPError(f"shard {shard!r} is outside the model directory", index, "fix the index")
        if path.is_symlink():
            raise IFPError(f"shard {shard!r} is a symbolic link", index, "copy the real file into the directory")
        if path.resolve().parent != root:
            raise IFPError(f"shard {shard!r} is not a file beside the index", index, "keep every shard beside it")
        shards.append(path)
    return shards, weight_map
