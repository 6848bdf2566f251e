"""coremltools' graph passes over one built decoder function: only those that change what `build` makes.

The function is built op by op (`build`), so most passes find nothing to do, yet each walks the whole function, and
`PassPipelineManager.apply_pipeline` validates the whole program after every pass (and formats it for a debug log
line that is not printed): ~80 % of the Core ML pass on the 246M bench model (py-spy). So `run_passes` runs, in
coremltools' order, only the passes in `RUN`, and validates once, after the last one.

`CHANGES_OUR_PROGRAMS` was found by running each of coremltools' passes over the functions of llama, qwen2 (biases,
tied head) and mistral (sliding window) decoders, fp16, int8 and int4, printing the program before and after: seven
changed it, the others never did (there are no convolutions, activations or norms to fuse; `reduce_transposes`
moves transposes that later passes put back). `const_deduplication` prints no change at its own step, but without
it later passes name the duplicates differently, so it stays. The passes that make a program's inputs, outputs and
names valid for the backend (`ENSURE_VALID_FOR_THE_BACKEND`) change nothing either; they are cheap and run anyway,
so a builder change there cannot reach the backend unconverted. A pass that changes nothing is the identity, so
leaving it out gives the same program: `tests/test_coreml_program.py` checks that against coremltools' full
pipelines, and so did every function of 12 tiny exports (4 configs x 3 modes).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

from ifp_export.quiet import quiet

with quiet():
    from coremltools.converters.mil import mil
    from coremltools.converters.mil.converter import _construct_other_pipelines
    from coremltools.converters.mil.mil.passes.pass_pipeline import PassPipeline
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

NOT_RUN = {"common::add_fp16_cast", "common::add_int16_cast"}  # the program is fp16 already
CHANGES_OUR_PROGRAMS = {
    "common::canonicalize_inplace_pattern",
    "common::const_deduplication",
    "common::const_elimination",
    "common::dedup_op_and_var_names",
    "common::guard_negative_gather_indices",
    "common::noop_elimination",
    "common::remove_redundant_ops",
    "common::topological_reorder",
}
ENSURE_VALID_FOR_THE_BACKEND = {
    "common::sanitize_input_output_names",
    "common::update_output_dtypes",
    "mil_backend::adjust_io_to_supported_types",
    "mil_backend::sanitize_name_strings",
}
RUN = CHANGES_OUR_PROGRAMS | ENSURE_VALID_FOR_THE_BACKEND


def pipelines() -> list[Any]:
    """coremltools' main and `backend_mlprogram` pipelines for a MIL program, without the passes in `NOT_RUN`."""
    main = PassPipeline()
    main.remove_passes(NOT_RUN)
    _, backend = _construct_other_pipelines(main, "milinternal", "mlprogram")
    backend.remove_passes(NOT_RUN)
    return [main, backend]


def run_passes(fn: Any) -> Any:
    """Run the pipelines' passes in `RUN` over one function (in place; returned for convenience), then validate it
    once."""
    prog = mil.Program()
    prog.add_function("main", fn)
    with quiet(), contextlib.redirect_stderr(io.StringIO()):
        for pipeline in pipelines():
            for name in pipeline.passes:
                if name not in RUN:
                    continue
                graph_pass = PASS_REGISTRY[name]
                graph_pass.set_options(pipeline.get_options(name))
                graph_pass(prog)
        prog.validate(check_essential_scope=True)
    return prog.functions["main"]
