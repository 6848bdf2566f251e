"""`load_decoder` refuses bad checkpoints with one-line IFPErrors naming the offending file."""

from __future__ import annotations

import builtins
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_ifp_error, edit_config, make_hf_model, save_hf_model
from safetensors.torch import load_file, save_file

from ifp_export.errors import IFPError
from ifp_export.model.hf_io import load_decoder

WEIGHT = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_model(make_hf_model("llama"), tmp_path_factory.mktemp("pristine"))


@pytest.fixture
def model_dir(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of a valid checkpoint, to be broken by the test."""
    return Path(shutil.copytree(pristine, tmp_path / "model"))


def load_error(directory: Path, *expected: str) -> IFPError:
    return assert_one_line_ifp_error(lambda: load_decoder(directory), *expected)


class _CreateFileOnUnpickle:
    """Unpickling this object opens (creates) `path`: a stand-in for arbitrary code in a pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (builtins.open, (str(self.path), "w"))


def test_pristine_checkpoint_loads(model_dir: Path) -> None:
    assert load_decoder(model_dir).config.model_type == "llama"


def test_missing_directory(tmp_path: Path) -> None:
    load_error(tmp_path / "no-such-model", "no-such-model", "not found")


def test_missing_config(model_dir: Path) -> None:
    (model_dir / "config.json").unlink()
    load_error(model_dir, str(model_dir / "config.json"), "not found")


def test_invalid_json_config(model_dir: Path) -> None:
    (model_dir / "config.json").write_text('{"model_type": "llama",')
    load_error(model_dir, str(model_dir / "config.json"), "not valid JSON")


def test_config_not_an_object(model_dir: Path) -> None:
    (model_dir / "config.json").write_text("[1, 2]")
    load_error(model_dir, str(model_dir / "config.json"), "JSON object")


def test_unsupported_model_type(model_dir: Path) -> None:
    edit_config(model_dir, model_type="gpt2")
    load_error(model_dir, str(model_dir / "config.json"), "gpt2")


def test_missing_config_field(model_dir: Path) -> None:
    edit_config(model_dir, hidden_size=None)
    load_error(model_dir, str(model_dir / "config.json"), "hidden_size")


def test_only_pickle_weights_are_never_unpickled(model_dir: Path, tmp_path: Path) -> None:
    probe = tmp_path / "probe-created"
    pickle.loads(pickle.dumps(_CreateFileOnUnpickle(probe)))
    assert probe.exists(), "the payload must be live, or this test proves nothing"

    marker = tmp_path / "unpickled-marker"
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_CreateFileOnUnpickle(marker)))
    load_error(model_dir, "pytorch_model.bin", str(model_dir), "never loaded")
    assert not marker.exists()


def test_no_weights_at_all(model_dir: Path) -> None:
    (model_dir / "model.safetensors").unlink()
    load_error(model_dir, str(model_dir / "model.safetensors"), "not found")


def test_truncated_safetensors(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    load_error(model_dir, str(path), "truncated")


def test_garbage_safetensors_header(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    path.write_bytes(b"\xff" * 64)
    load_error(model_dir, str(path), "corrupt")


def rewrite_weight(directory: Path, name: str, value: torch.Tensor | None) -> None:
    """Replace (or with None, delete) one tensor of `directory/model.safetensors`."""
    path = directory / "model.safetensors"
    tensors = load_file(path)
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    save_file(tensors, path, metadata={"format": "pt"})


def test_wrong_tensor_shape(model_dir: Path) -> None:
    up = load_file(model_dir / "model.safetensors")[WEIGHT]
    rewrite_weight(model_dir, WEIGHT, up[:-1].clone())
    load_error(model_dir, str(model_dir / "model.safetensors"), WEIGHT, "shape")


def test_nan_weight(model_dir: Path) -> None:
    up = load_file(model_dir / "model.safetensors")[WEIGHT].clone()
    up[0, 0] = float("nan")
    rewrite_weight(model_dir, WEIGHT, up)
    load_error(model_dir, str(model_dir / "model.safetensors"), WEIGHT, "NaN")


def test_missing_tensor(model_dir: Path) -> None:
    rewrite_weight(model_dir, WEIGHT, None)
    load_error(model_dir, str(model_dir / "model.safetensors"), WEIGHT, "missing")


def test_heads_not_multiple_of_kv_heads(model_dir: Path) -> None:
    edit_config(model_dir, num_key_value_heads=3)
    load_error(model_dir, str(model_dir / "config.json"), "num_key_value_heads")


def test_unsupported_rope_type(model_dir: Path) -> None:
    edit_config(model_dir, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    load_error(model_dir, str(model_dir / "config.json"), "yarn")


def test_unsupported_activation(model_dir: Path) -> None:
    edit_config(model_dir, hidden_act="gelu")
    load_error(model_dir, str(model_dir / "config.json"), "gelu")


def test_qwen2_mixed_sliding_layers_refused(tmp_path: Path) -> None:
    """HF slides only layers >= max_window_layers; a mix cannot be run exactly by our single-window decoder."""
    model = make_hf_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    save_hf_model(model, tmp_path)
    load_error(tmp_path, str(tmp_path / "config.json"), "sliding")


def test_shard_outside_directory_refused(model_dir: Path, tmp_path: Path) -> None:
    shutil.move(model_dir / "model.safetensors", tmp_path / "outside.safetensors")
    index = model_dir / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"%s": "../outside.safetensors"}}' % WEIGHT)  # noqa: UP031
    load_error(model_dir, str(index), "outside")


@pytest.fixture
def sharded_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "sharded"
    make_hf_model("llama").save_pretrained(directory, safe_serialization=True, max_shard_size="20KB")
    assert len(list(directory.glob("model-*.safetensors"))) > 1
    return directory


def test_sharded_checkpoint_loads_like_single_file(sharded_dir: Path, pristine: Path) -> None:
    single, sharded = load_decoder(pristine).state_dict(), load_decoder(sharded_dir).state_dict()
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[name], sharded[name]) for name in single)


def test_sharded_nan_weight_names_the_index(sharded_dir: Path) -> None:
    shard = next(p for p in sorted(sharded_dir.glob("model-*.safetensors")) if WEIGHT in load_file(p))
    tensors = load_file(shard)
    tensors[WEIGHT][0, 0] = float("inf")
    save_file(tensors, shard, metadata={"format": "pt"})
    load_error(sharded_dir, str(sharded_dir / "model.safetensors.index.json"), WEIGHT, "Inf")


def test_shard_index_without_weight_map(sharded_dir: Path) -> None:
    (sharded_dir / "model.safetensors.index.json").write_text("[]")
    load_error(sharded_dir, str(sharded_dir / "model.safetensors.index.json"), "weight_map")
