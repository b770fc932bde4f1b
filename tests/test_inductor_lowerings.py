"""Inductor lowerings of the quantize/dequantize ops (CPU, C++ backend).

Each compiled result is compared bit for bit with the eager op (the pure-torch reference on CPU),
and the generated code is checked: the op must be lowered (no call of the op itself) and a
dequantize followed by elementwise work must be one kernel.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from torch._inductor import config as inductor_config

from conftest import compiled, kernel_count
from inductor_quant.code_tables import dynamic_map
from inductor_quant.lowerings import _ir, register_lowerings
from inductor_quant.reference import fourbit as reference_fourbit

iq = torch.ops.inductor_quant


@pytest.fixture(scope="module", autouse=True)
def _inductor(inductor_cpp):
    """Lowerings on, in conftest's Inductor setup (scalar C++; ``test_quantize_lowerings_bit_exact``
    also runs the vectorized code)."""
    register_lowerings()


def assert_lowered(source: str, op: str) -> None:
    assert f"torch.ops.inductor_quant.{op}.default(" not in source, f"{op} was not lowered (fallback call in the generated code)"


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def special_values(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Fresh random data with an all-zero block, an exact code value and a tie (if room)."""
    flat = x.view(-1)
    if flat.numel() >= 3 * blocksize:
        flat[blocksize : 2 * blocksize] = 0.0
    flat[0] = 1.0
    return x


# Cases are batched into one compiled function per test: one C++ build serves them all (the
# build, not the lowering, dominates the time of a CPU compile).

DEQUANT_4BIT_CASES = [
    # quant_type, quant_storage, shape, blocksize, output dtype
    ("nf4", torch.uint8, (64, 96), 64, torch.float32),
    ("fp4", torch.uint8, (1000,), 256, torch.bfloat16),  # partial last block
    ("nf4", torch.bfloat16, (48, 40), 128, torch.float16),  # quant_storage view, partial block
    ("fp4", torch.uint8, (7, 9), 32, torch.float32),  # odd numel: padded last nibble
]
DEQUANT_8BIT_CASES = [((64, 64), 64, torch.float32), ((3, 333), 256, torch.bfloat16)]


def test_dequantize_lowerings_bit_exact():
    code = dynamic_map()
    inputs = []
    for quant_type, storage, shape, blocksize, _ in DEQUANT_4BIT_CASES:
        inputs += iq.quantize_4bit(special_values(torch.randn(shape), blocksize), blocksize, quant_type, storage)
    for shape, blocksize, _ in DEQUANT_8BIT_CASES:
        inputs += iq.quantize_blockwise(special_values(torch.randn(shape), blocksize), code, blocksize)

    def fn(*tensors):
        outs = []
        for i, (quant_type, _, shape, blocksize, dtype) in enumerate(DEQUANT_4BIT_CASES):
            outs.append(iq.dequantize_4bit(tensors[2 * i], tensors[2 * i + 1], blocksize, quant_type, list(shape), dtype))
        for j, (_, blocksize, dtype) in enumerate(DEQUANT_8BIT_CASES):
            k = 2 * (len(DEQUANT_4BIT_CASES) + j)
            outs.append(iq.dequantize_blockwise(tensors[k], tensors[k + 1], code, blocksize, dtype))
        return outs

    out, source = compiled(fn, *inputs)
    assert_lowered(source, "dequantize_4bit")
    assert_lowered(source, "dequantize_blockwise")
    for actual, expected in zip(out, fn(*inputs)):
        assert_bit_equal(actual, expected)


def test_dequantize_lowering_dynamic_shape():
    """Symbolic sizes (partial blocks): one compile serves two different weight sizes."""
    code = dynamic_map()

    def fn(codes, absmax, packed, absmax4, rows):
        return (
            iq.dequantize_blockwise(codes, absmax, code, 64, torch.float32),
            iq.dequantize_4bit(packed, absmax4, 64, "nf4", [rows.shape[0], 100], torch.float32),
        )

    torch._dynamo.reset()
    compiled_fn = torch.compile(fn, fullgraph=True, dynamic=True)
    for rows in (5, 11):
        x = torch.randn(rows, 100)
        args = (*iq.quantize_blockwise(x, code, 64), *iq.quantize_4bit(x, 64, "nf4", torch.uint8), torch.empty(rows))
        for actual, expected in zip(compiled_fn(*args), fn(*args)):
            assert_bit_equal(actual, expected)


QUANT_8BIT_CASES = [((32, 64), 64, torch.float32), ((1000,), 256, torch.bfloat16), ((3, 37), 64, torch.float16)]
QUANT_4BIT_CASES = [
    # quant_type, shape, blocksize, quant_storage
    ("nf4", (64, 64), 64, torch.uint8),  # whole blocks: pair reduction fused with the packing
    ("fp4", (1000,), 256, torch.uint8),  # partial last block
    ("nf4", (7, 9), 32, torch.uint8),  # odd numel
    ("fp4", (32, 32), 128, torch.bfloat16),  # quant_storage view
]


def _with_specials(shape, blocksize, dtype=torch.float32):
    """Fresh random data with a zero block, a NaN block, an Inf block and a -0.0 (where room)."""
    x = special_values(torch.randn(shape), blocksize).to(dtype)
    flat = x.view(-1)
    flat[5] = -0.0
    if flat.numel() > 4 * blocksize:
        flat[2 * blocksize + 1] = float("nan")
        flat[3 * blocksize + 1] = float("inf")
    return x


@pytest.mark.parametrize("reciprocal", ["div_rn", "fma_refined"])
@pytest.mark.parametrize("vectorized", [False, True])
def test_quantize_lowerings_bit_exact(vectorized, reciprocal, monkeypatch):
    """Both ways of rounding ``1 / absmax`` (``reciprocal_rn``): ``div_rn`` where Inductor has the
    op, the fma-refined reciprocal otherwise (torch 2.11), forced here."""
    monkeypatch.setattr(_ir, "_HAS_DIV_RN", reciprocal == "div_rn")
    code = dynamic_map()
    inputs = [_with_specials(shape, bs, dtype) for shape, bs, dtype in QUANT_8BIT_CASES]
    inputs += [_with_specials(shape, bs) for _, shape, bs, _ in QUANT_4BIT_CASES]

    def fn(*xs):
        outs = []
        for x, (_, blocksize, _) in zip(xs, QUANT_8BIT_CASES):
            outs += iq.quantize_blockwise(x, code, blocksize)
        for x, (quant_type, _, blocksize, storage) in zip(xs[len(QUANT_8BIT_CASES) :], QUANT_4BIT_CASES):
            outs += iq.quantize_4bit(x, blocksize, quant_type, storage)
        return outs

    with inductor_config.patch({"cpp.simdlen": None if vectorized else 1}):
        out, source = compiled(fn, *inputs)
    assert_lowered(source, "quantize_blockwise")
    assert_lowered(source, "quantize_4bit")
    for actual, expected in zip(out, fn(*inputs)):
        assert_bit_equal(actual, expected)


def _round_to_f32(value: Fraction) -> float:
    """``value`` rounded to the nearest fp32, ties to even, by exact comparison."""
    nearest = np.float32(float(value))
    candidates = [np.nextafter(nearest, np.float32(-np.inf)), nearest, np.nextafter(nearest, np.float32(np.inf))]
    return float(min(candidates, key=lambda c: (abs(Fraction(float(c)) - value), int(np.float32(c).view(np.int32)) & 1)))


def _fma(a: float, b: float, c: float) -> float:
    return _round_to_f32(Fraction(a) * Fraction(b) + Fraction(c))


def test_fma_refined_reciprocal_is_correctly_rounded_from_a_2_ulp_start():
    """The refinement ``reciprocal_rn`` emits where Inductor has no ``div_rn`` (torch 2.11),
    emulated with exact fmas: from any start within 2 fp32 ulp of ``1 / x`` (Triton's
    ``div.full.f32`` bound) it lands on ``1 / x`` rounded to nearest, over random mantissas and
    exponents of the normal range it is used for, and mantissas of all ones (where correcting the
    quotient by its remainder instead would round a tie the wrong way)."""
    generator = torch.Generator().manual_seed(0)
    mantissas = 1 + torch.rand(300, generator=generator, dtype=torch.float64)
    exponents = torch.randint(-125, 125, (300,), generator=generator)
    xs = [float(np.float32(m * 2.0**e)) for m, e in zip(mantissas.tolist(), exponents.tolist())]
    xs += [float(np.float32(2.0 - 2.0**-23) * 2.0**e) for e in (-125, -3, 0, 7, 124)]
    for x in xs:
        want = _round_to_f32(1 / Fraction(x))
        start = np.float32(want)
        for step in range(-2, 3):
            approx = start
            for _ in range(abs(step)):
                approx = np.nextafter(approx, np.float32(np.inf if step > 0 else -np.inf))
            approx = float(approx)
            refined = np.float32(_fma(approx, _fma(-x, approx, 1.0), approx))
            below, above = (np.nextafter(refined, np.float32(d)) for d in (-np.inf, np.inf))
            corrected = refined
            for candidate in (below, above):
                if abs(_fma(-x, float(candidate), 1.0)) < abs(_fma(-x, float(corrected), 1.0)):
                    corrected = candidate
            assert float(corrected) == want, (x, step, float(corrected), want)


def test_quantize_decision_boundaries_exact():
    """Every code value, fp32 midpoint and neighbouring float of the 8-bit map, and every NF4
    midpoint / FP4 literal threshold with its neighbours, encodes as in the reference (the
    10-gather binary search equals bucketize; ties go to the lower code)."""
    from inductor_quant.code_tables import FP4_THRESHOLDS, code_midpoints, nf4_code

    def neighbours(edges):
        return torch.cat([edges, torch.nextafter(edges, torch.tensor(2.0)), torch.nextafter(edges, torch.tensor(-2.0))])

    def one_value_per_block(values, blocksize):
        blocks = torch.zeros(values.numel(), blocksize)
        blocks[:, 0] = 1.0  # absmax exactly 1: the value itself is the normalized value
        blocks[:, 1] = values
        return blocks

    code = dynamic_map()
    eight = one_value_per_block(torch.cat([code, neighbours(code_midpoints(code))]), 64)
    edges4 = torch.cat([code_midpoints(nf4_code()), torch.tensor(FP4_THRESHOLDS, dtype=torch.float32)])
    four = one_value_per_block(neighbours(torch.cat([edges4, -edges4])), 32)

    def fn(eight, four):
        return (
            *iq.quantize_blockwise(eight, code, 64),
            iq.quantize_4bit(four, 32, "nf4", torch.uint8)[0],
            iq.quantize_4bit(four, 32, "fp4", torch.uint8)[0],
        )

    out, _ = compiled(fn, eight, four)
    for actual, expected in zip(out, fn(eight, four)):
        assert_bit_equal(actual, expected)


# --------------------------------------------------------------------------------------------
# fusion


def test_dequantize_fuses_with_elementwise_work():
    """dequantize_4bit -> * scale -> silu is one C++ kernel and equals eager bit for bit
    (with Inductor told to keep the eager roundings of the bf16 intermediate)."""
    packed, absmax = iq.quantize_4bit(torch.randn(64, 64), 64, "nf4", torch.uint8)

    def fn(packed, absmax, scale):
        w = iq.dequantize_4bit(packed, absmax, 64, "nf4", [64, 64], torch.bfloat16)
        return torch.nn.functional.silu(w * scale)

    scale = torch.randn(64, dtype=torch.bfloat16)
    with inductor_config.patch(emulate_precision_casts=True):
        out, source = compiled(fn, packed, absmax, scale)
    assert_lowered(source, "dequantize_4bit")
    assert kernel_count(source) == 1, source
    assert_bit_equal(out, fn(packed, absmax, scale))


def test_quantize_roundtrip_is_one_kernel():
    """quantize_blockwise(x * 2) -> dequantize: the absmax reduction, the code search, the
    producer and the dequantize all land in one kernel (whole blocks)."""
    code = dynamic_map()

    def fn(x):
        codes, absmax = iq.quantize_blockwise(x * 2, code, 256)
        return iq.dequantize_blockwise(codes, absmax, code, 256, torch.float32), absmax

    x = torch.randn(16, 256)
    (out, absmax), source = compiled(fn, x)
    expected, expected_absmax = fn(x)
    assert kernel_count(source) == 1, source
    assert_bit_equal(out, expected)
    assert_bit_equal(absmax, expected_absmax)


# --------------------------------------------------------------------------------------------
# the fused matmul ops on CPU (gemm_4bit, gemm_4bit_grouped, gemm_4bit_swiglu, linear_8bit)


def assert_matmul_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """``actual`` is the float64 product ``expected`` rounded once to its dtype (fp32 sums: their
    error is far below the output rounding; near-zero sums get an absolute slack)."""
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11}[actual.dtype]
    atol = 1e-5 * expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol)


def exact_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 ``F.linear`` with the fp32 dequantized ``weight``: as the reference rounds it to x's
    dtype for several rows (dequantize + mm), unrounded for one row (the generated reduction keeps
    it in fp32, as the GPU GEMV does)."""
    if x.shape[:-1].numel() > 1:
        weight = weight.to(x.dtype)
    out = x.double() @ weight.double().T
    return out if bias is None else out + bias.double()


def weight_4bit(w: dict, N: int, K: int, quant_type: str) -> torch.Tensor:
    scales = reference_fourbit.resolve_absmax(w["absmax"], w.get("absmax_8bit"), w.get("absmax_code"),
                                              w.get("absmax_offset"))
    return reference_fourbit.dequantize_4bit(w["B"], scales, 64, quant_type, [N, K], torch.float32)


def nested_4bit(n: int, k: int, quant_type: str = "nf4") -> dict:
    """A packed weight with double-quantized absmax, as gemm_4bit's keyword arguments."""
    packed, absmax = iq.quantize_4bit(torch.randn(n, k), 64, quant_type, torch.uint8)
    offset = absmax.mean().view(1)
    absmax_8bit, nested_absmax = iq.quantize_blockwise(absmax - offset, dynamic_map(), 256)
    return dict(B=packed, absmax=nested_absmax, absmax_8bit=absmax_8bit, absmax_code=dynamic_map(), absmax_offset=offset)


MATMUL_CASES = [
    # activation shape, dtype, quant_type, bias, double-quantized absmax
    ((1, 128), torch.float32, "nf4", True, False),  # decode: one reduction, the weight never stored
    ((1, 1, 128), torch.bfloat16, "nf4", False, True),
    ((2, 3, 128), torch.float16, "fp4", True, False),  # several rows: dequantize + addmm
    ((4, 128), torch.float32, "nf4", False, True),
]


def test_gemm_4bit_is_generated_code_on_cpu():
    """Each case equals the eager op (the reference); one row of activations takes no BLAS call,
    more rows take one ``mm``/``addmm``; no call of the op is left."""
    N, K = 48, 128
    weights = []
    for _, dtype, quant_type, has_bias, nested in MATMUL_CASES:
        if nested:
            kwargs = nested_4bit(N, K, quant_type)
        else:
            packed, absmax = iq.quantize_4bit(torch.randn(N, K), 64, quant_type, torch.uint8)
            kwargs = dict(B=packed, absmax=absmax)
        weights.append(dict(kwargs, bias=torch.randn(N, dtype=dtype) if has_bias else None))
    activations = [torch.randn(shape, dtype=dtype) for shape, dtype, *_ in MATMUL_CASES]

    def fn(activations):
        return [
            iq.gemm_4bit(x, w["B"], [N, K], w["absmax"], 64, case[2], w["bias"], w.get("absmax_8bit"),
                         w.get("absmax_code"), w.get("absmax_offset"))
            for x, w, case in zip(activations, weights, MATMUL_CASES)
        ]

    out, source = compiled(fn, activations)
    assert_lowered(source, "gemm_4bit")
    several_rows = sum(1 for shape, *_ in MATMUL_CASES if torch.Size(shape[:-1]).numel() > 1)
    assert source.count("extern_kernels.mm(") + source.count("extern_kernels.addmm(") == several_rows, source
    for actual, x, w, (_, _, quant_type, *_) in zip(out, activations, weights, MATMUL_CASES):
        assert_matmul_close(actual, exact_product(x, weight_4bit(w, N, K, quant_type), w["bias"]))


@pytest.mark.parametrize("rows", [1, 3])
def test_grouped_swiglu_and_8bit_matmuls_are_generated_code_on_cpu(rows):
    N, K = 32, 128
    code = dynamic_map()
    gate, up = (iq.quantize_4bit(torch.randn(N, K), 64, "nf4", torch.uint8) for _ in range(2))
    q, k = (nested_4bit(n, K) for n in (N, 16))
    codes, absmax8 = iq.quantize_blockwise(torch.randn(N, K), code, 256)
    bias8 = torch.randn(N, dtype=torch.bfloat16)

    def fn(x):
        grouped = iq.gemm_4bit_grouped(
            x, [q["B"], k["B"]], [N, 16], [q["absmax"], k["absmax"]], 64, "nf4", None,
            [q["absmax_8bit"], k["absmax_8bit"]], [code, code], [q["absmax_offset"], k["absmax_offset"]],
        )
        swiglu = iq.gemm_4bit_swiglu(x, [gate[0], up[0]], [N, N], [gate[1], up[1]], 64, "nf4")
        return grouped, swiglu, iq.linear_8bit(x, codes, absmax8, code, 256, bias8)

    x = torch.randn(rows, K, dtype=torch.bfloat16)
    out, source = compiled(fn, x)
    for op in ("gemm_4bit_grouped", "gemm_4bit_swiglu", "linear_8bit"):
        assert_lowered(source, op)
    blas_calls = source.count("extern_kernels.mm(") + source.count("extern_kernels.addmm(")
    assert blas_calls == (0 if rows == 1 else 5), source  # 2 grouped, 2 swiglu, 1 8-bit
    grouped, swiglu, eight = out
    assert_matmul_close(grouped, torch.cat([exact_product(x, weight_4bit(q, N, K, "nf4")),
                                            exact_product(x, weight_4bit(k, 16, K, "nf4"))], -1))
    gate_up = [exact_product(x, weight_4bit(dict(B=B, absmax=a), N, K, "nf4")) for B, a in (gate, up)]
    # the SwiGLU of the rounded products, each of its ops rounded to bf16: within two roundings
    expected = reference_fourbit.swiglu(*(p.to(x.dtype) for p in gate_up)).double()
    torch.testing.assert_close(swiglu.double(), expected, rtol=2**-7, atol=1e-5 * expected.abs().max().item())
    weight8 = iq.dequantize_blockwise(codes, absmax8, code, 256, torch.float32)
    assert_matmul_close(eight, exact_product(x, weight8, bias8))
