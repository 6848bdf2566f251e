"""SoftTopK: exact hard top-k at inference, a soft mask summing to k, straight-through gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ifp_export.model.softtopk import SoftTopK, hard_topk_mask


def random_scores(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    """Scores that are distinct with certainty (a random permutation plus sub-unit noise)."""
    gen = torch.Generator().manual_seed(seed)
    d = shape[-1]
    ranks = torch.stack([torch.randperm(d, generator=gen) for _ in range(int(torch.tensor(shape[:-1]).prod()))])
    noise = 0.5 * torch.rand(ranks.shape, generator=gen)
    return (scale * (ranks.float() + noise) / d).reshape(shape)


def topk_reference(scores: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """[B, L, d] 0/1 mask from torch.topk, one k per layer."""
    mask = torch.zeros_like(scores)
    for layer, k in enumerate(ks):
        index = scores[:, layer].topk(k, dim=-1).indices
        mask[:, layer].scatter_(-1, index, 1.0)
    return mask


@pytest.mark.parametrize("shape", [(1, 1, 8), (3, 4, 32), (2, 3, 257)])
def test_hard_mask_is_the_true_topk_per_layer(shape: tuple[int, int, int]) -> None:
    b, layers, d = shape
    ks = [(3 * layer + 1) % d or 1 for layer in range(layers)]
    scores = random_scores(shape, seed=d)
    expected = topk_reference(scores, ks)
    assert torch.equal(hard_topk_mask(scores, torch.tensor(ks)), expected)
    assert torch.equal(SoftTopK(ks).eval()(scores), expected)
    assert expected.sum(-1).tolist() == [ks] * b


def test_hard_mask_scalar_k_and_edges() -> None:
    scores = random_scores((2, 3, 10), seed=0)
    assert torch.equal(hard_topk_mask(scores, 4), topk_reference(scores, [4, 4, 4]))
    assert torch.equal(hard_topk_mask(scores, 0), torch.zeros_like(scores))
    assert torch.equal(hard_topk_mask(scores, 10), torch.ones_like(scores))


def test_hard_mask_ties_go_to_the_lower_index() -> None:
    scores = torch.tensor([[0.5, 1.0, 1.0, 1.0, 1.0, 0.0]])
    assert hard_topk_mask(scores, 2).tolist() == [[0.0, 1.0, 1.0, 0.0, 0.0, 0.0]]
    assert hard_topk_mask(torch.zeros(1, 5), 3).tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]]


@pytest.mark.parametrize("temperature", [0.005, 0.05, 0.5, 5.0])
@pytest.mark.parametrize("shape", [(1, 2, 16), (4, 3, 64), (2, 1, 1000)])
def test_soft_mask_sums_to_k(shape: tuple[int, int, int], temperature: float) -> None:
    ks = [max(1, shape[-1] // (layer + 3)) for layer in range(shape[1])]
    module = SoftTopK(ks, temperature=temperature)
    soft = module.soft(random_scores(shape, seed=1, scale=4.0))
    assert soft.shape == shape
    assert ((soft >= 0) & (soft <= 1)).all()
    sums = soft.sum(-1)
    target = torch.tensor(ks, dtype=sums.dtype).expand_as(sums)
    assert (sums - target).abs().max() <= 1e-3


def test_soft_mask_approaches_hard_mask_at_low_temperature() -> None:
    scores = random_scores((2, 2, 40), seed=2, scale=40.0)  # neighbouring scores >= ~0.5 apart
    module = SoftTopK([5, 11], temperature=0.01)
    assert torch.allclose(module.soft(scores), module.hard(scores), atol=1e-6)


def test_train_forward_is_hard_mask_with_soft_gradients() -> None:
    ks = [3, 7, 12]
    scores = random_scores((2, 3, 24), seed=3).requires_grad_(True)
    weights = torch.randn(2, 3, 24, generator=torch.Generator().manual_seed(4))
    module = SoftTopK(ks, temperature=0.1).train()

    mask = module(scores)
    assert torch.equal(mask, hard_topk_mask(scores.detach(), torch.tensor(ks)))
    (mask * weights).sum().backward()
    grad = scores.grad.clone()
    assert grad.abs().sum() > 0
    assert torch.isfinite(grad).all()

    # straight-through: the gradient is exactly that of the soft mask
    scores.grad = None
    (module.soft(scores) * weights).sum().backward()
    assert torch.allclose(grad, scores.grad, atol=1e-7)


def test_eval_forward_is_hard_mask_without_graph() -> None:
    scores = random_scores((2, 2, 16), seed=5).requires_grad_(True)
    module = SoftTopK([4, 9]).eval()
    mask = module(scores)
    assert torch.equal(mask, module.hard(scores.detach()))
    assert not mask.requires_grad


@settings(max_examples=30, deadline=None, database=None)
@given(
    batch=st.integers(1, 3),
    layers=st.integers(1, 4),
    d=st.integers(2, 80),
    k_fractions=st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4),
    temperature=st.floats(0.01, 3.0),
    scale=st.sampled_from([0.1, 1.0, 10.0]),
    seed=st.integers(0, 2**16),
)
def test_topk_properties(
    batch: int, layers: int, d: int, k_fractions: list[float], temperature: float, scale: float, seed: int
) -> None:
    ks = [round(f * d) for f in k_fractions[:layers]]  # includes the edges k = 0 and k = d
    scores = random_scores((batch, layers, d), seed=seed, scale=scale)
    module = SoftTopK(ks, temperature=temperature)

    hard = module.eval()(scores)
    assert torch.equal(hard, topk_reference(scores, ks))

    soft = module.soft(scores)
    sums = soft.sum(-1)
    assert (sums - torch.tensor(ks, dtype=sums.dtype)).abs().max() <= 1e-3

    trained = module.train()(scores.clone().requires_grad_(True))
    assert torch.equal(trained.detach(), hard)
