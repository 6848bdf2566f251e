"""Suite-wide settings and the shared full-export fixtures."""

import subprocess
from pathlib import Path

import pytest
import torch
from tiny import make_checkpoint, onnx_only_export, run_export

from ifp_export.cli import bundled_sample
from ifp_export.pipeline import ExportContext

# The test models are tiny: one intra-op thread is as fast as two when the machine is idle, and keeps the suite
# from slowing down ~10x (OpenMP threads spinning against each other) when another process is using the cores.
torch.set_num_threads(1)


# Full exports are the slow part of the suite; each is made once per session and shared (read-only: tests
# that damage an output copy it first).
@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> ExportContext:
    """A tiny random Llama-style checkpoint exported with every pass; held-out = its calibration prompts."""
    root = tmp_path_factory.mktemp("tiny_export")
    checkpoint = make_checkpoint(root)
    return run_export(checkpoint, root / "out", heldout=checkpoint / "tasks.jsonl")


@pytest.fixture(scope="session")
def qwen2_export(tmp_path_factory: pytest.TempPathFactory) -> ExportContext:
    """A tiny random Qwen2-style checkpoint (q/k/v bias, tied embeddings) exported with every pass."""
    root = tmp_path_factory.mktemp("qwen2_export")
    checkpoint = make_checkpoint(root, model_type="qwen2", tie_word_embeddings=True)
    return run_export(checkpoint, root / "out", heldout=checkpoint / "tasks.jsonl")


@pytest.fixture(scope="session")
def sample_export(tmp_path_factory: pytest.TempPathFactory) -> ExportContext:
    """The bundled trained sample exported with every pass, with its held-out prompts."""
    root = tmp_path_factory.mktemp("sample_export")
    return run_export(bundled_sample(), root / "out", heldout=bundled_sample().parent / "heldout.jsonl")


@pytest.fixture(scope="session")
def sample_int8_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled sample's ONNX files with `--quantize int8` (only the passes an ONNX app needs)."""
    return onnx_only_export(tmp_path_factory.mktemp("sample_int8") / "out", quantize="int8")


@pytest.fixture(scope="session")
def sample_int4_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled sample's ONNX files with `--quantize int4` (only the passes an ONNX app needs)."""
    return onnx_only_export(tmp_path_factory.mktemp("sample_int4") / "out", quantize="int4")


@pytest.fixture(scope="session")
def dynamic_export(tmp_path_factory: pytest.TempPathFactory) -> ExportContext:
    """A tiny random Llama-style checkpoint exported with --mode dynamic (dynamic.onnx beside the variants)."""
    root = tmp_path_factory.mktemp("dynamic")
    checkpoint = make_checkpoint(root)
    return run_export(checkpoint, root / "out", mode="dynamic")


@pytest.fixture
def small_disk(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A real tmpfs of `request.param` bytes (root in CI): writes past it fail with ENOSPC from whatever writer
    (Python, C++)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs", str(mount)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()}): needs root / CAP_SYS_ADMIN")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)
