"""SoftTopK: a differentiable top-k mask for training, exact hard top-k at inference."""

from __future__ import annotations

import torch
from torch import nn


def hard_topk_mask(scores: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """0/1 mask of the k highest scores along the last dim; ties go to the lower index.

    `k` is an int or a tensor broadcastable to `scores.shape[:-1]` (e.g. one k per layer).
    """
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1]).expand_as(order))
    k = torch.as_tensor(k, device=scores.device)
    return (ranks < k[..., None]).to(scores.dtype)


class SoftTopK(nn.Module):
    """Top-k mask over the last dim with k active entries (per row) in expectation while training.

    Training forward is straight-through: the hard top-k mask goes forward, gradients flow through
    `sigmoid((s - t) / temperature)`, with the threshold `t` found by bisection so the soft mask sums to k.
    In eval mode it is exactly `hard_topk_mask`.
    """

    def __init__(self, k: list[int] | int, temperature: float = 0.05, iterations: int = 60) -> None:
        super().__init__()
        self.register_buffer("k", torch.as_tensor(k, dtype=torch.long), persistent=False)
        self.temperature = temperature
        self.iterations = iterations

    def soft(self, scores: torch.Tensor) -> torch.Tensor:
        """The differentiable mask: entries in (0, 1), each row summing to k (to ~1e-6)."""
        s = scores.double()
        k = self.k.to(s.dtype).expand(s.shape[:-1])
        tau = self.temperature
        with torch.no_grad():
            lo = s.amin(-1) - 40 * tau
            hi = s.amax(-1) + 40 * tau
            for _ in range(self.iterations):
                mid = (lo + hi) / 2
                above = torch.sigmoid((s - mid[..., None]) / tau).sum(-1) > k
                lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
            threshold = (lo + hi) / 2
        return torch.sigmoid((s - threshold[..., None]) / tau).to(scores.dtype)

    def hard(self, scores: torch.Tensor) -> torch.Tensor:
        return hard_topk_mask(scores, self.k)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.hard(scores)
        soft = self.soft(scores)
        # (soft - soft.detach()) is exactly 0, so the forward value is exactly the hard mask ((hard + soft) - soft
        # is not: it rounds to 1 +- 1 ulp); the gradient is the soft mask's.
        return self.hard(scores.detach()) + (soft - soft.detach())
