"""The sample's training helpers: the task mix and the diversity term that keeps tasks on different neurons."""

from __future__ import annotations

import random
from collections import Counter

import torch

from ifp_export.samples import corpus
from ifp_export.samples.train import batches, task_contrast


def masks_of(rows: list[list[int]], d: int = 8) -> torch.Tensor:
    """[N, 1, d] 0/1 masks keeping the listed neurons."""
    out = torch.zeros(len(rows), 1, d)
    for i, kept in enumerate(rows):
        out[i, 0, kept] = 1.0
    return out


def test_task_contrast_rewards_disjoint_tasks_and_punishes_shared_neurons() -> None:
    task_ids = torch.tensor([0, 0, 1, 1])
    disjoint = masks_of([[0, 1], [0, 1], [2, 3], [2, 3]])
    shared = masks_of([[0, 1], [0, 1], [0, 1], [0, 1]])
    half = masks_of([[0, 1], [0, 1], [1, 2], [1, 2]])
    values = []
    for masks in (disjoint, half, shared):
        running = torch.zeros(2, 1, 8)
        values.append(float(task_contrast(masks, task_ids, running, momentum=0.0)))
    assert values == [-1.0, -0.5, 0.0]


def test_task_contrast_gradient_moves_a_prompt_off_the_other_tasks_neurons() -> None:
    running = torch.zeros(2, 1, 8)
    task_contrast(masks_of([[0, 1], [2, 3]]), torch.tensor([0, 1]), running, momentum=0.0)
    masks = masks_of([[0, 2]]).requires_grad_(True)  # a task-0 prompt keeping one neuron of each task
    task_contrast(masks, torch.tensor([0]), running.clone(), momentum=1.0).backward()
    grad = masks.grad[0, 0]
    assert grad[2] > 0 > grad[0]  # descent drops task 1's neuron 2 and keeps task 0's neuron 0


def test_batches_follow_the_mix_and_skip_reserved_prompts() -> None:
    tokenizer = corpus.build_tokenizer()
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    reserved = {f"add {a}+{b}=" for a in range(10) for b in range(10)}
    data = batches(random.Random(0), reserved, vocab, batch_size=10, mix=[2, 1, 1, 1], group=5)
    tasks, prompts = Counter(), set()
    for _ in range(5):
        batch = next(data)
        tasks.update(corpus.TASKS[int(t)] for t in batch.task_ids)
        prompts.update(tokenizer.decode(row.tolist()) for row in batch.prompt_ids)
    assert tasks == {"add": 20, "reverse": 10, "sort": 10, "brackets": 10}
    assert len(prompts) > 1 and all(p.endswith("=") for p in prompts)
    assert not prompts & reserved
