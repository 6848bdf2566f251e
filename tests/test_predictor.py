"""The sparsity predictor: shapes, padding invariance, save/load round trip, loader errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_ifp_error, edit_config, left_padded_batch
from safetensors.torch import load_file, save_file

from ifp_export.generate import left_pad
from ifp_export.model.predictor import PredictorConfig, SparsityPredictor, load_predictor, save_predictor

CONFIG = PredictorConfig(
    vocab_size=50,
    target_layers=3,
    target_intermediate_size=24,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=48,
    head_hidden_size=40,
    max_length=64,
)


@pytest.fixture(scope="module")
def predictor() -> SparsityPredictor:
    torch.manual_seed(0)
    model = SparsityPredictor(CONFIG).eval()
    with torch.no_grad():  # non-trivial norms so every parameter matters
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
    return model


def right_pad(sequences: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


@pytest.mark.parametrize(("batch", "length"), [(1, 1), (3, 9), (2, 64)])
def test_output_shape(predictor: SparsityPredictor, batch: int, length: int) -> None:
    ids, mask, _ = left_padded_batch([length] * batch, CONFIG.vocab_size)
    with torch.no_grad():
        scores = predictor(ids, mask)
    assert scores.shape == (batch, CONFIG.target_layers, CONFIG.target_intermediate_size)
    assert torch.isfinite(scores).all()


def test_padding_invariance(predictor: SparsityPredictor) -> None:
    prompt = [7, 3, 19, 41, 8]
    others = [[11, 12, 13, 14, 15, 16, 17, 18, 19], [4, 5]]
    with torch.no_grad():
        alone = predictor(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long))[0]
        right_ids, right_mask = right_pad([prompt, *others], width=12)
        right = predictor(right_ids, right_mask)
        left_ids, left_mask = left_pad([*others, prompt])
        left = predictor(left_ids, left_mask)
        # junk in the padded slots must not matter either
        noisy_ids = right_ids.masked_fill(right_mask == 0, 49)
        noisy = predictor(noisy_ids, right_mask)
    assert (right[0] - alone).abs().max() <= 1e-5
    assert (left[-1] - alone).abs().max() <= 1e-5
    assert (noisy - right).abs().max() <= 1e-5
    assert (right[1] - alone).abs().max() > 1e-3  # different prompts score differently


def test_scores_depend_on_token_order(predictor: SparsityPredictor) -> None:
    """The encoder has positions (RoPE): a permuted prompt is a different prompt."""
    with torch.no_grad():
        scores = predictor(torch.tensor([[5, 6, 7, 8], [8, 7, 6, 5]]), torch.ones(2, 4, dtype=torch.long))
    assert (scores[0] - scores[1]).abs().max() > 1e-4


def test_save_load_round_trip(predictor: SparsityPredictor, tmp_path: Path) -> None:
    save_predictor(predictor, tmp_path)
    loaded = load_predictor(tmp_path)
    assert loaded.config == CONFIG
    assert not loaded.training
    original = predictor.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    ids, mask = right_pad([[1, 2, 3], [9, 8, 7, 6, 5]], width=6)
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask), predictor(ids, mask))


@pytest.fixture
def saved(predictor: SparsityPredictor, tmp_path: Path) -> Path:
    save_predictor(predictor, tmp_path)
    return tmp_path


def predictor_error(directory: Path, *expected: str) -> None:
    assert_one_line_ifp_error(lambda: load_predictor(directory), *expected)


def test_wrong_tensor_shape(saved: Path) -> None:
    path = saved / "model.safetensors"
    tensors = load_file(path)
    name = "head.2.weight"
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, path)
    predictor_error(saved, str(path), name, "shape")


def test_config_disagreeing_with_weights(saved: Path) -> None:
    edit_config(saved, target_intermediate_size=CONFIG.target_intermediate_size + 1)
    predictor_error(saved, str(saved / "model.safetensors"), "head.2")


def test_missing_tensor(saved: Path) -> None:
    path = saved / "model.safetensors"
    tensors = load_file(path)
    del tensors["encoder.norm.weight"]
    save_file(tensors, path)
    predictor_error(saved, str(path), "encoder.norm.weight")


def test_nan_weight(saved: Path) -> None:
    path = saved / "model.safetensors"
    tensors = load_file(path)
    tensors["head.0.bias"][0] = float("nan")
    save_file(tensors, path)
    predictor_error(saved, str(path), "head.0.bias", "NaN")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"format": "something-else"}, "format"),
        ({"format": None}, "format"),
        ({"hidden_size": "wide"}, "bad predictor config"),
        ({"num_heads": 5}, "divisible"),
        ({"num_layers": 0}, "must be in 1.."),
        ({"head_hidden_size": 2**63}, "must be in 1.."),  # found by the fuzzer: torch's shapes overflowed
        ({"target_layers": 2**23, "target_intermediate_size": 2**23}, "target_layers x target_intermediate_size"),
    ],
)
def test_bad_config(saved: Path, changes: dict, expected: str) -> None:
    edit_config(saved, **changes)
    predictor_error(saved, str(saved / "config.json"), expected)


def test_config_not_json(saved: Path) -> None:
    (saved / "config.json").write_text("format: ifp-sparsity-predictor")
    predictor_error(saved, str(saved / "config.json"), "not valid JSON")


def test_config_is_a_list(saved: Path) -> None:
    (saved / "config.json").write_text("[]")
    predictor_error(saved, str(saved / "config.json"), "not a predictor config")


def test_pickle_weights_refused(saved: Path) -> None:
    (saved / "model.safetensors").rename(saved / "model.pt")
    predictor_error(saved, "model.pt", "never loaded")
