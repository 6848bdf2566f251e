"""Fuzzed loaders (DESIGN.md section 10): mutated manifests, ifp.json, tasks.jsonl and config.json files only ever
raise our one-line IFPError (naming a file inside the directory under test), and no file outside that directory is
ever opened. CI runs 100 examples per test; IFP_FUZZ_EXAMPLES=1000 (or more) is the nightly-style run."""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import make_checkpoint

import ifp_export
from ifp_export.artifacts import MANIFEST_FILE, open_output
from ifp_export.checkpoint import SPEC_FILE, TASKS_FILE, load_checkpoint, read_spec, read_tasks
from ifp_export.errors import IFPError
from ifp_export.pipeline import ExportContext

EXAMPLES = int(os.environ.get("IFP_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
PACKAGE_DIR = Path(ifp_export.__file__).resolve().parent  # the loaders read their JSON Schemas from here

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
# fmt: off
HOSTILE_PATHS = [
    "../outside", "../../etc/passwd", "/etc/passwd", "//etc/passwd", "onnx/../../x", "onnx/../manifest.json",
    "a/./../../b", ".", "..", "", "./", "onnx/", "onnx//add.onnx", "C:\\Windows\\win.ini", "\\\\host\\share",
    "onnx\\..\\..\\x", "~/.ssh/id_rsa", "onnx/add.onnx\x00.txt", "x" * 5000, "/".join(["a"] * 2000),
    "données/日本語.onnx", "\u202eabc", "proc/self/environ", "/proc/self/environ", "/dev/zero",
]
# fmt: on
hostile_paths = st.one_of(st.sampled_from(HOSTILE_PATHS), st.text(max_size=60), st.text(alphabet="./\\a", max_size=20))


def node_paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every (key/index) path into a JSON value, the root included."""
    paths = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            paths += node_paths(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            paths += node_paths(value, (*prefix, index))
    return paths


def mutate_json(draw: Callable, data: Any, extra_values: st.SearchStrategy = json_values) -> Any:
    """Apply 1-3 random edits: replace a node (random JSON or hostile path string), delete a key or item, add a
    key; `data` is a deep copy and is changed in place (the returned root may be a new value)."""
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(node_paths(data)))
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        if not target:
            if op == "replace":
                data = draw(extra_values)
            continue
        parent = data
        for step in target[:-1]:
            parent = parent[step]
        key = target[-1]
        if op == "replace":
            parent[key] = draw(st.one_of(extra_values, hostile_paths))
        elif op == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = draw(extra_values)
        else:
            parent.insert(key, draw(extra_values))
    return data


def mutate_bytes(draw: Callable, data: bytes) -> bytes:
    """Truncate, flip, insert or delete bytes, or replace everything with random bytes."""
    op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "random"]))
    if op == "random" or not data:
        return draw(st.binary(max_size=200))
    at = draw(st.integers(0, len(data) - 1))
    if op == "truncate":
        return data[:at]
    if op == "flip":
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    if op == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    return data[:at] + data[at + draw(st.integers(1, 8)) :]


@st.composite
def mutated_json_file(draw: Callable, original: bytes) -> bytes:
    if draw(st.booleans()):
        return mutate_bytes(draw, original)
    data = mutate_json(draw, json.loads(original))
    return json.dumps(data, ensure_ascii=draw(st.booleans())).encode()


@st.composite
def mutated_manifest(draw: Callable, original: bytes) -> bytes:
    """A third each: a hostile path in the file list (with its real size and hash, so only the path is wrong),
    generic JSON edits, or byte-level damage."""
    kind = draw(st.sampled_from(["path", "json", "bytes"]))
    if kind != "path":
        return draw(mutated_json_file(original)) if kind == "json" else mutate_bytes(draw, original)
    data = json.loads(original)
    files = data["files"]
    entry = dict(draw(st.sampled_from(files)))
    entry["path"] = draw(hostile_paths)
    if draw(st.booleans()):
        files.append(entry)
    else:
        files[draw(st.integers(0, len(files) - 1))] = entry
    return json.dumps(data).encode()


@st.composite
def mutated_tasks(draw: Callable, original: bytes) -> bytes:
    kind = draw(st.sampled_from(["bytes", "line", "lines"]))
    if kind == "bytes":
        return mutate_bytes(draw, original)
    lines = original.decode().splitlines()
    if kind == "line":
        at = draw(st.integers(0, len(lines) - 1))
        lines[at] = json.dumps(mutate_json(draw, json.loads(lines[at])))
    else:
        lines = [json.dumps(v) for v in draw(st.lists(json_values, max_size=5))] + draw(
            st.lists(st.text(max_size=20), max_size=3)
        )
    return "\n".join(lines).encode()


@contextmanager
def recorded_opens() -> Iterator[list[str]]:
    """Every path opened through open / io.open / os.open while inside the block (fds are skipped)."""
    opened: list[str] = []

    def record(real: Callable) -> Callable:
        def wrapper(file: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(file, str | bytes | os.PathLike):
                opened.append(os.fsdecode(file))
            return real(file, *args, **kwargs)

        return wrapper

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "open", record(builtins.open))
        mp.setattr(io, "open", record(io.open))
        mp.setattr(os, "open", record(os.open))
        yield opened


def inside(path: str, root: Path) -> bool:
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, str(r)]) == str(r) for r in (root.resolve(), PACKAGE_DIR))


def check_loader(call: Callable[[], object], root: Path) -> str:
    """Run a loader: only IFPError may escape, naming a file inside `root`; no file outside `root` (or the package's
    own schemas) may be opened. Returns "ok" or "refused"."""
    with recorded_opens() as opened:
        try:
            call()
            outcome = "ok"
        except IFPError as err:
            message = str(err)
            assert "\n" not in message and message.startswith("error: "), message
            assert err.path is not None and inside(err.path, root), message
            outcome = "refused"
    outside = [p for p in opened if not inside(p, root)]
    assert not outside, f"opened outside the directory under test: {outside[:5]}"
    return outcome


@pytest.fixture(scope="module")
def output_copy(tiny_export: ExportContext, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(shutil.copytree(tiny_export.workdir, tmp_path_factory.mktemp("fuzz_output") / "out"))


@pytest.fixture(scope="module")
def checkpoint_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("fuzz_checkpoint"))


@pytest.fixture
def restore(request: pytest.FixtureRequest) -> Iterator[Callable[[Path], None]]:
    """Register files to put back after the test (the fuzzed dirs are shared by all examples)."""
    saved: dict[Path, bytes] = {}
    yield lambda path: saved.setdefault(path, path.read_bytes())
    for path, data in saved.items():
        path.write_bytes(data)


def tally(counts: dict[str, int], outcome: str) -> None:
    counts[outcome] = counts.get(outcome, 0) + 1


def test_fuzz_open_output(output_copy: Path, restore: Callable[[Path], None]) -> None:
    manifest = output_copy / MANIFEST_FILE
    restore(manifest)
    original = manifest.read_bytes()
    counts: dict[str, int] = {}

    @FUZZ
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        manifest.write_bytes(data.draw(mutated_manifest(original)))
        tally(counts, check_loader(lambda: open_output(output_copy), output_copy))

    fuzz()
    print(f"open_output: {sum(counts.values())} mutated manifests, {counts}")
    assert counts.get("refused", 0) > 0


@pytest.mark.parametrize("target", [SPEC_FILE, TASKS_FILE, "backbone/config.json", "predictor/config.json"])
def test_fuzz_checkpoint_loaders(checkpoint_copy: Path, restore: Callable[[Path], None], target: str) -> None:
    path = checkpoint_copy / target
    restore(path)
    original = path.read_bytes()
    strategy = mutated_tasks(original) if target == TASKS_FILE else mutated_json_file(original)
    direct = {SPEC_FILE: read_spec, TASKS_FILE: lambda root: read_tasks(root / TASKS_FILE)}.get(target)
    counts: dict[str, int] = {}

    @FUZZ
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        path.write_bytes(data.draw(strategy))
        if direct is not None:
            tally(counts, "direct " + check_loader(lambda: direct(checkpoint_copy), checkpoint_copy))
        tally(counts, check_loader(lambda: load_checkpoint(checkpoint_copy), checkpoint_copy))

    fuzz()
    print(f"{target}: {EXAMPLES} max examples, outcomes {counts}")
    assert counts.get("refused", 0) > 0
