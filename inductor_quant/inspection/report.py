"""The inspection report: plain dataclasses, a text rendering for terminals, and JSON.

Everything in a report is plain data (strings, ints, lists, dicts), so it survives a JSON round
trip unchanged (``InspectionReport.from_json(report.to_json()) == report``) and can be rendered
without torch. ``capture.py`` builds it; ``html.py`` draws it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

__all__ = [
    "QUANT_NAMESPACE",
    "SourceLine",
    "GraphBreak",
    "Recompile",
    "GraphNode",
    "GraphSnapshot",
    "PatternMatch",
    "PassDecision",
    "Kernel",
    "QuantOpStatus",
    "CompiledGraph",
    "InspectionReport",
    "render_text",
]

QUANT_NAMESPACE = "inductor_quant"
"""Targets of our ops print as ``inductor_quant.<op>.<overload>``."""


@dataclass
class SourceLine:
    """One frame of user code: where an op, a graph break or a kernel came from."""

    filename: str
    lineno: int
    function: str
    code: str = ""

    def short(self) -> str:
        """``file.py:12 in forward`` (basename only, so reports do not depend on the checkout path)."""
        return f"{os.path.basename(self.filename)}:{self.lineno} in {self.function}"

    def describe(self) -> str:
        """``file.py:12 in forward: <code>``."""
        return f"{self.short()}: {self.code}" if self.code else self.short()


@dataclass
class GraphBreak:
    """A place where Dynamo split the program into several graphs (from ``torch._dynamo.explain``)."""

    reason: str
    user_stack: list[SourceLine] = field(default_factory=list)

    @property
    def summary(self) -> str:
        """First line of the reason (Dynamo's reasons carry multi-line explanations and hints)."""
        return self.reason.strip().splitlines()[0] if self.reason.strip() else "(no reason given)"


@dataclass
class Recompile:
    """A recompilation of an already compiled frame and the guard failures that caused it."""

    compile_id: str
    reasons: list[str] = field(default_factory=list)


@dataclass
class GraphNode:
    """One FX node of a post-grad graph, reduced to what a report needs."""

    name: str
    op: str
    target: str
    inputs: list[str] = field(default_factory=list)
    shape: list[str] | None = None
    dtype: str | None = None
    source: SourceLine | None = None

    @property
    def is_quantized(self) -> bool:
        """True for ``torch.ops.inductor_quant.*`` calls."""
        return self.op == "call_function" and self.target.startswith(QUANT_NAMESPACE + ".")

    @property
    def op_name(self) -> str:
        """``aten.mm.default`` -> ``mm``; ``inductor_quant.dequantize_4bit.default`` -> ``dequantize_4bit``."""
        parts = self.target.split(".")
        if len(parts) >= 3 and parts[0] in (QUANT_NAMESPACE, "aten", "prims", "quantized_decomposed"):
            return parts[1]
        return parts[-1] if parts else self.target


@dataclass
class GraphSnapshot:
    """A post-grad graph at one moment: its nodes and its readable Python code."""

    nodes: list[GraphNode] = field(default_factory=list)
    code: str = ""

    def node(self, name: str) -> GraphNode | None:
        """The node called ``name``, or None."""
        for node in self.nodes:
            if node.name == name:
                return node
        return None

    def users(self, name: str) -> list[GraphNode]:
        """Nodes that take ``name`` as an input."""
        return [node for node in self.nodes if name in node.inputs]

    @property
    def op_count(self) -> int:
        """Number of ``call_function`` nodes."""
        return sum(node.op == "call_function" for node in self.nodes)


@dataclass
class PatternMatch:
    """What one inductor_quant pattern rewrote in one graph."""

    pattern: str
    count: int
    sources: list[SourceLine] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)


@dataclass
class PassDecision:
    """One decision an inductor_quant pass recorded about a node (``patterns.records``)."""

    pattern: str
    node: str
    op: str
    action: str
    reason: str


@dataclass
class Kernel:
    """One kernel (or extern call) of the generated code and the graph nodes it computes."""

    name: str
    kind: str
    nodes: list[str] = field(default_factory=list)
    quantized_ops: list[str] = field(default_factory=list)
    bytes_moved: int | None = None
    code: str = ""
    sources: list[SourceLine] = field(default_factory=list)

    @property
    def is_generated(self) -> bool:
        """True for kernels Inductor generated (C++ or Triton), False for extern calls."""
        return self.kind in ("cpp", "triton", "template")


@dataclass
class QuantOpStatus:
    """The fate of one quantized op of the graph our passes received.

    ``status`` is ``"rewritten"`` (a pattern replaced it), ``"fused"`` (it shares a generated
    kernel with other work), ``"not fused"`` (it runs alone) or ``"removed"`` (in no kernel).
    """

    node: str
    op: str
    status: str
    reason: str
    kernel: str | None = None
    source: SourceLine | None = None

    @property
    def fused(self) -> bool:
        """True when the op was rewritten by a pattern or shares a kernel with its neighbours."""
        return self.status in ("rewritten", "fused")


@dataclass
class CompiledGraph:
    """One graph Inductor compiled: before/after our passes, matches, kernels, quantized ops."""

    compile_id: str
    kind: str
    passes: list[str] = field(default_factory=list)
    before: GraphSnapshot = field(default_factory=GraphSnapshot)
    after: GraphSnapshot = field(default_factory=GraphSnapshot)
    matches: list[PatternMatch] = field(default_factory=list)
    decisions: list[PassDecision] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    kernels: list[Kernel] = field(default_factory=list)
    quant_ops: list[QuantOpStatus] = field(default_factory=list)
    output_code: str = ""

    @property
    def unfused(self) -> list[QuantOpStatus]:
        """Quantized ops that did not fuse, with the reason."""
        return [status for status in self.quant_ops if not status.fused]

    def kernel_of(self, node: str) -> list[Kernel]:
        """Kernels that compute ``node``."""
        return [kernel for kernel in self.kernels if node in kernel.nodes]


@dataclass
class InspectionReport:
    """What ``torch.compile`` did with a function's quantized ops (see ``inductor_quant.inspect``)."""

    target: str
    device: str
    torch_version: str
    compile_kwargs: dict[str, str] = field(default_factory=dict)
    graph_count: int = 0
    graph_breaks: list[GraphBreak] = field(default_factory=list)
    recompiles: list[Recompile] = field(default_factory=list)
    graphs: list[CompiledGraph] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def kernels(self) -> list[Kernel]:
        """Every kernel of every compiled graph."""
        return [kernel for graph in self.graphs for kernel in graph.kernels]

    @property
    def unfused(self) -> list[QuantOpStatus]:
        """Every quantized op that did not fuse."""
        return [status for graph in self.graphs for status in graph.unfused]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-compatible)."""
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON (``from_json`` reads it back into an equal report)."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InspectionReport:
        """Inverse of ``to_dict``; raises ValueError naming the first field that does not fit."""
        return _build(cls, data, "report")

    @classmethod
    def from_json(cls, text: str) -> InspectionReport:
        """Inverse of ``to_json``."""
        return cls.from_dict(json.loads(text))

    def to_text(self) -> str:
        """The readable terminal report (``render_text``)."""
        return render_text(self)


def _build(tp: Any, data: Any, path: str) -> Any:
    """Rebuild a value of type ``tp`` (a dataclass, list, dict, optional or plain type) from JSON data."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if data is None and type(None) in options:
            return None
        (inner,) = [option for option in options if option is not type(None)]
        return _build(inner, data, path)
    if origin is list:
        if not isinstance(data, list):
            raise ValueError(f"{path} must be a list, got {type(data).__name__}")
        (inner,) = typing.get_args(tp)
        return [_build(inner, item, f"{path}[{i}]") for i, item in enumerate(data)]
    if origin is dict:
        if not isinstance(data, dict):
            raise ValueError(f"{path} must be an object, got {type(data).__name__}")
        _, value_type = typing.get_args(tp)
        return {str(key): _build(value_type, value, f"{path}.{key}") for key, value in data.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise ValueError(f"{path} must be an object, got {type(data).__name__}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{path} has unknown fields {unknown} for {tp.__name__}")
        return tp(**{name: _build(hints[name], value, f"{path}.{name}") for name, value in data.items()})
    if tp is Any:
        return data
    if tp is int and isinstance(data, bool) or not isinstance(data, tp):
        raise ValueError(f"{path} must be {tp.__name__}, got {type(data).__name__}")
    return data


def _table(rows: list[list[str]], indent: str = "    ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"


def _names(names: list[str], limit: int = 6) -> str:
    """``a, b, c`` (long lists cut after ``limit`` names; the JSON and HTML keep them all)."""
    if not names:
        return "-"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... (+{len(names) - limit})"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def render_text(report: InspectionReport) -> str:
    """A readable, deterministic text report (no timings or addresses; file names without directories)."""
    out: list[str] = [f"inductor_quant inspection of {report.target}"]
    kwargs = ", ".join(f"{key}={value}" for key, value in report.compile_kwargs.items()) or "(defaults)"
    out.append(f"device: {report.device}   torch: {report.torch_version}   compile: {kwargs}")
    n_kernels = len(report.kernels)
    n_quant = sum(len(graph.quant_ops) for graph in report.graphs)
    out.append(
        f"{_plural(report.graph_count, 'graph')}, {_plural(len(report.graph_breaks), 'graph break')}, "
        f"{_plural(len(report.recompiles), 'recompile')}, {_plural(n_kernels, 'kernel')}, "
        f"{n_quant} quantized ops ({len(report.unfused)} not fused)"
    )

    out += ["", "Graph breaks:"]
    if not report.graph_breaks:
        out.append("  none")
    for i, brk in enumerate(report.graph_breaks, 1):
        where = brk.user_stack[-1].describe() if brk.user_stack else "(no user frame)"
        out.append(f"  {i}. {where}")
        out.append(f"     {brk.summary}")

    out += ["", "Recompiles:"]
    if not report.recompiles:
        out.append("  none")
    for rec in report.recompiles:
        out.append(f"  {rec.compile_id}: " + ("; ".join(rec.reasons) or "(no reason recorded)"))

    for graph in report.graphs:
        out += ["", f"Graph {graph.compile_id} ({graph.kind})"]
        out.append("  passes: " + (", ".join(graph.passes) if graph.passes else "none installed"))
        out.append(
            f"  post-grad graph: {graph.before.op_count} ops before our passes, {graph.after.op_count} after"
        )
        out.append("  pattern matches:")
        if not graph.matches:
            out.append("    none")
        else:
            rows = [["pattern", "count", "source"]]
            for match in graph.matches:
                sources = sorted({source.short() for source in match.sources}) or ["-"]
                rows.append([match.pattern, str(match.count), sources[0]])
                rows += [["", "", source] for source in sources[1:]]
            out += _table(rows)
        out.append(f"  kernels ({len(graph.kernels)}):")
        if graph.kernels:
            rows = [["#", "kernel", "kind", "bytes", "quantized ops", "nodes"]]
            for i, kernel in enumerate(graph.kernels, 1):
                rows.append(
                    [
                        str(i),
                        kernel.name,
                        kernel.kind,
                        _bytes(kernel.bytes_moved),
                        ", ".join(kernel.quantized_ops) or "-",
                        _names(kernel.nodes),
                    ]
                )
            out += _table(rows)
        out.append(f"  quantized ops ({len(graph.quant_ops)}):")
        if not graph.quant_ops:
            out.append("    none")
        for status in graph.quant_ops:
            where = f" at {status.source.short()}" if status.source else ""
            out.append(f"    {status.node} ({status.op}){where}: {status.status.upper()}")
            out.append(f"      {status.reason}")

    if report.notes:
        out += ["", "Notes:"]
        out += [f"  - {note}" for note in report.notes]
    return "\n".join(out) + "\n"
