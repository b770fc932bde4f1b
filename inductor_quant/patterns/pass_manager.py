"""The post-grad pass manager: one ``CustomGraphPass`` that runs every inductor_quant pass family.

Inductor's post-grad hooks (``config.post_grad_custom_pre_pass`` / ``post_grad_custom_post_pass``)
hold one object each, so :class:`QuantPassManager` runs our pattern passes *and* whatever pass
the user had installed there (``chained``, run first), instead of replacing it. Its
:meth:`~QuantPassManager.uuid` hashes the source of the passes, of the lowerings and of the op
definitions, the :class:`QuantPassConfig` and the chained passes' own uuids, so the FX graph
cache (and a second process) reuses compiled graphs exactly when nothing that shapes them
changed. A chained pass without a uuid (a plain function) makes the uuid ``None``, which tells
Inductor not to cache.

Running the manager also installs the lowerings (``inductor_quant.lowerings``) if that was not
done yet: the post-grad passes run before Inductor lowers the graph.

Typical use, with your own ``torch.compile`` options::

    from inductor_quant.patterns.pass_manager import QuantPassManager, install_options
    torch.compile(model, options=install_options({"max_autotune": True}))

or ``inductor_quant.compile(model, ...)``, which does the same.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.pattern_matcher import PatternMatcherPass

from ..lowerings import lowering_files, register_lowerings
from . import dequant_linear, optimizer_chain, sibling_matmuls, standalone, swiglu_epilogue, template_prologue

try:
    from torch._inductor.custom_graph_pass import CustomInferenceAwareGraphPass as _PassBase

    _INFERENCE_AWARE = True
except ImportError:  # torch < 2.12: passes receive only the graph
    _PassBase = CustomGraphPass
    _INFERENCE_AWARE = False

__all__ = ["QuantPassConfig", "QuantPassManager", "install_options", "HOOKS"]

HOOKS = ("post_grad_custom_post_pass", "post_grad_custom_pre_pass")


@dataclass(frozen=True)
class QuantPassConfig:
    """Which rewrites run (all by default).

    ``template_prologues``: under max-autotune on a GPU, a dequantize feeding a matmul of more than
    ``FUSED_MAX_M`` static rows is offered to Inductor's Triton matmul templates as a prologue
    (``patterns.template_prologue``) instead of becoming the fused op.
    ``dequant_linear_4bit``: ``dequantize_4bit`` feeding ``mm``/``addmm`` -> ``gemm_4bit``.
    ``dequant_linear_8bit``: ``dequantize_blockwise`` feeding ``mm``/``addmm`` -> ``linear_8bit``
    (turn off to leave the 8-bit dequantize to its lowering and Inductor's own matmul).
    ``group_sibling_matmuls``: ``gemm_4bit`` calls that read the same activations (q/k/v,
    gate/up) -> one ``gemm_4bit_grouped`` (one GEMV launch at decode; ``patterns.sibling_matmuls``).
    ``fuse_swiglu_epilogues``: ``silu(gate) * up`` over a grouped gate/up matmul -> one
    ``gemm_4bit_swiglu`` (the products never go to memory; ``patterns.swiglu_epilogue``).
    ``functional_optimizer_updates``: auto-functionalized mutating optimizer updates ->
    the functional optimizer steps (which have fused lowerings).
    ``standalone_kernels``: quant ops call their hand-written kernel where it beats generated code
    (``patterns.standalone``; GPU only): an 8-bit dequantize with no fusible neighbour, a quantize
    unless it ends a requantization chain; ``dequantize_4bit`` stays generated code, its faster form.
    ``lowerings``: install the IR lowerings when the pass first runs.
    """

    template_prologues: bool = True
    dequant_linear_4bit: bool = True
    dequant_linear_8bit: bool = True
    group_sibling_matmuls: bool = True
    fuse_swiglu_epilogues: bool = True
    functional_optimizer_updates: bool = True
    standalone_kernels: bool = True
    lowerings: bool = True


@functools.lru_cache(maxsize=None)
def _source_hash() -> str:
    """sha256 of every source file that decides what a compiled graph looks like."""
    here = os.path.dirname(os.path.abspath(__file__))
    ops_dir = os.path.join(os.path.dirname(here), "ops")
    files = [
        *(os.path.join(here, f) for f in sorted(os.listdir(here)) if f.endswith(".py")),
        *lowering_files(),
        *(os.path.join(ops_dir, f) for f in sorted(os.listdir(ops_dir)) if f.endswith(".py")),
    ]
    digest = hashlib.sha256()
    for path in files:
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def _as_tuple(passes: Any) -> tuple[Any, ...]:
    if passes is None:
        return ()
    if isinstance(passes, (list, tuple)):
        return tuple(passes)
    return (passes,)


class QuantPassManager(_PassBase):
    """Runs the chained user passes, then the inductor_quant pattern passes, on a post-grad graph.

    ``config`` selects the rewrites; ``chained`` is the pass (or list of passes) that was in the
    hook before, run first with the same arguments Inductor would have given it."""

    def __init__(self, config: QuantPassConfig | None = None, chained: Any = None) -> None:
        self.config = config or QuantPassConfig()
        flat: list[Any] = []
        for user_pass in _as_tuple(chained):
            # An earlier manager (e.g. compile() applied twice) is replaced, its own chain kept.
            flat.extend(user_pass.chained if isinstance(user_pass, QuantPassManager) else (user_pass,))
        self.chained = tuple(flat)
        self.patterns = PatternMatcherPass(pass_name="inductor_quant_dequant_linear")
        if self.config.dequant_linear_4bit or self.config.dequant_linear_8bit:
            dequant_linear.register_dequant_linear_patterns(
                self.patterns, fourbit=self.config.dequant_linear_4bit, eightbit=self.config.dequant_linear_8bit
            )

    def __call__(self, graph: torch.fx.Graph, is_inference: bool = False) -> None:
        if self.config.lowerings:
            register_lowerings()
        for user_pass in self.chained:
            if _INFERENCE_AWARE and isinstance(user_pass, _PassBase):
                user_pass(graph, is_inference=is_inference)
            else:
                user_pass(graph)
        changed = 0
        if self.config.functional_optimizer_updates:
            changed += optimizer_chain.rewrite_optimizer_updates(graph)
        if self.config.template_prologues:
            changed += template_prologue.wrap_template_prologues(graph)
        changed += self.patterns.apply(graph)
        if self.config.group_sibling_matmuls:
            changed += sibling_matmuls.group_sibling_matmuls(graph)
        if self.config.fuse_swiglu_epilogues:
            changed += swiglu_epilogue.fuse_swiglu_epilogues(graph)
        if changed:
            _set_eager_input_vals(
                graph,
                dequant_linear.FUSED_TARGETS + sibling_matmuls.FUSED_TARGETS + swiglu_epilogue.FUSED_TARGETS
                + optimizer_chain.FUSED_TARGETS,
            )
            graph.eliminate_dead_code()
            graph.lint()
        if self.config.standalone_kernels:  # after the rewrites: on the quant ops they left
            standalone.mark_standalone_quant_ops(graph)

    def uuid(self) -> str | None:
        parts = [_source_hash(), repr(dataclasses.astuple(self.config)), torch.__version__]
        for user_pass in self.chained:
            uuid = user_pass.uuid() if isinstance(user_pass, CustomGraphPass) else None
            if uuid is None:
                return None
            parts.append(repr(uuid))
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def __repr__(self) -> str:
        return f"QuantPassManager(config={self.config}, chained={list(self.chained)})"


def _set_eager_input_vals(graph: torch.fx.Graph, targets: Sequence[Any]) -> None:
    """Give the ops our passes inserted the input metadata Inductor uses to keep their inputs'
    strides as traced (``needs_exact_strides``); without it an op inserted by a pass gets
    whatever layout Inductor picks (pytorch PR #184051)."""
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in targets or "eager_input_vals" in node.meta:
            continue
        vals = torch.fx.node.map_arg(node.args, lambda a: a.meta.get("val"))
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: a.meta.get("val"))
        node.meta["eager_input_vals"] = (vals, kwargs)


def install_options(
    options: dict[str, Any] | None = None,
    *,
    config: QuantPassConfig | None = None,
    hook: str = "post_grad_custom_post_pass",
) -> dict[str, Any]:
    """``torch.compile`` ``options`` with a :class:`QuantPassManager` in ``hook``, chained with the
    pass already there (in ``options``, else in the global Inductor config). Returns a new dict;
    nothing global is modified."""
    if hook not in HOOKS:
        raise ValueError(f"hook must be one of {HOOKS}, got {hook!r}")
    options = dict(options or {})
    existing = options[hook] if hook in options else getattr(inductor_config, hook)
    options[hook] = QuantPassManager(config, chained=existing)
    return options
