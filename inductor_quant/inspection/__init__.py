"""Graph inspection for fusion debugging: what matched, what fused, what did not, and why.

``inspect(fn_or_module, *example_inputs, **compile_kwargs)`` compiles and runs the program once
with Inductor and returns an :class:`InspectionReport`: graph breaks, recompiles, the post-grad
graph before and after the inductor_quant passes, each pattern's matches, every generated kernel
with the quantized ops it contains and the bytes it moves, and each quantized op that did not
fuse with the reason. ``report.to_text()``, ``report.to_json()`` and
``inductor_quant.inspection.html.render_html(report)`` render it.

Importing this package is cheap (the report classes only); Inductor is imported by ``inspect()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .report import (
    CompiledGraph,
    GraphBreak,
    GraphNode,
    GraphSnapshot,
    InspectionReport,
    Kernel,
    PassDecision,
    PatternMatch,
    QuantOpStatus,
    Recompile,
    SourceLine,
    render_text,
)

if TYPE_CHECKING:
    from ..patterns.pass_manager import QuantPassConfig

__all__ = [
    "inspect",
    "InspectionReport",
    "CompiledGraph",
    "GraphBreak",
    "GraphNode",
    "GraphSnapshot",
    "Kernel",
    "PassDecision",
    "PatternMatch",
    "QuantOpStatus",
    "Recompile",
    "SourceLine",
    "render_text",
]


def inspect(
    fn_or_module: Callable[..., Any],
    *example_inputs: Any,
    extra_inputs: Sequence[Sequence[Any]] = (),
    passes: bool = True,
    pass_config: QuantPassConfig | None = None,
    hook: str = "post_grad_custom_post_pass",
    **compile_kwargs: Any,
) -> InspectionReport:
    """Compile ``fn_or_module`` with Inductor, run it on ``example_inputs`` and report what happened.

    Args:
        fn_or_module: the function or ``nn.Module`` to compile.
        example_inputs: positional arguments for one call.
        extra_inputs: further argument tuples, each run after the first call (e.g. another batch
            size), so the report shows the recompiles they cause.
        passes: install the inductor_quant pass manager and lowerings, as
            ``inductor_quant.compile`` does; False shows what stock Inductor does with the ops.
        pass_config: which rewrites run (``QuantPassConfig``; all by default).
        hook: the post-grad hook the passes go into (as in ``inductor_quant.compile``).
        compile_kwargs: passed to ``torch.compile`` (``mode``, ``dynamic``, ``fullgraph``,
            ``options``); the backend must be Inductor.

    The program runs twice: once under ``torch._dynamo.explain`` (graph breaks) and once compiled
    (after ``torch._dynamo.reset()``, which drops every compiled graph of the process), with the
    FX graph cache off so every pass runs. Backward graphs appear only if the program itself
    runs a backward.
    """
    # Inductor is imported here, not at package import (it takes seconds).
    from ..lowerings import register_lowerings
    from ..patterns.pass_manager import QuantPassConfig, QuantPassManager
    from .capture import capture

    if not callable(fn_or_module):
        raise TypeError(f"fn_or_module must be a function or nn.Module, got {type(fn_or_module).__name__}")
    for i, more in enumerate(extra_inputs):
        if not isinstance(more, (tuple, list)):
            raise TypeError(f"extra_inputs[{i}] must be a tuple of positional arguments, got {type(more).__name__}")
    if passes:
        config = pass_config or QuantPassConfig()
        register_lowerings()
        managers = [QuantPassManager(config)]
        disabled = {
            op: f"QuantPassConfig({family}=False)"
            for op, family in (("dequantize_4bit", "dequant_linear_4bit"), ("dequantize_blockwise", "dequant_linear_8bit"))
            if not getattr(config, family)
        }
    else:
        managers, disabled = [], {"*": "inspect(..., passes=False): no inductor_quant pass was installed"}
    return capture(
        fn_or_module,
        example_inputs,
        extra_inputs=[tuple(more) for more in extra_inputs],
        passes=managers,
        hook=hook,
        disabled=disabled,
        compile_kwargs=compile_kwargs,
    )
