"""Quant ops -> the hand-written kernels where they beat the generated code.

The lowerings turn ``quantize_*`` / ``dequantize_*`` into Inductor IR so that they fuse with the
pointwise work around them (a dequantize followed by a scale, a producer of the tensor being
quantized). A quant op with no such neighbour gains nothing from that: its generated kernel only
does what the hand-written Triton kernel does, and slower (the hand-written kernels read 32-bit
words of codes and search the 8-bit map through bucket tables, which Inductor's per-element
pointwise code cannot express). This pass marks the ops that should call their kernel
(``node.meta[STANDALONE_KEY]``); their lowering then emits a call of the op, whose GPU
implementation is the hand-written kernel. Per op (H100 numbers: ``tools/BENCHMARKS.md``):

* ``dequantize_4bit``: always generated code. Its generated kernel (one byte load and two table
  loads per output pair) is faster than the hand-written one even alone — 18.5 / 14.2 µs against
  20.5 / 15.5 µs on 4096x4096 with and without the L2 flushed between CUDA-graph replays, 56.0 vs
  57.2 and 206.9 vs 209.9 µs on the larger shapes (``tools/notes_quant.md``, Run 5).
* ``dequantize_blockwise``: generated and hand-written kernels are within 1 %, so it is generated
  code when a neighbour fuses with it, the kernel otherwise.
* ``quantize_4bit`` / ``quantize_blockwise``: the hand-written kernel, even with a fusible
  producer. The generated quantizers run at 12–20 % of copy bandwidth against 47–96 % for the
  kernels (3–6x slower); fusing a producer saves one write and one read of the tensor being
  quantized, which is less than that on every benchmark shape (4096x4096 bf16 ``quantize_4bit``:
  115 µs generated against 24 µs for the kernel, and a pointwise producer writing and reading the
  32 MB input adds about 20–25 µs at copy speed).
  The exception is a *requantization chain*, a quantize whose input is computed from a
  ``dequantize_*`` through fusible ops only (an 8-bit optimizer step written in plain PyTorch
  over the ops): there the lowering makes the whole chain one kernel, which keeps its fp32
  intermediates (the dequantized states) out of memory.

A neighbour is fusible when it is an ``aten``/``prims`` op other than a matmul-like extern
(``mm``, ``addmm``, ``bmm``, convolutions, ...), looking through views and ``getitem``. The
dequantize's inputs (packed codes, absmax) are not considered: they are read once either way.

Only devices whose op implementation is a hand-written Triton kernel are marked (CUDA and XPU);
on CPU the op's implementation is the pure-torch reference and the generated C++ code is the
faster choice. Every decision is recorded (``records``; counter ``quant_op_to_kernel`` per mark).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

import torch
import torch.fx

from . import records

__all__ = ["STANDALONE_KEY", "QUANT_OPS", "KERNEL_DEVICES", "mark_standalone_quant_ops"]

aten = torch.ops.aten
iq = torch.ops.inductor_quant

STANDALONE_KEY = "inductor_quant_standalone"

QUANT_OPS = (
    iq.dequantize_4bit.default,
    iq.dequantize_blockwise.default,
    iq.quantize_4bit.default,
    iq.quantize_blockwise.default,
)
_QUANTIZE_OPS = (iq.quantize_4bit.default, iq.quantize_blockwise.default)
_DEQUANTIZE_OPS = (iq.dequantize_4bit.default, iq.dequantize_blockwise.default)
_GENERATED_IS_FASTER = (iq.dequantize_4bit.default,)
"""Quant ops whose generated kernel beats the hand-written one even with no neighbour to fuse."""

KERNEL_DEVICES = ("cuda", "xpu")
"""Device types where the quant ops' implementation is a hand-written Triton kernel."""


def _overloads(*names: str) -> frozenset:
    """The aten overloads named ``"op.overload"`` that this torch build has."""
    found = set()
    for name in names:
        op, _, overload = name.partition(".")
        packet = getattr(aten, op, None)
        if packet is not None and hasattr(packet, overload):
            found.add(getattr(packet, overload))
    return frozenset(found)


# Ops Inductor lowers to an extern call (a library kernel) or a template: they read their inputs
# from memory whatever produced them, so they fuse with nothing.
_EXTERN_OPS = _overloads(
    "mm.default", "addmm.default", "bmm.default", "baddbmm.default", "convolution.default", "_scaled_mm.default",
    "_int_mm.default", "_scaled_dot_product_flash_attention.default", "_scaled_dot_product_efficient_attention.default",
    "_scaled_dot_product_cudnn_attention.default",
)

# Ops that only re-index their input: look through them to the real producer / consumers.
_VIEW_OPS = _overloads(
    "view.default", "reshape.default", "_unsafe_view.default", "permute.default", "t.default", "transpose.int",
    "unsqueeze.default", "squeeze.dim", "squeeze.dims", "expand.default", "alias.default", "view.dtype",
) | {operator.getitem}


def _is_fusible(node: torch.fx.Node) -> bool:
    """Whether Inductor may generate one kernel that contains ``node``'s computation."""
    if node.op != "call_function" or node.target in _EXTERN_OPS:
        return False
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target.namespace in ("aten", "prims")


def _consumers(node: torch.fx.Node) -> Iterator[torch.fx.Node]:
    """The users of ``node``, with views and ``getitem`` looked through."""
    for user in node.users:
        if user.op == "call_function" and user.target in _VIEW_OPS:
            yield from _consumers(user)
        else:
            yield user


def _producer(arg: object) -> torch.fx.Node | None:
    """The node that computes ``arg``, with views looked through."""
    while isinstance(arg, torch.fx.Node) and arg.op == "call_function" and arg.target in _VIEW_OPS:
        arg = arg.args[0]
    return arg if isinstance(arg, torch.fx.Node) else None


def _device_type(node: torch.fx.Node) -> str | None:
    val = node.meta.get("val")
    tensors = val if isinstance(val, (tuple, list)) else (val,)
    devices = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
    return devices.pop() if len(devices) == 1 else None


def _fusible_neighbour(node: torch.fx.Node) -> torch.fx.Node | None:
    for consumer in _consumers(node):
        if _is_fusible(consumer):
            return consumer
    if node.target in _QUANTIZE_OPS:
        producer = _producer(node.args[0])
        if producer is not None and _is_fusible(producer):
            return producer
    return None


def _requantized_dequantize(quantize: torch.fx.Node) -> torch.fx.Node | None:
    """The dequantize op that ``quantize``'s input is computed from through fusible ops only (a
    requantization chain), or None."""
    seen: set[torch.fx.Node] = set()
    pending = [quantize.args[0]]
    while pending:
        producer = _producer(pending.pop())
        if producer is None or producer in seen:
            continue
        seen.add(producer)
        if producer.target in _DEQUANTIZE_OPS:
            return producer
        if _is_fusible(producer):
            pending.extend(producer.all_input_nodes)
    return None


def _decide(node: torch.fx.Node) -> tuple[str, str]:
    """``("kernel" | "lowered", reason)`` for the quant op ``node`` on a kernel device."""
    if node.target in _GENERATED_IS_FASTER:
        return "lowered", "generated code: faster than the hand-written kernel for this op"
    if node.target in _QUANTIZE_OPS:
        source = _requantized_dequantize(node)
        if source is not None:
            return "lowered", f"generated code: one kernel with the requantization chain from {source.name} ({source.target})"
        neighbour = _fusible_neighbour(node)
        if neighbour is not None:
            return "kernel", (
                f"the hand-written kernel: the generated quantize is 3-6x slower, more than fusing with "
                f"{neighbour.name} ({neighbour.target}) saves"
            )
        return "kernel", "no pointwise neighbour to fuse with: calls the hand-written kernel"
    neighbour = _fusible_neighbour(node)
    if neighbour is not None:
        return "lowered", f"generated code: it can fuse with {neighbour.name} ({neighbour.target})"
    return "kernel", "no pointwise neighbour to fuse with: calls the hand-written kernel"


def mark_standalone_quant_ops(graph: torch.fx.Graph) -> int:
    """Mark the quant ops on kernel devices that should call their hand-written kernel; returns
    how many."""
    marked = 0
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in QUANT_OPS:
            continue
        if _device_type(node) not in KERNEL_DEVICES:  # read at call time: tests widen it to "cpu"
            continue
        action, reason = _decide(node)
        records.record("standalone", node, action, reason)
        if action == "kernel":
            node.meta[STANDALONE_KEY] = True
            marked += 1
            records.bump("quant_op_to_kernel")
    return marked
