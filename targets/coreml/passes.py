"""coremltools' graph passes over one built decoder function, without what costs time and changes nothing here.

The function is built op by op (`build`), so most passes find nothing to do; the time goes to two things that
scale with the op count, not the weights, and were ~80 % of the Core ML pass on the 246M bench model (py-spy):
- `common::reduce_transposes` (run three times in the main pipeline) leaves our programs unchanged: the head
  transposes it looks for sit between reshapes and attention, never in cancelling pairs;
- `PassPipelineManager.apply_pipeline` validates the whole program after every pass (and formats it for a debug
  log line that is not printed). Here the program is validated once, after the last pass.
`tests/test_coreml_program.py` checks that this gives the same program as coremltools' own pipelines.
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
NO_OP_HERE = {"common::reduce_transposes"}


def pipelines(skip: set[str] = NOT_RUN | NO_OP_HERE) -> list[Any]:
    """coremltools' main and `backend_mlprogram` pipelines for a MIL program, without the passes in `skip`."""
    main = PassPipeline()
    main.remove_passes(skip)
    _, backend = _construct_other_pipelines(main, "milinternal", "mlprogram")
    backend.remove_passes(skip)
    return [main, backend]


def run_passes(fn: Any, skip: set[str] = NOT_RUN | NO_OP_HERE) -> Any:
    """Run the pipelines over one function (in place; returned for convenience), then validate it once."""
    prog = mil.Program()
    prog.add_function("main", fn)
    with quiet(), contextlib.redirect_stderr(io.StringIO()):
        for pipeline in pipelines(skip):
            for name in pipeline.passes:
                graph_pass = PASS_REGISTRY[name]
                graph_pass.set_options(pipeline.get_options(name))
                graph_pass(prog)
        prog.validate(check_essential_scope=True)
    return prog.functions["main"]
