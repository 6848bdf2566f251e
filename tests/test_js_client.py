"""The JavaScript client (examples/js) on the real npm packages, and the browser page (examples/web) in a real headless
Chromium, each against the reference runtime (`ifp_export.runtime`): same route, same tokens, same text.

The packages come from the npm registry, installed once into ~/.cache/ifp-export/npm and reused: the example's own
lockfile (`npm ci`) and each release of `RELEASES` that the lockfile does not pin. `--ignore-scripts` skips
onnxruntime-node's install script, which downloads GPU builds from outside the registry (the CPU binaries ship in the
package).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ifp_export.pipeline import ExportContext
from ifp_export.runtime import Runtime

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_JS = REPO / "examples" / "js"
EXAMPLE_WEB = REPO / "examples" / "web"
NPM_CACHE = Path.home() / ".cache" / "ifp-export" / "npm"
CHROMIUM = Path("/usr/bin/chromium")

# The releases the JavaScript client is tested on (and README's compatibility table states): the export's default
# floor (`--min-onnxruntime 1.20`, its latest patch) and the newest on the registry. The example's package.json pins
# the newest.
RELEASES = {"onnxruntime-node": ("1.20.1", "1.30.0"), "onnxruntime-web": ("1.20.1", "1.31.1")}

MAX_NEW_TOKENS = 12
# One prompt per task of the sample, a held-out one each, and one longer than the predictor's max_length (128 tokens:
# it reads the first 128, `keep_first`).
PROMPTS = [
    "add 45+12=",
    "reverse kqzvb=",
    "sort 50913=",
    "close (()((=",
    "add 92+1=",
    "reverse abcdefgh=",
    "sort " + "9081726354" * 14 + "=",
]
BROWSER_PROMPTS = ["add 45+12=", "reverse kqzvb=", "close (()((="]
PAGE_MAX_NEW_TOKENS = 64  # examples/web/app.js generates with IfpClient's default


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found: install Node.js and npm (Debian: apt-get install nodejs npm)")
    return path


def npm_install(directory: Path, argv: list[str], setup: Callable[[Path], None]) -> Path:
    """Run an npm install into `directory` once: built beside it and renamed into place, so a run that dies leaves
    no half-installed cache."""
    if (directory / "node_modules").is_dir():
        return directory / "node_modules"
    staging = directory.with_name(f".{directory.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    setup(staging)
    result = subprocess.run(
        [tool("npm"), *argv, "--ignore-scripts", "--no-audit", "--no-fund"],
        cwd=staging,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        pytest.fail(f"npm {' '.join(argv)} failed in {directory}:\n{result.stderr[-3000:]}")
    try:
        staging.rename(directory)
    except OSError:  # another run installed it first
        shutil.rmtree(staging, ignore_errors=True)
    return directory / "node_modules"


@functools.cache
def example_modules() -> Path:
    """node_modules of the example's lockfile (`npm ci`), cached by the lockfile's hash."""
    lock = (EXAMPLE_JS / "package-lock.json").read_bytes()
    directory = NPM_CACHE / f"example-{hashlib.sha256(lock).hexdigest()[:16]}"

    def copy_manifests(staging: Path) -> None:
        for name in ("package.json", "package-lock.json"):
            shutil.copy(EXAMPLE_JS / name, staging / name)

    return npm_install(directory, ["ci"], copy_manifests)


def pinned_version(package: str) -> str:
    return json.loads((EXAMPLE_JS / "package.json").read_text())["dependencies"][package]


def runtime_package(package: str, version: str) -> Path:
    """The installed package directory of one release: the lockfile's when it pins that release, else its own."""
    if version == pinned_version(package):
        return example_modules() / package
    directory = NPM_CACHE / f"{package}-{version}"

    def empty_project(staging: Path) -> None:
        (staging / "package.json").write_text('{"private": true}\n')

    return npm_install(directory, ["install", "--save-exact", f"{package}@{version}"], empty_project) / package


@pytest.fixture(scope="session")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of examples/ (as an app would copy it) beside the installed node_modules and the page driver."""
    tool("node")
    modules = example_modules()
    root = tmp_path_factory.mktemp("js_example")
    shutil.copytree(EXAMPLE_JS, root / "examples" / "js", ignore=shutil.ignore_patterns("node_modules"))
    shutil.copytree(EXAMPLE_WEB, root / "examples" / "web", ignore=shutil.ignore_patterns("*.png"))
    for script in (REPO / "tests" / "js").glob("*.mjs"):
        shutil.copy(script, root / "examples" / "js")
    (root / "examples" / "js" / "node_modules").symlink_to(modules, target_is_directory=True)
    return root


def export_dir(exported: ExportContext | Path) -> Path:
    """The output directory of a full export (`sample_export`) or of an ONNX-only one (`sample_int4_export`, ...)."""
    return exported.workdir if isinstance(exported, ExportContext) else exported


def python_answers(out: Path, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS) -> list[dict]:
    """Route, greedy tokens and streamed text of each prompt from the reference runtime."""
    runtime = Runtime(out, threads=1)
    answers = []
    for prompt in prompts:
        route = runtime.route(prompt)
        tokens = list(runtime.generate(prompt, variant=route.variant, max_new_tokens=max_new_tokens))
        text = "".join(runtime.stream_text(iter(tokens)))
        answers.append({"ids": runtime.encode(prompt), "route": route, "tokens": tokens, "text": text})
    return answers


def run_cli(example: Path, out: Path, runtime: Path, prompts: list[str]) -> subprocess.CompletedProcess:
    """examples/js/cli.js on every prompt in one Node process."""
    argv = [tool("node"), str(example / "examples" / "js" / "cli.js"), str(out), "--runtime", str(runtime), "--json"]
    argv += ["--max-new-tokens", str(MAX_NEW_TOKENS)]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def node_answers(example: Path, out: Path, runtime: Path, prompts: list[str]) -> list[dict]:
    result = run_cli(example, out, runtime, prompts)
    assert result.returncode == 0, f"{runtime}: {result.stderr[-3000:]}"
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize(
    ("package", "version"), [(package, version) for package, versions in RELEASES.items() for version in versions]
)
@pytest.mark.parametrize("exported", ["sample_export", "sample_int8_export", "sample_int4_export"])
def test_node_client_equals_python_runtime(
    example: Path, exported: str, package: str, version: str, request: pytest.FixtureRequest
) -> None:
    """examples/js under Node (onnxruntime-node natively, onnxruntime-web as WebAssembly) routes every prompt to the
    variant the Python runtime picks, with the same scores, and generates the same tokens and text."""
    out = export_dir(request.getfixturevalue(exported))
    got = node_answers(example, out, runtime_package(package, version), PROMPTS)
    expected = python_answers(out, PROMPTS)
    assert len(got) == len(PROMPTS)
    assert {answer["versions"][package.removeprefix("onnxruntime-")] for answer in got} == {version}
    for prompt, js, py in zip(PROMPTS, got, expected, strict=True):
        assert js["ids"] == py["ids"], prompt
        assert js["route"]["variant"] == py["route"].variant, (prompt, js["route"]["scores"], py["route"].scores)
        assert js["route"]["truncated"] == py["route"].truncated, prompt
        assert js["route"]["scores"] == pytest.approx(py["route"].scores, abs=1e-4), prompt
        assert (js["tokens"], js["text"]) == (py["tokens"], py["text"]), prompt
    assert got[-1]["route"]["truncated"], "the long prompt must exceed the predictor's max_length"


def flip_a_bit(out: Path) -> str:
    data = out / "onnx" / "decoder_shared.onnx_data"
    damaged = bytearray(data.read_bytes())
    damaged[len(damaged) // 2] ^= 1
    data.write_bytes(bytes(damaged))
    return "error: onnx/decoder_shared.onnx_data does not match manifest.json"


def point_outside(out: Path) -> str:
    manifest = json.loads((out / "manifest.json").read_text())
    outside = "../elsewhere/predictor.onnx"
    manifest["predictor"]["onnx"]["model"] = outside
    manifest["files"].append({"path": outside, "size": 1, "sha256": "0" * 64})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return f"error: {outside} is not a file listed inside the export's manifest.json"


# onnxruntime-node opens the models itself (`localPath`): only their paths are checked; onnxruntime-web gets their
# bytes, checked against the manifest's sizes and sha256 too.
@pytest.mark.parametrize(
    ("damage", "package"),
    [(flip_a_bit, "onnxruntime-web"), (point_outside, "onnxruntime-web"), (point_outside, "onnxruntime-node")],
)
def test_damaged_export_is_refused(
    example: Path, sample_export: ExportContext, tmp_path: Path, damage: Callable[[Path], str], package: str
) -> None:
    """A data file that differs from the manifest (one flipped bit, as a broken download) or a path leaving the
    export is refused before any session runs on it: exit 2, one line naming the file."""
    out = tmp_path / "out"
    shutil.copytree(sample_export.workdir, out)
    expected = damage(out)
    result = run_cli(example, out, runtime_package(package, RELEASES[package][-1]), ["add 45+12="])
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(expected) and len(result.stderr.splitlines()) == 1, result.stderr


def test_graph_above_the_runtime_is_refused(example: Path, sample_export: ExportContext, tmp_path: Path) -> None:
    """A graph whose recorded floor (`min_onnxruntime`, here raised to 1.24 as `--min-onnxruntime 1.24` records it)
    is newer than the injected runtime gets a one-line error naming it and both releases, not the runtime's own."""
    out = tmp_path / "out"
    shutil.copytree(sample_export.workdir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["predictor"]["onnx"]["min_onnxruntime"] = "1.24"
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    oldest = RELEASES["onnxruntime-node"][0]
    result = run_cli(example, out, runtime_package("onnxruntime-node", oldest), ["add 45+12="])
    assert result.returncode == 2 and result.stdout == ""
    expected = f"error: onnx/predictor.onnx needs onnxruntime 1.24 or newer, this app has {oldest}: "
    assert result.stderr.startswith(expected) and len(result.stderr.splitlines()) == 1, result.stderr


SWITCH_PROMPTS = ["add 45+12=", "reverse kqzvb=", "add 3+5=", "reverse abc="]


def switch_reads(example: Path, out: Path, max_sessions: int) -> dict:
    web = runtime_package("onnxruntime-web", RELEASES["onnxruntime-web"][-1])
    argv = [tool("node"), "switch_reads.mjs", str(out), str(web), json.dumps(SWITCH_PROMPTS), str(max_sessions)]
    result = subprocess.run(argv, cwd=example / "examples" / "js", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_switching_variants_reads_the_shared_weights_once(example: Path, sample_export: ExportContext) -> None:
    """On onnxruntime-web (model bytes + `externalData`) the shared weights are read once however often the client
    switches variants; with one session kept, switching back re-reads only the variant's own two files."""
    out = sample_export.workdir
    runtime = Runtime(out, threads=1)
    first, second = (runtime.route(p).variant for p in SWITCH_PROMPTS[:2])
    assert [runtime.route(p).variant for p in SWITCH_PROMPTS] == [first, second, first, second]
    own = {name: [runtime.output.variant(name)["files"]["onnx"]["model"]] for name in (first, second)}
    shared = set.intersection(*(set(v["files"]["onnx"]["data"]) for v in runtime.output.manifest["variants"]))
    for name in own:
        own[name] += [path for path in runtime.output.variant(name)["files"]["onnx"]["data"] if path not in shared]
    assert len(shared) == 1 and all(len(files) == 2 for files in own.values())
    (shared_file,) = shared
    for max_sessions, reads_per_variant in ((1, 2), (2, 1)):
        got = switch_reads(example, out, max_sessions)
        assert got["variants"] == [first, second, first, second]
        assert got["reads"][shared_file] == 1, got
        for files in own.values():
            assert [got["reads"][path] for path in files] == [reads_per_variant] * 2, (max_sessions, got)


def test_package_pins_the_newest_tested_releases() -> None:
    """The example's package.json installs the releases the tests call the newest (one list: `RELEASES`)."""
    for package, versions in RELEASES.items():
        assert pinned_version(package) == versions[-1], package


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def static_server(example: Path) -> Iterator[str]:
    """The example's directory served over HTTP on 127.0.0.1 (a thread of this process)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(example)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("exported", ["sample_export", "sample_int8_export", "sample_int4_export"])
def test_browser_page_equals_python_runtime(
    example: Path, static_server: str, exported: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """examples/web in headless Chromium: each typed prompt shows the Python runtime's variant and streams its
    answer (onnxruntime-web of the lockfile, the export fetched over HTTP)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: apt-get install chromium")
    out = export_dir(request.getfixturevalue(exported))
    served = example / exported
    if not served.exists():
        served.symlink_to(out, target_is_directory=True)
    screenshot = tmp_path / "page.png"
    url = f"{static_server}/examples/web/?export=/{exported}/"
    argv = [tool("node"), "drive_page.mjs", url, json.dumps(BROWSER_PROMPTS), str(screenshot)]
    result = subprocess.run(argv, cwd=example / "examples" / "js", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    got = [json.loads(line) for line in result.stdout.splitlines()]
    expected = python_answers(out, BROWSER_PROMPTS, PAGE_MAX_NEW_TOKENS)
    assert [answer["state"] for answer in got] == ["done"] * len(BROWSER_PROMPTS), (got, result.stderr)
    for prompt, page, py in zip(BROWSER_PROMPTS, got, expected, strict=True):
        assert page["variant"] == py["route"].variant, prompt
        assert (page["tokens"], page["text"]) == (py["tokens"], py["text"]), prompt
    assert f"onnxruntime-web {pinned_version('onnxruntime-web')}" in got[0]["status"]
    assert screenshot.read_bytes().startswith(b"\x89PNG")
