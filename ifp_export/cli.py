"""The `ifp-export` command line. Bad input: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ifp_export.errors import IFPError, ValidationFailed, environment_failure
from ifp_export.fsutil import canonical_json
from ifp_export.summary import build_summary, model_entries

if TYPE_CHECKING:
    from ifp_export.pipeline import Pipeline

DEFAULT_OUTPUT = Path("ifp-artifacts")


def bundled_sample() -> Path:
    """The trained sample checkpoint shipped with the package (samples/checkpoint)."""
    return Path(str(resources.files("ifp_export.samples").joinpath("checkpoint")))


EXIT_CODES = """\b
Exit codes:
  0  ok
  2  bad input (one line on stderr: what, which file, how to fix)
  3  validation failed (the export's own checks: an export bug, not your input)
  4  environment: not enough disk (checked before any work) or out of disk / memory mid-run
"""


checks_option = click.option(
    "--checks",
    type=click.Choice(["full", "quick"]),
    default="full",
    show_default=True,
    help="quick: validate the dense model and the first variant in full, the other variants by one forward over "
    "their prompts (the summary says which); for the inner loop, never for a release.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.version_option(package_name="ifp-export")
def cli() -> None:
    """Export Instruction-Following Pruning (IFPruning) models as per-task pruned ONNX / Core ML variants."""


@cli.command(epilog=EXIT_CODES)
@click.argument("checkpoint", required=False, type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), default=DEFAULT_OUTPUT, show_default=True, help="Output dir."
)
@click.option("--until", metavar="PASS", help="Stop after this pass (e.g. load, predict, group, fold).")
@click.option("--keep", type=float, help="Override the checkpoint's keep ratio (0 < keep <= 1).")
@click.option("--variants", type=int, help="Cluster prompts into N variants instead of one per task.")
@click.option(
    "--heldout",
    type=click.Path(path_type=Path),
    help="Held-out prompts (JSONL, optional 'answer') for routing accuracy; default: the sample's, with the sample.",
)
@click.option(
    "--quantize",
    type=click.Choice(["none", "int8", "int4"]),
    default="none",
    show_default=True,
    help="Weight-only quantization (ONNX: MatMulNBits with 8 or 4 bits; Core ML decoder: coremltools "
    "int8 per channel / int4 block 32).",
)
@click.option(
    "--mode",
    type=click.Choice(["static", "dynamic"]),
    default="static",
    show_default=True,
    help="dynamic: also emit onnx/dynamic.onnx, pruned per prompt from the predictor's own top-k (fp32 only).",
)
@click.option(
    "--min-onnxruntime",
    metavar="RELEASE",
    default="1.20",
    show_default=True,
    help="Oldest onnxruntime release the ONNX graphs must run on (recorded per file in the manifest); 1.24 or newer "
    "uses the opset-23 Attention and RMSNormalization, 1.22 or newer keeps --quantize int8 as MatMulNBits.",
)
@click.option(
    "--keep-massive-neurons",
    is_flag=True,
    help="Keep the dense model's massive-activation FFN neurons (found on the calibration prompts) in every variant, "
    "in place of its lowest-ranked others (k unchanged).",
)
@checks_option
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON summary object on stdout (schema: summary.schema.json)."
)
@click.option("--junit", type=click.Path(path_type=Path), help="Write the validation checks as JUnit XML to FILE.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Predictor batch size.")
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing output, only if it is empty or a previous ifp-export output whose manifest verifies "
    "(never the input checkpoint or a directory holding it); replaced only after success.",
)
def export(
    checkpoint: Path | None,
    output: Path,
    until: str | None,
    keep: float | None,
    variants: int | None,
    heldout: Path | None,
    quantize: str,
    mode: str,
    min_onnxruntime: str,
    keep_massive_neurons: bool,
    checks: str,
    as_json: bool,
    junit: Path | None,
    batch_size: int,
    force: bool,
) -> None:
    """Run the export pipeline on CHECKPOINT (default: the bundled trained sample)."""
    from ifp_export.pipeline import ExportContext, ExportOptions
    from ifp_export.preflight import preflight
    from ifp_export.staging import check_output_target, staged_directory
    from ifp_export.targets.onnx.floor import floor_text, parse_floor

    ctx: ExportContext | None = None
    models: list | None = None
    try:
        if variants is not None and variants < 1:
            raise IFPError(f"--variants must be at least 1, got {variants}", None, "pass e.g. --variants 4")
        if mode == "dynamic" and quantize != "none":
            raise IFPError(
                "--mode dynamic gathers fp32 FFN weights per prompt", None, "drop --quantize or use --mode static"
            )
        if batch_size < 1:
            raise IFPError(f"--batch-size must be at least 1, got {batch_size}", None, "pass e.g. --batch-size 64")
        floor = floor_text(parse_floor(min_onnxruntime))
        pipeline = export_pipeline(until)
        if checkpoint is None:
            checkpoint, heldout = bundled_sample(), heldout or bundled_sample().parent / "heldout.jsonl"
        inputs = (checkpoint,) if heldout is None else (checkpoint, heldout)
        check_output_target(output, force, inputs, replaceable=previous_export)
        preflight(checkpoint, output, variants=variants, keep=keep, quantize=quantize, mode=mode, until=until)
        options = ExportOptions(
            checkpoint=checkpoint,
            output=output,
            keep=keep,
            variants=variants,
            heldout=heldout,
            until=until,
            batch_size=batch_size,
            quantize=quantize,
            mode=mode,
            min_onnxruntime=floor,
            keep_massive_neurons=keep_massive_neurons,
            checks=checks,
        )
        with staged_directory(output, force, inputs, previous_export, checked=True) as stage:
            ctx = ExportContext(options=options, workdir=stage)
            try:
                pipeline.run(ctx, until=until)
            except BaseException:
                models = figures_of_failed_run(ctx, stage)
                raise
            models = model_entries(ctx, stage)
    except Exception as err:
        emit_results("export", output, ctx, models, environment_failure(err) or err, as_json, junit)
        raise
    emit_results("export", output, ctx, models, None, as_json, junit)
    total = sum(seconds for _, seconds in ctx.timings)
    click.echo(f"wrote {output} ({len(ctx.timings)} passes, {total:.1f}s)", err=as_json)


def export_pipeline(until: str | None) -> Pipeline:
    from ifp_export.passes import default_passes
    from ifp_export.pipeline import Pipeline

    pipeline = Pipeline(default_passes())
    pipeline.check_until(until)
    return pipeline


def previous_export(target: Path) -> None:
    """`--force` replaces a non-empty directory only if it is a previous ifp-export output that verifies and holds
    nothing its manifest does not list."""
    from ifp_export.artifacts import MANIFEST_FILE, open_output
    from ifp_export.staging import check_nothing_unlisted

    try:
        previous = open_output(target)
    except IFPError as err:
        raise IFPError(
            f"--force replaces only an empty directory or a previous ifp-export output whose manifest verifies; "
            f"this one does not ({err.what})",
            target,
            "choose another -o, or empty or remove the directory yourself",
        ) from None
    listed = {entry["path"] for entry in previous.manifest["files"]} | {MANIFEST_FILE}
    check_nothing_unlisted(target, listed, "a previous ifp-export output")


def previous_checkpoint(target: Path) -> None:
    """`new-checkpoint --force` replaces a non-empty directory only if it is an IFPruning checkpoint holding only a
    checkpoint's files."""
    from ifp_export.checkpoint import checkpoint_files, read_spec
    from ifp_export.staging import check_nothing_unlisted

    try:
        read_spec(target)
    except IFPError as err:
        raise IFPError(
            f"--force replaces only an empty directory or a previous IFPruning checkpoint; this one is not "
            f"({err.what})",
            target,
            "choose another -o, or empty or remove the directory yourself",
        ) from None
    check_nothing_unlisted(target, set(checkpoint_files(target)), "an IFPruning checkpoint")


def figures_of_failed_run(ctx: object, root: Path) -> list | None:
    """What a failed run had measured (its staging dir is about to be removed); None if even that fails: the
    original error, not this one, is what the user must see."""
    try:
        return model_entries(ctx, root)
    except Exception:
        return None


def emit_results(
    command: str,
    output: Path,
    ctx: object | None,
    models: list | None,
    error: BaseException | None,
    as_json: bool,
    junit: Path | None,
) -> None:
    """The JSON summary on stdout (--json) and the JUnit file (--junit), for success and failure alike."""
    if not (as_json or junit):
        return
    summary = build_summary(command, output, ctx, models, error)
    if junit is not None:
        from ifp_export.junit import write_junit

        write_junit(junit, summary)
    if as_json:
        click.echo(canonical_json(summary), nl=False)


@cli.command(epilog=EXIT_CODES)
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    help="The checkpoint OUTPUT was exported from (default: the bundled sample).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON summary object on stdout (schema: summary.schema.json)."
)
@checks_option
@click.option("--junit", type=click.Path(path_type=Path), help="Write the validation checks as JUnit XML to FILE.")
def validate(output: Path, checkpoint: Path | None, checks: str, as_json: bool, junit: Path | None) -> None:
    """Re-run the validation of an export in OUTPUT against its checkpoint (ONNX Runtime vs PyTorch)."""
    import time

    from ifp_export.memory import survivors_frozen
    from ifp_export.passes.validate import ValidatePass
    from ifp_export.pipeline import peak_rss_bytes
    from ifp_export.validation import validation_context

    ctx, models = None, None
    try:
        ctx = validation_context(output, checkpoint or bundled_sample(), checks)
        start = time.perf_counter()
        try:
            with survivors_frozen():
                ValidatePass().run(ctx)
        finally:
            ctx.timings.append(("validate", time.perf_counter() - start))
            ctx.peak_rss["validate"] = peak_rss_bytes()
            models = figures_of_failed_run(ctx, output)
    except Exception as err:
        emit_results("validate", output, ctx, models, environment_failure(err) or err, as_json, junit)
        raise
    emit_results("validate", output, ctx, models, None, as_json, junit)
    click.echo(f"{output}: all checks passed", err=as_json)


@cli.command()
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="The prompt to route and continue.")
@click.option("--variant", help="Run this variant instead of the one the predictor picks ('dense' for the full model).")
@click.option("--max-new-tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--dynamic", is_flag=True, help="Prune per prompt with the predictor's own top-k (needs --mode dynamic).")
@click.option("--raw", is_flag=True, help="Send the prompt to the model as is, without the checkpoint's chat template.")
def run(
    output: Path,
    prompt: str,
    variant: str | None,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    dynamic: bool,
    raw: bool,
) -> None:
    """Route PROMPT with the predictor graph and generate with the chosen variant on ONNX Runtime.

    The predictor reads PROMPT as typed; the model reads it formatted with the export's chat template (one user
    turn and the assistant's generation prompt) when the checkpoint had one, unless --raw."""
    from ifp_export.runtime import Runtime

    runtime = Runtime(output)
    runtime.decoder_ids(prompt, raw)  # an empty prompt or a failing chat template: the one-line error, no session
    truncated = False
    if dynamic:
        click.echo("dynamic mode: FFN neurons pruned for this prompt", err=True)
        truncated = runtime.predict(prompt).truncated
    elif variant is None:
        route = runtime.route(prompt)
        variant, truncated = route.variant, route.truncated
        scores = ", ".join(f"{name} {score:+.3f}" for name, score in route.scores.items())
        click.echo(f"routed to {variant} (variant_scores: {scores})", err=True)
    elif variant != "dense":
        runtime.output.variant(variant)
    if truncated:
        limit = runtime.output.manifest["predictor"]["max_length"]
        click.echo(
            f"warning: prompt truncated for the predictor, which reads only its first {limit} tokens (routing "
            "ignores the rest; the model still sees the whole prompt)",
            err=True,
        )
    tokens = runtime.generate(prompt, None if dynamic else variant, max_new_tokens, temperature, seed, dynamic, raw)
    for piece in runtime.stream_text(tokens):
        click.echo(piece, nl=False)
    click.echo()


@cli.command()
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest's variants and files as JSON.")
def inspect(output: Path, as_json: bool) -> None:
    """Verify OUTPUT (schema, paths, sha256 of every file) and show its variants and files."""
    from rich.console import Console
    from rich.table import Table

    from ifp_export.artifacts import open_output

    out = open_output(output)
    manifest = out.manifest
    if as_json:
        click.echo(canonical_json({k: manifest[k] for k in ("model", "variants", "dense", "predictor", "files")}))
        return
    sizes = {f["path"]: f["size"] for f in manifest["files"]}
    m = manifest["model"]
    table = Table(
        title=f"{output}: {m['model_type']}, {m['num_hidden_layers']} layers, keep {m['k']}/{m['intermediate_size']}"
    )
    for column in ("variant", "task", "coverage", "routing acc.", "ONNX model + own data", "Core ML function"):
        table.add_column(column)
    for v in manifest["variants"]:
        own = variant_own_files(manifest, v)
        routing = v.get("routing_accuracy")
        table.add_row(
            v["name"],
            str(v["task"]),
            f"{v['coverage']:.3f}",
            "n/a" if routing is None else f"{routing:.1%}",
            f"{sum(sizes[p] for p in own):,} B" if own else "-",
            v["files"].get("coreml", {}).get("function", "-"),
        )
    table.caption = f"{len(sizes)} files, {sum(sizes.values()):,} bytes, all sha256 verified"
    Console().print(table)


def variant_own_files(manifest: dict, variant: dict) -> list[str]:
    """A variant's ONNX model and the data files no other model lists (its FFN slices), matched by exact path."""
    onnx_files = variant["files"].get("onnx")
    if not onnx_files:
        return []
    others = [*(v for v in manifest["variants"] if v is not variant), manifest["dense"]]
    shared = {d for other in others for d in other["files"].get("onnx", {}).get("data", [])}
    return [onnx_files["model"], *(d for d in onnx_files.get("data", []) if d not in shared)]


@cli.command("new-checkpoint")
@click.option("--backbone", required=True, type=click.Path(path_type=Path), help="HF save_pretrained directory.")
@click.option("--tasks", required=True, type=click.Path(path_type=Path), help="Calibration prompts (JSONL).")
@click.option("--keep", type=float, default=0.25, show_default=True, help="Fraction of FFN neurons kept per layer.")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="tokenizer.json (default: BACKBONE/tokenizer.json).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the predictor's initialization.")
@click.option(
    "--predictor-backbone",
    type=click.Path(path_type=Path),
    help="HF save_pretrained dir of a small LM to use as the predictor (with a new MLP head); default: our encoder.",
)
@click.option(
    "--predictor-pooling",
    type=click.Choice(["last", "mean"]),
    help="How the LM predictor's head pools the prompt: last real token (default) or masked mean.",
)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="New checkpoint directory.")
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing output, only if it is empty or a previous IFPruning checkpoint (never an input).",
)
def new_checkpoint(
    backbone: Path,
    tasks: Path,
    keep: float,
    tokenizer: Path | None,
    seed: int,
    predictor_backbone: Path | None,
    predictor_pooling: str | None,
    output: Path,
    force: bool,
) -> None:
    """Wrap a Hugging Face checkpoint with a fresh, untrained predictor, to try the export pipeline on it."""
    from ifp_export.checkpoint import create_checkpoint
    from ifp_export.staging import staged_directory

    if predictor_pooling is not None and predictor_backbone is None:
        raise IFPError("--predictor-pooling applies to an LM predictor only", None, "add --predictor-backbone LM_DIR")
    pooling = predictor_pooling or "last"
    inputs = [backbone, tasks, *(p for p in (tokenizer, predictor_backbone) if p is not None)]
    with staged_directory(output, force=force, inputs=tuple(inputs), replaceable=previous_checkpoint) as stage:
        ckpt = create_checkpoint(backbone, tasks, stage, keep, tokenizer, seed, predictor_backbone, pooling)
    click.echo(f"wrote {output} (k={ckpt.k_per_layer[0]} of {ckpt.backbone.config.intermediate_size} per layer)")


def main(argv: list[str] | None = None) -> None:
    """Entry point: every known failure is one line on stderr and its exit code (see EXIT_CODES)."""
    try:
        try:
            cli.main(args=argv, prog_name="ifp-export", standalone_mode=False)
        except Exception as err:  # any writer's ENOSPC (Python or C++) / an allocation failure: the environment
            failure = environment_failure(err)
            if failure is None:
                raise
            raise failure from None
    except IFPError as err:
        click.echo(str(err), err=True)
        sys.exit(err.exit_code)
    except ValidationFailed as err:
        click.echo(f"error: validation failed: {err}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("error: aborted.", err=True)
        sys.exit(130)
    except click.ClickException as err:
        args = sys.argv[1:] if argv is None else argv
        help_command = " ".join(["ifp-export", *(args[:1] if args and args[0] in cli.commands else []), "--help"])
        usage = IFPError(err.format_message().rstrip("."), None, f"see {help_command}")
        click.echo(str(usage), err=True)
        usage_error_summary(args, usage)
        sys.exit(err.exit_code)


def usage_error_summary(args: list[str], error: IFPError) -> None:
    """Under `--json`, a usage error (a bad option value, an unknown option) still prints the summary object:
    a CI step that parses stdout always gets one. The options are read leniently (click's resilient parsing,
    unknown options skipped)."""
    command = cli.commands.get(args[0]) if args else None
    if command is None or command.name not in ("export", "validate"):
        return
    try:
        with command.make_context(
            command.name, list(args[1:]), resilient_parsing=True, ignore_unknown_options=True
        ) as ctx:
            params = ctx.params
    except click.ClickException:
        params = {"as_json": "--json" in args}
    if params.get("as_json"):
        emit_results(command.name, Path(params.get("output") or DEFAULT_OUTPUT), None, None, error, True, None)
