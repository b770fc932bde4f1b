"""Run one ``torch.compile`` and collect what Inductor did with the quantized ops.

Sources, all provided by torch (no scraping of log text):

* graph breaks: ``torch._dynamo.explain`` (reasons and user frames);
* recompiles, generated code and the kernel -> post-grad-node map: Inductor's structured trace
  (``torch._logging`` ``trace_structured`` artifacts ``recompile_reasons``, ``inductor_output_code``
  and, with ``config.trace.provenance_tracking_level = 1``, ``inductor_provenance_tracking_*``),
  received by a ``logging.Handler`` on the trace logger for the duration of the compile;
* the post-grad graph before/after our passes: an observer installed in the post-grad hook that
  runs the pass already there (the user's), snapshots the FX graph, runs our pass manager and
  snapshots again, keeping the counter changes (``counters["inductor_quant"]``) and the
  decisions the passes recorded (``inductor_quant.patterns.records``);
* bytes per kernel: an observer in ``_post_fusion_custom_pass`` that asks each fused scheduler
  node for Inductor's own estimate (``get_read_write_buffers_sizes``);
* each kernel's source: the generated wrapper module, parsed with ``ast`` (the ``async_compile``
  definitions and the extern calls).

The FX graph cache is disabled for the compile, so the passes and observers always run.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch._inductor.ir
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass

from ..patterns import records
from ..patterns.records import COUNTER_GROUP
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
)

try:
    from torch._inductor.custom_graph_pass import CustomInferenceAwareGraphPass as _GraphPassBase
except ImportError:
    _GraphPassBase = CustomGraphPass
try:
    from torch._inductor.custom_graph_pass import CustomSchedulerPass as _SchedulerPassBase
except ImportError:
    _SchedulerPassBase = object

__all__ = ["PassObserver", "FusionObserver", "describe_pass", "snapshot_graph", "parse_output_code", "capture"]

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LIBRARY_DIRS = tuple(
    os.path.join(_PACKAGE_DIR, sub) + os.sep
    for sub in ("nn", "ops", "optim", "reference", "kernels", "lowerings", "patterns")
)
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>[^\n]+)\n(?P<code>[^\n]*)')
_AUTO_FUNCTIONALIZED = ("auto_functionalized", "auto_functionalized_v2")


# --- graph snapshots ------------------------------------------------------------------------


def parse_stack_trace(trace: str | None) -> list[SourceLine]:
    """Frames of an FX ``node.meta["stack_trace"]`` (outermost first).

    Torch stores this meta as formatted traceback text, so it is parsed here.
    """
    if not trace:
        return []
    return [
        SourceLine(m["file"], int(m["line"]), m["func"].strip(), m["code"].strip())
        for m in _FRAME.finditer(trace)
    ]


def user_frame(frames: Sequence[SourceLine]) -> SourceLine | None:
    """The user's line: the innermost frame outside torch and outside inductor_quant's library
    layers (``nn``, ``ops``, ``optim``, ...); else the innermost frame outside torch; else the
    innermost frame."""
    outside_torch = [f for f in frames if not os.path.abspath(f.filename).startswith(_TORCH_DIR + os.sep)]
    for frame in reversed(outside_torch):
        if not os.path.abspath(frame.filename).startswith(_LIBRARY_DIRS):
            return frame
    if outside_torch:
        return outside_torch[-1]
    return frames[-1] if frames else None


def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    if node.op != "call_function":
        return str(target)
    if isinstance(target, torch._ops.HigherOrderOperator):
        name = target.name()
        if name in _AUTO_FUNCTIONALIZED and node.args and isinstance(node.args[0], torch._ops.OpOverload):
            # A mutating op inside a functional graph: report the op it wraps.
            return str(node.args[0])
        return f"higher_order.{name}"
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(target)
    return getattr(target, "__name__", str(target))


def _describe_value(value: Any) -> tuple[list[str] | None, str | None]:
    if isinstance(value, torch.Tensor):
        return [str(size) for size in value.shape], str(value.dtype).removeprefix("torch.")
    return None, None


def snapshot_graph(graph: torch.fx.Graph) -> GraphSnapshot:
    """Plain-data copy of an FX graph: nodes (target, inputs, shape, dtype, user line) and code."""
    nodes = []
    for node in graph.nodes:
        shape, dtype = _describe_value(node.meta.get("val"))
        nodes.append(
            GraphNode(
                name=node.name,
                op=node.op,
                target=_target_name(node),
                inputs=[arg.name for arg in node.all_input_nodes],
                shape=shape,
                dtype=dtype,
                source=user_frame(parse_stack_trace(node.meta.get("stack_trace"))),
            )
        )
    return GraphSnapshot(nodes=nodes, code=graph.python_code("self", verbose=True).src.strip() + "\n")


# --- per-compile records --------------------------------------------------------------------


@dataclass
class _FusedNode:
    origins: list[str]
    bytes_moved: int | None


@dataclass
class _RawGraph:
    """What the observers and the trace handler saw for one graph Inductor compiled."""

    compile_id: str
    kind: str
    passes: list[str]
    before: GraphSnapshot
    after: GraphSnapshot
    counters: dict[str, int]
    decisions: list[PassDecision] = field(default_factory=list)
    fused: list[_FusedNode] = field(default_factory=list)
    output_code: str | None = None
    provenance: dict[str, list[str]] | None = None
    kernel_stacks: dict[str, list[str]] = field(default_factory=dict)


class _Session:
    """Collects records in compile order; the last graph still waiting for its code is 'open'."""

    def __init__(self) -> None:
        self.graphs: list[_RawGraph] = []
        self.recompiles: list[Recompile] = []

    def open_graph(self, compile_id: str | None) -> _RawGraph:
        for graph in reversed(self.graphs):
            if graph.output_code is None and (compile_id is None or graph.compile_id == compile_id):
                return graph
        graph = _RawGraph(compile_id or "?", "forward", [], GraphSnapshot(), GraphSnapshot(), {})
        self.graphs.append(graph)
        return graph

    def last_compiled(self, compile_id: str | None) -> _RawGraph | None:
        for graph in reversed(self.graphs):
            if graph.output_code is not None and (compile_id is None or graph.compile_id == compile_id):
                return graph
        return None


def _compile_id() -> str:
    compile_id = torch._guards.CompileContext.current_compile_id()
    if compile_id is None:
        return "?"
    return f"{compile_id.frame_id}/{compile_id.frame_compile_id}"


def _graph_kind(graph: torch.fx.Graph, is_inference: bool | None) -> str:
    if any(node.op == "placeholder" and node.name.startswith("tangents") for node in graph.nodes):
        return "backward"
    return "inference" if is_inference else "forward"


def _run_pass(graph_pass: Any, graph: torch.fx.Graph, is_inference: bool | None) -> None:
    """Call a post-grad pass the way Inductor would (inference-aware passes get ``is_inference``)."""
    if _GraphPassBase is not CustomGraphPass and isinstance(graph_pass, _GraphPassBase):
        graph_pass(graph, is_inference=bool(is_inference))
    else:
        graph_pass(graph)


def describe_pass(graph_pass: Any) -> str:
    """``QuantPassManager(dequant_linear_8bit=False)``: the class and the config fields that
    differ from their defaults (no addresses, so reports stay comparable)."""
    config = getattr(graph_pass, "config", None)
    if not dataclasses.is_dataclass(config):
        return type(graph_pass).__name__
    changed = [
        f"{f.name}={getattr(config, f.name)!r}"
        for f in dataclasses.fields(config)
        if f.default is not dataclasses.MISSING and getattr(config, f.name) != f.default
    ]
    return f"{type(graph_pass).__name__}({', '.join(changed)})"


class PassObserver(_GraphPassBase):
    """Post-grad pass that snapshots the graph around the passes it observes.

    Installed in one post-grad hook for the compile. It runs ``chained`` (what the hook held
    before: the user's own passes) first, then snapshots the graph, runs ``observed`` (the
    inductor_quant pass manager), snapshots again and keeps the counter changes and the
    decisions the passes recorded (``inductor_quant.patterns.records``). ``uuid()`` is None: the
    observer exists only while inspecting, with the FX graph cache off.
    """

    def __init__(self, observed: Sequence[Any], chained: Sequence[Any], session: _Session, hook: str) -> None:
        self.observed = tuple(observed)
        self.chained = tuple(chained)
        self.session = session
        self.hook = hook

    def __call__(self, graph: torch.fx.Graph, is_inference: bool | None = None) -> None:
        for graph_pass in self.chained:
            _run_pass(graph_pass, graph, is_inference)
        before = snapshot_graph(graph)
        counts_before = dict(counters[COUNTER_GROUP])
        n_decisions = len(records.fusion_decisions())
        for graph_pass in self.observed:
            _run_pass(graph_pass, graph, is_inference)
        delta = {
            name: count - counts_before.get(name, 0)
            for name, count in counters[COUNTER_GROUP].items()
            if count != counts_before.get(name, 0)
        }
        decisions = [
            PassDecision(d.pattern, d.node, d.op, d.action, d.reason) for d in records.fusion_decisions()[n_decisions:]
        ]
        self.session.graphs.append(
            _RawGraph(
                compile_id=_compile_id(),
                kind=_graph_kind(graph, is_inference),
                passes=[f"{describe_pass(graph_pass)} in {self.hook}" for graph_pass in self.observed],
                before=before,
                after=snapshot_graph(graph),
                counters=delta,
                decisions=decisions,
            )
        )

    def uuid(self) -> None:
        return None


class FusionObserver(_SchedulerPassBase):
    """``_post_fusion_custom_pass`` that records each fused node's origins and bytes moved."""

    def __init__(self, inner: Callable[[list[Any]], list[Any]] | None, session: _Session) -> None:
        self.inner = inner
        self.session = session

    def __call__(self, nodes: list[Any]) -> list[Any]:
        if self.inner is not None:
            nodes = self.inner(nodes)
        graph = self.session.open_graph(_compile_id())
        for snode in nodes:
            origins: list[str] = []
            for sub in snode.get_nodes():
                origins += [name for name in _origin_names(sub.node) if name not in origins]
            size = snode.get_read_write_buffers_sizes()
            # A symbolic size (dynamic shapes) has no single byte count.
            known = isinstance(size, int) or getattr(size, "is_Integer", False)
            graph.fused.append(_FusedNode(origins, int(size) if known else None))
        return nodes

    def uuid(self) -> None:
        return None


def _origin_names(ir_node: Any) -> list[str]:
    """The post-grad nodes an IR node computes, by the rule Inductor's kernel provenance uses:
    an extern kernel's exact ``origin_node`` when it has one, else all its ``origins``."""
    if ir_node is None:
        return []
    origin_node = getattr(ir_node, "origin_node", None)
    if isinstance(ir_node, torch._inductor.ir.ExternKernel) and origin_node is not None:
        return [origin_node.name]
    return [origin.name for origin in ir_node.origins]


class _TraceHandler(logging.Handler):
    """Receives Inductor's structured-trace records and routes the ones a report needs."""

    def __init__(self, session: _Session) -> None:
        super().__init__(logging.DEBUG)
        self.session = session

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._route(record)
        except Exception:  # noqa: BLE001  (logging convention: a handler must never break the caller)
            self.handleError(record)

    def _route(self, record: logging.LogRecord) -> None:
        metadata = getattr(record, "metadata", None)
        payload = getattr(record, "payload", None)
        if not isinstance(metadata, dict):
            return
        compile_id = f"{metadata['frame_id']}/{metadata.get('frame_compile_id', 0)}" if "frame_id" in metadata else None
        if "inductor_output_code" in metadata and isinstance(payload, str):
            self.session.open_graph(compile_id).output_code = payload
            return
        artifact = metadata.get("artifact")
        if not isinstance(artifact, dict) or payload is None:
            return
        name = artifact.get("name")
        if name == "recompile_reasons":
            reasons = _reasons(payload)
            self.session.recompiles.append(Recompile(compile_id or "?", [str(r).strip() for r in reasons]))
        elif name == "inductor_provenance_tracking_node_mappings":
            graph = self.session.last_compiled(compile_id)
            if graph is not None:
                graph.provenance = json.loads(payload).get("cppCodeToPost", {})
        elif name == "inductor_provenance_tracking_kernel_stack_traces":
            graph = self.session.last_compiled(compile_id)
            if graph is not None:
                graph.kernel_stacks = json.loads(payload)


def _reasons(payload: str) -> list[str]:
    """``recompile_reasons`` payload: one reason as plain text, several as a JSON list."""
    if payload.startswith("[\n") and payload.endswith("\n]"):
        with contextlib.suppress(json.JSONDecodeError):
            return [str(reason) for reason in json.loads(payload)]
    return [payload]


@contextlib.contextmanager
def _structured_trace(handler: logging.Handler) -> Iterator[None]:
    trace_log = torch._logging._internal.trace_log
    level, propagate = trace_log.level, trace_log.propagate
    trace_log.addHandler(handler)
    trace_log.setLevel(logging.DEBUG)
    # The records are for this handler only (not for root handlers such as pytest's capture).
    trace_log.propagate = False
    try:
        yield
    finally:
        trace_log.removeHandler(handler)
        trace_log.setLevel(level)
        trace_log.propagate = propagate


# --- generated code -------------------------------------------------------------------------


def _dotted(node: ast.expr) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def parse_output_code(code: str) -> tuple[dict[str, tuple[str, str]], dict[str, list[str]]]:
    """Kernels defined in an Inductor wrapper module, and its extern calls.

    Returns ``({kernel name: (kind, source)}, {extern callee: [call source, in call order]})``.
    Kernels are the module-level ``name = async_compile.<method>(...)`` definitions (``kind`` is
    ``cpp``, ``triton`` or ``template``; the source is the longest string argument); extern calls
    are calls to ``extern_kernels.*`` and ``torch.ops.*``.
    """
    tree = ast.parse(code)
    kernels: dict[str, tuple[str, str]] = {}
    calls: dict[str, list[str]] = collections.defaultdict(list)
    for stmt in tree.body:
        if (
            isinstance(stmt, ast.Assign)
            and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Name)
            and isinstance(stmt.value, ast.Call)
        ):
            callee = _dotted(stmt.value.func) or ""
            if callee.startswith("async_compile."):
                method = callee.split(".", 1)[1]
                name = stmt.targets[0].id
                strings = [
                    arg.value for arg in stmt.value.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
                ]
                source = max(strings, key=len, default="")
                if method.startswith("cpp"):
                    kind = "cpp"
                elif method == "triton":
                    kind = "template" if name.startswith("triton_tem") else "triton"
                else:
                    kind = method
                kernels[name] = (kind, source.strip("\n") + "\n")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            callee = _dotted(node.func)
            if callee and callee.startswith(("extern_kernels.", "torch.ops.")):
                calls[callee].append(ast.get_source_segment(code, node) or callee)
    return kernels, dict(calls)


def _provenance_entries(provenance: dict[str, list[str]]) -> list[tuple[str, list[str]]]:
    """``[(kernel name, post-grad nodes)]`` in code-generation order (by provenance handle)."""
    entries = []
    for key, nodes in provenance.items():
        name, _, handle = key.rpartition(":")
        if not name or not handle.isdigit():
            name, handle = key, "0"
        entries.append((int(handle), name, key, list(nodes)))
    entries.sort()
    return [(name, nodes) for _, name, _key, nodes in entries]


def _kernels(raw: _RawGraph, notes: list[str]) -> list[Kernel]:
    generated, calls = parse_output_code(raw.output_code or "")
    provenance = raw.provenance or {}
    if raw.output_code and not provenance and generated:
        notes.append(f"graph {raw.compile_id}: Inductor gave no kernel provenance; kernels are listed without their nodes")
    stacks = {key.rpartition(":")[0] or key: value for key, value in raw.kernel_stacks.items()}
    entries = _provenance_entries(provenance)
    totals = collections.Counter(name for name, _ in entries)
    seen: collections.Counter[str] = collections.Counter()
    kernels: list[Kernel] = []
    for name, nodes in entries:
        seen[name] += 1
        if name in generated:
            kind, code = generated[name]
        else:
            kind = "extern"
            extern_calls = calls.get(name, [])
            code = extern_calls[seen[name] - 1] + "\n" if seen[name] <= len(extern_calls) else ""
        display = name if totals[name] == 1 else f"{name}#{seen[name]}"
        sources: list[SourceLine] = []
        for trace in stacks.get(name, []):
            frame = user_frame(parse_stack_trace(trace))
            if frame is not None and frame not in sources:
                sources.append(frame)
        kernels.append(Kernel(display, kind, nodes, [], None, code, sources))
    named = {name for name, _ in entries}
    for name, (kind, code) in generated.items():
        if name not in named:
            kernels.append(Kernel(name, kind, [], [], None, code, []))
    _assign_bytes(kernels, raw.fused)
    # An extern kernel that calls a node's own op (``torch.ops.inductor_quant.gemm_4bit.default``
    # for a ``gemm_4bit`` node, ``extern_kernels.mm`` for ``mm``) computes exactly that node; a
    # generated kernel may still list it among its origins when it only realizes the call's
    # inputs. Drop those. (A library call inside an op's lowering, such as the ``addmm`` of a
    # ``gemm_4bit`` lowered on CPU, computes only part of its node: the generated kernels keep it.)
    by_extern = {
        kernel.nodes[0] for kernel in kernels
        if not kernel.is_generated and len(kernel.nodes) == 1 and _calls_own_op(kernel, raw.after.node(kernel.nodes[0]))
    }
    for kernel in kernels:
        if kernel.is_generated:
            kernel.nodes = [node for node in kernel.nodes if node not in by_extern]
        for node_name in kernel.nodes:
            node = raw.after.node(node_name)
            if node is not None and node.is_quantized and node.op_name not in kernel.quantized_ops:
                kernel.quantized_ops.append(node.op_name)
    return kernels


def _calls_own_op(kernel: Kernel, node: Any) -> bool:
    """Whether the extern ``kernel`` is a call of ``node``'s op (by name)."""
    return node is None or node.op_name in kernel.name.partition("#")[0].split(".")


def _assign_bytes(kernels: list[Kernel], fused: list[_FusedNode]) -> None:
    """Give each kernel the bytes of the fused scheduler nodes whose origins overlap it most."""
    totals: dict[int, int] = {}
    node_sets = [set(kernel.nodes) for kernel in kernels]
    for fnode in fused:
        origins = set(fnode.origins)
        exact = [i for i, nodes in enumerate(node_sets) if nodes == origins]
        # Several kernels of one node (an op lowered to a generated kernel and a library call):
        # both lists are in execution order, so the first kernel not yet given bytes is this one.
        best = next((i for i in exact if i not in totals), exact[0] if exact else None)
        if best is None:
            overlap = 0
            for i, nodes in enumerate(node_sets):
                if len(origins & nodes) > overlap:
                    best, overlap = i, len(origins & nodes)
        if best is not None and fnode.bytes_moved is not None:
            totals[best] = totals.get(best, 0) + fnode.bytes_moved
    for i, total in totals.items():
        kernels[i].bytes_moved = total


# --- quantized-op verdicts ------------------------------------------------------------------


_VIEW_OPS = frozenset(
    ("permute", "view", "reshape", "_unsafe_view", "t", "transpose", "expand", "unsqueeze", "squeeze", "alias", "slice")
)


def _reader_kernels(after: GraphSnapshot, name: str, kernels: list[Kernel], homes: list[Kernel]) -> list[Kernel]:
    """Kernels outside ``homes`` that read what ``name`` produced.

    The walk goes through views (free) and through consumers computed in the same kernels as
    ``name`` (fused with it), so a dequantize fused with a dtype conversion still reports the
    matmul that reads the converted weight.
    """
    inside = {node for kernel in homes for node in kernel.nodes}
    found: list[Kernel] = []
    pending = [user.name for user in after.users(name)]
    seen = set()
    while pending:
        user = pending.pop(0)
        if user in seen:
            continue
        seen.add(user)
        node = after.node(user)
        places = [kernel for kernel in kernels if user in kernel.nodes and kernel not in homes]
        if user in inside or (not places and node is not None and node.op_name in _VIEW_OPS):
            pending += [u.name for u in after.users(user)]
        found += [kernel for kernel in places if kernel not in found]
    return found


def _has_lowering(target: str) -> bool:
    """Whether Inductor has a real lowering (not a fallback) for the op printed as ``target``."""
    from torch._inductor.lowering import lowerings

    namespace, _, rest = target.partition(".")
    name, _, overload = rest.partition(".")
    packet = getattr(getattr(torch.ops, namespace, None), name, None)
    op = getattr(packet, overload or "default", None)
    # Inductor installs a fallback handler (marked ``_is_fallback_handler``) for ops it has no lowering for.
    return op is not None and op in lowerings and not getattr(lowerings[op], "_is_fallback_handler", False)


def _descendants(graph: GraphSnapshot, name: str) -> list[str]:
    """Every node reachable from ``name`` (breadth first, nearest first)."""
    order: list[str] = []
    pending = [name]
    while pending:
        current = pending.pop(0)
        for user in graph.users(current):
            if user.name not in order:
                order.append(user.name)
                pending.append(user.name)
    return order


def _related_decisions(raw: _RawGraph, name: str) -> list[PassDecision]:
    """Decisions about ``name`` itself or about the nodes it feeds, nearest first."""
    rank = {node: i for i, node in enumerate([name, *_descendants(raw.before, name)])}
    related = [d for d in raw.decisions if d.node in rank]
    return sorted(related, key=lambda d: rank[d.node])


def _name_after_passes(raw: _RawGraph, name: str, homes: list[Kernel]) -> str:
    """The node of the graph after our passes that stands for ``name``: itself, or the
    ``invoke_quant`` call it was moved into (``patterns.template_prologue``), which its kernels
    list among their nodes."""
    if raw.after.node(name) is not None:
        return name
    for kernel in homes:
        for other in kernel.nodes:
            node = raw.after.node(other)
            if node is not None and node.target.endswith("invoke_quant"):
                return other
    return name


def _quant_status(raw: _RawGraph, kernels: list[Kernel], disabled: dict[str, str]) -> list[QuantOpStatus]:
    """The fate of every quantized op of the graph our passes received.

    ``disabled`` maps an op name (or ``"*"``: every op) to why no pass could rewrite it.
    """
    statuses = []
    for node in raw.before.nodes:
        if not node.is_quantized:
            continue
        op = node.op_name
        decisions = _related_decisions(raw, node.name)
        homes = [kernel for kernel in kernels if node.name in kernel.nodes]
        if raw.after.node(node.name) is None and not homes:
            rewrites = [d for d in decisions if d.action == "rewritten"]
            if rewrites:
                reason = f"rewritten by {rewrites[0].pattern} ({rewrites[0].reason})"
            else:
                reason = "removed by the inductor_quant passes (" + (", ".join(sorted(raw.counters)) or "no counter moved") + ")"
            statuses.append(QuantOpStatus(node.name, op, "rewritten", reason, None, node.source))
            continue
        if not homes:
            reason = "computed by no kernel (dead code, or folded away by Inductor)"
            statuses.append(QuantOpStatus(node.name, op, "removed", reason, None, node.source))
            continue
        notes = [f"{d.pattern}: {d.reason}" for d in decisions if d.action != "rewritten"]
        # The op itself as an extern call (a generated kernel may still list it among its
        # origins when it only prepares the call's inputs).
        itself = [k for k in homes if not k.is_generated and k.name.partition("#")[0].endswith(node.target)]
        generated = [k for k in homes if k.is_generated] if not itself else []
        after_name = _name_after_passes(raw, node.name, homes)
        own = {node.name, after_name}
        if after_name != node.name:  # wrapped: its invoke_quant call and that call's subgraph
            own.update(raw.after.node(after_name).inputs[:1])
        readers = _reader_kernels(raw.after, after_name, kernels, itself or generated)
        extern_readers = [k.name for k in readers if not k.is_generated]
        shared = [k for k in generated if set(k.nodes) - own]
        if shared and not extern_readers:
            kernel = shared[0]
            reason = f"computed inside {kernel.name} with {', '.join(n for n in kernel.nodes if n not in own)}"
            statuses.append(QuantOpStatus(node.name, op, "fused", "; ".join([reason, *notes]), kernel.name, node.source))
            continue
        kernel = (itself or shared or generated or homes)[0]
        reasons = []
        off = disabled.get(op, disabled.get("*"))
        if off:
            reasons.append(f"pass disabled: {off}")
        reasons += notes
        users = raw.before.users(node.name)
        if len(users) > 1 and not any(d.action == "per-consumer" for d in decisions):
            reasons.append(f"{len(users)} consumers ({', '.join(u.name for u in users)})")
        if kernel.is_generated:
            where = f"computed in {kernel.name}" + (
                f" with {', '.join(n for n in kernel.nodes if n not in own)}" if shared else " alone"
            )
            if extern_readers:
                reasons.append(
                    f"its result is written to memory: {where}, then read by {', '.join(extern_readers)} "
                    "(Inductor does not fuse a producer into an extern kernel)"
                )
            else:
                consumers = ", ".join(k.name for k in readers) or "none"
                reasons.append(f"{where}; Inductor did not fuse it with its consumers ({consumers})")
        elif _has_lowering(node.target):
            reasons.append(f"its lowering fell back to the opaque extern call {kernel.name}")
        else:
            reasons.append(f"no Inductor lowering registered: runs as the opaque extern call {kernel.name}")
        statuses.append(QuantOpStatus(node.name, op, "not fused", "; ".join(reasons), kernel.name, node.source))
    return statuses


def _matches(raw: _RawGraph) -> list[PatternMatch]:
    """Rewrites per pattern, with the user lines of the matched ops (each line once)."""
    matches: dict[str, PatternMatch] = {}
    for decision in raw.decisions:
        if decision.action != "rewritten":
            continue
        match = matches.setdefault(decision.pattern, PatternMatch(decision.pattern, 0))
        match.count += 1
        match.nodes.append(decision.node)
        node = raw.before.node(decision.node)
        if node is not None and node.source is not None and node.source not in match.sources:
            match.sources.append(node.source)
    return sorted(matches.values(), key=lambda m: m.pattern)


# --- the driver -----------------------------------------------------------------------------


def _explain(fn: Callable[..., Any], inputs: Sequence[Any]) -> tuple[int, list[GraphBreak]]:
    explained = torch._dynamo.explain(fn)(*inputs)
    breaks = []
    for reason in explained.break_reasons:
        stack = [SourceLine(f.filename, f.lineno or 0, f.name, (f.line or "").strip()) for f in reason.user_stack]
        breaks.append(GraphBreak(str(reason.reason), stack))
    return explained.graph_count, breaks


def _device(fn: Any, inputs: Sequence[Any]) -> str:
    for value in inputs:
        if isinstance(value, torch.Tensor):
            return str(value.device)
    if isinstance(fn, torch.nn.Module):
        for tensor in list(fn.parameters()) + list(fn.buffers()):
            return str(tensor.device)
    return "cpu"


def _describe_target(fn: Any) -> str:
    if isinstance(fn, torch.nn.Module):
        return type(fn).__name__
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def _as_tuple(passes: Any) -> tuple[Any, ...]:
    if passes is None:
        return ()
    return tuple(passes) if isinstance(passes, (list, tuple)) else (passes,)


def _show(value: Any) -> str:
    """A deterministic rendering of a compile argument (objects by type, not by address)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key!r}: {_show(item)}" for key, item in sorted(value.items())) + "}"
    return type(value).__name__


HOOKS = ("post_grad_custom_post_pass", "post_grad_custom_pre_pass")


def capture(
    fn: Callable[..., Any],
    inputs: Sequence[Any],
    *,
    extra_inputs: Sequence[Sequence[Any]] = (),
    passes: Sequence[Any] = (),
    hook: str = "post_grad_custom_post_pass",
    disabled: dict[str, str] | None = None,
    compile_kwargs: dict[str, Any] | None = None,
) -> InspectionReport:
    """Explain, compile and run ``fn(*inputs)`` (then ``fn(*more)`` for each of ``extra_inputs``).

    ``passes`` (the inductor_quant pass manager) go into the post-grad ``hook`` behind an
    observer, after whatever the compile options or the global config already hold there.
    ``disabled`` maps a quantized op name to why no pass could rewrite it. ``compile_kwargs`` go
    to ``torch.compile`` (``mode`` is expanded into ``options``, as ``inductor_quant.compile``
    does, so both may be given).
    """
    compile_kwargs = dict(compile_kwargs or {})
    shown = {key: _show(value) for key, value in sorted(compile_kwargs.items())}
    backend = compile_kwargs.pop("backend", "inductor")
    if backend != "inductor":
        raise ValueError(f"backend must be 'inductor' to inspect Inductor's kernels, got {backend!r}")
    if hook not in HOOKS:
        raise ValueError(f"hook must be one of {HOOKS}, got {hook!r}")
    options = dict(compile_kwargs.pop("options", None) or {})
    mode = compile_kwargs.pop("mode", None)
    if mode is not None and mode != "default":
        from torch._inductor import list_mode_options

        options = {**list_mode_options(mode, compile_kwargs.get("dynamic")), **options}

    graph_count, breaks = _explain(fn, inputs)
    session = _Session()
    chained = options[hook] if hook in options else getattr(inductor_config, hook)
    user_fusion = options.get("_post_fusion_custom_pass", inductor_config._post_fusion_custom_pass)
    options[hook] = PassObserver(passes, _as_tuple(chained), session, hook)
    options["_post_fusion_custom_pass"] = FusionObserver(user_fusion, session)
    options["trace.provenance_tracking_level"] = 1
    compiled = torch.compile(fn, backend="inductor", options=options, **compile_kwargs)
    with inductor_config.patch(force_disable_caches=True), _structured_trace(_TraceHandler(session)):
        torch._dynamo.reset()
        compiled(*inputs)
        for more in extra_inputs:
            compiled(*more)

    notes = ["bytes: Inductor's estimate per fused node (each buffer read or written once, worst-case inputs)"]
    graphs = []
    for raw in session.graphs:
        if raw.output_code is None:
            raw.kind = "subgraph"
        kernels = _kernels(raw, notes) if raw.output_code is not None else []
        graphs.append(
            CompiledGraph(
                compile_id=raw.compile_id,
                kind=raw.kind,
                passes=raw.passes,
                before=raw.before,
                after=raw.after,
                matches=_matches(raw),
                decisions=raw.decisions,
                counters=dict(sorted(raw.counters.items())),
                kernels=kernels,
                quant_ops=_quant_status(raw, kernels, disabled or {}),
                output_code=raw.output_code or "",
            )
        )
    return InspectionReport(
        target=_describe_target(fn),
        device=_device(fn, inputs),
        torch_version=torch.__version__,
        compile_kwargs=shown,
        graph_count=graph_count,
        graph_breaks=breaks,
        recompiles=session.recompiles,
        graphs=graphs,
        notes=notes,
    )
