"""Graph inspection (``inductor_quant.inspect``): text snapshots, HTML validity, JSON round trip, CLI.

CPU only (Inductor's C++ backend). Each report costs one Inductor compile, so the reports are
built once per class. Snapshots live in ``tests/expect/``; regenerate them with
``EXPECTTEST_ACCEPT=1 pytest tests/test_inspect.py`` and review the diff.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import textwrap
from html.parser import HTMLParser

import pytest
import torch

from inductor_quant import inspect_cli
from inductor_quant.inspection import InspectionReport, inspect
from inductor_quant.inspection.examples import shared_weight_mlp, two_layer_mlp, widened_weight_mlp
from inductor_quant.inspection.html import render_html

expecttest = pytest.importorskip("expecttest")

EXPECT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "expect")


def normalize(text: str) -> str:
    """Drop what legitimately differs between machines: the torch version."""
    return text.replace(torch.__version__, "<torch>")


def assert_expected(name: str, actual: str) -> None:
    """Compare with ``tests/expect/<name>.expect`` (``EXPECTTEST_ACCEPT=1`` rewrites it)."""
    path = os.path.join(EXPECT_DIR, name + ".expect")
    if expecttest.ACCEPT:
        os.makedirs(EXPECT_DIR, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(actual)
        return
    if not os.path.exists(path):
        raise AssertionError(f"no snapshot {path}; run with EXPECTTEST_ACCEPT=1 to create it:\n{actual}")
    with open(path, encoding="utf-8") as f:
        expected = f.read()
    assert actual == expected, f"snapshot {name} differs (EXPECTTEST_ACCEPT=1 to update):\n{actual}"


class _Checker(HTMLParser):
    """Collects text and checks that every non-void element is closed in order."""

    VOID = {"meta", "br", "img", "hr", "input", "link", "path", "rect", "marker"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.text: list[str] = []
        self.tags: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def two_layer_report() -> InspectionReport:
    model, inputs = two_layer_mlp()
    expected = model(*inputs)
    report = inspect(model, *inputs)
    # Inspecting must not change what the model computes.
    torch.testing.assert_close(model(*inputs), expected)
    return report


@pytest.fixture(scope="module")
def unfused_report() -> InspectionReport:
    model, inputs = widened_weight_mlp()
    return inspect(model, *inputs)


def test_text_report_two_layer(two_layer_report):
    assert_expected("inspect_two_layer", normalize(two_layer_report.to_text()))


def test_text_report_not_fused(unfused_report):
    (status,) = unfused_report.unfused
    assert status.op == "dequantize_4bit" and status.status == "not fused"
    assert "the fused op would skip the rounding to torch.bfloat16" in status.reason
    assert "then read by extern_kernels.mm" in status.reason
    (decision,) = unfused_report.graphs[0].decisions
    assert decision.action == "not rewritten" and decision.node == "mm"
    assert_expected("inspect_not_fused", normalize(unfused_report.to_text()))


def test_report_contents(two_layer_report):
    (graph,) = two_layer_report.graphs
    assert graph.kind == "inference"
    assert [n.name for n in graph.before.nodes if n.is_quantized] == ["dequantize_4bit", "dequantize_4bit_1"]
    assert not any(n.op_name == "dequantize_4bit" for n in graph.after.nodes)
    assert [n.op_name for n in graph.after.nodes if n.is_quantized] == ["gemm_4bit", "gemm_4bit"]
    assert [(m.pattern, m.count) for m in graph.matches] == [("gemm_4bit", 2)]
    assert {s.function for m in graph.matches for s in m.sources} == {"forward"}
    assert sum(graph.counters.values()) > 0 and graph.counters.get("gemm_4bit_addmm") == 2
    assert [s.status for s in graph.quant_ops] == ["rewritten", "rewritten"]
    for kernel in graph.kernels:
        assert kernel.code.strip(), f"kernel {kernel.name} has no code"
        assert kernel.name.partition("#")[0] in graph.output_code
        assert kernel.bytes_moved is not None and kernel.bytes_moved > 0
    assert [k.quantized_ops for k in graph.kernels if not k.is_generated] == [["gemm_4bit"], ["gemm_4bit"]]
    generated = [k for k in graph.kernels if k.is_generated]
    assert generated and all(k.kind == "cpp" and k.name.startswith("cpp_fused") for k in generated)


def test_passes_disabled_and_several_consumers():
    model, inputs = shared_weight_mlp()
    report = inspect(model, *inputs, passes=False)
    (graph,) = report.graphs
    assert graph.passes == [] and graph.matches == [] and graph.decisions == []
    (status,) = graph.quant_ops
    assert status.status == "not fused"
    assert status.reason.startswith("pass disabled: inspect(..., passes=False)")
    assert "2 consumers (permute, pow_1)" in status.reason


def test_template_prologue_candidate(monkeypatch):
    """A dequantize moved into an invoke_quant call is still reported under its own name, with the
    kernel that computes it, its reader and the pass's reason (the CPU stands in for a GPU)."""
    from inductor_quant.patterns import template_prologue

    monkeypatch.setattr(template_prologue, "PROLOGUE_DEVICES", ("cpu",))
    model, inputs = two_layer_mlp(batch=template_prologue.FUSED_MAX_M + 8)
    report = inspect(model, *inputs, options={"max_autotune": True, "max_autotune_gemm_backends": "ATEN"})
    (graph,) = report.graphs
    assert graph.counters == {"template_prologue": 2}
    assert [s.status for s in graph.quant_ops] == ["not fused", "not fused"]
    for status in graph.quant_ops:
        assert status.kernel.startswith("cpp_fused_dequantize_4bit")
        assert "offered to Inductor's Triton matmul templates as a prologue" in status.reason
        assert "then read by extern_kernels.addmm" in status.reason


def test_html_is_valid_and_names_every_kernel(two_layer_report, unfused_report, tmp_path):
    for report in (two_layer_report, unfused_report):
        page = render_html(report)
        checker = _Checker()
        checker.feed(page)
        checker.close()
        assert not checker.errors, checker.errors[:5]
        assert checker.stack == [], f"unclosed elements: {checker.stack}"
        assert "svg" in checker.tags
        assert "script" not in checker.tags and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
        text = "".join(checker.text)
        for kernel in report.kernels:
            assert kernel.name in text, f"HTML does not name kernel {kernel.name}"
        for status in report.unfused:
            assert status.reason in text


def test_json_round_trip(two_layer_report, unfused_report):
    for report in (two_layer_report, unfused_report):
        text = report.to_json()
        again = InspectionReport.from_json(text)
        assert again == report
        assert again.to_json() == text
        json.loads(text)


def test_json_rejects_bad_fields(two_layer_report):
    data = json.loads(two_layer_report.to_json())
    data["graphs"][0]["kernels"][0]["bytes_moved"] = "many"
    with pytest.raises(ValueError, match=r"report\.graphs\[0\]\.kernels\[0\]\.bytes_moved must be int"):
        InspectionReport.from_dict(data)
    data = json.loads(two_layer_report.to_json())
    data["graphs"][0]["surprise"] = 1
    with pytest.raises(ValueError, match="unknown fields"):
        InspectionReport.from_dict(data)


def _breaks_and_grows(x: torch.Tensor) -> torch.Tensor:
    y = x.sin()
    print("graph break here")  # a graph break
    return y.cos() + 1


def test_graph_breaks_and_recompiles():
    x = torch.randn(8)
    with contextlib.redirect_stdout(io.StringIO()):
        report = inspect(_breaks_and_grows, x, extra_inputs=[(torch.randn(8, 2),)], dynamic=False, passes=False)
    assert report.graph_count == 2
    (brk,) = report.graph_breaks
    assert brk.user_stack[-1].function == "_breaks_and_grows"
    assert brk.user_stack[-1].code == 'print("graph break here")  # a graph break'
    assert brk.summary == "Failed to trace builtin operator" and "print" in brk.reason
    assert report.recompiles, "a new input rank must recompile"
    assert any("x" in reason for rec in report.recompiles for reason in rec.reasons)
    text = report.to_text()
    assert "test_inspect.py:" in text and "1 graph break" in text


def test_cli_script_target(tmp_path, capsys):
    script = tmp_path / "target.py"
    script.write_text(
        textwrap.dedent(
            """
            from inductor_quant.inspection.examples import two_layer_mlp

            def build():
                model, inputs = two_layer_mlp(dim=32, hidden=64)
                return model, inputs, {"dynamic": False}

            if __name__ == "__main__":
                raise SystemExit("must not run on import")
            """
        )
    )
    html_path = tmp_path / "report.html"
    assert inspect_cli.main([f"{script}:build", "--html", str(html_path), "--json"]) == 0
    report = InspectionReport.from_json(capsys.readouterr().out)
    assert report.target == "TwoLayerMLP" and report.compile_kwargs == {"dynamic": "False"}
    assert [m.count for m in report.graphs[0].matches] == [2]
    page = html_path.read_text()
    assert "<svg" in page and all(kernel.name in page for kernel in report.kernels)


def test_cli_demo_text(capsys):
    assert inspect_cli.main(["--demo", "mlp", "--no-passes"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("inductor_quant inspection of TwoLayerMLP")
    assert "passes: none installed" in out and "(2 not fused)" in out


def test_cli_bad_targets(tmp_path, capsys):
    assert inspect_cli.main([str(tmp_path / "missing.py") + ":build"]) == 2
    assert "does not exist" in capsys.readouterr().err
    script = tmp_path / "bad.py"
    script.write_text("def build():\n    return 3\n")
    assert inspect_cli.main([f"{script}:build"]) == 2
    assert "must return (fn_or_module, example_inputs)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="FILE.py:FUNCTION"):
        inspect_cli.load_target("no_colon")


def test_bad_arguments():
    model, inputs = two_layer_mlp()
    with pytest.raises(TypeError, match="fn_or_module must be a function or nn.Module"):
        inspect(3, *inputs)
    with pytest.raises(TypeError, match=r"extra_inputs\[0\] must be a tuple"):
        inspect(model, *inputs, extra_inputs=[inputs[0]])
    with pytest.raises(ValueError, match="backend must be 'inductor'"):
        inspect(model, *inputs, backend="eager")
    with pytest.raises(ValueError, match="hook must be one of"):
        inspect(model, *inputs, hook="joint_custom_pre_pass")
