"""dequantize+linear pattern pass, pass manager and ``inductor_quant.compile`` (CPU, C++ backend).

Pattern tests follow PyTorch's test_pattern_matcher convention: clear the counters, run eager,
run compiled through ``run_and_get_code``, compare, then assert the exact match count, the
number of FX nodes the matches covered and what the generated code calls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import run_and_get_code

from inductor_quant.compile import compile as iq_compile
from inductor_quant.lowerings import gemm as lowerings_gemm
from inductor_quant.code_tables import dynamic_map
from inductor_quant.patterns import records, template_prologue
from inductor_quant.patterns.pass_manager import QuantPassConfig, QuantPassManager, install_options

iq = torch.ops.inductor_quant
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("inductor_cpp")  # conftest: private cache, scalar C++ builds


@pytest.fixture(autouse=True)
def fused_ops_stay_calls(monkeypatch):
    """Compile the fused matmul ops the rewrites produce as calls of the op, as on a GPU (where the
    call is the fused Triton kernel), so the generated code shows what the rewrite left. On CPU
    they are lowered to generated code by default: ``test_inductor_lowerings.py`` tests that."""
    monkeypatch.setattr(lowerings_gemm, "GENERATED_DEVICES", ())


def run_compiled(fn, *args, **compile_kwargs):
    """Fresh counters and records; eager result, compiled result and generated source."""
    torch._dynamo.reset()
    counters.clear()
    records.clear_fusion_decisions()
    expected = fn(*args)
    actual, source = run_and_get_code(iq_compile(fn, fullgraph=True, **compile_kwargs), *args)
    return expected, actual, "\n".join(source)


def quant_counters() -> dict[str, int]:
    return {k: v for k, v in counters["inductor_quant"].items() if v}


def calls(source: str, op: str) -> int:
    """Number of calls of ``op`` in the generated wrapper (extern ops and our fused ops)."""
    return source.count(f"{op}(")


def assert_close(actual, expected):
    tolerances = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 1e-3}[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=tolerances, atol=tolerances)


def make_4bit(n, k, quant_type="nf4", storage=torch.uint8, blocksize=64):
    weight = torch.randn(n, k)
    packed, absmax = iq.quantize_4bit(weight, blocksize, quant_type, storage)
    return packed, absmax


# --------------------------------------------------------------------------------------------
# dequantize_4bit + linear

VARIANTS_4BIT = [
    # dtype, activation shape, bias, quant_type, quant_storage
    (torch.float32, (4, 64), True, "nf4", torch.uint8),
    (torch.float32, (2, 3, 64), False, "fp4", torch.uint8),
    (torch.bfloat16, (2, 3, 64), True, "nf4", torch.bfloat16),
    (torch.bfloat16, (1, 64), False, "nf4", torch.uint8),
    (torch.float16, (5, 64), True, "fp4", torch.uint8),
    (torch.float16, (1, 2, 64), False, "nf4", torch.uint8),
]


@pytest.mark.parametrize("dtype, x_shape, has_bias, quant_type, storage", VARIANTS_4BIT)
def test_dequantize_4bit_linear_becomes_gemm_4bit(dtype, x_shape, has_bias, quant_type, storage):
    packed, absmax = make_4bit(32, 64, quant_type, storage)
    x = torch.randn(x_shape, dtype=dtype)
    bias = torch.randn(32, dtype=dtype) if has_bias else None

    def fn(x, packed, absmax, bias):
        weight = iq.dequantize_4bit(packed, absmax, 64, quant_type, [32, 64], x.dtype)
        return F.linear(x, weight, bias)

    expected, actual, source = run_compiled(fn, x, packed, absmax, bias)
    assert_close(actual, expected)
    name = "gemm_4bit_addmm" if has_bias else "gemm_4bit_mm"
    assert quant_counters() == {name: 1, "dequant_linear_nodes": 3}  # dequantize, permute, mm
    assert calls(source, "torch.ops.inductor_quant.gemm_4bit.default") == 1
    assert calls(source, "extern_kernels.mm") + calls(source, "extern_kernels.addmm") == 0
    assert "cpp_fused" not in source  # the weight is never materialized


@pytest.mark.parametrize("has_bias", [False, True])
def test_double_quantized_absmax_goes_into_gemm_4bit(has_bias):
    """Linear4bit's compiled form with compress_statistics: the 8-bit absmax, its code and
    offset become gemm_4bit's absmax_8bit/absmax_code/absmax_offset (no absmax kernel)."""
    code = dynamic_map()
    packed, absmax = make_4bit(32, 64)
    offset = absmax.mean()
    absmax_8bit, nested_absmax = iq.quantize_blockwise(absmax - offset, code, 256)
    x = torch.randn(2, 3, 64)
    bias = torch.randn(32) if has_bias else None

    def fn(x, packed, absmax_8bit, nested_absmax, offset, bias):
        scales = iq.dequantize_blockwise(absmax_8bit, nested_absmax, code, 256, torch.float32) + offset
        return F.linear(x, iq.dequantize_4bit(packed, scales, 64, "nf4", [32, 64], x.dtype), bias)

    expected, actual, source = run_compiled(fn, x, packed, absmax_8bit, nested_absmax, offset, bias)
    assert_close(actual, expected)
    name = "gemm_4bit_nested_addmm" if has_bias else "gemm_4bit_nested_mm"
    assert quant_counters() == {name: 1, "dequant_linear_nodes": 5}  # + dequantize_blockwise, add
    assert calls(source, "torch.ops.inductor_quant.gemm_4bit.default") == 1
    assert "cpp_fused" not in source


@pytest.mark.parametrize("before_transpose", [True, False])
def test_fp32_dequantize_converted_for_the_matmul(before_transpose):
    """dequantize to fp32 then .to(bf16): one rounding of the same fp32 product, so gemm_4bit
    dequantizing straight to bf16 is exact; the conversion node is part of the match."""
    packed, absmax = make_4bit(32, 64)
    x = torch.randn(3, 64, dtype=torch.bfloat16)

    def fn(x, packed, absmax):
        weight = iq.dequantize_4bit(packed, absmax, 64, "nf4", [32, 64], torch.float32)
        weight_t = weight.to(torch.bfloat16).t() if before_transpose else weight.t().to(torch.bfloat16)
        return x @ weight_t

    expected, actual, source = run_compiled(fn, x, packed, absmax)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert quant_counters() == {"gemm_4bit_mm": 1, "dequant_linear_nodes": 4}
    assert calls(source, "torch.ops.inductor_quant.gemm_4bit.default") == 1


# --------------------------------------------------------------------------------------------
# dequantize_blockwise + linear


@pytest.mark.parametrize("dtype, x_shape, has_bias", [(torch.float32, (2, 3, 64), True), (torch.bfloat16, (1, 64), False)])
def test_dequantize_blockwise_linear_becomes_linear_8bit(dtype, x_shape, has_bias):
    code = dynamic_map()
    codes, absmax = iq.quantize_blockwise(torch.randn(32, 64), code, 64)
    x = torch.randn(x_shape, dtype=dtype)
    bias = torch.randn(32, dtype=dtype) if has_bias else None

    def fn(x, codes, absmax, bias):
        return F.linear(x, iq.dequantize_blockwise(codes, absmax, code, 64, x.dtype), bias)

    expected, actual, source = run_compiled(fn, x, codes, absmax, bias)
    assert_close(actual, expected)
    name = "linear_8bit_addmm" if has_bias else "linear_8bit_mm"
    assert quant_counters() == {name: 1, "dequant_linear_nodes": 3}
    assert calls(source, "torch.ops.inductor_quant.linear_8bit.default") == 1
    assert "cpp_fused" not in source


def test_pass_config_leaves_8bit_to_the_lowering():
    code = dynamic_map()
    codes, absmax = iq.quantize_blockwise(torch.randn(32, 64), code, 64)
    x = torch.randn(4, 64)

    def fn(x, codes, absmax):
        return F.linear(x, iq.dequantize_blockwise(codes, absmax, code, 64, x.dtype))

    expected, actual, source = run_compiled(fn, x, codes, absmax, pass_config=QuantPassConfig(dequant_linear_8bit=False))
    assert_close(actual, expected)
    assert quant_counters() == {}
    assert calls(source, "extern_kernels.mm") == 1
    assert "torch.ops.inductor_quant.dequantize_blockwise.default(" not in source  # lowered, not a fallback


# --------------------------------------------------------------------------------------------
# the one-row matmul as Inductor decomposes it under coordinate_descent_tuning (GPU only; the
# GPU test compiles the real decomposition, here the same graph is written out by hand)


def decomposed_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for a one-row ``x`` as ``torch._inductor.decomposition.mm`` spells it
    (``pw_cast_for_opmath``: 16-bit factors widened to fp32, the sum rounded back)."""
    if x.dtype == torch.float32:
        return (x.unsqueeze(2) * weight.t().unsqueeze(0)).sum(1)
    return (x.float().unsqueeze(2) * weight.t().float().unsqueeze(0)).sum(1).to(x.dtype)


@pytest.mark.parametrize("kind", ["4bit", "nested", "8bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decomposed_matrix_vector_becomes_the_fused_op(dtype, kind):
    code = dynamic_map()
    packed, absmax = make_4bit(32, 64)
    offset = absmax.mean()
    absmax_8bit, nested_absmax = iq.quantize_blockwise(absmax - offset, code, 256)
    codes, absmax_codes = iq.quantize_blockwise(torch.randn(32, 64), code, 64)
    x = torch.randn(1, 64, dtype=dtype)

    def fn(x, packed, absmax, absmax_8bit, nested_absmax, offset, codes, absmax_codes):
        if kind == "8bit":
            weight = iq.dequantize_blockwise(codes, absmax_codes, code, 64, x.dtype)
        else:
            if kind == "nested":
                absmax = iq.dequantize_blockwise(absmax_8bit, nested_absmax, code, 256, torch.float32) + offset
            weight = iq.dequantize_4bit(packed, absmax, 64, "nf4", [32, 64], x.dtype)
        return decomposed_linear(x, weight)

    expected, actual, source = run_compiled(fn, x, packed, absmax, absmax_8bit, nested_absmax, offset, codes, absmax_codes)
    assert_close(actual, expected)
    name = {"4bit": "gemm_4bit_mv", "nested": "gemm_4bit_nested_mv", "8bit": "linear_8bit_mv"}[kind]
    # dequantize, permute, 2 unsqueeze, mul, sum (+ 3 conversions for 16-bit, + 2 nested-absmax nodes)
    nodes = 6 + (3 if dtype != torch.float32 else 0) + (2 if kind == "nested" else 0)
    assert quant_counters() == {name: 1, "dequant_linear_nodes": nodes}
    fused = "linear_8bit" if kind == "8bit" else "gemm_4bit"
    assert calls(source, f"torch.ops.inductor_quant.{fused}.default") == 1
    assert "cpp_fused" not in source


def test_decomposed_matrix_vector_kept_in_fp32_does_not_match():
    """Widened factors summed without the rounding back: ``mm`` would return bf16, this returns
    fp32, so there is no fused equivalent."""
    packed, absmax = make_4bit(32, 64)
    x = torch.randn(1, 64, dtype=torch.bfloat16)

    def fn(x, packed, absmax):
        weight = iq.dequantize_4bit(packed, absmax, 64, "nf4", [32, 64], x.dtype)
        return (x.float().unsqueeze(2) * weight.t().float().unsqueeze(0)).sum(1)

    with inductor_config.patch(emulate_precision_casts=True):  # keep the bf16 rounding of the weight
        expected, actual, source = run_compiled(fn, x, packed, absmax)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert quant_counters() == {}
    assert "gemm_4bit" not in source


# --------------------------------------------------------------------------------------------
# several consumers, negative cases


def test_dequantize_with_several_consumers():
    """Both matmul consumers are rewritten; the dequantize stays for the reduction and the
    per-consumer decision is recorded once (module list and node.meta)."""
    packed, absmax = make_4bit(32, 64)
    x = torch.randn(5, 64)

    def fn(x, packed, absmax):
        weight = iq.dequantize_4bit(packed, absmax, 64, "nf4", [32, 64], x.dtype)
        return F.linear(x, weight), F.linear(x.sin(), weight), weight.abs().amax()

    expected, actual, source = run_compiled(fn, x, packed, absmax)
    for a, e in zip(actual, expected):
        assert_close(a, e)
    assert quant_counters() == {"gemm_4bit_mm": 2, "dequant_linear_nodes": 6, "dequant_multi_consumer": 1}
    assert calls(source, "torch.ops.inductor_quant.gemm_4bit.default") == 2
    per_consumer = [d for d in records.fusion_decisions() if d.action == "per-consumer"]
    assert len(per_consumer) == 1 and per_consumer[0].op == "inductor_quant.dequantize_4bit.default"
    assert "3 consumers" in per_consumer[0].reason


def test_negative_cases_do_not_match():
    """None of these is dequantize -> transpose -> matmul with an exact fused equivalent."""
    packed, absmax = make_4bit(32, 64)
    packed_kn, absmax_kn = make_4bit(64, 32)
    x = torch.randn(4, 64)

    def fn(x, packed, absmax, packed_kn, absmax_kn):
        narrow = iq.dequantize_4bit(packed, absmax, 64, "nf4", [32, 64], torch.bfloat16)
        widened = F.linear(x, narrow.float())  # bf16 rounding the fused op would skip
        activated = F.linear(x, torch.relu(iq.dequantize_4bit(packed, absmax, 64, "nf4", [32, 64], x.dtype)))
        untransposed = x @ iq.dequantize_4bit(packed_kn, absmax_kn, 64, "nf4", [64, 32], x.dtype)
        weight = iq.dequantize_4bit(packed, absmax, 64, "fp4", [32, 64], x.dtype)
        scaled = torch.addmm(torch.ones(32), x, weight.t(), beta=0.5)
        return widened, activated, untransposed, scaled

    with inductor_config.patch(emulate_precision_casts=True):  # keep the bf16 rounding of `narrow`
        expected, actual, source = run_compiled(fn, x, packed, absmax, packed_kn, absmax_kn)
    for a, e in zip(actual, expected):
        assert_close(a, e)
    assert quant_counters() == {}
    assert "gemm_4bit" not in source
    reasons = [d.reason for d in records.fusion_decisions() if d.action == "not rewritten"]
    assert any("skip the rounding to torch.bfloat16" in r for r in reasons), reasons
    assert any("addmm scales its terms" in r for r in reasons), reasons


# --------------------------------------------------------------------------------------------
# large-M dequantize + matmul under max-autotune -> invoke_quant, a candidate template prologue

# CPU stands in for the GPU here: the pass wraps the same nodes, and the C++ backend compiles the
# wrapped dequantize as its own kernel in front of the matmul (CPU templates take no prologue).
AUTOTUNE = {"max_autotune": True, "max_autotune_gemm_backends": "ATEN"}


@pytest.fixture
def prologue_on_cpu(monkeypatch):
    monkeypatch.setattr(template_prologue, "PROLOGUE_DEVICES", ("cpu",))


def _weights(kind, n=32, k=64):
    """``(make the weight from tensors, tensors)`` for a dequantized ``[n, k]`` weight."""
    code = dynamic_map()
    if kind == "8bit":
        codes, absmax = iq.quantize_blockwise(torch.randn(n, k), code, 64)
        return (lambda dtype, c, a: iq.dequantize_blockwise(c, a, code, 64, dtype)), (codes, absmax)
    packed, absmax = make_4bit(n, k)
    if kind == "4bit":
        return (lambda dtype, p, a: iq.dequantize_4bit(p, a, 64, "nf4", [n, k], dtype)), (packed, absmax)
    offset = absmax.mean()
    absmax_8bit, nested_absmax = iq.quantize_blockwise(absmax - offset, code, 256)

    def nested(dtype, p, a8, na, off):
        scales = iq.dequantize_blockwise(a8, na, code, 256, torch.float32) + off
        return iq.dequantize_4bit(p, scales, 64, "nf4", [n, k], dtype)

    return nested, (packed, absmax_8bit, nested_absmax, offset)


@pytest.mark.usefixtures("prologue_on_cpu")
@pytest.mark.parametrize("kind", ["4bit", "4bit_nested", "8bit"])
@pytest.mark.parametrize("has_bias, dtype, convert", [(False, torch.float32, False), (True, torch.bfloat16, True)])
def test_large_m_dequantize_is_offered_as_a_template_prologue(kind, has_bias, dtype, convert):
    """M > FUSED_MAX_M, max-autotune: the weight chain (nested absmax included, and a conversion
    before the transpose) moves into one invoke_quant call, generated as one kernel in front of
    Inductor's matmul; the fused op is not used."""
    weight, tensors = _weights(kind)
    x = torch.randn(template_prologue.FUSED_MAX_M + 72, 64, dtype=dtype)
    bias = torch.randn(32, dtype=dtype) if has_bias else None

    def fn(x, bias, *tensors):
        w = weight(torch.float32, *tensors).to(dtype) if convert else weight(dtype, *tensors)
        return F.linear(x, w, bias)

    expected, actual, source = run_compiled(fn, x, bias, *tensors, options=AUTOTUNE)
    assert_close(actual, expected)
    assert quant_counters() == {"template_prologue": 1}
    assert calls(source, "extern_kernels.addmm" if has_bias else "extern_kernels.mm") == 1
    assert "gemm_4bit" not in source and "linear_8bit" not in source
    assert source.count("cpp_fused_") == 2  # one kernel definition, one call: the whole weight chain
    (decision,) = [d for d in records.fusion_decisions() if d.pattern == "template_prologue"]
    assert decision.action == "prologue candidate" and decision.op == ("aten.addmm.default" if has_bias else "aten.mm.default")


@pytest.mark.usefixtures("prologue_on_cpu")
def test_template_prologue_leaves_the_fused_op_where_it_wins():
    """Not wrapped, so the dequantize+linear rewrite applies: M <= FUSED_MAX_M (GEMV / small-M
    kernels), a symbolic M (the op's runtime switch), a shared dequantize, no max-autotune, or the
    option turned off."""
    weight, tensors = _weights("4bit")
    small = torch.randn(template_prologue.FUSED_MAX_M, 64)
    large = torch.randn(template_prologue.FUSED_MAX_M + 1, 64)
    symbolic_rows = large.clone()
    torch._dynamo.mark_dynamic(symbolic_rows, 0)

    def linear(x, *tensors):
        return F.linear(x, weight(x.dtype, *tensors))

    def shared(x, *tensors):
        w = weight(x.dtype, *tensors)
        return F.linear(x, w), w.sum()

    cases = [
        (linear, small, {"options": AUTOTUNE}),
        (linear, symbolic_rows, {"options": AUTOTUNE}),
        (shared, large, {"options": AUTOTUNE}),
        (linear, large, {}),
        (linear, large, {"options": AUTOTUNE, "pass_config": QuantPassConfig(template_prologues=False)}),
    ]
    for fn, x, kwargs in cases:
        expected, actual, source = run_compiled(fn, x, *tensors, **kwargs)
        for a, e in zip(actual if isinstance(actual, tuple) else (actual,), expected if isinstance(expected, tuple) else (expected,)):
            assert_close(a, e)
        assert "template_prologue" not in quant_counters(), (fn.__name__, kwargs)
        assert calls(source, "torch.ops.inductor_quant.gemm_4bit.default") == 1, (fn.__name__, kwargs)


# --------------------------------------------------------------------------------------------
# sibling 4-bit matmuls -> gemm_4bit_grouped


def _projections(sizes, k=64, quant_types=None, nested=False):
    """Packed weights ``[n, k]`` for each n, with their (optionally double-quantized) absmax."""
    weights = []
    for i, n in enumerate(sizes):
        quant_type = quant_types[i] if quant_types else "nf4"
        # N(0, 1/k) weights keep activations O(1) through the chained projections (bf16 case)
        packed, absmax = iq.quantize_4bit(torch.randn(n, k) * k**-0.5, 64, quant_type, torch.uint8)
        extra = ()
        if nested:
            offset = absmax.mean()
            code = dynamic_map()
            absmax_8bit, outer = iq.quantize_blockwise(absmax - offset, code, 256)
            extra = (absmax_8bit, outer, code, offset)
        weights.append((packed, absmax, quant_type, n, extra))
    return weights


def _linear(x, weight):
    packed, absmax, quant_type, n, extra = weight
    if extra:
        absmax_8bit, outer, code, offset = extra
        absmax = iq.dequantize_blockwise(absmax_8bit, outer, code, 256, torch.float32) + offset
    return F.linear(x, iq.dequantize_4bit(packed, absmax, 64, quant_type, [n, packed.numel() * 2 // n], x.dtype))


@pytest.mark.parametrize("dtype, nested", [(torch.float32, False), (torch.bfloat16, True)])
def test_sibling_projections_become_one_grouped_op(dtype, nested):
    """A decode step's q/k/v and gate/up (each linear flattening the activation with its own view)
    -> two gemm_4bit_grouped; the output projection, which reads another activation, stays
    gemm_4bit. The result equals the compile without grouping bit for bit."""
    qkv, gate_up, out_proj = _projections((64, 16, 16), nested=nested), _projections((96, 96), nested=nested), \
        _projections((64,), nested=nested)
    x = torch.randn(1, 1, 64, dtype=dtype)

    def fn(x):
        q, k, v = (_linear(x, w) for w in qkv)
        h = x + _linear((q[..., :16] * k + v).repeat(1, 1, 4), out_proj[0])
        gate, up = (_linear(h, w) for w in gate_up)
        return F.silu(gate) * up

    # the SwiGLU epilogue fusion (tested below) off: this test is about the grouping alone
    _, ungrouped, _ = run_compiled(fn, x, pass_config=QuantPassConfig(group_sibling_matmuls=False,
                                                                      fuse_swiglu_epilogues=False))
    expected, actual, source = run_compiled(fn, x, pass_config=QuantPassConfig(fuse_swiglu_epilogues=False))
    torch.testing.assert_close(actual, ungrouped, rtol=0, atol=0)  # the grouped op is the same arithmetic
    # vs eager: bf16 differs by the roundings Inductor's fused pointwise code skips (|out| ~ 10)
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=0.1 if dtype == torch.bfloat16 else 1e-5)
    name = "gemm_4bit_nested_mm" if nested else "gemm_4bit_mm"
    assert quant_counters() == {name: 6, "dequant_linear_nodes": 6 * (5 if nested else 3), "gemm_4bit_grouped": 2,
                                "gemm_4bit_grouped_members": 5}
    assert calls(source, "torch.ops.inductor_quant.gemm_4bit_grouped.default") == 2
    assert calls(source, "torch.ops.inductor_quant.gemm_4bit.default") == 1
    grouped = [d for d in records.fusion_decisions() if d.pattern == "sibling_matmuls"]
    assert [d.reason.split(" ")[0] for d in grouped] == ["3", "2"]


def test_more_siblings_than_one_launch_takes_are_split():
    weights = _projections((8, 16, 24, 32, 40, 48))
    x = torch.randn(1, 64)
    expected, actual, source = run_compiled(lambda x: [_linear(x, w) for w in weights], x)
    for a, e in zip(actual, expected):
        assert_close(a, e)
    assert quant_counters()["gemm_4bit_grouped"] == 2  # 4 + 2
    assert quant_counters()["gemm_4bit_grouped_members"] == 6


def test_siblings_that_cannot_share_a_launch_are_not_grouped():
    """Different quant types, a bias on one weight only, different activations, too many rows,
    or the pass turned off: every matmul stays its own gemm_4bit."""
    nf4, fp4 = _projections((32, 32), quant_types=["nf4", "fp4"])
    plain = _projections((32,))[0]
    bias = torch.randn(32)
    x, y = torch.randn(1, 64), torch.randn(1, 64)

    def mixed(x, y):
        return _linear(x, nf4), _linear(x, fp4), _linear(x, plain) + 0, _linear(y, nf4)

    def with_bias(x):
        return _linear(x, nf4), F.linear(x, iq.dequantize_4bit(plain[0], plain[1], 64, "nf4", [32, 64], x.dtype), bias)

    big = torch.randn(129, 64)  # more rows than the fused kernels take
    cases = [(mixed, (x, y), {}), (with_bias, (x,), {}), (lambda x: (_linear(x, nf4), _linear(x, plain)), (big,), {}),
             (lambda x: (_linear(x, nf4), _linear(x, plain)), (x,), {"pass_config": QuantPassConfig(group_sibling_matmuls=False)})]
    grouped_once = 0
    for fn, args, kwargs in cases:
        expected, actual, source = run_compiled(fn, *args, **kwargs)
        for a, e in zip(actual, expected):
            assert_close(a, e)
        grouped_once += quant_counters().get("gemm_4bit_grouped", 0)
        assert quant_counters().get("gemm_4bit_mm", 0) + quant_counters().get("gemm_4bit_addmm", 0) >= 2
    # `mixed` has one legitimate pair: x @ nf4 and x @ plain (same quant type, both without bias)
    assert grouped_once == 1


def test_quantized_llama_decode_groups_each_layers_projections():
    """quantize_model (NF4, double-quantized absmax) on the built-in Llama: one decode step
    compiles to two gemm_4bit_grouped per layer (q/k/v, gate/up), logits equal eager."""
    from inductor_quant.models import build_model
    from inductor_quant.nn import quantize_model

    model = build_model()
    quantize_model(model, quant_type="nf4", blocksize=64, compress_statistics=True, skip=("lm_head",))
    token, position = torch.tensor([[5]]), torch.tensor([3])
    with torch.no_grad():
        model.setup_caches(1)
        expected = model(token, position)
        model.setup_caches(1)
        torch._dynamo.reset()
        counters.clear()
        actual = iq_compile(model, fullgraph=True)(token, position)
    assert_close(actual, expected)
    layers = model.config.n_layers
    assert quant_counters()["gemm_4bit_grouped"] == 2 * layers
    assert quant_counters()["gemm_4bit_grouped_members"] == 5 * layers
    assert quant_counters()["gemm_4bit_swiglu"] == layers  # each MLP's gate/up group + SiLU * up


# --------------------------------------------------------------------------------------------
# silu(gate) * up over a grouped gate/up -> gemm_4bit_swiglu


@pytest.mark.parametrize(
    "dtype, nested, up_first", [(torch.float32, False, False), (torch.bfloat16, True, True), (torch.float32, True, True)]
)
def test_swiglu_over_grouped_gate_up_becomes_one_op(dtype, nested, up_first):
    """A SwiGLU MLP at decode: the grouped gate/up matmul, the SiLU and the product -> one
    gemm_4bit_swiglu (either operand order of the product, the SiLU on either weight of the
    group); equals the unfused compile up to the SiLU's last-bit rounding, and eager within the
    dtype's tolerance."""
    gate_up, down = _projections((96, 96), nested=nested), _projections((64,), k=96, nested=nested)
    x = torch.randn(1, 1, 64, dtype=dtype)

    def fn(x):
        gate, up = (_linear(x, w) for w in gate_up)
        hidden = up * F.silu(gate) if up_first else F.silu(gate) * up
        return _linear(hidden, down[0])

    _, unfused, _ = run_compiled(fn, x, pass_config=QuantPassConfig(fuse_swiglu_epilogues=False))
    expected, actual, source = run_compiled(fn, x)
    ulp = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(actual, unfused, rtol=ulp, atol=ulp)
    assert_close(actual, expected)
    assert quant_counters()["gemm_4bit_swiglu"] == 1
    assert calls(source, "torch.ops.inductor_quant.gemm_4bit_swiglu.default") == 1
    assert calls(source, "torch.ops.inductor_quant.gemm_4bit_grouped.default") == 0
    assert calls(source, "torch.ops.inductor_quant.gemm_4bit.default") == 1  # the down projection
    [decision] = [d for d in records.fusion_decisions() if d.pattern == "swiglu_epilogue"]
    assert decision.action == "rewritten" and "96 rows each" in decision.reason


def test_swiglu_that_cannot_be_fused_is_left_alone():
    """Not fused: the gate product also returned; SiLU times its own input; GELU instead of
    SiLU; the product kept in fp32. The grouped op stays and the results equal eager."""
    gate_up = _projections((32, 32))
    x = torch.randn(1, 64, dtype=torch.bfloat16)

    def products(x):
        return (_linear(x, w) for w in gate_up)

    def gate_escapes(x):
        gate, up = products(x)
        return F.silu(gate) * up, gate

    def same_half(x):
        gate, up = products(x)
        return F.silu(gate) * gate, up

    def gelu(x):
        gate, up = products(x)
        return F.gelu(gate) * up

    def fp32_product(x):
        gate, up = products(x)
        return F.silu(gate.float()) * up.float()

    for fn in (gate_escapes, same_half, gelu, fp32_product):
        expected, actual, source = run_compiled(fn, x)
        for a, e in zip(actual if isinstance(actual, tuple) else [actual], expected if isinstance(expected, tuple) else [expected]):
            assert_close(a, e)
        assert "gemm_4bit_swiglu" not in quant_counters(), fn.__name__
        assert calls(source, "torch.ops.inductor_quant.gemm_4bit_grouped.default") == 1, fn.__name__
        decisions = [d for d in records.fusion_decisions() if d.pattern == "swiglu_epilogue"]
        if fn is gate_escapes:  # matched, then refused: the reason names the escaping node
            assert [d.action for d in decisions] == ["not rewritten"] and "also read outside" in decisions[0].reason
        else:
            assert not decisions, fn.__name__


# --------------------------------------------------------------------------------------------
# a quantized transformer block


class QuantLinear(torch.nn.Module):
    """An nn.Linear's weight quantized with our ops; forward is dequantize + F.linear."""

    def __init__(self, linear: torch.nn.Linear, quant_type: str = "nf4", blocksize: int = 64) -> None:
        super().__init__()
        packed, absmax = iq.quantize_4bit(linear.weight.detach(), blocksize, quant_type, torch.uint8)
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().clone())
        self.shape = list(linear.weight.shape)
        self.quant_type, self.blocksize = quant_type, blocksize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = iq.dequantize_4bit(self.packed, self.absmax, self.blocksize, self.quant_type, self.shape, x.dtype)
        return F.linear(x, weight, self.bias)


class Block(torch.nn.Module):
    """Pre-norm attention + SwiGLU MLP, every projection a QuantLinear."""

    def __init__(self, dim: int = 64, heads: int = 4, hidden: int = 128) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv = QuantLinear(torch.nn.Linear(dim, 3 * dim))
        self.out = QuantLinear(torch.nn.Linear(dim, dim, bias=False))
        self.gate = QuantLinear(torch.nn.Linear(dim, hidden, bias=False))
        self.up = QuantLinear(torch.nn.Linear(dim, hidden, bias=False), quant_type="fp4")
        self.down = QuantLinear(torch.nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attn.transpose(1, 2).reshape(b, s, d))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def test_quantized_block_fullgraph_no_recompiles():
    """fullgraph compile of the block: all five projections (qkv and down with bias) become
    gemm_4bit; 20 calls with a changing batch size after warm-up cause no recompile."""
    block = Block().eval()
    torch._dynamo.reset()
    counters.clear()
    compiled_block = iq_compile(block, fullgraph=True, dynamic=True)
    with torch.no_grad():
        x = torch.randn(2, 8, 64)  # warm-up: one compile with a symbolic batch (sizes >= 2)
        assert_close(compiled_block(x), block(x))
        assert quant_counters() == {"gemm_4bit_addmm": 2, "gemm_4bit_mm": 3, "dequant_linear_nodes": 15}
        with torch.compiler.set_stance("fail_on_recompile"):
            for step in range(20):
                x = torch.randn(2 + step % 5, 8, 64)
                assert_close(compiled_block(x), block(x))


# --------------------------------------------------------------------------------------------
# pass manager, entry point, caching


class CountingPass(CustomGraphPass):
    """A user's own post-grad pass: counts its calls, has a uuid."""

    def __init__(self, tag: str) -> None:
        self.tag, self.calls = tag, 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.calls += 1

    def uuid(self) -> str:
        return f"counting-pass-{self.tag}"


def test_compile_chains_the_users_pass_and_changes_no_global_config():
    packed, absmax = make_4bit(32, 64)
    x = torch.randn(4, 64)

    def fn(x, packed, absmax):
        return F.linear(x, iq.dequantize_4bit(packed, absmax, 64, "nf4", [32, 64], x.dtype))

    user_pass = CountingPass("a")
    def settings():
        copy = inductor_config.get_config_copy()  # deep copy: compare the hooks by identity instead
        return {k: v for k, v in copy.items() if "custom" not in k}, [getattr(inductor_config, k) for k in copy if "custom" in k]

    with inductor_config.patch(post_grad_custom_post_pass=user_pass):
        before, hooks_before = settings()
        expected, actual, _ = run_compiled(fn, x, packed, absmax)
        after, hooks_after = settings()
        assert after == before
        assert all(a is b for a, b in zip(hooks_after, hooks_before))
        assert inductor_config.post_grad_custom_post_pass is user_pass
    assert_close(actual, expected)
    assert user_pass.calls == 1
    assert quant_counters()["gemm_4bit_mm"] == 1


def test_install_options_composes_instead_of_clobbering():
    user_pass = CountingPass("a")
    options = install_options({"post_grad_custom_post_pass": user_pass, "max_autotune": False})
    manager = options["post_grad_custom_post_pass"]
    assert isinstance(manager, QuantPassManager) and manager.chained == (user_pass,)
    assert options["max_autotune"] is False
    again = install_options(options)["post_grad_custom_post_pass"]
    assert again.chained == (user_pass,)  # our earlier manager is replaced, the user's pass kept
    with pytest.raises(ValueError, match="hook must be one of"):
        install_options({}, hook="joint_custom_pre_pass")
    with pytest.raises(ValueError, match="backend must be 'inductor'"):
        iq_compile(lambda x: x, backend="eager")


def test_uuid_identifies_sources_config_and_chained_passes():
    base = QuantPassManager().uuid()
    assert isinstance(base, str) and base == QuantPassManager().uuid()
    assert QuantPassManager(QuantPassConfig(dequant_linear_8bit=False)).uuid() != base
    with_a = QuantPassManager(chained=CountingPass("a")).uuid()
    assert with_a not in (None, base) and with_a != QuantPassManager(chained=CountingPass("b")).uuid()
    assert QuantPassManager(chained=lambda graph: None).uuid() is None  # unknown pass: no caching
    # (test_second_process_hits_the_fx_graph_cache checks that other processes get the same uuid)


def test_second_process_hits_the_fx_graph_cache(tmp_path):
    """Two fresh processes share one cache directory: the first compiles (miss, the pass runs),
    the second loads the compiled graph (hit) and still computes the right result. Both also
    check that importing inductor_quant changed no Inductor setting and registered no lowering."""
    script = textwrap.dedent(
        """
        import json, torch, torch.nn.functional as F
        from torch._inductor import config
        from torch._inductor.lowering import lowerings
        settings = {k: repr(v) for k, v in config.get_config_copy().items()}
        n_lowerings = len(lowerings)
        import inductor_quant
        untouched = settings == {k: repr(v) for k, v in config.get_config_copy().items()} and len(lowerings) == n_lowerings
        from inductor_quant.compile import compile as iq_compile
        from torch._dynamo.utils import counters
        from inductor_quant.patterns.pass_manager import QuantPassManager
        iq = torch.ops.inductor_quant
        torch.manual_seed(0)
        packed, absmax = iq.quantize_4bit(torch.randn(32, 64), 64, "nf4", torch.uint8)
        x = torch.randn(4, 64)
        def fn(x, packed, absmax):
            return F.linear(x, iq.dequantize_4bit(packed, absmax, 64, "nf4", [32, 64], x.dtype)) * 2
        out = iq_compile(fn, fullgraph=True)(x, packed, absmax)
        print(json.dumps({
            "hit": counters["inductor"]["fxgraph_cache_hit"], "miss": counters["inductor"]["fxgraph_cache_miss"],
            "rewrites": counters["inductor_quant"]["gemm_4bit_mm"], "ok": bool(torch.equal(out, fn(x, packed, absmax))),
            "uuid": QuantPassManager().uuid(), "import_untouched": untouched,
        }))
        """
    )
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    first, second = runs
    uuid = QuantPassManager().uuid()
    assert first == {"hit": 0, "miss": 1, "rewrites": 1, "ok": True, "uuid": uuid, "import_untouched": True}
    assert second == {"hit": 1, "miss": 0, "rewrites": 0, "ok": True, "uuid": uuid, "import_untouched": True}  # cached: the pass did not run again
