"""A self-contained HTML page for an inspection report, with the graphs drawn as inline SVG.

No scripts and no external resources: the page is one file that opens anywhere. The graph is laid
out here (layered, top to bottom): each node sits one row below its deepest input, rows are
ordered by the barycentre of their neighbours, and the nodes of one kernel are kept side by side
so the kernel can be shaded as a region. Unfused quantized ops get a red outline; every node links
to the ``<details>`` block holding its kernel's generated code.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from .report import CompiledGraph, GraphNode, GraphSnapshot, InspectionReport, Kernel, render_text

__all__ = ["render_html", "layout_graph", "graph_svg"]

_PALETTE = ("#8ecae6", "#ffb703", "#90be6d", "#cdb4db", "#f4a261", "#80ed99", "#a2d2ff", "#e9c46a", "#bde0fe", "#ffafcc")
_NODE_HEIGHT = 36
_ROW_GAP = 46
_COL_GAP = 18
_CHAR_WIDTH = 6.6
_MARGIN = 24

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; } h3 { margin-bottom: .3em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } code, pre { font: 12px/1.4 ui-monospace, monospace; }
pre { background: #f7f7f9; border: 1px solid #e4e4e8; padding: .6em; overflow-x: auto; }
details { margin: .4em 0; } summary { cursor: pointer; }
.meta { color: #555; } .bad { color: #b00020; font-weight: 600; } .good { color: #2b7a0b; font-weight: 600; }
.svgbox { overflow-x: auto; border: 1px solid #e4e4e8; background: #fff; }
.legend span { display: inline-block; margin-right: 1.2em; }
.swatch { display: inline-block; width: 12px; height: 12px; vertical-align: middle; margin-right: 4px; border: 1px solid #555; }
"""


@dataclass
class _Box:
    node: GraphNode
    row: int
    x: float = 0.0
    y: float = 0.0
    width: float = 0.0

    @property
    def lines(self) -> tuple[str, str]:
        detail = self.node.op_name if self.node.op == "call_function" else self.node.op
        if self.node.shape is not None:
            detail += f" {self.node.dtype}[{', '.join(self.node.shape)}]"
        return self.node.name, detail


def layout_graph(snapshot: GraphSnapshot, group_of: dict[str, str]) -> list[_Box]:
    """Place every node of ``snapshot``: rows by depth, columns by neighbour barycentre, groups kept together."""
    boxes = {node.name: _Box(node, 0) for node in snapshot.nodes}
    users: dict[str, list[str]] = {name: [] for name in boxes}
    for node in snapshot.nodes:
        known = [name for name in node.inputs if name in boxes]
        boxes[node.name].row = 1 + max((boxes[name].row for name in known), default=-1)
        for name in known:
            users[name].append(node.name)
    for node in reversed(snapshot.nodes):
        # As late as possible: weights and their dequantize chains sit just above their first
        # consumer instead of piling up in the top rows.
        if users[node.name]:
            boxes[node.name].row = min(boxes[name].row for name in users[node.name]) - 1
    rows: dict[int, list[str]] = {}
    for node in snapshot.nodes:
        rows.setdefault(boxes[node.name].row, []).append(node.name)
    order = {name: float(i) for names in rows.values() for i, name in enumerate(names)}
    neighbours = {name: [*boxes[name].node.inputs, *users[name]] for name in boxes}
    for _ in range(4):
        for row in sorted(rows):
            centre = {}
            for name in rows[row]:
                near = [order[other] for other in neighbours[name] if other in order]
                centre[name] = sum(near) / len(near) if near else order[name]
            group_centre: dict[str, list[float]] = {}
            for name in rows[row]:
                group_centre.setdefault(group_of.get(name, name), []).append(centre[name])
            rank = {group: sum(values) / len(values) for group, values in group_centre.items()}
            rows[row].sort(key=lambda name: (rank[group_of.get(name, name)], group_of.get(name, name), centre[name]))
            for i, name in enumerate(rows[row]):
                order[name] = float(i)
    for box in boxes.values():
        box.width = max(len(line) for line in box.lines) * _CHAR_WIDTH + 16
    row_widths = {row: sum(boxes[n].width for n in names) + _COL_GAP * (len(names) - 1) for row, names in rows.items()}
    widest = max(row_widths.values(), default=0.0)
    for row, names in rows.items():
        x = _MARGIN + (widest - row_widths[row]) / 2
        for name in names:
            boxes[name].x = x
            boxes[name].y = _MARGIN + 18 + row * (_NODE_HEIGHT + _ROW_GAP)
            x += boxes[name].width + _COL_GAP
    return [boxes[node.name] for node in snapshot.nodes]


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def graph_svg(
    snapshot: GraphSnapshot,
    kernels: list[Kernel],
    flagged: dict[str, str],
    anchors: dict[str, str],
    caption: str,
) -> str:
    """Inline SVG of ``snapshot``: kernel regions shaded, ``flagged`` nodes ({name: reason}) outlined red."""
    group_of: dict[str, str] = {}
    color_of: dict[str, str] = {}
    for i, kernel in enumerate(kernels):
        for name in kernel.nodes:
            group_of.setdefault(name, kernel.name)
        color_of[kernel.name] = _PALETTE[i % len(_PALETTE)]
    boxes = layout_graph(snapshot, group_of)
    if not boxes:
        return "<p>(empty graph)</p>"
    by_name = {box.node.name: box for box in boxes}
    width = max(box.x + box.width for box in boxes) + _MARGIN
    height = max(box.y for box in boxes) + _NODE_HEIGHT + _MARGIN
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{_esc(caption)}">',
        f"<title>{_esc(caption)}</title>",
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#777"/></marker></defs>',
    ]
    for kernel in kernels:
        members = [by_name[name] for name in kernel.nodes if name in by_name and group_of[name] == kernel.name]
        if kernel.is_generated and members:
            x0 = min(b.x for b in members) - 8
            y0 = min(b.y for b in members) - 16
            x1 = max(b.x + b.width for b in members) + 8
            y1 = max(b.y for b in members) + _NODE_HEIGHT + 8
            out.append(
                f'<g class="region"><rect x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" height="{y1 - y0:.1f}" rx="10" '
                f'fill="{color_of[kernel.name]}" fill-opacity="0.28" stroke="{color_of[kernel.name]}" stroke-width="1.5"/>'
                f'<text x="{x0 + 6:.1f}" y="{y0 + 11:.1f}" font-size="10" fill="#333">{_esc(kernel.name)}</text></g>'
            )
    for box in boxes:
        sources = [by_name[name] for name in box.node.inputs if name in by_name]
        for i, src in enumerate(sources):
            # Spread the arrowheads over the top edge so several inputs stay distinguishable.
            x0, y0 = src.x + src.width / 2, src.y + _NODE_HEIGHT
            x1, y1 = box.x + box.width * (i + 1) / (len(sources) + 1), box.y
            mid = (y0 + y1) / 2
            out.append(
                f'<path d="M {x0:.1f} {y0:.1f} C {x0:.1f} {mid:.1f}, {x1:.1f} {mid:.1f}, {x1:.1f} {y1:.1f}" '
                'fill="none" stroke="#999" stroke-width="1.2" marker-end="url(#arrow)"/>'
            )
    for box in boxes:
        name = box.node.name
        kernel = group_of.get(name)
        fill = color_of.get(kernel, "#ffffff") if kernel else "#f2f2f2"
        stroke, stroke_width = ("#d00000", 3) if name in flagged else ("#555", 1)
        if box.node.is_quantized and name not in flagged:
            stroke, stroke_width = ("#2b7a0b", 2.5)
        first, second = box.lines
        tip = f"{name}: {box.node.target}"
        if kernel:
            tip += f"\nkernel: {kernel}"
        if name in flagged:
            tip += f"\nNOT FUSED: {flagged[name]}"
        shape = (
            f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.width:.1f}" height="{_NODE_HEIGHT}" rx="{14 if box.node.op != "call_function" else 5}" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="{stroke_width}"/>'
            f'<text x="{box.x + 8:.1f}" y="{box.y + 15:.1f}" font-size="11" font-weight="600">{_esc(first)}</text>'
            f'<text x="{box.x + 8:.1f}" y="{box.y + 29:.1f}" font-size="10" fill="#333">{_esc(second)}</text>'
        )
        body = f'<g class="node"><title>{_esc(tip)}</title>{shape}</g>'
        anchor = anchors.get(kernel) if kernel else None
        out.append(f'<a href="#{_esc(anchor)}">{body}</a>' if anchor else body)
    out.append("</svg>")
    return "\n".join(out)


def _bytes(value: int | None) -> str:
    return "-" if value is None else f"{value:,} B"


def _source_cell(sources: list) -> str:
    return "<br>".join(_esc(source.describe()) for source in sources) or "-"


def _table(headers: tuple[str, ...], rows: list[str], empty: str = "none") -> list[str]:
    """HTML lines of a table with a header row and ``rows`` (each a ``<tr>``), or a paragraph
    saying ``empty`` when there are no rows."""
    if not rows:
        return [f"<p>{empty}</p>"]
    return ["<table><tr>" + "".join(f"<th>{h}</th>" for h in headers) + "</tr>", *rows, "</table>"]


def _graph_section(index: int, graph: CompiledGraph) -> str:
    anchors = {kernel.name: f"g{index}-k{i}" for i, kernel in enumerate(graph.kernels)}
    flagged = {status.node: status.reason for status in graph.unfused}
    out = [f'<section id="graph-{index}"><h2>Graph {_esc(graph.compile_id)} ({_esc(graph.kind)})</h2>']
    out.append(
        f'<p class="meta">passes: {_esc(", ".join(graph.passes) or "none installed")} · '
        f"{graph.before.op_count} ops before our passes, {graph.after.op_count} after · "
        f"{len(graph.kernels)} kernels</p>"
    )
    out.append("<h3>After our passes: kernels</h3>")
    out.append(
        '<p class="legend"><span><i class="swatch" style="background:#8ecae6;opacity:.6"></i>shaded box: one generated kernel (fused region)</span>'
        '<span><i class="swatch" style="border:3px solid #d00000"></i>quantized op that did not fuse</span>'
        '<span><i class="swatch" style="border:3px solid #2b7a0b"></i>quantized op, fused</span>'
        "<span>click a node for its kernel's code</span></p>"
    )
    out.append('<div class="svgbox">')
    out.append(graph_svg(graph.after, graph.kernels, flagged, anchors, f"post-grad graph {graph.compile_id} after our passes"))
    out.append("</div>")

    out.append("<h3>Pattern matches</h3>")
    out += _table(
        ("pattern", "count", "source"),
        [f"<tr><td>{_esc(m.pattern)}</td><td>{m.count}</td><td>{_source_cell(m.sources)}</td></tr>" for m in graph.matches],
    )

    out.append("<h3>Pass decisions</h3>")
    rows = []
    for decision in graph.decisions:
        css = "good" if decision.action == "rewritten" else "bad" if decision.action == "not rewritten" else ""
        rows.append(
            f"<tr><td>{_esc(decision.pattern)}</td><td>{_esc(decision.node)}</td><td>{_esc(decision.op)}</td>"
            f'<td class="{css}">{_esc(decision.action)}</td><td>{_esc(decision.reason)}</td></tr>'
        )
    out += _table(("pattern", "node", "op", "action", "reason"), rows, empty="none recorded")

    out.append("<h3>Quantized ops</h3>")
    rows = []
    for status in graph.quant_ops:
        css = "good" if status.fused else "bad"
        kernel = (
            f'<a href="#{anchors[status.kernel]}">{_esc(status.kernel)}</a>' if status.kernel in anchors else _esc(status.kernel or "-")
        )
        source = _esc(status.source.describe()) if status.source else "-"
        rows.append(
            f'<tr><td>{_esc(status.node)}</td><td>{_esc(status.op)}</td><td class="{css}">{_esc(status.status)}</td>'
            f"<td>{kernel}</td><td>{_esc(status.reason)}</td><td>{source}</td></tr>"
        )
    out += _table(("node", "op", "status", "kernel", "reason", "source"), rows)

    out.append("<h3>Kernels</h3>")
    for kernel in graph.kernels:
        quant = f" · quantized: {_esc(', '.join(kernel.quantized_ops))}" if kernel.quantized_ops else ""
        out.append(
            f'<details id="{anchors[kernel.name]}"><summary><code>{_esc(kernel.name)}</code> · {_esc(kernel.kind)} · '
            f"{_bytes(kernel.bytes_moved)}{quant}</summary>"
            f"<p>nodes: {_esc(', '.join(kernel.nodes) or '-')}<br>source: {_source_cell(kernel.sources)}</p>"
            f"<pre><code>{_esc(kernel.code or '(no code: see the wrapper code)')}</code></pre></details>"
        )
    flagged_before = {status.node: status.reason for status in graph.unfused}
    out.append("<details><summary>Post-grad graph before our passes</summary>")
    out.append('<div class="svgbox">')
    out.append(graph_svg(graph.before, [], flagged_before, {}, f"post-grad graph {graph.compile_id} before our passes"))
    out.append(f"</div><pre><code>{_esc(graph.before.code)}</code></pre></details>")
    out.append(f"<details><summary>Post-grad graph after our passes</summary><pre><code>{_esc(graph.after.code)}</code></pre></details>")
    out.append(f"<details><summary>Generated wrapper code</summary><pre><code>{_esc(graph.output_code)}</code></pre></details>")
    counters = ", ".join(f"{name}={count}" for name, count in graph.counters.items()) or "none"
    out.append(f'<p class="meta">counters["inductor_quant"] changes: {_esc(counters)}</p></section>')
    return "\n".join(out)


def render_html(report: InspectionReport) -> str:
    """The whole report as one self-contained HTML page."""
    kwargs = ", ".join(f"{key}={value}" for key, value in report.compile_kwargs.items()) or "(defaults)"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>inductor_quant inspection: {_esc(report.target)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>inductor_quant inspection: <code>{_esc(report.target)}</code></h1>",
        f'<p class="meta">device {_esc(report.device)} · torch {_esc(report.torch_version)} · compile: {_esc(kwargs)}</p>',
        "<table>",
        f"<tr><th>graphs</th><td>{report.graph_count}</td></tr>",
        f"<tr><th>graph breaks</th><td>{len(report.graph_breaks)}</td></tr>",
        f"<tr><th>recompiles</th><td>{len(report.recompiles)}</td></tr>",
        f"<tr><th>kernels</th><td>{len(report.kernels)}</td></tr>",
        f'<tr><th>quantized ops not fused</th><td class="{"bad" if report.unfused else "good"}">{len(report.unfused)}</td></tr>',
        "</table>",
        '<section id="graph-breaks"><h2>Graph breaks</h2>',
    ]
    if not report.graph_breaks:
        out.append("<p>none</p>")
    for brk in report.graph_breaks:
        where = _esc(brk.user_stack[-1].describe()) if brk.user_stack else "(no user frame)"
        out.append(f"<details><summary>{where}: {_esc(brk.summary)}</summary><pre>{_esc(brk.reason)}</pre></details>")
    out.append('</section><section id="recompiles"><h2>Recompiles</h2>')
    if not report.recompiles:
        out.append("<p>none</p>")
    else:
        out.append("<ul>")
        out += [f"<li>{_esc(rec.compile_id)}: {_esc('; '.join(rec.reasons))}</li>" for rec in report.recompiles]
        out.append("</ul>")
    out.append("</section>")
    out += [_graph_section(i, graph) for i, graph in enumerate(report.graphs)]
    if report.notes:
        out.append('<section id="notes"><h2>Notes</h2><ul>')
        out += [f"<li>{_esc(note)}</li>" for note in report.notes]
        out.append("</ul></section>")
    out.append(f"<details><summary>Text report</summary><pre>{_esc(render_text(report))}</pre></details>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
