"""Where the targets read weights from: one tensor at a time, by Hugging Face name, as float32.

Every target builds its graphs from the config and binds weights tensor by tensor through a `WeightSource`, so no
pass holds a second full copy of the model. A variant is its kept FFN neuron indices ([L, k]) until it is written:
`ffn_slice` gathers one layer's projection for it at write time.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

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

    def get(self, name: str) -> np.ndarray: ...

    def release(self) -> None:
        """Drop whatever the source keeps resident (memory-mapped pages) between tensors; a no-op if nothing."""
        ...


def ffn_slice(source: WeightSource, layer: int, proj: str, kept: np.ndarray | None) -> np.ndarray:
    """One layer's FFN projection for a model keeping `kept` neurons (ascending; None: dense), float32, [out, in].

    Neuron j is row j of gate_proj/up_proj and column j of down_proj.
    """
    weight = source.get(ffn_name(layer, proj))
    if kept is None:
        return weight
    return np.ascontiguousarray(np.take(weight, kept, axis=1 if proj == "down_proj" else 0))


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

    def get(self, name: str) -> np.ndarray:
        return self._state[name].detach().to(torch.float32).numpy()

    def release(self) -> None:
        return None
