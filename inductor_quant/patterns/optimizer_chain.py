"""Mutating optimizer updates -> functional optimizer steps, so Inductor can fuse them.

A compiled program that calls the mutating ops (``optimizer_update_8bit_blockwise``,
``optimizer_update_32bit``; e.g. bitsandbytes-style optimizer code, or our optimizers' eager step
traced by ``torch.compile``) reaches the post-grad graph as
``auto_functionalized_v2(op, ..., _all_bases=[p, state1, ...])`` followed by ``getitem`` nodes
holding the new values of the mutated tensors. That node is an opaque call. This pass replaces
it by ``optimizer_step_8bit_blockwise`` / ``optimizer_step_32bit`` (``ops/optim_functional.py``)
with the Python-number ``lr``, ``step``, ``beta3``, ``alpha`` (and ``param_norm``) turned into
float64 scalar tensors, and points the ``getitem`` users at the functional results. The
functional ops have IR lowerings (``lowerings/optim.py``): dequantize -> update -> absmax ->
requantize becomes one kernel per tensor. The ``copy_`` of the results into the inputs is left
to Inductor, which stores into the input buffers in place.

The in-place step op ``optimizer_step_8bit_blockwise_`` (tensor scalars already) is rewritten
the same way.

Not rewritten (recorded with the reason in ``records.fusion_decisions()``): 8-bit updates on a
Triton device (cuda, xpu), where the hand-written kernel is 3.5x faster than the kernel Inductor
generates from the lowering (tools/BENCHMARKS.md) and Inductor already calls it in place, one
launch per tensor; a mutated argument that is a view of a graph tensor rather than the tensor
itself (the view would have to be re-created); and the v1 ``auto_functionalized`` form.

The numbers stay baked into the graph (as they were in the mutating call, so a new ``lr`` still
recompiles); pass tensors through ``step_8bit_blockwise`` / ``step_32bit`` to avoid that.

Counters: ``functional_optimizer_8bit``, ``functional_optimizer_32bit``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
from torch._guards import detect_fake_mode

from ..ops._library import TRITON_DEVICES
from ..reference.optim import TWO_STATE_OPTIMIZERS
from . import records

__all__ = ["rewrite_optimizer_updates", "FUSED_TARGETS"]

aten = torch.ops.aten
iq = torch.ops.inductor_quant
AUTO_FUNCTIONALIZED_V2 = torch.ops.higher_order.auto_functionalized_v2

# mutating op -> (kind, its mutated tensor arguments)
_MUTATING = {
    iq.optimizer_update_8bit_blockwise.default: ("8bit", ("p", "state1", "state2", "absmax1", "absmax2")),
    iq.optimizer_step_8bit_blockwise_.default: ("8bit_step", ("p", "state1", "state2", "absmax1", "absmax2")),
    iq.optimizer_update_32bit.default: ("32bit", ("p", "state1", "state2", "unorm_vec")),
}
# Arguments (name, default) of the in-place step op; the functional op takes the same ones.
_STEP_ARGS = [
    (a.name, a.default_value if a.has_default_value() else None)
    for a in iq.optimizer_step_8bit_blockwise_.default._schema.arguments
]
FUSED_TARGETS = (iq.optimizer_step_8bit_blockwise.default, iq.optimizer_step_32bit.default)
PATTERN = "functional_optimizer"


def _mutated_bases(node: torch.fx.Node, names: tuple[str, ...]) -> tuple[dict[str, Any], str | None]:
    """``{arg name: (base node, base index) or None}``, or a reason when an argument is a view."""
    kwargs, bases = node.kwargs, node.kwargs["_all_bases"]
    found: dict[str, Any] = {}
    for name in names:
        index = kwargs.get(f"_{name}_base_index")
        if index is None:
            found[name] = None
        elif f"_{name}_storage_offset" in kwargs or f"_{name}_slice_dim" in kwargs:
            return {}, f"{name} is a view of a graph tensor (the functional step would have to re-create the view)"
        else:
            found[name] = (bases[index], index)
    return found, None


def _scalar(graph: torch.fx.Graph, value: float, device: torch.device, fake_mode: Any) -> torch.fx.Node:
    node = graph.call_function(aten.scalar_tensor.default, (float(value),), {"dtype": torch.float64, "device": device})
    with fake_mode:
        node.meta["val"] = aten.scalar_tensor.default(float(value), dtype=torch.float64, device=device)
    return node


def _functional_call(graph: torch.fx.Graph, node: torch.fx.Node, kind: str, args: dict[str, Any], fake_mode: Any) -> list[torch.fx.Node]:
    """Insert the functional op before ``node``; return the getitem nodes of its results."""
    kw = node.kwargs
    base = {name: (None if value is None else value[0]) for name, value in args.items()}
    device = base["p"].meta["val"].device

    def scalar(value: float) -> torch.fx.Node:
        return _scalar(graph, value, device, fake_mode)

    if kind == "8bit_step":
        target = iq.optimizer_step_8bit_blockwise.default
        call_args = tuple(base[name] if name in base else kw.get(name, default) for name, default in _STEP_ARGS)
        return _call(graph, target, call_args, fake_mode)
    lr, step, beta3, alpha = scalar(kw["lr"]), scalar(kw["step"]), scalar(kw["beta3"]), scalar(kw["alpha"])
    if kind == "8bit":
        target = iq.optimizer_step_8bit_blockwise.default
        call_args = (
            kw["optimizer_name"], kw["g"], base["p"], base["state1"], base["state2"], kw["qmap1"], kw["qmap2"],
            base["absmax1"], base["absmax2"], lr, step, kw["beta1"], kw["beta2"], beta3, alpha, kw["eps"],
            kw["weight_decay"], kw["gnorm_scale"], kw.get("skip_zeros", False),
        )
    else:
        target = iq.optimizer_step_32bit.default
        max_unorm = kw["max_unorm"]
        param_norm = scalar(kw["param_norm"]) if max_unorm > 0 else None
        call_args = (
            kw["optimizer_name"], kw["g"], base["p"], base["state1"], base["state2"], lr, step, kw["beta1"],
            kw["beta2"], beta3, alpha, kw["eps"], kw["weight_decay"], kw["gnorm_scale"], kw.get("skip_zeros", False),
            max_unorm, param_norm,
        )
    return _call(graph, target, call_args, fake_mode)


def _call(graph: torch.fx.Graph, target: Any, call_args: tuple, fake_mode: Any) -> list[torch.fx.Node]:
    """Insert ``target(*call_args)``; return the getitem nodes of its results."""
    call = graph.call_function(target, call_args)
    fake_args = torch.fx.node.map_arg(call_args, lambda a: a.meta["val"])
    with fake_mode:
        results = target(*fake_args)
    call.meta["val"] = results
    outputs = []
    for i, value in enumerate(results):
        item = graph.call_function(operator.getitem, (call, i))
        item.meta["val"] = value
        outputs.append(item)
    return outputs


def _result_order(kind: str, optimizer_name: str, has_unorm_output: bool) -> list[str]:
    """Which mutated argument each functional result updates (see ops/optim_functional.py)."""
    two_state = optimizer_name in TWO_STATE_OPTIMIZERS
    if kind.startswith("8bit"):
        return ["p", "state1", "absmax1"] + (["state2", "absmax2"] if two_state else [])
    return ["p", "state1"] + (["state2"] if two_state else []) + (["unorm_vec"] if has_unorm_output else [])


def rewrite_optimizer_updates(graph: torch.fx.Graph) -> int:
    """Replace every auto-functionalized mutating optimizer update of ``graph``; returns the count."""
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not AUTO_FUNCTIONALIZED_V2 or node.args[0] not in _MUTATING:
            continue
        kind, names = _MUTATING[node.args[0]]
        args, reason = _mutated_bases(node, names)
        if reason is None and kind.startswith("8bit") and args["p"][0].meta["val"].device.type in TRITON_DEVICES:
            reason = "8-bit update on a Triton device: the hand-written kernel, called in place, is faster"
        if reason is None and any(u.target is not operator.getitem or u.args[1] == 0 for u in node.users):
            reason = f"unexpected users {[u.name for u in node.users]}"
        if reason is not None:
            records.record(PATTERN, node, "not rewritten", reason)
            continue
        fake_mode = detect_fake_mode([a[0].meta["val"] for a in args.values() if a is not None])
        with graph.inserting_before(node):
            outputs = _functional_call(graph, node, kind, args, fake_mode)
        order = _result_order(kind, node.kwargs["optimizer_name"], kind == "32bit" and node.kwargs["max_unorm"] > 0)
        new_value = {name: outputs[i] for i, name in enumerate(order)}
        for user in list(node.users):
            base_index = user.args[1] - 1  # getitem(node, 1 + i) is the new value of _all_bases[i]
            name = next(n for n, a in args.items() if a is not None and a[1] == base_index)
            # an argument the functional step does not return (unorm_vec without clipping) is unchanged
            user.replace_all_uses_with(new_value.get(name, args[name][0]))
            graph.erase_node(user)
        graph.erase_node(node)
        call = outputs[0].args[0]
        records.bump(f"{PATTERN}_{kind.removesuffix('_step')}")
        records.record(PATTERN, call, "rewritten", f"auto_functionalized {node.args[0]} -> {call.target}")
        rewritten += 1
    return rewritten
