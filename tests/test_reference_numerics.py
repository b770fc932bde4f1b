"""Numerics of the CPU kernels (the pure-torch reference) against independent oracles.

Round trips are held to bitsandbytes' own test bars (bitsandbytes.md §6); edge cases follow the
rules in ``reference/blockwise.py`` and ``reference/fourbit.py``; matmuls are compared with float64;
optimizers with ``torch.optim`` or hand-written float64 loops.
"""

import math

import pytest
import torch

import inductor_quant.ops  # noqa: F401  (registers the ops)
from inductor_quant.code_tables import FP4_RANK_TO_CODE, FP4_THRESHOLDS, code_midpoints, dynamic_map, get_4bit_code

ops = torch.ops.inductor_quant

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QUANT_TYPES = ["nf4", "fp4"]
ZERO_CODE = {"nf4": 7, "fp4": 0}


def _ids(value):
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)


def _roundtrip_8bit(A, blocksize, code=None):
    code = dynamic_map() if code is None else code
    q, absmax = ops.quantize_blockwise(A, code, blocksize)
    return q, absmax, ops.dequantize_blockwise(q, absmax, code, blocksize, A.dtype)


def _roundtrip_4bit(A, blocksize, quant_type, storage=torch.uint8):
    packed, absmax = ops.quantize_4bit(A, blocksize, quant_type, storage)
    return packed, absmax, ops.dequantize_4bit(packed, absmax, blocksize, quant_type, list(A.shape), A.dtype)


def _codes_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The n 4-bit codes of a packed tensor (high nibble = even element)."""
    b = packed.contiguous().view(torch.uint8).reshape(-1)
    return torch.stack((b >> 4, b & 0xF), dim=1).reshape(-1)[:n]


# ---------------------------------------------------------------------------------------------
# Round-trip error bars (bitsandbytes.md §6)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,blocksize",
    [(torch.float32, bs) for bs in (32, 64, 128, 256, 512, 1024, 2048, 4096)]
    + [(dt, bs) for dt in (torch.float16, torch.bfloat16) for bs in (64, 4096)],
    ids=_ids,
)
def test_8bit_roundtrip_error_bars(dtype, blocksize):
    # bitsandbytes test_dynamic_blockwise_quantization: randn(1024, 1024) mean abs < 0.011 and
    # rel < 0.018; rand[0, 1) with the signed map abs < 0.0036, rel < 0.015, unsigned abs < 0.0023,
    # rel < 0.012. Its relative error divides by |A + 1e-8|.
    def errors(A, code=None):
        _, _, B = _roundtrip_8bit(A, blocksize, code)
        diff = (A - B).abs().float()
        return diff.mean().item(), (diff / (A.float() + 1e-8).abs()).mean().item()

    abs_err, rel_err = errors(torch.randn(1024, 1024, dtype=dtype))
    assert abs_err < 0.011 and rel_err < 0.018
    uniform = torch.rand(1024, 1024, dtype=dtype)
    abs_err, rel_err = errors(uniform, dynamic_map(signed=True))
    assert abs_err < 0.0036 and rel_err < 0.015
    abs_err, rel_err = errors(uniform, dynamic_map(signed=False))
    assert abs_err < 0.0023 and rel_err < 0.012


# bitsandbytes test_4bit_quant tables (mean over 1k samples of randn(1024, 1024)); the bs 32 column
# is from bitsandbytes.md §6. Its spread sigma is 0.7e-4 (bs 32) to 3.6e-4 (bs 4096) for the abs
# error; we interpolate geometrically in log2(blocksize) and scale it by rel/abs for the relative
# error, whose spread has the same origin (the per-block absmax).
ERR_4BIT = {
    "nf4": {32: 0.0677, 64: 0.072792, 128: 0.076835, 256: 0.080326, 512: 0.083535, 1024: 0.086603, 2048: 0.089592, 4096: 0.092537},
    "fp4": {32: 0.0889, 64: 0.096545, 128: 0.102947, 256: 0.108685, 512: 0.114087, 1024: 0.119312, 2048: 0.124460, 4096: 0.129573},
}
REL_ERR_4BIT = {
    "nf4": {32: 0.190, 64: 0.203299, 128: 0.215252, 256: 0.226044, 512: 0.236021, 1024: 0.245365, 2048: 0.254146, 4096: 0.262457},
    "fp4": {32: 0.242, 64: 0.260130, 128: 0.275734, 256: 0.289842, 512: 0.302852, 1024: 0.314982, 2048: 0.326402, 4096: 0.337228},
}


def _sigma_4bit(blocksize: int) -> float:
    t = (math.log2(blocksize) - 5) / 7
    return 0.7e-4 * (3.6 / 0.7) ** t


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_4bit_roundtrip_error_bars(quant_type, blocksize):
    A = torch.randn(1024, 1024)
    _, _, B = _roundtrip_4bit(A, blocksize, quant_type)
    err = (A - B).abs()
    rel = (err / (A.abs() + 1e-8)).mean().item()
    err = err.mean().item()
    sigma = _sigma_4bit(blocksize)
    mean_err, mean_rel = ERR_4BIT[quant_type][blocksize], REL_ERR_4BIT[quant_type][blocksize]
    assert err < mean_err + 7 * sigma
    assert rel < mean_rel + 7 * sigma * mean_rel / mean_err
    # and not suspiciously good either (a broken bar or a different table would show here)
    assert err > mean_err - 7 * sigma


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_ids)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_4bit_roundtrip_half_inputs(quant_type, dtype):
    A = torch.randn(512, 1024, dtype=dtype)
    _, _, B = _roundtrip_4bit(A, 64, quant_type)
    assert B.dtype == dtype
    err = (A - B).abs().float().mean().item()
    assert err < ERR_4BIT[quant_type][64] + 7 * _sigma_4bit(64) * 2  # half the samples: sigma * sqrt(2) < 2 sigma


# ---------------------------------------------------------------------------------------------
# Rules: non-contiguous, partial blocks, odd n, zero / non-finite blocks, signed zeros, scale
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_non_contiguous_quantize_equals_contiguous(dtype):
    base = torch.randn(96, 130, dtype=dtype)
    for A in (base.t(), base[:, ::2], base[::3, 1:]):
        assert not A.is_contiguous()
        q1, a1, d1 = _roundtrip_8bit(A, 64)
        q2, a2, d2 = _roundtrip_8bit(A.contiguous(), 64)
        assert torch.equal(q1, q2) and torch.equal(a1, a2) and torch.equal(d1, d2)
        for quant_type in QUANT_TYPES:
            p1, a1, d1 = _roundtrip_4bit(A, 64, quant_type)
            p2, a2, d2 = _roundtrip_4bit(A.contiguous(), 64, quant_type)
            assert torch.equal(p1, p2) and torch.equal(a1, a2) and torch.equal(d1, d2)


def test_non_contiguous_codes_and_weights():
    A = torch.randn(40, 70)
    code = dynamic_map()
    q, absmax = ops.quantize_blockwise(A, code, 32)
    qt = q.t()  # a transposed view of codes dequantizes in its own (logical) element order
    assert torch.equal(
        ops.dequantize_blockwise(qt, absmax, code, 32, torch.float32),
        ops.dequantize_blockwise(qt.contiguous(), absmax, code, 32, torch.float32),
    )
    packed, absmax = ops.quantize_4bit(A, 64, "nf4", torch.uint8)
    wide = torch.zeros(packed.shape[0], 3, dtype=torch.uint8)
    wide[:, 1] = packed[:, 0]
    strided = wide[:, 1:2]
    assert not strided.is_contiguous()
    expected = ops.dequantize_4bit(packed, absmax, 64, "nf4", [40, 70], torch.float32)
    assert torch.equal(ops.dequantize_4bit(strided, absmax, 64, "nf4", [40, 70], torch.float32), expected)
    x = torch.randn(70, 5).t()
    assert torch.equal(
        ops.gemm_4bit(x, strided, [40, 70], absmax, 64, "nf4"), ops.gemm_4bit(x.contiguous(), packed, [40, 70], absmax, 64, "nf4")
    )
    assert torch.equal(
        ops.gemv_4bit(x, strided, [40, 70], absmax, get_4bit_code("nf4"), 64),
        ops.gemv_4bit(x.contiguous(), packed, [40, 70], absmax, get_4bit_code("nf4"), 64),
    )


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("n", [1, 63, 65, 200, 4097])
def test_partial_last_block_uses_own_elements(quant_type, n):
    blocksize = 64
    A = torch.randn(n)
    A[-1] = 0.01  # keep the tail small: its absmax must not come from earlier blocks
    blocks = -(-n // blocksize)
    for absmax in (_roundtrip_8bit(A, blocksize)[1], _roundtrip_4bit(A, blocksize, quant_type)[1]):
        assert absmax.shape == (blocks,)
        for b in range(blocks):
            assert absmax[b].item() == A[b * blocksize : (b + 1) * blocksize].abs().max().item()


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_odd_n_pads_with_the_zero_code(quant_type):
    A = torch.randn(129) + 3.0  # all positive: no element itself maps to the code of 0.0
    packed, absmax, B = _roundtrip_4bit(A, 64, quant_type)
    assert packed.shape == (65, 1)
    assert (packed[-1, 0].item() & 0xF) == ZERO_CODE[quant_type]
    assert (_codes_4bit(packed, 129) != ZERO_CODE[quant_type]).all()
    assert torch.isfinite(B).all()


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_zero_blocks(quant_type):
    A = torch.randn(4, 64)
    A[1] = 0.0
    A[3, :] = -0.0
    q, absmax, B = _roundtrip_8bit(A.reshape(-1), 64)
    assert absmax[1].item() == 0.0 and absmax[3].item() == 0.0
    assert (q[64:128] == 127).all() and (q[192:] == 127).all()
    assert (B[64:128] == 0).all() and (B[192:] == 0).all()
    assert not torch.signbit(B[64:128]).any() and not torch.isnan(B).any()
    packed, absmax, B4 = _roundtrip_4bit(A, 64, quant_type)
    codes = _codes_4bit(packed, A.numel()).view(4, 64)
    assert (codes[1] == ZERO_CODE[quant_type]).all() and (codes[3] == ZERO_CODE[quant_type]).all()
    assert (B4[1] == 0).all() and (B4[3] == 0).all() and not torch.isnan(B4).any()
    # the other blocks are untouched by their zero neighbours
    _, _, alone = _roundtrip_4bit(A[2].clone(), 64, quant_type)
    assert torch.equal(B4[2], alone)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_blocks(bad):
    A = torch.randn(256)
    A[70] = bad  # block 1 of 64
    ref = A.clone()
    ref[64:128] = 1.0
    for quant_type in [None, *QUANT_TYPES]:
        if quant_type is None:
            _, absmax, B = _roundtrip_8bit(A, 64)
            _, _, B_ref = _roundtrip_8bit(ref, 64)
        else:
            _, absmax, B = _roundtrip_4bit(A, 64, quant_type)
            _, _, B_ref = _roundtrip_4bit(ref, 64, quant_type)
        if math.isnan(bad):
            assert math.isnan(absmax[1].item())
        else:
            assert absmax[1].item() == math.inf
        assert torch.isnan(B[64:128]).all(), "a non-finite block must dequantize to NaN, never a finite value"
        keep = torch.ones(256, dtype=torch.bool)
        keep[64:128] = False
        assert torch.equal(B[keep], B_ref[keep])
        assert torch.isfinite(B[keep]).all()


def test_signed_zeros():
    A = torch.tensor([1.0, -0.0, 0.0, -1e-9, 1e-9, -0.5, 0.25, -1.0])
    q, _, B = _roundtrip_8bit(A, 32)
    assert q[1].item() == 127 and q[2].item() == 127
    assert B[1].item() == 0.0 and B[2].item() == 0.0
    packed, _, _ = _roundtrip_4bit(A, 32, "fp4")
    codes = _codes_4bit(packed, 8)
    # FP4: the sign bit is set only for x < 0, so -0.0 is stored as +0 (code 0); a tiny negative
    # below the first threshold keeps its sign (code 0b1000, which dequantizes to -0.0)
    assert codes[1].item() == 0 and codes[2].item() == 0
    assert codes[3].item() == 0b1000 and codes[4].item() == 0
    packed, _, _ = _roundtrip_4bit(A, 32, "nf4")
    codes = _codes_4bit(packed, 8)
    assert codes[1].item() == 7 and codes[2].item() == 7 and codes[3].item() == 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_ids)
def test_tiny_and_huge_magnitudes(dtype):
    A = torch.randn(64, 64, dtype=dtype)
    for exponent in (-100, 100):
        # power-of-two scales are exact, so every code and absmax scales exactly
        scaled = A * 2.0**exponent
        for quant_type in [None, *QUANT_TYPES]:
            rt = (lambda X: _roundtrip_8bit(X, 64)) if quant_type is None else (lambda X: _roundtrip_4bit(X, 64, quant_type))
            q1, a1, d1 = rt(A)
            q2, a2, d2 = rt(scaled)
            assert torch.equal(q1, q2)
            assert torch.equal(a2, a1 * 2.0**exponent)
            assert torch.equal(d2, d1 * 2.0**exponent)
    A = A.float()
    for scale in (1e-30, 1e30):
        scaled = (A * scale).to(dtype)
        for quant_type in [None, *QUANT_TYPES]:
            rt = (lambda X: _roundtrip_8bit(X, 64)) if quant_type is None else (lambda X: _roundtrip_4bit(X, 64, quant_type))
            unit = A.to(dtype)
            rel_unit = ((rt(unit)[2] - unit).abs().float() / unit.abs().float().clamp_min(1e-6)).mean().item()
            rel_scaled = ((rt(scaled)[2] - scaled).abs().float() / scaled.abs().float().clamp_min(1e-6 * scale)).mean().item()
            assert math.isfinite(rel_scaled)
            assert rel_scaled == pytest.approx(rel_unit, rel=0.02)


def test_empty_tensors():
    code = dynamic_map()
    for shape in [(0,), (0, 7), (3, 0)]:
        A = torch.empty(shape)
        q, absmax, B = _roundtrip_8bit(A, 64)
        assert q.shape == shape and absmax.shape == (0,) and B.shape == shape
        for quant_type in QUANT_TYPES:
            for storage in (torch.uint8, torch.bfloat16, torch.float32):
                packed, absmax, B = _roundtrip_4bit(A, 64, quant_type, storage)
                assert packed.shape == (0, 1) and packed.dtype == storage
                assert absmax.shape == (0,) and B.shape == shape
    W = torch.randn(8, 64)
    packed, absmax = ops.quantize_4bit(W, 64, "nf4", torch.uint8)
    out = ops.gemm_4bit(torch.empty(0, 64), packed, [8, 64], absmax, 64, "nf4")
    assert out.shape == (0, 8)
    out = ops.gemv_4bit(torch.empty(2, 0, 64), packed, [8, 64], absmax, get_4bit_code("nf4"), 64)
    assert out.shape == (2, 0, 8)
    assert ops.dequantize_blockwise(torch.empty(0, dtype=torch.uint8), torch.empty(0), code, 64, torch.float16).shape == (0,)


# ---------------------------------------------------------------------------------------------
# Code selection: exact codes map to themselves, ties go to the lower code
# ---------------------------------------------------------------------------------------------


def test_exact_codes_map_to_themselves():
    for signed in (True, False):
        code = dynamic_map(signed=signed)
        for absmax in (1.0, 3.0):
            q, a, B = _roundtrip_8bit(code * absmax, 256, code)
            assert a.item() == absmax
            assert torch.equal(q.long(), torch.arange(256))
            if absmax == 1.0:
                assert torch.equal(B, code)
    for quant_type in QUANT_TYPES:
        code = get_4bit_code(quant_type)
        for absmax in (1.0, 2.5):
            packed, a, B = _roundtrip_4bit(code * absmax, 32, quant_type)
            codes = _codes_4bit(packed, 16)
            expected = torch.arange(16)
            if quant_type == "fp4":
                expected[8] = 0  # -0.0 is not < 0: stored as +0
            assert torch.equal(codes.long(), expected)
            assert torch.equal(B.abs(), (code * absmax).abs())


def test_midpoint_ties_go_to_the_lower_code():
    # absmax 1.0 (the block holds 1.0), so the normalized values are exactly the inputs
    code = dynamic_map()
    mids = code_midpoints(code)
    A = torch.cat((mids, torch.ones(1)))
    q, a, _ = _roundtrip_8bit(A, 256, code)
    assert a.item() == 1.0
    assert torch.equal(q[:255].long(), torch.arange(255))
    above = torch.cat((torch.nextafter(mids, torch.tensor(2.0)), torch.ones(1)))
    q, _, _ = _roundtrip_8bit(above, 256, code)
    assert torch.equal(q[:255].long(), torch.arange(1, 256))

    nf4 = get_4bit_code("nf4")
    mids = code_midpoints(nf4)
    for values, first in ((mids, 0), (torch.nextafter(mids, torch.tensor(2.0)), 1)):
        packed, a, _ = _roundtrip_4bit(torch.cat((values, torch.ones(1))), 32, "nf4")
        assert a.item() == 1.0
        assert torch.equal(_codes_4bit(packed, 15).long(), torch.arange(first, first + 15))

    # FP4: bitsandbytes' literal thresholds on |x|, strict '>': on the literal -> lower magnitude
    t = torch.tensor(FP4_THRESHOLDS, dtype=torch.float32)
    rank_to_code = torch.tensor(FP4_RANK_TO_CODE)
    for values, ranks in ((t, torch.arange(7)), (torch.nextafter(t, torch.tensor(2.0)), torch.arange(1, 8))):
        for sign in (1.0, -1.0):
            packed, _, _ = _roundtrip_4bit(torch.cat((sign * values, torch.ones(1))), 32, "fp4")
            expected = rank_to_code[ranks] | (0b1000 if sign < 0 else 0)
            assert torch.equal(_codes_4bit(packed, 7).long(), expected)


# ---------------------------------------------------------------------------------------------
# gemv / gemm against float64
# ---------------------------------------------------------------------------------------------

EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _dequant64(packed, absmax, blocksize, quant_type, shapeB):
    return ops.dequantize_4bit(packed, absmax, blocksize, quant_type, shapeB, torch.float32).double()


def _assert_matmul_close(out, A, W64, bias=None):
    """|out - A @ W.T| within a few roundings of the dtype, scaled by |A| @ |W|.T (+|bias|)."""
    expected = A.double() @ W64.T
    bound = A.double().abs() @ W64.abs().T
    if bias is not None:
        expected = expected + bias.double()
        bound = bound + bias.double().abs()
    k = A.shape[-1]
    eps = EPS[A.dtype]
    # weight rounding to A.dtype + output rounding + fp32 accumulation over k terms
    tol = (3 * eps + k * 2.0**-24) * bound + 1e-30
    assert out.dtype == A.dtype
    assert ((out.double() - expected).abs() <= tol).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_gemv_gemm_vs_float64(quant_type, dtype):
    N, K, blocksize = 48, 200, 64  # K % blocksize != 0: blocks cross rows
    W = torch.randn(N, K, dtype=dtype) / math.sqrt(K)
    for storage in (torch.uint8, torch.bfloat16):
        packed, absmax = ops.quantize_4bit(W, blocksize, quant_type, storage)
        W64 = _dequant64(packed, absmax, blocksize, quant_type, [N, K])
        for lead in [(1,), (3,), (2, 5)]:
            A = torch.randn(*lead, K, dtype=dtype)
            _assert_matmul_close(ops.gemv_4bit(A, packed, [N, K], absmax, get_4bit_code(quant_type), blocksize), A, W64)
            _assert_matmul_close(ops.gemm_4bit(A, packed, [N, K], absmax, blocksize, quant_type), A, W64)
            bias = torch.randn(N, dtype=dtype)
            _assert_matmul_close(ops.gemm_4bit(A, packed, [N, K], absmax, blocksize, quant_type, bias), A, W64, bias)


def test_gemv_uses_the_given_code_table():
    # gemv takes its 16 values from `code`, not from a quant_type: a scaled table scales the output
    W = torch.randn(16, 64)
    packed, absmax = ops.quantize_4bit(W, 64, "nf4", torch.uint8)
    A = torch.randn(1, 64)
    code = get_4bit_code("nf4")
    base = ops.gemv_4bit(A, packed, [16, 64], absmax, code, 64)
    torch.testing.assert_close(ops.gemv_4bit(A, packed, [16, 64], absmax, code * 2, 64), base * 2)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_gemm_nested_absmax_vs_manual_reconstruction(quant_type):
    N, K, blocksize = 96, 200, 32  # 600 weight blocks: three 256-blocks of nested absmax
    W = torch.randn(N, K)
    packed, absmax = ops.quantize_4bit(W, blocksize, quant_type, torch.uint8)
    offset = absmax.mean()
    code = dynamic_map()
    absmax_8bit, outer = ops.quantize_blockwise(absmax - offset, code, 256)
    assert outer.shape == (3,)
    manual = torch.stack(
        [code[absmax_8bit[i].long()] * outer[i // 256] for i in range(absmax.numel())]
    ) + offset
    # the reconstruction is close to the real absmax (8-bit error), and the op uses exactly it
    torch.testing.assert_close(manual, absmax, rtol=0.02, atol=0.02 * absmax.max().item())
    A = torch.randn(5, K)
    bias = torch.randn(N)
    nested = ops.gemm_4bit(A, packed, [N, K], outer, blocksize, quant_type, bias, absmax_8bit, code, offset)
    assert torch.equal(nested, ops.gemm_4bit(A, packed, [N, K], manual, blocksize, quant_type, bias))
    # a half-precision offset is upcast, not a different formula
    nested16 = ops.gemm_4bit(A, packed, [N, K], outer, blocksize, quant_type, bias, absmax_8bit, code, offset.half())
    manual16 = manual - offset + offset.half().float()
    assert torch.equal(nested16, ops.gemm_4bit(A, packed, [N, K], manual16, blocksize, quant_type, bias))


# ---------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------

SHAPE = (64, 33)  # 2112 elements: 9 blocks of 256, the last partial


def _update32(name, g, p, s1, s2=None, *, lr=1e-3, beta1=0.9, beta2=0.999, beta3=0.9999, alpha=5.0, eps=1e-8,
              weight_decay=0.0, step=1, gnorm_scale=1.0, unorm_vec=None, max_unorm=0.0, param_norm=0.0,
              skip_zeros=False):
    ops.optimizer_update_32bit(
        name, g, p, s1, s2, unorm_vec, max_unorm, param_norm, beta1, beta2, beta3, alpha, eps, weight_decay,
        step, lr, gnorm_scale, skip_zeros,
    )


def _run_against_torch(name, torch_cls, torch_kwargs, our_kwargs, state_keys, steps=20):
    torch.manual_seed(1)
    p0 = torch.randn(SHAPE)
    ours = p0.clone()
    s1 = torch.zeros(SHAPE)
    s2 = torch.zeros(SHAPE) if len(state_keys) == 2 else None
    theirs = torch.nn.Parameter(p0.clone())
    opt = torch_cls([theirs], **torch_kwargs)
    for step in range(1, steps + 1):
        g = torch.randn(SHAPE) * 0.1
        theirs.grad = g.clone()
        opt.step()
        _update32(name, g, ours, s1, s2, step=step, **our_kwargs)
    state = opt.state[theirs]
    torch.testing.assert_close(s1, state[state_keys[0]], atol=1e-6, rtol=1e-5)
    if s2 is not None:
        torch.testing.assert_close(s2, state[state_keys[1]], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours, theirs.detach(), atol=1e-6, rtol=1e-5)


def test_adam_vs_torch():
    _run_against_torch("adam", torch.optim.Adam, dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8),
                       dict(lr=1e-3), ("exp_avg", "exp_avg_sq"))


def test_adamw_vs_torch():
    # Weight decay is decoupled (AdamW). bitsandbytes' CUDA kernel (and ours) applies it after the
    # update, torch before: p(1 - lr wd) - lr u vs (p - lr u)(1 - lr wd) differ by lr^2 wd u ~ 1e-8.
    _run_against_torch("adam", torch.optim.AdamW, dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
                       dict(lr=1e-3, weight_decay=0.1), ("exp_avg", "exp_avg_sq"))


def test_momentum_vs_torch_sgd():
    _run_against_torch("momentum", torch.optim.SGD, dict(lr=1e-2, momentum=0.9, dampening=0, weight_decay=1e-2),
                       dict(lr=1e-2, beta1=0.9, weight_decay=1e-2), ("momentum_buffer",))


def test_rmsprop_vs_torch():
    # Formulas agree with torch.optim.RMSprop for momentum=0, centered=False (bitsandbytes does
    # not support the other two): v = a v + (1 - a) g^2; p -= lr g / (sqrt(v) + eps), with coupled
    # L2 weight decay folded into g first.
    _run_against_torch("rmsprop", torch.optim.RMSprop, dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=1e-2),
                       dict(lr=1e-2, beta1=0.99, eps=1e-8, weight_decay=1e-2), ("square_avg",))


def test_adagrad_vs_torch():
    # lr_decay = 0 and initial_accumulator_value = 0, the only settings bitsandbytes supports
    _run_against_torch("adagrad", torch.optim.Adagrad, dict(lr=1e-2, eps=1e-10, weight_decay=1e-2),
                       dict(lr=1e-2, eps=1e-10, weight_decay=1e-2), ("sum",))


def _lion64(p, m, g, lr, beta1, beta2, wd):
    p = p * (1 - lr * wd)
    p = p - lr * torch.sign(beta1 * m + (1 - beta1) * g)
    return p, beta2 * m + (1 - beta2) * g


def _ademamix64(p, m1, m2, nu, g, lr, beta1, beta2, beta3, alpha, eps, wd, step):
    m1 = beta1 * m1 + (1 - beta1) * g
    m2 = beta3 * m2 + (1 - beta3) * g
    nu = beta2 * nu + (1 - beta2) * g * g
    c1 = 1 - beta1**step
    c2 = math.sqrt(1 - beta2**step)
    p = p - lr * (m1 / c1 + alpha * m2) / (nu.sqrt() / c2 + eps)
    return p * (1 - lr * wd), m1, m2, nu


def test_lion_vs_float64():
    torch.manual_seed(2)
    p = torch.randn(SHAPE)
    m = torch.zeros(SHAPE)
    p64, m64 = p.double(), m.double()
    for step in range(1, 21):
        g = torch.randn(SHAPE) * 0.1
        _update32("lion", g, p, m, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.1, step=step)
        p64, m64 = _lion64(p64, m64, g.double(), 1e-4, 0.9, 0.99, 0.1)
        # re-sync the sign input: an fp32 momentum within an ulp of -(1-b1)/b1 * g may flip a sign
        torch.testing.assert_close(m, m64.float(), atol=1e-7, rtol=1e-6)
        m64 = m.double()
    # fp32 rounds p twice per step (decay, update): 20 steps x 2 x 2**-24 relative, with margin
    torch.testing.assert_close(p, p64.float(), atol=1e-7, rtol=5e-6)


def test_ademamix_vs_float64():
    torch.manual_seed(3)
    p = torch.randn(SHAPE)
    s1 = torch.zeros(2, *SHAPE)
    s2 = torch.zeros(SHAPE)
    ref = (p.double(), s1[0].double(), s1[1].double(), s2.double())
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, beta3=0.9999, alpha=5.0, eps=1e-8, weight_decay=0.01)
    for step in range(1, 21):
        g = torch.randn(SHAPE) * 0.1
        _update32("ademamix", g, p, s1, s2, step=step, **kw)
        ref = _ademamix64(*ref, g.double(), kw["lr"], kw["beta1"], kw["beta2"], kw["beta3"], kw["alpha"], kw["eps"],
                          kw["weight_decay"], step)
    torch.testing.assert_close(p, ref[0].float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s1[0], ref[1].float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s1[1], ref[2].float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s2, ref[3].float(), atol=1e-6, rtol=1e-5)


def test_gnorm_scale_scales_the_gradient():
    torch.manual_seed(4)
    g = torch.randn(SHAPE)
    for name in ("adam", "momentum", "rmsprop", "adagrad", "lion"):
        a = torch.randn(SHAPE)
        b = a.clone()
        s2a = torch.zeros(SHAPE) if name == "adam" else None
        s2b = torch.zeros(SHAPE) if name == "adam" else None
        s1a, s1b = torch.zeros(SHAPE), torch.zeros(SHAPE)
        _update32(name, g, a, s1a, s2a, gnorm_scale=0.25)
        _update32(name, g * 0.25, b, s1b, s2b)
        assert torch.equal(a, b) and torch.equal(s1a, s1b), name


@pytest.mark.parametrize("name", ["adam", "lamb", "momentum", "lars", "rmsprop", "lion", "adagrad"])
def test_skip_zeros_32bit(name):
    torch.manual_seed(5)
    p = torch.randn(SHAPE)
    g = torch.randn(SHAPE)
    g[::3] = 0.0
    zero = g == 0
    s1 = torch.rand(SHAPE)
    s2 = torch.rand(SHAPE) if name in ("adam", "lamb") else None
    p0, s10 = p.clone(), s1.clone()
    clipped = name in ("lamb", "lars")
    kw = dict(step=2, weight_decay=0.01, max_unorm=1.0 if clipped else 0.0, param_norm=p.norm().item())
    # the same step without skip_zeros on copies: non-zero-grad elements must match it
    p_all, s1_all, s2_all = p.clone(), s1.clone(), None if s2 is None else s2.clone()
    _update32(name, g, p_all, s1_all, s2_all, unorm_vec=torch.zeros(1) if clipped else None, **kw)
    _update32(name, g, p, s1, s2, skip_zeros=True, unorm_vec=torch.zeros(1) if clipped else None, **kw)
    assert torch.equal(p[zero], p0[zero]) and torch.equal(s1[zero], s10[zero])
    assert not torch.equal(p[~zero], p0[~zero])
    if name not in ("lamb", "lars"):  # clipping uses the norm over the kept elements only
        assert torch.equal(p[~zero], p_all[~zero]) and torch.equal(s1[~zero], s1_all[~zero])


def _lamb_lars_manual(name, p, g, s1, s2, lr, beta1, beta2, eps, wd, step, max_unorm):
    """float64 LAMB/LARS step with bitsandbytes' CUDA clipping (bitsandbytes.md §4.2)."""
    p, g, s1 = p.double(), g.double(), s1.double()
    param_norm = p.norm()
    if name == "lamb":
        s2 = s2.double()
        m = beta1 * s1 + (1 - beta1) * g
        v = beta2 * s2 + (1 - beta2) * g * g
        c1, c2 = 1 - beta1**step, math.sqrt(1 - beta2**step)
        u = (m / c1) / ((v / (1 - beta2**step)).sqrt() + eps)
        unorm = u.square().sum()
        bound = max_unorm * param_norm
        scale = bound / unorm.sqrt() if unorm.sqrt() > bound else 1.0
        p = p - lr * scale * (c2 / c1) * m / (v.sqrt() + eps * c2)
        return p * (1 - lr * wd), m, v, unorm
    g = g + wd * p
    m = g if step == 1 else beta1 * s1 + g
    unorm = m.square().sum()
    bound = max_unorm * param_norm + eps
    scale = bound / (unorm.sqrt() + eps) if unorm.sqrt() > bound else 1.0
    return p - lr * scale * m, m, None, unorm


@pytest.mark.parametrize("name,max_unorm", [("lamb", 1.0), ("lamb", 1e-3), ("lars", 0.02), ("lars", 10.0)])
def test_lamb_lars_clipping_vs_manual(name, max_unorm):
    torch.manual_seed(6)
    p = torch.randn(SHAPE)
    g = torch.randn(SHAPE)
    s1 = torch.randn(SHAPE) * 0.1
    s2 = torch.rand(SHAPE) * 0.1 if name == "lamb" else None
    unorm_vec = torch.zeros(1)
    lr, wd, step = 1e-2, 0.01, 3
    expected = _lamb_lars_manual(name, p, g, s1, s2, lr, 0.9, 0.999, 1e-8, wd, step, max_unorm)
    _update32(name, g, p, s1, s2, lr=lr, weight_decay=wd, step=step, unorm_vec=unorm_vec, max_unorm=max_unorm,
              param_norm=p.norm().item())
    torch.testing.assert_close(p, expected[0].float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s1, expected[1].float(), atol=1e-6, rtol=1e-5)
    if s2 is not None:
        torch.testing.assert_close(s2, expected[2].float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(unorm_vec, expected[3].float().reshape(1), rtol=1e-5, atol=0)


def _quantize_state(values, signed=True):
    qmap = dynamic_map(signed=signed)
    q, absmax = ops.quantize_blockwise(values, qmap, 256)
    return q, absmax, qmap


def _dequantize_state(q, absmax, qmap):
    return ops.dequantize_blockwise(q, absmax, qmap, 256, torch.float32)


# Half the widest gap of the dynamic maps, relative to the block absmax: the top band holds
# linspace(0.1, 1, 65) midpoints (signed), 0.9 / 64 apart.
REQUANT_ATOL = 0.9 / 64 / 2 + 1e-6


@pytest.mark.parametrize("name", ["adam", "ademamix"])
def test_8bit_nan_gradients_leave_p_and_zero_states(name):
    torch.manual_seed(7)
    p = torch.randn(SHAPE)
    g = torch.randn(SHAPE) * 0.1
    bad = torch.zeros(SHAPE, dtype=torch.bool)
    bad[3, 5] = bad[10, 0] = bad[40, 32] = True
    g[3, 5], g[10, 0], g[40, 32] = float("nan"), float("inf"), float("-inf")
    if name == "ademamix":
        rows = [_quantize_state(torch.randn(SHAPE) * 0.01) for _ in range(2)]
        s1 = torch.stack([r[0] for r in rows])
        a1 = torch.stack([r[1] for r in rows])
        qmap1 = rows[0][2]
    else:
        s1, a1, qmap1 = _quantize_state(torch.randn(SHAPE) * 0.01)
    s2, a2, qmap2 = _quantize_state(torch.rand(SHAPE) * 0.01, signed=False)
    p0 = p.clone()
    ops.optimizer_update_8bit_blockwise(name, g, p, s1, s2, 0.9, 0.999, 0.9999, 5.0, 1e-8, 2, 1e-3, qmap1, qmap2,
                                        a1, a2, 0.0, 1.0, False)
    assert torch.equal(p[bad], p0[bad])
    assert torch.isfinite(p).all() and not torch.equal(p[~bad], p0[~bad])
    states = [_dequantize_state(s1[i], a1[i], qmap1) for i in range(2)] if name == "ademamix" else [
        _dequantize_state(s1, a1, qmap1)]
    states.append(_dequantize_state(s2, a2, qmap2))
    for state in states:
        assert (state[bad] == 0).all()
        assert torch.isfinite(state).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_ids)
@pytest.mark.parametrize("name", ["adam", "ademamix", "momentum", "rmsprop", "lion", "adagrad"])
def test_8bit_step_close_to_32bit(name, dtype):
    """One step from the same (8-bit representable) states: the dequantized 8-bit states are the
    32-bit states up to requantization, and p matches closely."""
    torch.manual_seed(8)
    p = torch.randn(SHAPE).to(dtype)
    g = (torch.randn(SHAPE) * 0.1).to(dtype)
    two = name in ("adam", "ademamix")
    lead = (2,) if name == "ademamix" else ()
    init1 = torch.randn(*lead, *SHAPE) * 0.01
    if name == "ademamix":
        rows = [_quantize_state(init1[i]) for i in range(2)]
        q1, a1, qmap1 = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), rows[0][2]
        f1 = torch.stack([_dequantize_state(q1[i], a1[i], qmap1) for i in range(2)])
    else:
        q1, a1, qmap1 = _quantize_state(init1)
        f1 = _dequantize_state(q1, a1, qmap1)
    if name in ("rmsprop", "adagrad"):  # these states are non-negative
        f1 = f1.abs()
        q1, a1, qmap1 = _quantize_state(f1)
        f1 = _dequantize_state(q1, a1, qmap1)
    q2 = a2 = qmap2 = f2 = None
    if two:
        q2, a2, qmap2 = _quantize_state(torch.rand(SHAPE) * 1e-3, signed=False)
        f2 = _dequantize_state(q2, a2, qmap2)
    kw = dict(beta1=0.9, beta2=0.99 if name == "lion" else 0.999, beta3=0.9999, alpha=5.0, eps=1e-8, step=2,
              lr=1e-3, weight_decay=0.01)
    p8, p32 = p.clone(), p.clone()
    ops.optimizer_update_8bit_blockwise(name, g, p8, q1, q2, kw["beta1"], kw["beta2"], kw["beta3"], kw["alpha"],
                                        kw["eps"], kw["step"], kw["lr"], qmap1, qmap2, a1, a2, kw["weight_decay"],
                                        1.0, False)
    _update32(name, g, p32, f1, f2, **kw)
    if name == "ademamix":
        got1 = torch.stack([_dequantize_state(q1[i], a1[i], qmap1) for i in range(2)])
    else:
        got1 = _dequantize_state(q1, a1, qmap1)
    # requantization error: at most half a code gap of the new block absmax
    torch.testing.assert_close(got1, f1, atol=REQUANT_ATOL * f1.abs().max().item(), rtol=0)
    if two:
        torch.testing.assert_close(_dequantize_state(q2, a2, qmap2), f2, atol=REQUANT_ATOL * f2.abs().max().item(), rtol=0)
    # p is updated with the unquantized new states, so it matches the 32-bit step exactly, except
    # 8-bit Lion in half precision, which rounds the decayed p and lr * sign to p's dtype (CUDA)
    if name == "lion" and dtype != torch.float32:
        torch.testing.assert_close(p8, p32, atol=0, rtol=2.0**-7)
        assert not torch.equal(p8, p32)
    else:
        assert torch.equal(p8, p32)


def test_8bit_skip_zeros_one_state():
    torch.manual_seed(9)
    p = torch.randn(SHAPE)
    g = torch.randn(SHAPE) * 0.1
    g[:, ::4] = 0
    zero = g == 0
    q1, a1, qmap1 = _quantize_state(torch.randn(SHAPE) * 0.01)
    before = _dequantize_state(q1, a1, qmap1)
    p0 = p.clone()
    ops.optimizer_update_8bit_blockwise("momentum", g, p, q1, None, 0.9, 0.0, 0.0, 0.0, 1e-8, 2, 1e-2, qmap1, None,
                                        a1, None, 0.0, 1.0, True)
    after = _dequantize_state(q1, a1, qmap1)
    assert torch.equal(p[zero], p0[zero])
    assert not torch.equal(p[~zero], p0[~zero])
    # the kept states are requantized with the block's new absmax: close, not bit-equal
    torch.testing.assert_close(after[zero], before[zero], atol=REQUANT_ATOL * after.abs().max().item(), rtol=0)


def test_8bit_signed_state_keeps_its_sign():
    # bitsandbytes' sign fix: a tiny negative momentum next to a large one does not round to 0.0
    p = torch.zeros(256)
    g = torch.zeros(256)
    g[0] = 1.0
    g[1] = -1e-9
    q1, a1, qmap1 = _quantize_state(torch.zeros(256))
    ops.optimizer_update_8bit_blockwise("momentum", g, p, q1, None, 0.9, 0.0, 0.0, 0.0, 1e-8, 1, 1e-2, qmap1, None,
                                        a1, None, 0.0, 1.0, False)
    state = _dequantize_state(q1, a1, qmap1)
    assert state[0].item() == 1.0
    assert state[1].item() < 0 and q1[1].item() == 126


@pytest.mark.parametrize("name", ["adam", "ademamix", "momentum", "lion"])
def test_optimizers_non_contiguous_equal_contiguous(name):
    torch.manual_seed(10)
    two = name in ("adam", "ademamix")
    lead = (2,) if name == "ademamix" else ()

    def strided(t):  # same values, transposed storage
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    p, g = torch.randn(3, 300), torch.randn(3, 300) * 0.1
    s1, s2 = torch.randn(*lead, 3, 300) * 0.01, torch.rand(3, 300) * 1e-3
    args = [(strided(p), strided(g), strided(s1), strided(s2) if two else None),
            (p.clone(), g.clone(), s1.clone(), s2.clone() if two else None)]
    assert not args[0][0].is_contiguous() and not args[0][2].is_contiguous()
    for P, G, S1, S2 in args:
        _update32(name, G, P, S1, S2, step=2, weight_decay=0.01)
    assert torch.equal(args[0][0], args[1][0]) and torch.equal(args[0][2], args[1][2])

    qmap1, qmap2 = dynamic_map(signed=True), dynamic_map(signed=False)
    results = []
    for P, G in ((strided(p), strided(g)), (p.clone(), g.clone())):
        S1 = torch.full((*lead, 300, 3), 127, dtype=torch.uint8).transpose(-1, -2)
        S2 = torch.zeros(300, 3, dtype=torch.uint8).transpose(-1, -2) if two else None
        if P.is_contiguous():
            S1, S2 = S1.contiguous(), None if S2 is None else S2.contiguous()
        A1, A2 = torch.zeros(*lead, 4), torch.zeros(4) if two else None
        ops.optimizer_update_8bit_blockwise(name, G, P, S1, S2, 0.9, 0.999, 0.9999, 5.0, 1e-8, 1, 1e-3, qmap1,
                                            qmap2 if two else None, A1, A2, 0.01, 1.0, False)
        results.append((P, S1, A1))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_optimizers_empty_parameters():
    e = torch.empty(0)
    for name in ("adam", "momentum"):
        two = name == "adam"
        p = e.clone()
        _update32(name, e, p, e.clone(), e.clone() if two else None)
        assert p.shape == (0,)
        s1 = torch.empty(0, dtype=torch.uint8)
        ops.optimizer_update_8bit_blockwise(
            name, e, p, s1, s1.clone() if two else None, 0.9, 0.999, 0.0, 0.0, 1e-8, 1, 1e-3, dynamic_map(),
            dynamic_map(signed=False) if two else None, torch.empty(0), torch.empty(0) if two else None, 0.0, 1.0, False,
        )
        assert p.shape == (0,)


def test_absmax_and_states_of_any_shape_with_the_right_numel():
    # The checks accept any shape with one absmax per block / one state per element (as
    # bitsandbytes' do); the values must not depend on that shape.
    A = torch.randn(256)
    code = dynamic_map()
    q, absmax = ops.quantize_blockwise(A, code, 64)
    expected = ops.dequantize_blockwise(q, absmax, code, 64, torch.float32)
    assert torch.equal(ops.dequantize_blockwise(q, absmax.view(-1, 1), code, 64, torch.float32), expected)
    packed, absmax = ops.quantize_4bit(A.view(8, 32), 64, "nf4", torch.uint8)
    expected = ops.dequantize_4bit(packed, absmax, 64, "nf4", [8, 32], torch.float32)
    assert torch.equal(ops.dequantize_4bit(packed, absmax.view(2, 2), 64, "nf4", [8, 32], torch.float32), expected)
    x = torch.randn(3, 32)
    assert torch.equal(ops.gemm_4bit(x, packed, [8, 32], absmax.view(4, 1), 64, "nf4"), ops.gemm_4bit(x, packed, [8, 32], absmax, 64, "nf4"))

    p, g = torch.randn(3, 100), torch.randn(3, 100) * 0.1
    s1, s2 = torch.randn(3, 100) * 0.01, torch.rand(3, 100) * 1e-3
    results = []
    for shape in ((3, 100), (300,)):
        P, S1, S2 = p.clone(), s1.clone().reshape(shape), s2.clone().reshape(shape)
        _update32("adam", g.reshape(shape), P, S1, S2, step=2, weight_decay=0.01, skip_zeros=True)
        assert S1.shape == shape
        results.append((P, S1.reshape(3, 100), S2.reshape(3, 100)))
    for a, b in zip(*results):
        assert torch.equal(a, b)

    qmap = dynamic_map()
    results = []
    for shape, absmax_shape in (((3, 100), (2,)), ((300,), (2, 1))):
        P = p.clone()
        S1, A1 = ops.quantize_blockwise(s1.reshape(shape), qmap, 256)
        A1 = A1.reshape(absmax_shape)
        ops.optimizer_update_8bit_blockwise("momentum", g, P, S1, None, 0.9, 0.0, 0.0, 0.0, 1e-8, 2, 1e-2, qmap, None,
                                            A1, None, 0.0, 1.0, False)
        assert S1.shape == shape and A1.shape == absmax_shape
        results.append((P, S1.reshape(-1), A1.reshape(-1)))
    for a, b in zip(*results):
        assert torch.equal(a, b)
