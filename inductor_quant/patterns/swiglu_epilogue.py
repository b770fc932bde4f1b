"""SiLU(gate) * up over a grouped gate/up matmul -> one ``gemm_4bit_swiglu`` (epilogue fusion).

A SwiGLU feed-forward computes ``down(silu(gate(x)) * up(x))``. After ``sibling_matmuls`` the gate
and up products come from one ``gemm_4bit_grouped`` node, and the SiLU and the product are a
pointwise kernel of their own: at decode (one row) that is one more launch per layer, which
writes the two products to memory and reads them back. This pass replaces the grouped node, its
two slices and the SiLU-times-up arithmetic with ``gemm_4bit_swiglu``, whose GPU kernel computes
a gate row and its up row in the same program and writes only ``silu(gate) * up``.

Matched: a ``mul`` of the SiLU of one slice and the other slice (either order, through views) of
a two-weight ``gemm_4bit_grouped`` with equal output widths, where the SiLU is ``aten.silu``,
``x * sigmoid(x)`` or ``x / (1 + exp(-x))`` (what the decompositions make of ``F.silu``),
optionally computed in fp32 between two casts. Every node of the chain must feed only the chain:
a gate or up product that is also read elsewhere keeps the grouped node (recorded as not
rewritten). Runs after ``sibling_matmuls``.

Counter: ``gemm_4bit_swiglu`` (one per rewrite).
"""

from __future__ import annotations

import torch
import torch.fx

from . import records

__all__ = ["fuse_swiglu_epilogues", "FUSED_TARGETS"]

aten = torch.ops.aten
prims = torch.ops.prims
iq = torch.ops.inductor_quant

FUSED_TARGETS = (iq.gemm_4bit_swiglu.default,)
"""Ops this pass inserts (the pass manager gives them eager-stride metadata)."""

_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_CASTS = (prims.convert_element_type.default,)


def _call(node: object, *targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _strip(node: torch.fx.Node, targets: tuple, chain: list[torch.fx.Node]) -> torch.fx.Node:
    """Follow ``node`` back through single-input ``targets`` (views, casts), collecting them."""
    while _call(node, *targets):
        chain.append(node)
        node = node.args[0]
    return node


def _silu_input(node: torch.fx.Node, chain: list[torch.fx.Node]) -> torch.fx.Node | None:
    """``x`` if ``node`` computes ``silu(x)`` (the nodes it took collected in ``chain``), else None."""
    node = _strip(node, _CASTS, chain)
    if _call(node, aten.silu.default):
        chain.append(node)
        return node.args[0]
    if _call(node, aten.mul.Tensor):  # x * sigmoid(x)
        for x, sigmoid in (node.args, reversed(node.args)):
            if _call(sigmoid, aten.sigmoid.default) and sigmoid.args[0] is x:
                chain.extend((node, sigmoid))
                return x
    if _call(node, aten.div.Tensor):  # x / (1 + exp(-x))
        x, denominator = node.args
        if _call(denominator, aten.add.Tensor) and denominator.args[1] == 1:
            exp = denominator.args[0]
            if _call(exp, aten.exp.default) and _call(exp.args[0], aten.neg.default) and exp.args[0].args[0] is x:
                chain.extend((node, denominator, exp, exp.args[0]))
                return x
    return None


def _grouped_half(node: torch.fx.Node, chain: list[torch.fx.Node]) -> tuple[torch.fx.Node, int] | None:
    """``(grouped, half)`` if ``node`` is (a view or cast of) slice ``half`` (0: gate, 1: up) of a
    two-weight ``gemm_4bit_grouped`` with equal widths."""
    node = _strip(node, _VIEWS + _CASTS, chain)
    if not _call(node, aten.slice.Tensor) or not _call(node.args[0], iq.gemm_4bit_grouped.default):
        return None
    grouped = node.args[0]
    widths = grouped.args[2]
    if len(widths) != 2 or widths[0] != widths[1] or not isinstance(widths[0], int):
        return None
    val = grouped.meta["val"]
    dim, start, end = (list(node.args[1:]) + [0, 0, None][len(node.args) - 1:])[:3]  # schema defaults
    if dim % val.dim() != val.dim() - 1 or (start, end) not in ((0, widths[0]), (widths[0], 2 * widths[0])):
        return None
    chain.append(node)
    return grouped, 0 if start == 0 else 1


def _match(mul: torch.fx.Node) -> tuple[torch.fx.Node, int, list[torch.fx.Node]] | None:
    """``(grouped, gate_half, chain)`` if ``mul`` is ``silu(gate) * up`` over the two halves of one
    grouped node (``gate_half``: which half the SiLU reads; ``chain``: the nodes in between)."""
    if not all(isinstance(arg, torch.fx.Node) for arg in mul.args):
        return None
    # the op rounds to the products' dtype; a product kept in fp32 is a different computation
    for activated, other in (mul.args, reversed(mul.args)):
        chain: list[torch.fx.Node] = []
        x = _silu_input(activated, chain)
        gate = _grouped_half(x, chain) if x is not None else None
        up = _grouped_half(other, chain) if gate is not None else None
        if gate is not None and up is not None and gate[0] is up[0] and gate[1] != up[1]:
            if mul.meta["val"].dtype == gate[0].meta["val"].dtype:
                return gate[0], gate[1], chain
    return None


def _replace(graph: torch.fx.Graph, mul: torch.fx.Node, grouped: torch.fx.Node, gate_half: int) -> torch.fx.Node:
    def gate_first(arg):  # the op takes (gate, up): swap every per-weight list when the SiLU reads the second
        return list(reversed(arg)) if gate_half == 1 and isinstance(arg, (list, tuple)) else arg

    args = tuple(gate_first(arg) for arg in grouped.args)
    kwargs = {name: gate_first(arg) for name, arg in grouped.kwargs.items()}
    fake_args, fake_kwargs = torch.fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
    with grouped.meta["val"].fake_mode:
        fused_val = iq.gemm_4bit_swiglu.default(*fake_args, **fake_kwargs)
    with graph.inserting_before(mul):
        fused = graph.call_function(iq.gemm_4bit_swiglu.default, args, kwargs)
        fused.meta["val"] = fused_val
        result = fused
        shape = list(mul.meta["val"].shape)
        if list(fused_val.shape) != shape:
            result = graph.call_function(aten.view.default, (fused, shape))
            with fused_val.fake_mode:
                result.meta["val"] = aten.view.default(fused_val, shape)
    mul.replace_all_uses_with(result)
    return fused


def fuse_swiglu_epilogues(graph: torch.fx.Graph) -> int:
    """Replace each ``silu(gate) * up`` over a grouped gate/up matmul in ``graph``; returns the count."""
    fused = 0
    for mul in list(graph.nodes):
        if not _call(mul, aten.mul.Tensor) or "val" not in mul.meta:
            continue
        match = _match(mul)
        if match is None:
            continue
        grouped, gate_half, chain = match
        inside = set(chain) | {mul}
        escaping = [n for n in [grouped, *chain] if any(user not in inside for user in n.users)]
        if escaping:
            records.record(
                "swiglu_epilogue", grouped, "not rewritten",
                f"silu(gate) * up was not fused: {escaping[0].name} is also read outside the SwiGLU",
            )
            continue
        node = _replace(graph, mul, grouped, gate_half)
        records.bump("gemm_4bit_swiglu")
        records.record(
            "swiglu_epilogue", node, "rewritten",
            f"{grouped.name} (gate and up, {grouped.args[2][0]} rows each) + silu(gate) * up -> one gemm_4bit_swiglu "
            "(the two products never go to memory)",
        )
        fused += 1
    return fused
