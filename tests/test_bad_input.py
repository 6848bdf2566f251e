"""The bad-input catalog (DESIGN.md section 10): every case exits with code 2 and one stderr line naming the file
and the fix, no traceback, and leaves the whole temp dir (inputs and outputs) exactly as it was."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import assert_one_line_error, edit_config, refresh, run_cli, snapshot
from safetensors.torch import load_file, save_file
from tiny import make_checkpoint, save_backbone

from ifp_export.artifacts import MANIFEST_FILE
from ifp_export.checkpoint import create_checkpoint
from ifp_export.pipeline import ExportContext


@dataclass
class World:
    """One case's temp dir: a private copy of a tiny checkpoint and its HF source, output paths, a marker file
    that only an unpickled payload would create."""

    tmp: Path
    ckpt: Path
    backbone: Path
    tasks: Path
    out: Path
    marker: Path
    exported: Path | None = None  # a private copy of a full export (validate / run cases)
    cleanup: list[Callable[[], None]] = field(default_factory=list)


class Payload:
    """Unpickling this creates `marker`; a loader that ever unpickles it fails the case."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (self.marker, "w")


def pickle_bytes(w: World) -> bytes:
    return pickle.dumps({"model.embed_tokens.weight": Payload(w.marker)})


def edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_tensors(path: Path, edit: Callable[[dict], None]) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def set_first(value: float) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        name = sorted(n for n, t in tensors.items() if t.is_floating_point())[0]
        tensors[name].view(-1)[0] = value

    return edit


def reshape_first(tensors: dict) -> None:
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].reshape(-1)[:-1].clone()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def read_only_dir(w: World) -> Path:
    """A directory even root cannot write into: `chattr +i` (immutable), undone at teardown."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not available: cannot make a directory unwritable for root")
    path = w.tmp / "readonly"
    path.mkdir()
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"chattr +i failed ({done.stderr.strip()}): cannot make a directory unwritable for root")
    w.cleanup.append(lambda: subprocess.run(["chattr", "-i", str(path)], check=True))
    return path


def export_args(w: World, *extra: str) -> list[str]:
    return ["export", str(w.ckpt), "-o", str(w.out), *extra]


def new_checkpoint_args(w: World, *extra: str, backbone: Path | None = None, tasks: Path | None = None) -> list[str]:
    backbone, tasks = backbone or w.backbone, tasks or w.tasks
    return ["new-checkpoint", "--backbone", str(backbone), "--tasks", str(tasks), "-o", str(w.out), *extra]


def validate_args(w: World) -> list[str]:
    return ["validate", str(w.exported), "--checkpoint", str(w.ckpt)]


def run_args(w: World, *extra: str) -> list[str]:
    return ["run", str(w.exported), "--prompt", "add 1+2=", "--max-new-tokens", "2", *extra]


# --- export ----------------------------------------------------------------------------------------------------


def export_missing_dir(w: World) -> tuple[list[str], tuple[str, ...]]:
    shutil.rmtree(w.ckpt)
    return export_args(w), (str(w.ckpt), "checkpoint directory not found", "Fix:")


def export_min_onnxruntime_too_old(w: World) -> tuple[list[str], tuple[str, ...]]:
    return export_args(w, "--min-onnxruntime", "1.19"), ("--min-onnxruntime 1.19", "pass 1.20 or newer")


def export_missing_spec(w: World) -> tuple[list[str], tuple[str, ...]]:
    (w.ckpt / "ifp.json").unlink()
    return export_args(w), ("ifp.json", "not found", "Fix:")


def export_corrupt_spec(w: World) -> tuple[list[str], tuple[str, ...]]:
    (w.ckpt / "ifp.json").write_text('{"format": "ifp-checkpoint", "format_version": 1, "k_per')
    return export_args(w), ("ifp.json", "not valid JSON", "Fix:")


def export_wrong_format_version(w: World) -> tuple[list[str], tuple[str, ...]]:
    edit_json(w.ckpt / "ifp.json", format_version=3)
    return export_args(w), ("ifp.json", "format_version 3 is not supported", "Fix:")


def export_truncated_safetensors(w: World) -> tuple[list[str], tuple[str, ...]]:
    truncate(w.ckpt / "backbone" / "model.safetensors")
    return export_args(w), ("backbone/model.safetensors", "corrupt or truncated", "Fix:")


def export_wrong_tensor_shape(w: World) -> tuple[list[str], tuple[str, ...]]:
    edit_tensors(w.ckpt / "backbone" / "model.safetensors", reshape_first)
    return export_args(w), ("backbone/model.safetensors", "shape", "Fix:")


def export_wrong_predictor_shape(w: World) -> tuple[list[str], tuple[str, ...]]:
    edit_tensors(w.ckpt / "predictor" / "model.safetensors", reshape_first)
    return export_args(w), ("predictor/model.safetensors", "shape", "Fix:")


def predictor_lm(w: World) -> Path:
    """A small HF LM (our writer; the backbone's tokenizer) to use as the predictor."""
    path = w.tmp / "src" / "lm"
    save_backbone(path, seed=1, intermediate_size=32)
    return path


def with_lm_predictor(w: World) -> None:
    """Replace the case's checkpoint by one whose predictor is an HF LM + MLP head (issue 17)."""
    shutil.rmtree(w.ckpt)
    w.ckpt.mkdir()
    create_checkpoint(w.backbone, w.tasks, w.ckpt, 0.25, predictor_backbone=predictor_lm(w))


def export_lm_predictor_head_shape(w: World) -> tuple[list[str], tuple[str, ...]]:
    with_lm_predictor(w)
    edit_tensors(w.ckpt / "predictor" / "head.safetensors", reshape_first)
    return export_args(w), ("predictor/head.safetensors", "shape", "Fix:")


def export_lm_predictor_nan_lm(w: World) -> tuple[list[str], tuple[str, ...]]:
    with_lm_predictor(w)
    lm_weights = w.ckpt / "predictor" / "lm" / "model.safetensors"
    edit_tensors(lm_weights, lambda t: t["model.norm.weight"].fill_(float("nan")))  # not lm_head: unused, ignored
    return export_args(w), ("predictor/lm/model.safetensors", "NaN or Inf", "Fix:")


def export_lm_predictor_bad_pooling(w: World) -> tuple[list[str], tuple[str, ...]]:
    with_lm_predictor(w)
    config = json.loads((w.ckpt / "predictor" / "config.json").read_text())
    edit_json(w.ckpt / "predictor" / "config.json", head={**config["head"], "pooling": "max"})
    return export_args(w), ("predictor/config.json", "pooling 'max' is not supported", "Fix:")


def export_lm_predictor_in_version_1(w: World) -> tuple[list[str], tuple[str, ...]]:
    with_lm_predictor(w)
    edit_json(w.ckpt / "ifp.json", format_version=1)
    return export_args(w), ("ifp.json", "needs ifp.json format_version 2", "Fix:")


def export_nan_weights(w: World) -> tuple[list[str], tuple[str, ...]]:
    edit_tensors(w.ckpt / "backbone" / "model.safetensors", set_first(float("nan")))
    return export_args(w), ("backbone/model.safetensors", "NaN or Inf", "Fix:")


def export_inf_predictor_weights(w: World) -> tuple[list[str], tuple[str, ...]]:
    edit_tensors(w.ckpt / "predictor" / "model.safetensors", set_first(float("-inf")))
    return export_args(w), ("predictor/model.safetensors", "NaN or Inf", "Fix:")


def export_unsupported_architecture(w: World) -> tuple[list[str], tuple[str, ...]]:
    edit_config(w.ckpt / "backbone", model_type="gpt2")
    return export_args(w), ("backbone/config.json", "unsupported architecture model_type='gpt2'", "Fix:")


def export_llama3_rope_without_low_freq_factor(w: World) -> tuple[list[str], tuple[str, ...]]:
    rope = {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    edit_config(w.ckpt / "backbone", rope_scaling=rope)
    return export_args(w), ("backbone/config.json", "rope_scaling.low_freq_factor is missing", "Fix:")


def export_fractional_heads(w: World) -> tuple[list[str], tuple[str, ...]]:
    edit_config(w.ckpt / "backbone", num_attention_heads=4.7)
    return export_args(w), ("backbone/config.json", "num_attention_heads must be an integer", "Fix:")


def export_weight_map_value_not_a_file_name(w: World) -> tuple[list[str], tuple[str, ...]]:
    index = w.ckpt / "backbone" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": 3, "model.norm.weight": "model.safetensors"}}))
    return export_args(w), (str(index), "'lm_head.weight' is 3", "Fix:")


def symlink_outside(w: World, relative: str) -> Path:
    """Move ckpt/relative outside the checkpoint and leave a symlink to it: the content is valid, the place is not."""
    inside, outside = w.ckpt / relative, w.tmp / ("outside-" + relative.replace("/", "-"))
    shutil.move(inside, outside)
    inside.symlink_to(outside)
    return inside


def export_tokenizer_symlink_outside(w: World) -> tuple[list[str], tuple[str, ...]]:
    symlink_outside(w, "tokenizer.json")
    return export_args(w), ("tokenizer.json", "symlink", "Fix:")


def export_tasks_symlink_outside(w: World) -> tuple[list[str], tuple[str, ...]]:
    symlink_outside(w, "tasks.jsonl")
    return export_args(w), ("tasks.jsonl", "symlink", "Fix:")


def export_weights_symlink_outside(w: World) -> tuple[list[str], tuple[str, ...]]:
    symlink_outside(w, "backbone/model.safetensors")
    return export_args(w), ("backbone/model.safetensors", "symlink", "Fix:")


def export_backbone_dir_symlink_outside(w: World) -> tuple[list[str], tuple[str, ...]]:
    symlink_outside(w, "backbone")
    return export_args(w), ("backbone", "symlink", "Fix:")


def export_k_above_d_ff(w: World) -> tuple[list[str], tuple[str, ...]]:
    edit_json(w.ckpt / "ifp.json", k_per_layer=[12, 49])
    return export_args(w), ("ifp.json", "49 is outside 1..d_ff=48", "Fix:")


def export_k_zero(w: World) -> tuple[list[str], tuple[str, ...]]:
    edit_json(w.ckpt / "ifp.json", k_per_layer=[0, 0])
    return export_args(w), ("ifp.json", "0 is outside 1..d_ff=48", "Fix:")


def export_empty_tasks(w: World) -> tuple[list[str], tuple[str, ...]]:
    (w.ckpt / "tasks.jsonl").write_text("\n  \n")
    return export_args(w), ("tasks.jsonl", "holds no prompts", "Fix:")


def export_malformed_tasks(w: World) -> tuple[list[str], tuple[str, ...]]:
    with (w.ckpt / "tasks.jsonl").open("a") as f:
        f.write('{"task": "add", "prompt": \n')
    return export_args(w), ("tasks.jsonl", "line 11", "Fix:")


def export_unknown_heldout_task(w: World) -> tuple[list[str], tuple[str, ...]]:
    heldout = w.tmp / "heldout.jsonl"
    heldout.write_text('{"task": "add", "prompt": "add 1+1="}\n{"task": "translate", "prompt": "hola"}\n')
    return export_args(w, "--heldout", str(heldout)), (str(heldout), "held-out task 'translate'", "Fix:")


def export_too_many_variants(w: World) -> tuple[list[str], tuple[str, ...]]:
    return export_args(w, "--variants", "11"), ("tasks.jsonl", "--variants 11 exceeds the 10", "Fix:")


def export_pickle_only_weights(w: World) -> tuple[list[str], tuple[str, ...]]:
    (w.ckpt / "backbone" / "model.safetensors").unlink()
    (w.ckpt / "backbone" / "pytorch_model.bin").write_bytes(pickle_bytes(w))
    return export_args(w), ("backbone", "pytorch_model.bin", "pickle is never loaded", "Fix:")


def export_pickle_named_safetensors(w: World) -> tuple[list[str], tuple[str, ...]]:
    (w.ckpt / "predictor" / "model.safetensors").write_bytes(pickle_bytes(w))
    return export_args(w), ("predictor/model.safetensors", "corrupt or truncated", "Fix:")


def export_corrupt_tokenizer(w: World) -> tuple[list[str], tuple[str, ...]]:
    (w.ckpt / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    return export_args(w), ("tokenizer.json", "not a valid tokenizers file", "Fix:")


def export_output_is_file(w: World) -> tuple[list[str], tuple[str, ...]]:
    w.out.write_text("not a directory")
    return export_args(w), (str(w.out), "not a directory", "Fix:")


def export_output_not_empty(w: World) -> tuple[list[str], tuple[str, ...]]:
    w.out.mkdir()
    (w.out / "precious.txt").write_text("keep me")
    return export_args(w), (str(w.out), "not empty", "--force")


def export_force_over_checkpoint(w: World) -> tuple[list[str], tuple[str, ...]]:
    w.out = w.ckpt
    return export_args(w, "--force"), ("is the input", "replacing it would delete the input", "Fix:")


def export_force_over_parent_of_checkpoint(w: World) -> tuple[list[str], tuple[str, ...]]:
    w.out = w.ckpt / ".."
    return export_args(w, "--force"), ("contains the input", "Fix:")


def export_force_over_foreign_dir(w: World) -> tuple[list[str], tuple[str, ...]]:
    w.out.mkdir()
    (w.out / "precious.txt").write_text("keep me")
    return export_args(w, "--force"), (str(w.out), "--force replaces only an empty directory", "manifest", "Fix:")


def new_checkpoint_force_over_backbone(w: World) -> tuple[list[str], tuple[str, ...]]:
    w.out = w.backbone
    return new_checkpoint_args(w, "--force"), ("is the input", "Fix:")


def export_output_under_a_file(w: World) -> tuple[list[str], tuple[str, ...]]:
    (w.tmp / "a-file").write_text("x")
    w.out = w.tmp / "a-file" / "out"
    return export_args(w), (str(w.tmp / "a-file"), "Fix:")


def export_no_write_permission(w: World) -> tuple[list[str], tuple[str, ...]]:
    w.out = read_only_dir(w) / "out"
    return export_args(w), (str(w.out.parent), "no write permission", "Fix:")


# --- new-checkpoint ----------------------------------------------------------------------------------------------


def new_checkpoint_pickle_backbone(w: World) -> tuple[list[str], tuple[str, ...]]:
    (w.backbone / "model.safetensors").unlink()
    (w.backbone / "pytorch_model.bin").write_bytes(pickle_bytes(w))
    return new_checkpoint_args(w), (str(w.backbone), "pickle is never loaded", "Fix:")


def new_checkpoint_unsupported_architecture(w: World) -> tuple[list[str], tuple[str, ...]]:
    edit_config(w.backbone, model_type="mamba")
    return new_checkpoint_args(w), ("config.json", "model_type='mamba'", "Fix:")


def new_checkpoint_missing_predictor_backbone(w: World) -> tuple[list[str], tuple[str, ...]]:
    missing = w.tmp / "no-such-lm"
    args = new_checkpoint_args(w, "--predictor-backbone", str(missing))
    return args, (str(missing), "predictor LM directory not found", "Fix:")


def new_checkpoint_unsupported_predictor_backbone(w: World) -> tuple[list[str], tuple[str, ...]]:
    lm = predictor_lm(w)
    edit_config(lm, model_type="gpt2")
    return new_checkpoint_args(w, "--predictor-backbone", str(lm)), ("lm/config.json", "model_type='gpt2'", "Fix:")


def new_checkpoint_pooling_without_predictor_backbone(w: World) -> tuple[list[str], tuple[str, ...]]:
    args = new_checkpoint_args(w, "--predictor-pooling", "mean")
    return args, ("--predictor-pooling applies to an LM predictor only", "--predictor-backbone", "Fix:")


def new_checkpoint_bad_generation_config(w: World) -> tuple[list[str], tuple[str, ...]]:
    (w.backbone / "generation_config.json").write_text('{"eos_token_id": "</s>"}')
    return new_checkpoint_args(w), (str(w.backbone / "generation_config.json"), "eos_token_id", "Fix:")


def new_checkpoint_keep_zero(w: World) -> tuple[list[str], tuple[str, ...]]:
    return new_checkpoint_args(w, "--keep", "0"), ("keep ratio must be in (0, 1], got 0.0", "Fix: pass e.g. --keep")


def new_checkpoint_malformed_tasks(w: World) -> tuple[list[str], tuple[str, ...]]:
    w.tasks.write_text('{"task": "add", "prompt": "add 1+1="}\n["not", "an", "object"]\n')
    return new_checkpoint_args(w), (str(w.tasks), "line 2", "Fix:")


def new_checkpoint_missing_tasks(w: World) -> tuple[list[str], tuple[str, ...]]:
    w.tasks.unlink()
    return new_checkpoint_args(w), (str(w.tasks), "tasks file not found", "Fix:")


def new_checkpoint_output_not_empty(w: World) -> tuple[list[str], tuple[str, ...]]:
    w.out.mkdir()
    (w.out / "precious.txt").write_text("keep me")
    return new_checkpoint_args(w), (str(w.out), "not empty", "--force")


def new_checkpoint_no_write_permission(w: World) -> tuple[list[str], tuple[str, ...]]:
    w.out = read_only_dir(w) / "ckpt"
    return new_checkpoint_args(w), (str(w.out.parent), "no write permission", "Fix:")


# --- validate ----------------------------------------------------------------------------------------------------


def validate_missing_output(w: World) -> tuple[list[str], tuple[str, ...]]:
    shutil.rmtree(w.exported)
    return validate_args(w), (str(w.exported), "output directory not found", "Fix:")


def validate_corrupt_manifest(w: World) -> tuple[list[str], tuple[str, ...]]:
    truncate(w.exported / MANIFEST_FILE)
    return validate_args(w), (MANIFEST_FILE, "not valid JSON", "Fix:")


def validate_nan_checkpoint(w: World) -> tuple[list[str], tuple[str, ...]]:
    edit_tensors(w.ckpt / "predictor" / "model.safetensors", set_first(float("nan")))
    return validate_args(w), ("predictor/model.safetensors", "NaN or Inf", "Fix:")


def validate_pickle_kept_indices(w: World) -> tuple[list[str], tuple[str, ...]]:
    (w.exported / "variants.safetensors").write_bytes(pickle_bytes(w))
    refresh(w.exported, "variants.safetensors")
    return validate_args(w), ("variants.safetensors", "corrupt or truncated", "Fix:")


def validate_other_checkpoint(w: World) -> tuple[list[str], tuple[str, ...]]:
    edit_json(w.ckpt / "ifp.json", k_per_layer=[12])
    return validate_args(w), ("ifp.json", "k_per_layer has 1 entries", "Fix:")


# --- run ---------------------------------------------------------------------------------------------------------


def run_missing_output(w: World) -> tuple[list[str], tuple[str, ...]]:
    shutil.rmtree(w.exported)
    return run_args(w), (str(w.exported), "output directory not found", "Fix:")


def run_tampered_weights(w: World) -> tuple[list[str], tuple[str, ...]]:
    data = bytearray((w.exported / "onnx" / "decoder_shared.onnx_data").read_bytes())
    data[len(data) // 2] ^= 0x01
    (w.exported / "onnx" / "decoder_shared.onnx_data").write_bytes(bytes(data))
    return run_args(w), (MANIFEST_FILE, "decoder_shared.onnx_data", "sha256", "Fix:")


def run_manifest_path_escape(w: World) -> tuple[list[str], tuple[str, ...]]:
    manifest = json.loads((w.exported / MANIFEST_FILE).read_text())
    manifest["files"].append({"path": "onnx/../../secret", "size": 1, "sha256": "0" * 64})
    (w.exported / MANIFEST_FILE).write_text(json.dumps(manifest))
    return run_args(w), (MANIFEST_FILE, "leaves the output directory", "Fix:")


def run_unknown_variant(w: World) -> tuple[list[str], tuple[str, ...]]:
    return run_args(w, "--variant", "poetry"), (MANIFEST_FILE, "unknown variant 'poetry'", "use one of: add")


@dataclass(frozen=True)
class Case:
    make: Callable[[World], tuple[list[str], tuple[str, ...]]]
    console_script: bool = False  # run as a real `ifp-export` subprocess instead of in-process

    @property
    def command(self) -> str:
        name = self.make.__name__
        return "new-checkpoint" if name.startswith("new_checkpoint_") else name.split("_")[0]

    @property
    def needs_export(self) -> bool:
        return self.command in ("validate", "run")


CASES = [
    Case(export_missing_dir),
    Case(export_missing_spec),
    Case(export_min_onnxruntime_too_old),
    Case(export_corrupt_spec),
    Case(export_wrong_format_version),
    Case(export_truncated_safetensors),
    Case(export_wrong_tensor_shape),
    Case(export_wrong_predictor_shape),
    Case(export_lm_predictor_head_shape),
    Case(export_lm_predictor_nan_lm),
    Case(export_lm_predictor_bad_pooling),
    Case(export_lm_predictor_in_version_1),
    Case(export_nan_weights),
    Case(export_inf_predictor_weights),
    Case(export_unsupported_architecture),
    Case(export_llama3_rope_without_low_freq_factor),
    Case(export_fractional_heads),
    Case(export_weight_map_value_not_a_file_name),
    Case(export_tokenizer_symlink_outside),
    Case(export_tasks_symlink_outside),
    Case(export_weights_symlink_outside),
    Case(export_backbone_dir_symlink_outside),
    Case(export_k_above_d_ff),
    Case(export_k_zero),
    Case(export_empty_tasks),
    Case(export_malformed_tasks),
    Case(export_unknown_heldout_task),
    Case(export_too_many_variants),
    Case(export_pickle_only_weights, console_script=True),
    Case(export_pickle_named_safetensors),
    Case(export_corrupt_tokenizer),
    Case(export_output_is_file),
    Case(export_output_not_empty, console_script=True),
    Case(export_force_over_checkpoint),
    Case(export_force_over_parent_of_checkpoint),
    Case(export_force_over_foreign_dir, console_script=True),
    Case(new_checkpoint_force_over_backbone),
    Case(export_output_under_a_file),
    Case(export_no_write_permission),
    Case(new_checkpoint_pickle_backbone),
    Case(new_checkpoint_unsupported_architecture),
    Case(new_checkpoint_missing_predictor_backbone),
    Case(new_checkpoint_unsupported_predictor_backbone),
    Case(new_checkpoint_pooling_without_predictor_backbone),
    Case(new_checkpoint_bad_generation_config),
    Case(new_checkpoint_keep_zero),
    Case(new_checkpoint_malformed_tasks),
    Case(new_checkpoint_missing_tasks),
    Case(new_checkpoint_output_not_empty),
    Case(new_checkpoint_no_write_permission),
    Case(validate_missing_output),
    Case(validate_corrupt_manifest),
    Case(validate_nan_checkpoint),
    Case(validate_pickle_kept_indices),
    Case(validate_other_checkpoint),
    Case(run_missing_output),
    Case(run_tampered_weights),
    Case(run_manifest_path_escape),
    Case(run_unknown_variant),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """src/backbone + src/tasks.jsonl and the checkpoint ckpt/ made from them (same seed as `tiny_export`'s)."""
    return make_checkpoint(tmp_path_factory.mktemp("pristine")).parent


def console_script(*args: str) -> tuple[int, str, str]:
    script = Path(sys.executable).with_name("ifp-export")
    done = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=300, check=False)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.make.__name__ for c in CASES])
def test_bad_input(
    case: Case, pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    shutil.copytree(pristine / "ckpt", tmp_path / "ckpt")
    shutil.copytree(pristine / "src", tmp_path / "src")
    w = World(
        tmp_path, tmp_path / "ckpt", tmp_path / "src" / "backbone", tmp_path / "src" / "tasks.jsonl",
        tmp_path / "out", tmp_path / "unpickled.marker",
    )  # fmt: skip
    if case.needs_export:
        exported: ExportContext = request.getfixturevalue("tiny_export")
        w.exported = shutil.copytree(exported.workdir, tmp_path / "exported")
    try:
        args, needles = case.make(w)
        before = snapshot(tmp_path)
        if case.console_script:
            code, _, err = console_script(*args)
        else:
            code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, *needles)
        assert not w.marker.exists(), "a pickle payload was unpickled"
        assert snapshot(tmp_path) == before, "the command created or changed files"
        assert not [p for p in tmp_path.rglob("*") if ".staging-" in p.name]
    finally:
        for undo in w.cleanup:
            undo()


def test_catalog_covers_every_command() -> None:
    commands = {c.command for c in CASES}
    assert len(CASES) >= 20 and commands == {"export", "validate", "run", "new-checkpoint"}
    print(f"{len(CASES)} bad-input cases, {sum(c.console_script for c in CASES)} via the console script")
