"""Sibling 4-bit matmuls -> one ``gemm_4bit_grouped`` (horizontal fusion).

A transformer layer multiplies the same activations by several weights: q/k/v projections,
gate/up projections. At decode (one row of activations) each of those ``gemm_4bit`` calls is a
GEMV that is too small to fill the GPU by itself (a 1024x4096 weight is 512 programs of the GEMV
kernel) and pays its own launch. This pass groups ``gemm_4bit`` nodes that read the same
activation (views of one tensor to one shape count as one) with the same quantization
(blocksize, quant type, double-quantized or not, with or without bias) into one
``gemm_4bit_grouped`` node, whose GPU kernel runs all of their rows in one launch, and gives each
former consumer a slice of the grouped output (a view: nothing is copied).

Runs after the dequantize+linear rewrites, so it sees the ``gemm_4bit`` nodes they produced as
well as any the user's code called directly. Only graphs whose activation has a static row count
of at most ``FUSED_MAX_M`` are grouped: above it the op would concatenate per-weight results,
which costs a copy that separate ``gemm_4bit`` calls do not pay. Groups hold at most
``GROUPED_MAX_WEIGHTS`` weights (larger sibling sets are split in order).

Counters: ``gemm_4bit_grouped`` (one per grouped node) and ``gemm_4bit_grouped_members`` (the
``gemm_4bit`` nodes they replaced); the decision is recorded on each grouped node.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.fx
from torch.fx.operator_schemas import normalize_function

from ..kernels.gemm import FUSED_MAX_M, GROUPED_MAX_WEIGHTS
from . import records

__all__ = ["group_sibling_matmuls", "FUSED_TARGETS"]

aten = torch.ops.aten
iq = torch.ops.inductor_quant

FUSED_TARGETS = (iq.gemm_4bit_grouped.default,)
"""Ops this pass inserts (the pass manager gives them eager-stride metadata)."""

_NESTED_ARGS = ("absmax_8bit", "absmax_code", "absmax_offset")


def _arguments(node: torch.fx.Node) -> dict[str, Any]:
    """``gemm_4bit``'s arguments by schema name, defaults filled in."""
    return normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs


def _static_rows(activation: Any) -> int | None:
    """The activation's row count (product of its leading dims) if it is a known int."""
    val = activation.meta.get("val") if isinstance(activation, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    rows = 1
    for size in val.shape[:-1]:
        if not isinstance(size, int):
            return None
        rows *= size
    return rows


_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _activation_identity(activation: torch.fx.Node) -> tuple:
    """Activations that hold the same values: each ``F.linear`` flattens its input with a view
    node of its own, so views of one tensor to one shape count as the same activation."""
    base = activation
    while isinstance(base, torch.fx.Node) and base.op == "call_function" and base.target in _VIEWS:
        base = base.args[0]
    return base, tuple(activation.meta["val"].shape)


def _group_key(args: dict[str, Any]) -> tuple | None:
    """Members of one group share this key; None for a node that is never grouped."""
    if not all(isinstance(s, int) for s in args["shapeB"]):
        return None
    rows = _static_rows(args["A"])
    if rows is None or rows > FUSED_MAX_M:
        return None
    nested = args["absmax_8bit"] is not None
    return (*_activation_identity(args["A"]), args["blocksize"], args["quant_type"], nested, args["bias"] is not None)


def _weight_inputs(node: torch.fx.Node, args: dict[str, Any]) -> list[torch.fx.Node]:
    return [i for i in node.all_input_nodes if i is not args["A"]]


def _chunks(members: list) -> list[list]:
    return [members[i : i + GROUPED_MAX_WEIGHTS] for i in range(0, len(members), GROUPED_MAX_WEIGHTS)]


def _fake_mode(node: torch.fx.Node):
    return node.meta["val"].fake_mode


def _replace_group(graph: torch.fx.Graph, group: list[tuple[torch.fx.Node, dict[str, Any]]]) -> None:
    """One ``gemm_4bit_grouped`` node before the first member, a slice of it per member
    (``group``: each member with its normalized arguments)."""
    members = [member for member, _ in group]
    args = [member_args for _, member_args in group]
    first = args[0]
    nested = first["absmax_8bit"] is not None
    has_bias = first["bias"] is not None
    grouped_args = (
        first["A"],
        [a["B"] for a in args],
        [a["shapeB"][0] for a in args],
        [a["absmax"] for a in args],
        first["blocksize"],
        first["quant_type"],
        [a["bias"] for a in args] if has_bias else None,
        *([[a[name] for a in args] for name in _NESTED_ARGS] if nested else [None] * 3),
    )
    fake_args = torch.fx.node.map_arg(grouped_args, lambda n: n.meta["val"])
    with _fake_mode(members[0]):
        grouped_val = iq.gemm_4bit_grouped.default(*fake_args)
    dim = grouped_val.dim() - 1
    with graph.inserting_before(members[0]):
        grouped = graph.call_function(iq.gemm_4bit_grouped.default, grouped_args)
        grouped.meta["val"] = grouped_val
        start = 0
        for member, member_args in zip(members, args):
            end = start + member_args["shapeB"][0]
            piece = graph.call_function(aten.slice.Tensor, (grouped, dim, start, end))
            with _fake_mode(member):
                piece.meta["val"] = aten.slice.Tensor(grouped_val, dim, start, end)
            member.replace_all_uses_with(piece)
            start = end
    for member in members:
        graph.erase_node(member)
    records.bump("gemm_4bit_grouped")
    records.bump("gemm_4bit_grouped_members", len(members))
    records.record(
        "sibling_matmuls",
        grouped,
        "rewritten",
        f"{len(members)} gemm_4bit of one activation ({', '.join(m.name for m in members)}) -> one gemm_4bit_grouped "
        f"(one GEMV launch for all {sum(a['shapeB'][0] for a in args)} output features at one row)",
    )


def group_sibling_matmuls(graph: torch.fx.Graph) -> int:
    """Group the ``gemm_4bit`` nodes of ``graph`` that share their activation and quantization.

    Returns the number of grouped nodes inserted."""
    siblings: dict[tuple, list[tuple[torch.fx.Node, dict[str, Any]]]] = defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is iq.gemm_4bit.default and "val" in node.meta:
            args = _arguments(node)
            key = _group_key(args)
            if key is not None:
                siblings[key].append((node, args))
    order = {node: index for index, node in enumerate(graph.nodes)}
    inserted = 0
    for members in siblings.values():
        # The grouped node goes before the first member and reads its activation: members whose
        # weights are computed after that point (rare; weights are graph inputs) stay as they are.
        first = order[members[0][0]]
        members = [(m, args) for m, args in members if all(order[i] < first for i in _weight_inputs(m, args))]
        for chunk in _chunks(members):
            if len(chunk) > 1:
                _replace_group(graph, chunk)
                inserted += 1
    return inserted
