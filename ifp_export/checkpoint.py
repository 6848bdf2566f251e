"""The IFPruning checkpoint directory: read, validate, write. Safetensors and JSON only.

CKPT/
  ifp.json          {"format": "ifp-checkpoint", "format_version": 1, "k_per_layer": [...],
                     "softtopk": {"temperature": ...}}
  backbone/         Hugging Face save_pretrained dir (config.json + model.safetensors)
  predictor/        config.json + model.safetensors of the SparsityPredictor
  tokenizer.json    a `tokenizers` tokenizer shared by backbone and predictor
  tasks.jsonl       calibration prompts, one {"task": ..., "prompt": ...} per line
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import torch
from tokenizers import Tokenizer

from ifp_export.errors import IFPError
from ifp_export.fsutil import read_json, write_json
from ifp_export.model.decoder import CausalLM
from ifp_export.model.hf_io import load_decoder, open_decoder
from ifp_export.model.predictor import PredictorConfig, SparsityPredictor, load_predictor, save_predictor
from ifp_export.weights import INDEX_FILE, SafetensorsWeights, shard_files

FORMAT = "ifp-checkpoint"
FORMAT_VERSION = 1
SPEC_FILE, BACKBONE_DIR, PREDICTOR_DIR, TOKENIZER_FILE, TASKS_FILE = (
    "ifp.json",
    "backbone",
    "predictor",
    "tokenizer.json",
    "tasks.jsonl",
)


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
    predictor: SparsityPredictor
    tokenizer: Tokenizer
    tasks: list[TaskPrompt]
    weights: SafetensorsWeights  # the backbone's weights, one tensor at a time: what the targets bind from

    @property
    def k_per_layer(self) -> list[int]:
        return list(self.spec["k_per_layer"])

    @property
    def temperature(self) -> float:
        return float(self.spec["softtopk"]["temperature"])


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
    if spec["format_version"] != FORMAT_VERSION:
        raise IFPError(
            f"format_version {spec['format_version']} is not supported (this ifp-export reads {FORMAT_VERSION})",
            path,
            "re-create the checkpoint with this version of ifp-export",
        )
    return spec


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


def load_checkpoint(root: str | Path) -> Checkpoint:
    """Read and cross-check every part of a checkpoint; any problem is one IFPError."""
    root = Path(root)
    if not root.is_dir():
        raise IFPError("checkpoint directory not found", root, "pass an IFPruning checkpoint directory")
    spec = read_spec(root)
    backbone, weights = open_decoder(root / BACKBONE_DIR)
    predictor = load_predictor(root / PREDICTOR_DIR)
    tokenizer = read_tokenizer(root / TOKENIZER_FILE)
    tasks = read_tasks(root / TASKS_FILE)
    check_consistency(root, spec, backbone, predictor, tokenizer)
    return Checkpoint(root, spec, backbone, predictor, tokenizer, tasks, weights)


def check_consistency(
    root: Path, spec: dict[str, Any], backbone: CausalLM, predictor: SparsityPredictor, tokenizer: Tokenizer
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
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    for name, size, where in (
        ("backbone", cfg.vocab_size, root / BACKBONE_DIR / "config.json"),
        ("predictor", pcfg.vocab_size, root / PREDICTOR_DIR / "config.json"),
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


def create_checkpoint(
    backbone_dir: Path, tasks_path: Path, out_dir: Path, keep: float, tokenizer_path: Path | None = None, seed: int = 0
) -> Checkpoint:
    """Wrap a HF backbone with a freshly initialized (seeded) predictor into `out_dir` (which must be empty).

    The backbone files are copied byte for byte after validation; tasks.jsonl and the tokenizer likewise.
    """
    backbone = load_decoder(backbone_dir)
    tokenizer_path = tokenizer_path or backbone_dir / TOKENIZER_FILE
    tokenizer = read_tokenizer(tokenizer_path)
    read_tasks(tasks_path)
    cfg = backbone.config
    k = keep_to_k(keep, cfg.intermediate_size)
    torch.manual_seed(seed)
    predictor = SparsityPredictor(
        PredictorConfig(
            vocab_size=max(cfg.vocab_size, tokenizer.get_vocab_size(with_added_tokens=True)),
            target_layers=cfg.num_hidden_layers,
            target_intermediate_size=cfg.intermediate_size,
        )
    )
    (out_dir / BACKBONE_DIR).mkdir(parents=True)
    for name in ("config.json", "generation_config.json", INDEX_FILE):
        if (backbone_dir / name).is_file():
            shutil.copyfile(backbone_dir / name, out_dir / BACKBONE_DIR / name)
    for shard in shard_files(backbone_dir)[0]:
        shutil.copyfile(shard, out_dir / BACKBONE_DIR / shard.name)
    save_predictor(predictor, out_dir / PREDICTOR_DIR)
    shutil.copyfile(tokenizer_path, out_dir / TOKENIZER_FILE)
    shutil.copyfile(tasks_path, out_dir / TASKS_FILE)
    write_spec(
        out_dir,
        [k] * cfg.num_hidden_layers,
        temperature=0.05,
        description=f"untrained predictor (seed {seed}) over {backbone_dir.name}; train it before relying on routing",
    )
    return load_checkpoint(out_dir)
