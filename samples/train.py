"""Train the bundled IFPruning sample on CPU and write it to `samples/checkpoint/` (plus `samples/heldout.jsonl`).

Three phases, all seeded:
  (a) dense LM: the backbone learns the four tasks (loss on answer tokens, AdamW + one-cycle LR);
  (b) distillation: with the backbone frozen, the predictor learns (BCE) to pick top-k FFN neurons by the dense
      model's importance, mean |silu(gate) * up| over the answer positions: by default its task's running mean
      (--distill-task-share) minus the other tasks' (--distill-contrast), so each task gets neurons of its own;
  (c) joint fine-tuning: backbone and predictor together through SoftTopK (straight-through), so the backbone
      learns to run each task on 25 % of its FFN neurons; a BCE anchor keeps the predictor near its distilled masks
      and `task_contrast` (--diversity-weight) pushes each prompt's mask off the other tasks' neurons.
Joint training from scratch collapses to one mask for every task; plain importance gives tasks overlapping masks
that a static mask serves nearly as well. samples/README.md logs the recipes tried ("How it was tuned").

    python -m ifp_export.samples.train [--seed 0] [--out samples/checkpoint] [--heldout samples/heldout.jsonl]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ifp_export.checkpoint import write_spec
from ifp_export.fsutil import atomic_write_bytes
from ifp_export.masks import aggregate_topk, mask_iou
from ifp_export.model.config import DecoderConfig
from ifp_export.model.decoder import CausalLM
from ifp_export.model.hf_io import save_decoder
from ifp_export.model.predictor import PredictorConfig, SparsityPredictor, save_predictor
from ifp_export.model.softtopk import SoftTopK, hard_topk_mask
from ifp_export.samples import corpus
from ifp_export.samples.corpus import Example

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "checkpoint"
DEFAULT_HELDOUT = HERE / "heldout.jsonl"
CALIBRATION_PER_TASK = 64
HELDOUT_PER_TASK = 100
SPLIT_SEED = "ifp-sample-split"  # held-out and calibration prompts do not depend on --seed: every seed is judged alike
DESCRIPTION = (
    "IFPruning sample: char-level Llama-style decoder (4 layers, hidden 128, d_ff 512) and sparsity predictor "
    "keeping 128 of 512 FFN neurons per layer; tasks add, reverse, sort, brackets (ifp_export.samples)."
)


class Batch:
    """Tokenized examples: the decoder's right-padded [<bos> prompt answer <eos>] and the predictor's prompt."""

    def __init__(self, examples: list[Example], vocab: dict[str, int]) -> None:
        bos, eos = vocab[corpus.BOS], vocab[corpus.EOS]
        prompts = [[bos, *(vocab[c] for c in ex.prompt)] for ex in examples]
        answers = [[*(vocab[c] for c in ex.answer), eos] for ex in examples]
        width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True)) - 1
        pwidth = max(len(p) for p in prompts)
        n = len(examples)
        self.task_ids = torch.tensor([corpus.TASKS.index(ex.task) for ex in examples])
        self.input_ids = torch.zeros(n, width, dtype=torch.long)
        self.attention_mask = torch.zeros(n, width, dtype=torch.long)
        self.targets = torch.zeros(n, width, dtype=torch.long)
        self.answer_mask = torch.zeros(n, width, dtype=torch.bool)  # positions whose next token is answer/<eos>
        self.prompt_ids = torch.zeros(n, pwidth, dtype=torch.long)
        self.prompt_mask = torch.zeros(n, pwidth, dtype=torch.long)
        for row, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            seq = p + a
            self.input_ids[row, : len(seq) - 1] = torch.tensor(seq[:-1])
            self.attention_mask[row, : len(seq) - 1] = 1
            self.targets[row, : len(seq) - 1] = torch.tensor(seq[1:])
            self.answer_mask[row, len(p) - 1 : len(seq) - 1] = True
            self.prompt_ids[row, : len(p)] = torch.tensor(p)
            self.prompt_mask[row, : len(p)] = 1


def batches(
    rng: random.Random,
    reserved: set[str],
    vocab: dict[str, int],
    batch_size: int,
    mix: list[int],
    group: int = 8,
) -> Iterator[Batch]:
    """Endless training batches, task i drawn mix[i] times per round of the mix; `group` batches at a time are cut
    from one length-sorted pool so padding stays short. Prompts in `reserved` (calibration and held-out) are never
    trained on."""
    cycle = [task for task, weight in zip(corpus.TASKS, mix, strict=True) for _ in range(weight)]
    while True:
        pool: list[Example] = []
        while len(pool) < batch_size * group:
            ex = corpus.sample(cycle[len(pool) % len(cycle)], rng)
            if ex.prompt not in reserved:
                pool.append(ex)
        pool.sort(key=lambda ex: len(ex.prompt) + len(ex.answer))
        chunks = [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            yield Batch(chunk, vocab)


def answer_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(logits[batch.answer_mask], batch.targets[batch.answer_mask])


def optimizer(params: list[nn.Parameter], lr: float, steps: int, weight_decay: float = 0.01):
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=max(0.1, 2 / steps))
    return opt, sched


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    for sub in module.modules():
        if isinstance(sub, nn.Linear | nn.Embedding):
            nn.init.normal_(sub.weight, std=std)
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)


class FFNRecorder:
    """Forward pre-hooks on every layer's down_proj: `importance` is the mean |silu(gate) * up| per neuron over
    the answer positions of the last forward, [B, L, d_ff]."""

    def __init__(self, model: CausalLM) -> None:
        self.inputs: list[torch.Tensor] = []
        self.handles = [
            layer.mlp.down_proj.register_forward_pre_hook(lambda _m, args: self.inputs.append(args[0]))
            for layer in model.model.layers
        ]

    def importance(self, answer_mask: torch.Tensor) -> torch.Tensor:
        weights = answer_mask.float()[..., None]
        per_layer = [(h.abs() * weights).sum(1) / weights.sum(1) for h in self.inputs]
        self.inputs.clear()
        return torch.stack(per_layer, dim=1)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def log(phase: str, step: int, steps: int, start: float, **values: float) -> None:
    shown = " ".join(f"{k}={v:.4f}" for k, v in values.items())
    print(f"[{phase}] step {step:5d}/{steps} {shown} ({time.perf_counter() - start:.0f}s)", flush=True)


def train_dense(model: CausalLM, data: Iterator[Batch], steps: int, lr: float) -> None:
    opt, sched = optimizer(list(model.parameters()), lr, steps)
    model.train()
    start, running = time.perf_counter(), 0.0
    for step in range(1, steps + 1):
        batch = next(data)
        logits, _ = model(batch.input_ids, batch.attention_mask)
        loss = answer_loss(logits, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if step == 1 else 0.95 * running + 0.05 * loss.item()
        if step % 250 == 0 or step == steps:
            log("dense", step, steps, start, loss=running)


def distill_predictor(
    model: CausalLM,
    predictor: SparsityPredictor,
    data: Iterator[Batch],
    steps: int,
    lr: float,
    k: list[int],
    contrast: float = 0.0,
    task_share: float = 0.0,
) -> None:
    """The predictor learns (BCE) each prompt's top-k neurons by `distillation_target`, the backbone frozen."""
    model.eval().requires_grad_(False)
    recorder = FFNRecorder(model)
    opt, sched = optimizer(list(predictor.parameters()), lr, steps)
    predictor.train()
    k_tensor = torch.tensor(k)
    cfg = predictor.config
    running = torch.zeros(len(corpus.TASKS), cfg.target_layers, cfg.target_intermediate_size)
    start, loss_avg, overlap = time.perf_counter(), 0.0, 0.0
    for step in range(1, steps + 1):
        batch = next(data)
        with torch.no_grad():
            model(batch.input_ids, batch.attention_mask)
            importance = recorder.importance(batch.answer_mask)
            ranking = distillation_target(importance, batch.task_ids, running, contrast, task_share)
            target = hard_topk_mask(ranking, k_tensor)
        scores = predictor(batch.prompt_ids, batch.prompt_mask)
        loss = F.binary_cross_entropy_with_logits(scores, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        hit = ((hard_topk_mask(scores.detach(), k_tensor) * target).sum() / target.sum()).item()
        loss_avg = loss.item() if step == 1 else 0.95 * loss_avg + 0.05 * loss.item()
        overlap = hit if step == 1 else 0.95 * overlap + 0.05 * hit
        if step % 100 == 0 or step == steps:
            log("distill", step, steps, start, bce=loss_avg, topk_recall=overlap)
    recorder.close()
    model.requires_grad_(True)


def update_task_means(running: torch.Tensor, values: torch.Tensor, task_ids: torch.Tensor, momentum: float) -> None:
    """Each task's running mean of `values` [B, L, d_ff] over recent batches, in `running` [T, L, d_ff] (in place)."""
    for task in task_ids.unique().tolist():
        running[task] = momentum * running[task] + (1 - momentum) * values[task_ids == task].mean(0)


def other_tasks(running: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """For each row, the mean of the other tasks' running means, [B, L, d_ff]."""
    return (running.sum(0, keepdim=True) - running[task_ids]) / (running.shape[0] - 1)


def distillation_target(
    importance: torch.Tensor,
    task_ids: torch.Tensor,
    running: torch.Tensor,
    contrast: float,
    task_share: float,
    momentum: float = 0.9,
) -> torch.Tensor:
    """What the predictor learns to rank first, [B, L, d_ff]: each prompt's neuron importance relative to its layer's
    mean, blended (`task_share`) with its task's running mean of the same, minus `contrast` times the other tasks'
    running mean. Dense-trained neurons serve every task, so plain importance gives tasks overlapping masks that a
    static mask serves nearly as well (`contrast` pushes them apart), and masks that differ prompt by prompt within a
    task, which one per-task variant then serves worse than each prompt's own (`task_share` pulls them together)."""
    relative = importance / importance.mean(-1, keepdim=True).clamp(min=1e-12)
    if contrast == 0 and task_share == 0:
        return relative
    update_task_means(running, relative, task_ids, momentum)
    own = running[task_ids]
    return (1 - task_share) * relative + task_share * own - contrast * other_tasks(running, task_ids)


def task_contrast(masks: torch.Tensor, task_ids: torch.Tensor, running: torch.Tensor, momentum: float = 0.9):
    """The diversity term: the mean fraction of each prompt's kept neurons that the other tasks keep, minus the
    fraction its own task keeps. `running` [T, L, d_ff] holds each task's mean mask over recent batches (updated in
    place, no gradient), so a batch needs no second task to push its prompts off the other tasks' neurons, and
    prompts of one task are pulled onto one mask (what a per-task variant keeps)."""
    with torch.no_grad():
        update_task_means(running, masks, task_ids, momentum)
        shift = other_tasks(running, task_ids) - running[task_ids]
    return ((masks * shift).sum(-1) / masks.sum(-1).clamp(min=1)).mean()


def train_joint(
    model: CausalLM,
    predictor: SparsityPredictor,
    data: Iterator[Batch],
    steps: int,
    lr: float,
    predictor_lr: float,
    topk: SoftTopK,
    anchor_weight: float = 0.0,
    diversity_weight: float = 0.0,
) -> None:
    """Backbone and predictor through SoftTopK. With anchor_weight > 0 the predictor also pays BCE against the
    top-k masks of its own distilled (frozen) copy, which keeps the tasks' masks from collapsing into one; with
    diversity_weight > 0 it pays for the neurons its prompts share with other tasks (`task_contrast`)."""
    anchor = copy.deepcopy(predictor).eval().requires_grad_(False) if anchor_weight > 0 else None
    model.train()
    predictor.train()
    topk.train()
    opt_m, sched_m = optimizer(list(model.parameters()), lr, steps)
    opt_p, sched_p = optimizer(list(predictor.parameters()), predictor_lr, steps)
    cfg = predictor.config
    running_masks = torch.zeros(len(corpus.TASKS), cfg.target_layers, cfg.target_intermediate_size)
    start, running, shared = time.perf_counter(), 0.0, 0.0
    for step in range(1, steps + 1):
        batch = next(data)
        scores = predictor(batch.prompt_ids, batch.prompt_mask)
        masks = topk(scores)
        logits, _ = model(batch.input_ids, batch.attention_mask, ffn_masks=masks)
        loss = answer_loss(logits, batch)
        if anchor is not None:
            with torch.no_grad():
                target = hard_topk_mask(anchor(batch.prompt_ids, batch.prompt_mask), topk.k)
            loss = loss + anchor_weight * F.binary_cross_entropy_with_logits(scores, target)
        contrast = task_contrast(masks, batch.task_ids, running_masks)
        if diversity_weight > 0:
            loss = loss + diversity_weight * contrast
        opt_m.zero_grad(set_to_none=True)
        opt_p.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        nn.utils.clip_grad_norm_(predictor.parameters(), 1.0)
        opt_m.step()
        opt_p.step()
        sched_m.step()
        sched_p.step()
        running = loss.item() if step == 1 else 0.95 * running + 0.05 * loss.item()
        shared = contrast.item() if step == 1 else 0.95 * shared + 0.05 * contrast.item()
        if step % 250 == 0 or step == steps:
            log("joint", step, steps, start, loss=running, task_contrast=shared)


@torch.no_grad()
def task_mask_iou(
    predictor: SparsityPredictor, calibration: list[Example], vocab: dict[str, int], k: list[int]
) -> float:
    """Mean IoU between different tasks' aggregated masks over the calibration prompts (a progress signal)."""
    was_training = predictor.training
    predictor.eval()
    masks = []
    for task in corpus.TASKS:
        batch = Batch([ex for ex in calibration if ex.task == task], vocab)
        masks.append(aggregate_topk(predictor(batch.prompt_ids, batch.prompt_mask), k))
    predictor.train(was_training)
    pairs = [(a, b) for a in range(len(masks)) for b in range(a + 1, len(masks))]
    return sum(float(mask_iou(masks[a], masks[b]).mean()) for a, b in pairs) / len(pairs)


def write_jsonl(path: Path, examples: list[Example]) -> None:
    lines = [json.dumps({"task": ex.task, "prompt": ex.prompt, "answer": ex.answer}) for ex in examples]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def write_checkpoint(
    out: Path,
    model: CausalLM,
    predictor: SparsityPredictor,
    tokenizer_json: str,
    calibration: list[Example],
    k: list[int],
    temperature: float,
) -> None:
    """Write everything into a sibling temp dir, then swap it in for `out`."""
    out = out.resolve()
    tmp = out.parent / f".{out.name}.tmp"
    old = out.parent / f".{out.name}.old"
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir(parents=True)
    save_decoder(model, tmp / "backbone")
    save_predictor(predictor, tmp / "predictor")
    atomic_write_bytes(tmp / "tokenizer.json", tokenizer_json.encode())
    write_jsonl(tmp / "tasks.jsonl", calibration)
    write_spec(tmp, k, temperature, DESCRIPTION)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory to (re)write")
    parser.add_argument("--heldout", type=Path, default=DEFAULT_HELDOUT, help="held-out prompts (.jsonl) to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dense-steps", type=int, default=2000)
    parser.add_argument("--distill-steps", type=int, default=500)
    parser.add_argument("--joint-steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--distill-lr", type=float, default=2e-3)
    parser.add_argument("--joint-lr", type=float, default=1e-3)
    parser.add_argument("--joint-predictor-lr", type=float, default=3e-4)
    parser.add_argument("--keep", type=int, default=128, help="FFN neurons kept per layer (k)")
    parser.add_argument("--temperature", type=float, default=0.5, help="SoftTopK temperature")
    parser.add_argument(
        "--distill-contrast",
        type=float,
        default=1.0,
        help="distillation: subtract this times the other tasks' mean importance (distillation_target)",
    )
    parser.add_argument(
        "--distill-task-share",
        type=float,
        default=1.0,
        help="distillation: weight of the task's mean importance against the prompt's own (distillation_target)",
    )
    parser.add_argument(
        "--anchor-weight", type=float, default=1.0, help="joint phase: BCE weight towards the distilled masks"
    )
    parser.add_argument(
        "--diversity-weight", type=float, default=1.0, help="joint phase: weight of the task_contrast term"
    )
    parser.add_argument("--mix", default="2,1,1,1", help="training examples per round of add,reverse,sort,brackets")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation at the end")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(args.seed)
    split = random.Random(SPLIT_SEED)

    tokenizer = corpus.build_tokenizer()
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    heldout = [ex for task in corpus.TASKS for ex in corpus.distinct_examples(task, HELDOUT_PER_TASK, split)]
    reserved = {ex.prompt for ex in heldout}
    calibration = [
        ex for task in corpus.TASKS for ex in corpus.distinct_examples(task, CALIBRATION_PER_TASK, split, reserved)
    ]
    reserved |= {ex.prompt for ex in calibration}
    mix = [int(w) for w in args.mix.split(",")]
    data = batches(rng, reserved, vocab, args.batch_size, mix)

    vocab_size = 8 * math.ceil(len(vocab) / 8)
    cfg = DecoderConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        model_type="llama",
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=vocab[corpus.BOS],
        eos_token_id=vocab[corpus.EOS],
        pad_token_id=vocab[corpus.PAD],
    )
    model = CausalLM(cfg)
    init_weights(model)
    pcfg = PredictorConfig(
        vocab_size=vocab_size,
        target_layers=cfg.num_hidden_layers,
        target_intermediate_size=cfg.intermediate_size,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
    )
    predictor = SparsityPredictor(pcfg)
    init_weights(predictor)
    k = [args.keep] * cfg.num_hidden_layers
    n_model = sum(p.numel() for p in model.parameters())
    n_pred = sum(p.numel() for p in predictor.parameters())
    print(f"backbone {n_model / 1e6:.2f}M params, predictor {n_pred / 1e6:.2f}M params, k={k}", flush=True)

    phase = time.perf_counter()
    train_dense(model, data, args.dense_steps, args.lr)
    times = {"dense": time.perf_counter() - phase}
    phase = time.perf_counter()
    distill_predictor(
        model, predictor, data, args.distill_steps, args.distill_lr, k, args.distill_contrast, args.distill_task_share
    )
    times["distill"] = time.perf_counter() - phase
    print(f"task-mask IoU after distillation: {task_mask_iou(predictor, calibration, vocab, k):.3f}", flush=True)
    phase = time.perf_counter()
    topk = SoftTopK(k, args.temperature, iterations=40)
    train_joint(
        model,
        predictor,
        data,
        args.joint_steps,
        args.joint_lr,
        args.joint_predictor_lr,
        topk,
        args.anchor_weight,
        args.diversity_weight,
    )
    times["joint"] = time.perf_counter() - phase
    print(f"task-mask IoU after joint training: {task_mask_iou(predictor, calibration, vocab, k):.3f}", flush=True)

    model.eval()
    predictor.eval()
    write_checkpoint(args.out, model, predictor, tokenizer.to_str(), calibration, k, args.temperature)
    write_jsonl(args.heldout, heldout)
    times["train_total"] = time.perf_counter() - t0
    print(f"wrote {args.out} and {args.heldout}", flush=True)
    print("timing: " + ", ".join(f"{name} {secs:.0f}s" for name, secs in times.items()), flush=True)
    print(f"process CPU time {time.process_time():.0f}s on {args.threads} thread(s)", flush=True)

    if not args.no_eval:
        from ifp_export.samples import evaluate

        evaluate.main(["--checkpoint", str(args.out), "--heldout", str(args.heldout)])
        print(f"total wall time incl. evaluation {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
