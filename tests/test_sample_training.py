"""The sample's training helpers: the task mix, the distillation target and the diversity term that keep tasks on
different neurons."""

from __future__ import annotations

import random
from collections import Counter

import torch

from ifp_export.model.softtopk import hard_topk_mask
from ifp_export.samples import corpus
from ifp_export.samples.train import batches, distillation_target, task_contrast


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


def test_distillation_target_moves_a_task_off_the_neurons_other_tasks_use() -> None:
    # Two tasks, 6 neurons, k = 2. Task 0's prompts lean on neurons 0, 1 and 2; task 1's on neuron 0 and 3-5.
    importance = torch.tensor([[[4.0, 3.0, 2.9, 0.1, 0.1, 0.1]], [[4.0, 0.1, 0.1, 3.0, 2.0, 2.0]]])
    task_ids = torch.tensor([0, 1])
    plain = hard_topk_mask(distillation_target(importance, task_ids, torch.zeros(2, 1, 6), 0.0, 0.0), 2)
    assert plain[0, 0].tolist() == [1, 1, 0, 0, 0, 0]  # both tasks keep the shared neuron 0
    assert plain[1, 0].tolist() == [1, 0, 0, 1, 0, 0]
    apart = hard_topk_mask(distillation_target(importance, task_ids, torch.zeros(2, 1, 6), 1.0, 0.0, 0.0), 2)
    assert apart[0, 0].tolist() == [0, 1, 1, 0, 0, 0]  # neuron 0 goes: task 1 needs it as much
    assert apart[1, 0].tolist() == [0, 0, 0, 1, 1, 0]


def test_distillation_target_with_task_share_gives_one_ranking_per_task() -> None:
    importance = torch.rand(6, 2, 16, generator=torch.Generator().manual_seed(0)) + 0.1
    task_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    own = distillation_target(importance, task_ids, torch.zeros(2, 2, 16), 0.5, 0.0, 0.0)
    shared = distillation_target(importance, task_ids, torch.zeros(2, 2, 16), 0.5, 1.0, 0.0)
    assert not torch.equal(own[0], own[1])  # prompts of one task differ by their own importance ...
    for rows in ([0, 1, 2], [3, 4, 5]):  # ... unless the task's mean replaces it
        assert all(torch.equal(shared[rows[0]], shared[r]) for r in rows)
