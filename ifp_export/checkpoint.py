"""The IFPruning checkpoint directory: read, validate, write. Safetensors and JSON only.

CKPT/
  ifp.json          {"format": "ifp-checkpoint", "format_version": 2, "k_per_layer": [...],
                     "softtopk": {"temperature": ...}}
  backbone/         Hugging Face save_pretrained dir (config.json + model.safetensors)
  predictor/        either config.json + model.safetensors of the SparsityPredictor (encoder), or, from
                    format_version 2, an LM predictor: config.json + lm/ (HF dir) + head.safetensors
  tokenizer.json    a `tokenizers` tokenizer shared by backbone and predictor
  tasks.jsonl       calibration prompts, one {"task": ..., "prompt": ...} per line
  tokenizer_config.json, special_tokens_map.json, chat_template.jinja   optional: the tokenizer's companion files
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import torch
from tokenizers import Tokenizer

from ifp_export.chat import TEXT_FILES, TokenizerText, copy_tokenizer_text, read_tokenizer_text
from ifp_export.errors import IFPError
from ifp_export.fsutil import check_no_symlink_below, read_json, write_json
from ifp_export.memory import drop_clean_file_pages
from ifp_export.model.config import eos_token_ids, read_generation_config
from ifp_export.model.decoder import CausalLM
from ifp_export.model.hf_io import check_weight_map, load_decoder, open_decoder
from ifp_export.model.lm_predictor import (
    HEAD_FILE,
    LM_DIR,
    LM_PREDICTOR_FORMAT,
    HeadConfig,
    LMPredictor,
    Predictor,
    load_lm_predictor,
    new_lm_predictor,
    save_head,
)
from ifp_export.model.predictor import PredictorConfig, SparsityPredictor, load_predictor, save_predictor
from ifp_export.weights import SafetensorsWeights

FORMAT = "ifp-checkpoint"
FORMAT_VERSION = 2  # written; 2 added the LM predictor (predictor/config.json "ifp-lm-predictor")
READABLE_VERSIONS = (1, 2)
SPEC_FILE, BACKBONE_DIR, PREDICTOR_DIR, TOKENIZER_FILE, TASKS_FILE = (
    "ifp.json",
    "backbone",
    "predictor",
    "tokenizer.json",
    "tasks.jsonl",
)
HF_FILES = ("config.json", "generation_config.json", "model.safetensors")


@dataclass(frozen=True)
class TaskPrompt:
    task: str
    prompt: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass
class Checkpoint:
    root: Path
    spec: dict[str, Any]
    backbone: CausalLM  # the PyTorch reference; its parameters are views of `weights`' mapping (no second copy)
    predictor: Predictor
    tokenizer: Tokenizer
    tasks: list[TaskPrompt]
    weights: SafetensorsWeights  # the backbone's weights, one tensor at a time: what the targets bind from
    generation: dict[str, Any] = field(default_factory=dict)  # backbone/generation_config.json ({} if absent)
    text: TokenizerText = field(default_factory=TokenizerText)  # tokenizer_config.json, chat template, ... if any

    @property
    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids of config.json and generation_config.json (`model.config.eos_token_ids`)."""
        return eos_token_ids(self.backbone.config, self.generation)

    @property
    def k_per_layer(self) -> list[int]:
        return list(self.spec["k_per_layer"])

    @property
    def temperature(self) -> float:
        return float(self.spec["softtopk"]["temperature"])

    def drop_resident_weights(self) -> None:
        """Drop the resident pages of the backbone's and the predictor's mapped weights: the next pass that reads
        them re-reads them from the page cache, and a pass's peak does not carry what the passes before it read."""
        self.weights.release()
        drop_clean_file_pages(self.predictor.parameters())


def schema(name: str) -> dict[str, Any]:
    return json.loads(resources.files("ifp_export").joinpath("schemas", name).read_text())


def read_spec(root: Path) -> dict[str, Any]:
    path = root / SPEC_FILE
    spec = read_json(path, "checkpoint descriptor")
    try:
        jsonschema.validate(spec, schema("ifp_checkpoint.schema.json"))
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "top level"
        raise IFPError(f"invalid at {where}: {err.message}", path, "see README 'Checkpoint format'") from None
    if spec["format_version"] not in READABLE_VERSIONS:
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise IFPError(
            f"format_version {spec['format_version']} is not supported (this ifp-export reads {readable})",
            path,
            "use the ifp-export version that wrote the checkpoint, or re-create it with this one",
        )
    return spec


def read_predictor(directory: Path, format_version: int = FORMAT_VERSION) -> Predictor:
    """The encoder (`ifp-sparsity-predictor`) or, from format_version 2 (the checkpoint's ifp.json), the LM predictor
    (`ifp-lm-predictor`)."""
    path = directory / "config.json"
    raw = read_json(path, "predictor config")
    if not (isinstance(raw, dict) and raw.get("format") == LM_PREDICTOR_FORMAT):
        return load_predictor(directory)
    if format_version < 2:
        raise IFPError(
            f"an {LM_PREDICTOR_FORMAT!r} predictor needs ifp.json format_version 2, not {format_version}",
            directory.parent / SPEC_FILE,
            'set "format_version": 2 in ifp.json',
        )
    return load_lm_predictor(directory, raw)


def read_tasks(path: Path) -> list[TaskPrompt]:
    """Calibration prompts; every line a JSON object with non-empty string `task` and `prompt`."""
    if not path.is_file():
        raise IFPError("tasks file not found", path, 'write one {"task": ..., "prompt": ...} JSON object per line')
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError as err:
        raise IFPError(
            f"tasks file is not UTF-8 ({err.reason} at byte {err.start})", path, "save it as UTF-8"
        ) from None
    rows: list[TaskPrompt] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not (
            isinstance(row, dict)
            and isinstance(row.get("task"), str)
            and row["task"].strip()
            and isinstance(row.get("prompt"), str)
            and row["prompt"]
        ):
            raise IFPError(
                f"line {number} is not a JSON object with non-empty string 'task' and 'prompt'",
                path,
                'write one {"task": ..., "prompt": ...} object per line',
            )
        extra = {k: v for k, v in row.items() if k not in ("task", "prompt")}
        rows.append(TaskPrompt(row["task"], row["prompt"], extra))
    if not rows:
        raise IFPError("tasks file holds no prompts", path, "add at least one calibration prompt per task")
    return rows


def read_tokenizer(path: Path) -> Tokenizer:
    if not path.is_file():
        raise IFPError("tokenizer not found", path, "save the tokenizer with tokenizers' Tokenizer.save")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on bad files
        detail = str(err).splitlines()[0][:120]
        raise IFPError(f"not a valid tokenizers file ({detail})", path, "re-save it with Tokenizer.save") from None


def checkpoint_files(root: Path) -> Iterator[str]:
    """Every file a checkpoint may hold, relative to `root`: what the loader opens, then the shards a sharded
    backbone's or LM predictor's index names (an index is yielded before it is read)."""
    hf_dirs = (BACKBONE_DIR, PREDICTOR_DIR, f"{PREDICTOR_DIR}/{LM_DIR}")
    yield from (SPEC_FILE, TOKENIZER_FILE, TASKS_FILE, *TEXT_FILES, f"{PREDICTOR_DIR}/{HEAD_FILE}")
    for part in hf_dirs:
        yield from (f"{part}/{name}" for name in (*HF_FILES, "model.safetensors.index.json"))
    for part in hf_dirs:
        index = root / part / "model.safetensors.index.json"
        if index.is_file():
            for shard in sorted(set(check_weight_map(read_json(index, "safetensors index"), index).values())):
                yield f"{part}/{shard}"


def check_containment(root: Path) -> None:
    """Every file the loader opens is a regular path inside the checkpoint: no symlink (to a file or a directory)
    anywhere below `root`, shards of a sharded backbone or LM predictor included. `root` itself may be a symlink."""
    fix = "copy the real file into the checkpoint directory instead of linking it"
    for relative in checkpoint_files(root):
        check_no_symlink_below(root, root / relative, fix)


def load_checkpoint(root: str | Path) -> Checkpoint:
    """Read and cross-check every part of a checkpoint; any problem is one IFPError."""
    root = Path(root)
    if not root.is_dir():
        raise IFPError("checkpoint directory not found", root, "pass an IFPruning checkpoint directory")
    check_containment(root)
    spec = read_spec(root)
    backbone, weights = open_decoder(root / BACKBONE_DIR)
    predictor = read_predictor(root / PREDICTOR_DIR, spec["format_version"])
    tokenizer = read_tokenizer(root / TOKENIZER_FILE)
    tasks = read_tasks(root / TASKS_FILE)
    generation = read_generation_config(root / BACKBONE_DIR)
    text = read_tokenizer_text(root)
    check_consistency(root, spec, backbone, predictor, tokenizer)
    return Checkpoint(root, spec, backbone, predictor, tokenizer, tasks, weights, generation, text)


def check_consistency(
    root: Path, spec: dict[str, Any], backbone: CausalLM, predictor: Predictor, tokenizer: Tokenizer
) -> None:
    cfg, pcfg = backbone.config, predictor.config
    k = spec["k_per_layer"]
    if len(k) != cfg.num_hidden_layers:
        raise IFPError(
            f"k_per_layer has {len(k)} entries, the backbone has {cfg.num_hidden_layers} layers",
            root / SPEC_FILE,
            "give one k per layer",
        )
    bad = [v for v in k if not 1 <= v <= cfg.intermediate_size]
    if bad:
        raise IFPError(
            f"k_per_layer value {bad[0]} is outside 1..d_ff={cfg.intermediate_size}",
            root / SPEC_FILE,
            "choose k between 1 and the backbone's intermediate_size",
        )
    if (pcfg.target_layers, pcfg.target_intermediate_size) != (cfg.num_hidden_layers, cfg.intermediate_size):
        raise IFPError(
            f"predictor scores [{pcfg.target_layers}, {pcfg.target_intermediate_size}] but the backbone has "
            f"[{cfg.num_hidden_layers}, {cfg.intermediate_size}] FFN neurons",
            root / PREDICTOR_DIR / "config.json",
            "re-create the predictor for this backbone",
        )
    lm = isinstance(predictor, LMPredictor)
    predictor_config = root / PREDICTOR_DIR / (LM_DIR if lm else "") / "config.json"
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    for name, size, where in (
        ("backbone", cfg.vocab_size, root / BACKBONE_DIR / "config.json"),
        ("predictor", pcfg.vocab_size, predictor_config),
    ):
        if size < vocab:
            raise IFPError(
                f"{name} vocab_size {size} is smaller than the tokenizer's {vocab} tokens",
                where,
                "use the tokenizer the model was trained with",
            )


def write_spec(root: Path, k_per_layer: list[int], temperature: float, description: str = "") -> None:
    spec: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "k_per_layer": [int(v) for v in k_per_layer],
        "softtopk": {"temperature": float(temperature)},
    }
    if description:
        spec["description"] = description
    write_json(root / SPEC_FILE, spec)


def keep_to_k(keep: float, intermediate_size: int, path: str | Path | None = None) -> int:
    """Neurons kept per layer for a keep ratio in (0, 1]."""
    if not 0 < keep <= 1:
        raise IFPError(f"keep ratio must be in (0, 1], got {keep}", path, "pass e.g. --keep 0.25")
    return max(1, round(keep * intermediate_size))


def copy_hf_dir(source: Path, destination: Path) -> None:
    """A validated HF save_pretrained dir, byte for byte: config, weights (single file or index + shards)."""
    destination.mkdir(parents=True)
    for name in (*HF_FILES, "model.safetensors.index.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, destination / name)
    index = source / "model.safetensors.index.json"
    if index.is_file():
        for shard in sorted(set(check_weight_map(read_json(index), index).values())):
            shutil.copyfile(source / shard, destination / shard)


def check_same_tokenizer(lm_dir: Path, tokenizer: Tokenizer) -> None:
    """The predictor reads the backbone's token ids: an LM shipped with a different vocabulary is refused."""
    path = lm_dir / TOKENIZER_FILE
    if path.is_file() and read_tokenizer(path).get_vocab(with_added_tokens=True) != tokenizer.get_vocab(
        with_added_tokens=True
    ):
        raise IFPError(
            "the predictor LM's tokenizer differs from the backbone's (the predictor reads the same token ids)",
            path,
            "use a predictor LM trained with the backbone's tokenizer",
        )


def create_checkpoint(
    backbone_dir: Path,
    tasks_path: Path,
    out_dir: Path,
    keep: float,
    tokenizer_path: Path | None = None,
    seed: int = 0,
    predictor_backbone: Path | None = None,
    pooling: str = "last",
) -> Checkpoint:
    """Wrap a HF backbone with a freshly initialized (seeded) predictor into `out_dir` (which must be empty).

    The predictor is our small encoder, or with `predictor_backbone` that HF LM plus a new MLP head (`pooling`
    over the prompt: last token or masked mean). HF directories, tasks.jsonl and the tokenizer with the companion
    files beside it (tokenizer_config.json, special_tokens_map.json, chat_template.jinja) are copied byte for byte
    after validation.
    """
    backbone = load_decoder(backbone_dir)
    read_generation_config(backbone_dir)  # refused here, naming the source, not the staged copy
    tokenizer_path = tokenizer_path or backbone_dir / TOKENIZER_FILE
    tokenizer = read_tokenizer(tokenizer_path)
    read_tokenizer_text(tokenizer_path.parent)
    read_tasks(tasks_path)
    cfg = backbone.config
    k = keep_to_k(keep, cfg.intermediate_size)
    if predictor_backbone is None:
        torch.manual_seed(seed)
        predictor: Predictor = SparsityPredictor(
            PredictorConfig(
                vocab_size=max(cfg.vocab_size, tokenizer.get_vocab_size(with_added_tokens=True)),
                target_layers=cfg.num_hidden_layers,
                target_intermediate_size=cfg.intermediate_size,
            )
        )
    else:
        check_same_tokenizer(predictor_backbone, tokenizer)
        head = HeadConfig(cfg.num_hidden_layers, cfg.intermediate_size, pooling=pooling)
        predictor = new_lm_predictor(predictor_backbone, head, seed)
    copy_hf_dir(backbone_dir, out_dir / BACKBONE_DIR)
    if predictor_backbone is not None:
        copy_hf_dir(predictor_backbone, out_dir / PREDICTOR_DIR / LM_DIR)
        save_head(predictor, out_dir / PREDICTOR_DIR)
    else:
        save_predictor(predictor, out_dir / PREDICTOR_DIR)
    del backbone, predictor  # the check below loads both again: never hold two copies
    shutil.copyfile(tokenizer_path, out_dir / TOKENIZER_FILE)
    copy_tokenizer_text(tokenizer_path.parent, out_dir)
    shutil.copyfile(tasks_path, out_dir / TASKS_FILE)
    untrained = "predictor" if predictor_backbone is None else f"head on the {predictor_backbone.name} predictor LM"
    write_spec(
        out_dir,
        [k] * cfg.num_hidden_layers,
        temperature=0.05,
        description=f"untrained {untrained} (seed {seed}) over {backbone_dir.name}; train it before relying on routing",
    )
    return load_checkpoint(out_dir)
