"""A dequantized weight feeding a large-M matmul -> a candidate prologue of Inductor's matmul templates.

Under max-autotune Inductor may compile ``mm(x, W.t())`` as one of its Triton matmul templates and
fuse the pointwise kernel that produces ``W`` into the template's loads of ``W`` (a *prologue*):
the weight is then dequantized tile by tile inside the matmul and never written out in 16 bits.
Inductor benchmarks the fused kernel against the unfused choices (cuBLAS, the template without
the prologue) and keeps the fastest. Left to itself it does not try our dequantize: its heuristic
skips prologues that compute in fp32 for a 16-bit template, and the dequantize does (code value
times absmax, rounded once). ``torch._higher_order_ops.invoke_quant`` is PyTorch's way of saying
"this is a quantization prologue, try it": a dequantize wrapped in it skips the heuristic.

Whether the fusion is tried also depends on the Inductor version: before 2.12 the scheduler scores
a template against its prologue by exact equality of their memory accesses, and the template reads
``W`` through its transpose, so the fusion is never considered ("no shared data"); 2.12 matches a
template's dependencies by buffer name (pytorch PR #177302). Measured on an H100 with torch 2.11
(``tools/notes_gemm.md``): no fusion, and the autotuned matmul next to the generated dequantize is
as fast as the fused op or faster (4096x4096, M = 256: NF4 33.2 against 38.3 µs).

So, on a GPU and with max-autotune on, this pass wraps each dequantize whose only use is the
weight of a ``mm``/``addmm`` with more than ``FUSED_MAX_M`` static rows in ``invoke_quant``
(together with its nested-absmax reconstruction and a dtype conversion before the transpose, if
they have no other use). It runs before the dequantize+linear rewrite, which then leaves these
matmuls alone. Small or symbolic M keeps the fused 4-bit/8-bit op: its GEMV/small-M kernels beat
any template there, and its runtime switch on M is what a dynamic batch needs.

Counter: ``template_prologue`` (one per wrapped dequantize); every wrap is recorded
(``records``) on the matmul.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.fx
from torch._inductor import config as inductor_config

from ..kernels.gemm import FUSED_MAX_M
from . import records

__all__ = ["PROLOGUE_DEVICES", "SCHEME", "wrap_template_prologues", "template_prologues_enabled"]

aten = torch.ops.aten
prims = torch.ops.prims
iq = torch.ops.inductor_quant

PROLOGUE_DEVICES: tuple[str, ...] = ("cuda", "xpu")
"""Devices whose Inductor matmul templates are Triton kernels that take prologues."""

SCHEME = "inductor_quant_dequantize"
"""``scheme`` of the ``invoke_quant`` calls this pass inserts."""

_DEQUANTIZE_OPS = (iq.dequantize_4bit.default, iq.dequantize_blockwise.default)


def template_prologues_enabled() -> bool:
    """Whether the compile being run autotunes matmuls with prologue fusion (read at pass time,
    when ``torch.compile``'s options are in Inductor's config)."""
    autotune = inductor_config.max_autotune or inductor_config.max_autotune_gemm
    return bool(autotune and inductor_config.prologue_fusion and hasattr(torch._higher_order_ops, "invoke_quant"))


def _val(node: object) -> object:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _weight_chain(matmul: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The nodes that compute the matmul's weight operand from a dequantize, in graph order
    (``[nested absmax dequantize, add,] dequantize [, convert]``), when each one's only use is the
    next and the weight reaches the matmul through a ``[1, 0]`` permute; else None."""
    weight_t = matmul.args[1] if matmul.target == aten.mm.default else matmul.args[2]
    if not (isinstance(weight_t, torch.fx.Node) and weight_t.target == aten.permute.default and list(weight_t.args[1]) == [1, 0]):
        return None
    chain: list[torch.fx.Node] = []
    node = weight_t.args[0]
    if isinstance(node, torch.fx.Node) and node.target == prims.convert_element_type.default:
        chain.append(node)
        node = node.args[0]
    if not (isinstance(node, torch.fx.Node) and node.target in _DEQUANTIZE_OPS):
        return None
    chain.append(node)
    absmax = node.args[1]
    if (
        node.target == iq.dequantize_4bit.default
        and isinstance(absmax, torch.fx.Node)
        and absmax.target == aten.add.Tensor
        and _only_user(absmax) is node
        and isinstance(absmax.args[0], torch.fx.Node)
        and absmax.args[0].target == iq.dequantize_blockwise.default
        and _only_user(absmax.args[0]) is absmax
    ):
        chain += [absmax, absmax.args[0]]
    chain.reverse()
    for producer, consumer in zip(chain, [*chain[1:], weight_t]):
        if _only_user(producer) is not consumer:
            return None
    return chain


def _static_rows(matmul: torch.fx.Node) -> int | None:
    """M of the matmul's ``[M, K]`` activation when it is a static size, else None."""
    x = _val(matmul.args[0] if matmul.target == aten.mm.default else matmul.args[1])
    rows = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() == 2 else None
    return rows if isinstance(rows, int) else None


def _matmuls(graph: torch.fx.Graph) -> Iterator[torch.fx.Node]:
    for target in (aten.mm.default, aten.addmm.default):
        yield from list(graph.find_nodes(op="call_function", target=target))


def _wrap(graph: torch.fx.Graph, chain: list[torch.fx.Node]) -> torch.fx.Node:
    """Move ``chain`` into a subgraph called through ``invoke_quant``; returns the call."""
    inside = set(chain)
    operands: list[torch.fx.Node] = []
    for node in chain:
        for arg in node.all_input_nodes:
            if arg not in inside and arg not in operands:
                operands.append(arg)
    sub = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for operand in operands:
        env[operand] = sub.placeholder(operand.name)
        env[operand].meta.update(operand.meta)
    for node in chain:
        env[node] = sub.node_copy(node, lambda n: env[n])
    sub.output(env[chain[-1]])
    owner = graph.owning_module
    index = 0
    while hasattr(owner, f"inductor_quant_prologue_{index}"):
        index += 1
    name = f"inductor_quant_prologue_{index}"
    owner.register_module(name, torch.fx.GraphModule(owner, sub))
    last = chain[-1]
    with graph.inserting_after(last):
        subgraph = graph.get_attr(name)
    with graph.inserting_after(subgraph):
        call = graph.call_function(torch._higher_order_ops.invoke_quant, (subgraph, *operands), {"scheme": SCHEME})
    call.meta.update(last.meta)
    call.meta["quant_options"] = torch._higher_order_ops.InvokeQuant(codegen_low_precision=False)
    last.replace_all_uses_with(call)
    for node in reversed(chain):
        graph.erase_node(node)
    return call


def wrap_template_prologues(graph: torch.fx.Graph) -> int:
    """Wrap the dequantize of every eligible large-M matmul on a ``PROLOGUE_DEVICES`` device in
    ``invoke_quant`` (module doc); returns the number wrapped. Does nothing unless
    :func:`template_prologues_enabled`."""
    if not template_prologues_enabled() or graph.owning_module is None:  # the subgraph needs a module
        return 0
    wrapped = 0
    for matmul in _matmuls(graph):
        rows = _static_rows(matmul)
        chain = _weight_chain(matmul) if rows is not None and rows > FUSED_MAX_M else None
        if chain is None:
            continue
        weight = _val(chain[-1])
        if not isinstance(weight, torch.Tensor) or weight.device.type not in PROLOGUE_DEVICES:
            continue
        _wrap(graph, chain)
        wrapped += 1
        records.bump("template_prologue")
        records.record(
            "template_prologue",
            matmul,
            "prologue candidate",
            f"{matmul.target} with {rows} rows (> {FUSED_MAX_M}) under max-autotune: its dequantized weight is offered to Inductor's Triton matmul "
            "templates as a prologue (invoke_quant); Inductor keeps the fastest of fused, unfused and cuBLAS",
        )
    return wrapped
