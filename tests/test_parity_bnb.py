"""Parity with bitsandbytes 0.50.2 on CPU (``torch.ops.bitsandbytes``).

What runs on CPU in bitsandbytes 0.50.2: C++ kernels for 8-bit quantize/dequantize and 4-bit
dequantize (``backends/cpu``); pure torch for 4-bit quantize, gemv/gemm and, through its own
``default`` backend, a nearest-code 8-bit quantizer (``backends/default``); pure-torch CPU
optimizer kernels for both state widths. Dequantization must be bit-exact; quantized codes must
agree except in the documented cases; optimizer steps must stay within bitsandbytes' own test
tolerances (bitsandbytes.md §6, one-step protocol: both sides restart every step from the same
params and states).
"""

import math

import pytest
import torch

import inductor_quant.ops  # noqa: F401  (registers the ops)
from inductor_quant.code_tables import FP4_RANK_TO_CODE, FP4_THRESHOLDS, code_midpoints, dynamic_map, get_4bit_code

bitsandbytes = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes==0.50.2)")

ops = torch.ops.inductor_quant
bnb = torch.ops.bitsandbytes
DEFAULT_BACKEND = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)

pytestmark = pytest.mark.skipif(
    bitsandbytes.__version__ != "0.50.2", reason=f"parity is pinned to bitsandbytes 0.50.2, found {bitsandbytes.__version__}"
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


@pytest.fixture(autouse=True)
def _bitsandbytes_eager():
    # bitsandbytes' default backend wraps some kernels in torch.compile (seconds per new shape);
    # its eager numerics are the same, so run it eagerly.
    with torch._dynamo.config.patch(disable=True):
        yield


def _ids(value):
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def _codes_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    b = packed.contiguous().view(torch.uint8).reshape(-1)
    return torch.stack((b >> 4, b & 0xF), dim=1).reshape(-1)[:n]


# ---------------------------------------------------------------------------------------------
# Dequantize: bit-exact on the same codes and absmax
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_dequantize_blockwise_bit_exact(dtype, blocksize):
    n = 3 * blocksize + 17
    q = torch.randint(0, 256, (n,), dtype=torch.uint8)
    absmax = torch.rand(-(-n // blocksize)) * 4
    absmax[1] = 0.0
    code = dynamic_map()
    ours = ops.dequantize_blockwise(q, absmax, code, blocksize, dtype)
    theirs = bnb.dequantize_blockwise(q, absmax, code, blocksize, dtype)
    assert torch.equal(_bits(ours), _bits(theirs))
    # also with the unsigned map and a 2-D code tensor
    q2 = q[: 2 * blocksize].view(2, blocksize)
    code = dynamic_map(signed=False)
    assert torch.equal(
        _bits(ops.dequantize_blockwise(q2, absmax[:2], code, blocksize, dtype)),
        _bits(bnb.dequantize_blockwise(q2, absmax[:2], code, blocksize, dtype)),
    )


@pytest.mark.parametrize("shape", [(8, 200), (7, 33), (3, 3000)], ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 2048, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_dequantize_4bit_bit_exact(dtype, quant_type, blocksize, shape):
    # (7, 33): odd last dim; 2048/4096: bitsandbytes' pure-torch fallback; the others its C++ kernel
    n = shape[0] * shape[1]
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.rand(-(-n // blocksize)) * 4
    ours = ops.dequantize_4bit(packed, absmax, blocksize, quant_type, list(shape), dtype)
    theirs = bnb.dequantize_4bit(packed, absmax, blocksize, quant_type, list(shape), dtype)
    assert ours.shape == theirs.shape and torch.equal(ours, theirs)
    differ = _bits(ours) != _bits(theirs)
    if quant_type == "fp4":
        # bitsandbytes' pure-torch path reads +0.0 for code 0b1000 from its Python table; its C++
        # and CUDA kernels (and we) give -0.0. Only the sign of those zeros may differ.
        codes = _codes_4bit(packed, n).view(shape)
        assert (codes[differ] == 0b1000).all() and (ours[differ] == 0).all()
    else:
        assert not differ.any()


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32], ids=_ids)
def test_dequantize_4bit_storage_and_flat_shape(storage):
    W = torch.randn(16, 128)
    packed, absmax = ops.quantize_4bit(W, 64, "nf4", storage)
    ours = ops.dequantize_4bit(packed, absmax, 64, "nf4", [16, 128], torch.bfloat16)
    assert torch.equal(_bits(ours), _bits(bnb.dequantize_4bit(packed, absmax, 64, "nf4", [16, 128], torch.bfloat16)))
    # a 1-D shape: bitsandbytes' CPU kernel returns (1, n); ours returns exactly `shape`
    flat = ops.dequantize_4bit(packed, absmax, 64, "nf4", [2048], torch.float32)
    theirs = bnb.dequantize_4bit(packed, absmax, 64, "nf4", [2048], torch.float32)
    assert flat.shape == (2048,) and theirs.shape == (1, 2048)
    assert torch.equal(flat, theirs.reshape(-1))


# ---------------------------------------------------------------------------------------------
# Quantize: codes equal except the documented cases
# ---------------------------------------------------------------------------------------------


def _random_input(dtype, blocksize):
    A = torch.randn(300, 701, dtype=dtype)  # n % blocksize != 0 for every blocksize
    A.view(-1)[3 * blocksize : 4 * blocksize] = 0  # an all-zero block
    return A


@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_quantize_blockwise_codes(dtype, blocksize):
    A = _random_input(dtype, blocksize)
    code = dynamic_map()
    q, absmax = ops.quantize_blockwise(A, code, blocksize)
    # bitsandbytes' pure-torch quantizer (nearest code, ties low, clamp): identical codes
    q_default, absmax_default = bnb.quantize_blockwise.default.redispatch(DEFAULT_BACKEND, A, code, blocksize)
    assert torch.equal(absmax, absmax_default)
    assert torch.equal(q, q_default)
    # its CPU C++ kernel (what bnb.quantize_blockwise runs on CPU) approximates the search: it
    # disagrees on ~0.2% of elements and is then never nearer than us; zero blocks get code 0
    q_cpu, absmax_cpu = bnb.quantize_blockwise(A, code, blocksize)
    assert torch.equal(absmax, absmax_cpu)
    flat, flat_cpu = q.reshape(-1).long(), q_cpu.reshape(-1).long()
    zero_block = torch.zeros_like(flat, dtype=torch.bool)
    zero_block[3 * blocksize : 4 * blocksize] = True
    assert (flat_cpu[zero_block] == 0).all() and (flat[zero_block] == 127).all()
    differ = (flat != flat_cpu) & ~zero_block
    assert differ.float().mean().item() < 5e-3
    xn = A.reshape(-1).float() * torch.reciprocal(absmax).repeat_interleave(blocksize)[: A.numel()]
    ours_err = (code.double()[flat[differ]] - xn[differ].double()).abs()
    cpu_err = (code.double()[flat_cpu[differ]] - xn[differ].double()).abs()
    # a value exactly on the fp32 midpoint of its two codes is a tie: we take the lower code
    tie = xn[differ] == code_midpoints(code)[torch.minimum(flat[differ], flat_cpu[differ])]
    assert ((ours_err <= cpu_err) | (tie & (flat[differ] < flat_cpu[differ]))).all()
    # dequantized zero blocks are zeros on both sides
    dq_cpu = bnb.dequantize_blockwise(q_cpu, absmax_cpu, code, blocksize, dtype).reshape(-1)
    assert (dq_cpu[zero_block] == 0).all()


def _fp4_tie_window(xn: torch.Tensor) -> torch.Tensor:
    """|xn| between one of bitsandbytes' FP4 literal thresholds and the fp32 midpoint it stands
    for (inclusive): CUDA (and we) compare with the literal, bitsandbytes' pure-torch quantizer
    with the midpoint, so the two may pick neighbouring codes there (bitsandbytes.md §2.2)."""
    literal = torch.tensor(FP4_THRESHOLDS, dtype=torch.float32)
    ranked = get_4bit_code("fp4")[list(FP4_RANK_TO_CODE)]
    midpoint = code_midpoints(ranked)
    lo, hi = torch.minimum(literal, midpoint), torch.maximum(literal, midpoint)
    a = xn.abs().unsqueeze(-1)
    return ((a >= lo) & (a <= hi)).any(-1)


@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_quantize_4bit_codes(dtype, quant_type, blocksize):
    A = _random_input(dtype, blocksize)
    n = A.numel()
    packed, absmax = ops.quantize_4bit(A, blocksize, quant_type, torch.uint8)
    packed_b, absmax_b = bnb.quantize_4bit(A, blocksize, quant_type, torch.uint8)
    assert packed.shape == packed_b.shape and torch.equal(absmax, absmax_b)
    codes, codes_b = _codes_4bit(packed, n), _codes_4bit(packed_b, n)
    ours = ops.dequantize_4bit(packed, absmax, blocksize, quant_type, [n], torch.float32)
    theirs = ops.dequantize_4bit(packed_b, absmax_b, blocksize, quant_type, [n], torch.float32)
    differ = codes != codes_b
    if quant_type == "nf4":
        # same nearest-code rule on the same fp32 normalized values, zero blocks included
        assert not differ.any()
        return
    xn = A.reshape(-1).float() * torch.reciprocal(absmax).repeat_interleave(blocksize)[:n]
    signed_zero = (ours == 0) & (theirs == 0)  # +0 vs -0 codes: bitsandbytes maps +tiny to 0b1000
    tie = _fp4_tie_window(xn)
    assert (signed_zero | tie)[differ].all(), "FP4 codes may differ only at ±0 and in the literal windows"
    assert (ours[~tie] == theirs[~tie]).all()
    # the windows hold exact real ties such as 7/12 (frequent with bf16/fp16 inputs), so a few
    # values differ there; everywhere else the values are equal
    assert (ours != theirs).float().mean().item() < 2e-3


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_4bit_storage_bytes(quant_type):
    A = torch.randn(32, 64)
    for storage in (torch.bfloat16, torch.float16, torch.float32):
        packed, _ = ops.quantize_4bit(A, 64, quant_type, storage)
        packed_b, _ = bnb.quantize_4bit(A, 64, quant_type, storage)
        assert packed.dtype == packed_b.dtype == storage and packed.shape == packed_b.shape
        if quant_type == "nf4":
            assert torch.equal(packed.view(torch.uint8), packed_b.view(torch.uint8))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_gemv_gemm_match_bitsandbytes(dtype, quant_type):
    if torch._C._dispatch_has_kernel_for_dispatch_key("bitsandbytes::gemv_4bit", "CPU"):
        pytest.skip("this CPU has avx512_bf16: bitsandbytes' gemv_4bit runs its fused bf16 kernel, not dequant+linear")
    N, K = 48, 256
    W = torch.randn(N, K, dtype=dtype)
    packed, absmax = ops.quantize_4bit(W, 64, quant_type, torch.uint8)
    A = torch.randn(3, K, dtype=dtype)
    code = get_4bit_code(quant_type)
    assert torch.equal(ops.gemv_4bit(A, packed, [N, K], absmax, code, 64), bnb.gemv_4bit(A, packed, [N, K], absmax, code, 64))
    bias = torch.randn(N, dtype=dtype)
    assert torch.equal(
        ops.gemm_4bit(A, packed, [N, K], absmax, 64, quant_type, bias), bnb.gemm_4bit(A, packed, [N, K], absmax, 64, quant_type, bias)
    )
    offset = absmax.mean()
    qcode = dynamic_map()
    absmax_8bit, outer = ops.quantize_blockwise(absmax - offset, qcode, 256)
    assert torch.equal(
        ops.gemm_4bit(A, packed, [N, K], outer, 64, quant_type, None, absmax_8bit, qcode, offset),
        bnb.gemm_4bit(A, packed, [N, K], outer, 64, quant_type, None, absmax_8bit, qcode, offset),
    )


# ---------------------------------------------------------------------------------------------
# Optimizers: 50 steps, one-step error protocol, bitsandbytes' tolerances
# ---------------------------------------------------------------------------------------------

SHAPE = (32, 257)  # 8224 elements: n % 256 != 0 (a partial last block)
TWO_STATE = ("adam", "lamb", "ademamix")
LR = {"adam": 1e-3, "lamb": 1e-3, "ademamix": 1e-3, "lion": 1e-4}


def _hyper(name):
    return dict(beta1=0.9, beta2=0.99 if name == "lion" else 0.999, beta3=0.9999, alpha=5.0, eps=1e-8,
                lr=LR.get(name, 1e-2), weight_decay=0.01, gnorm_scale=0.8)


# bitsandbytes test_optim: 32-bit states atol/rtol 1e-6/1e-5 (fp32), params up to 15 mismatches;
# bf16 params 1e-3/1e-2.
TOL_32BIT = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-3, rtol=1e-2)}


def _step32(op, name, g, p, s1, s2, unorm_vec, max_unorm, step, h):
    op(name, g, p, s1, s2, unorm_vec, max_unorm, p.float().norm().item(), h["beta1"], h["beta2"], h["beta3"],
       h["alpha"], h["eps"], h["weight_decay"], step, h["lr"], h["gnorm_scale"], False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_ids)
@pytest.mark.parametrize("name", ["adam", "lamb", "ademamix", "momentum", "lars", "rmsprop", "lion", "adagrad"])
def test_optimizer_32bit_parity(name, dtype):
    torch.manual_seed(11)
    h = _hyper(name)
    # lamb/lars: a max_unorm that never clips, where bitsandbytes' CPU norm and ours agree (the
    # norms themselves are compared in test_optimizer_32bit_update_norm)
    max_unorm = 1e4 if name in ("lamb", "lars") else 0.0
    p = torch.randn(SHAPE).to(dtype)
    s1 = torch.zeros((2, *SHAPE) if name == "ademamix" else SHAPE)
    s2 = torch.zeros(SHAPE) if name in TWO_STATE else None
    pb, s1b, s2b = p.clone(), s1.clone(), None if s2 is None else s2.clone()
    for step in range(1, 51):
        g = (torch.randn(SHAPE) * 0.1).to(dtype)
        unorm, unorm_b = (torch.zeros(1), torch.zeros(1)) if max_unorm else (None, None)
        _step32(ops.optimizer_update_32bit, name, g, p, s1, s2, unorm, max_unorm, step, h)
        _step32(bnb.optimizer_update_32bit, name, g, pb, s1b, s2b, unorm_b, max_unorm, step, h)
        torch.testing.assert_close(s1, s1b, atol=1e-6, rtol=1e-5)
        if s2 is not None:
            torch.testing.assert_close(s2, s2b, atol=1e-6, rtol=1e-5)
        close = torch.isclose(p.float(), pb.float(), **TOL_32BIT[dtype])
        assert (~close).sum().item() <= 15, f"step {step}: {(~close).sum().item()} params differ"
        pb.copy_(p), s1b.copy_(s1)  # one-step error: restart both sides from the same point
        if s2 is not None:
            s2b.copy_(s2)


def _quantized_zero_states(name, n_blocks):
    lead = (2,) if name == "ademamix" else ()
    s1 = torch.full((*lead, *SHAPE), 127, dtype=torch.uint8)  # code of 0.0 in the signed map
    a1 = torch.zeros(*lead, n_blocks)
    if name not in TWO_STATE:
        return s1, a1, None, None
    return s1, a1, torch.zeros(SHAPE, dtype=torch.uint8), torch.zeros(n_blocks)


def _dequantized(name, s, a, qmap):
    if s is None:
        return None
    if name == "ademamix" and s.dim() == len(SHAPE) + 1:
        return torch.stack([ops.dequantize_blockwise(s[i], a[i], qmap, 256, torch.float32) for i in range(2)])
    return ops.dequantize_blockwise(s, a, qmap, 256, torch.float32)


# bitsandbytes test_optim 8-bit: dequantized states beyond atol 3e-3 / rtol 1e-3 in fewer than 20
# elements; params mean |err| < 6e-5 and mean rel < 6e-4 (fp32), bf16 1.7e-4 / 1.6e-3.
PARAM_BARS = {torch.float32: (6e-5, 6e-4), torch.bfloat16: (1.7e-4, 1.6e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_ids)
@pytest.mark.parametrize("name", ["adam", "ademamix", "momentum", "rmsprop", "lion", "adagrad"])
def test_optimizer_8bit_parity(name, dtype):
    torch.manual_seed(12)
    h = _hyper(name)
    qmap1, qmap2 = dynamic_map(signed=True), dynamic_map(signed=False)
    two = name in TWO_STATE
    n_blocks = -(-math.prod(SHAPE) // 256)
    p = torch.randn(SHAPE).to(dtype)
    s1, a1, s2, a2 = _quantized_zero_states(name, n_blocks)
    pb, s1b, a1b = p.clone(), s1.clone(), a1.clone()
    s2b, a2b = (s2.clone(), a2.clone()) if two else (None, None)
    mean_bar, rel_bar = PARAM_BARS[dtype]
    for step in range(1, 51):
        g = (torch.randn(SHAPE) * 0.1).to(dtype)
        for op, args in ((ops.optimizer_update_8bit_blockwise, (p, s1, s2, a1, a2)),
                         (bnb.optimizer_update_8bit_blockwise, (pb, s1b, s2b, a1b, a2b))):
            pp, ss1, ss2, aa1, aa2 = args
            op(name, g, pp, ss1, ss2, h["beta1"], h["beta2"], h["beta3"], h["alpha"], h["eps"], step, h["lr"],
               qmap1, qmap2 if two else None, aa1, aa2, h["weight_decay"], h["gnorm_scale"], False)
        for ours, theirs, qmap in ((s1, s1b, qmap1), (s2, s2b, qmap2)):
            if ours is None:
                continue
            a_ours, a_theirs = (a1, a1b) if ours is s1 else (a2, a2b)
            d_ours, d_theirs = _dequantized(name, ours, a_ours, qmap), _dequantized(name, theirs, a_theirs, qmap)
            far = ~torch.isclose(d_ours, d_theirs, atol=3e-3, rtol=1e-3)
            assert far.sum().item() < 20, f"step {step}: {far.sum().item()} state elements differ"
        err = (p.float() - pb.float()).abs()
        assert err.mean().item() < mean_bar
        assert (err / (pb.float().abs() + 1e-8)).mean().item() < rel_bar
        for ours, theirs in ((p, pb), (s1, s1b), (a1, a1b), (s2, s2b), (a2, a2b)):
            if ours is not None:
                theirs.copy_(ours)


# ---------------------------------------------------------------------------------------------
# Documented differences (docs/compatibility.md), asserted so a change on either side shows
# ---------------------------------------------------------------------------------------------


def test_adam_weight_decay_order():
    # bitsandbytes' CPU (and default/Triton) backends decay p before the update, CUDA and we after
    p = torch.tensor([1.0, -2.0, 0.5])
    g = torch.tensor([0.3, -0.1, 0.2])
    lr, wd = 0.1, 0.5
    ours, theirs = p.clone(), p.clone()
    for op, q in ((ops.optimizer_update_32bit, ours), (bnb.optimizer_update_32bit, theirs)):
        op("adam", g, q, torch.zeros(3), torch.zeros(3), None, 0.0, 0.0, 0.9, 0.999, 0.0, 0.0, 1e-8, wd, 1, lr, 1.0,
           False)
    u = torch.sign(g)  # first Adam step: m / (sqrt(v) + eps) with bias correction = sign(g)
    torch.testing.assert_close(ours, (p - lr * u) * (1 - lr * wd))
    torch.testing.assert_close(theirs, p * (1 - lr * wd) - lr * u)


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_optimizer_32bit_update_norm(name):
    # unorm_vec: we (and CUDA) store the squared norm of the bias-corrected update; bitsandbytes'
    # CPU kernel stores the norm of the uncorrected one, (c1 / c2) * sqrt(ours) for LAMB
    torch.manual_seed(13)
    p = torch.randn(SHAPE)
    g = torch.randn(SHAPE) * 0.1
    s1 = torch.randn(SHAPE) * 0.01
    s2 = torch.rand(SHAPE) * 1e-3 if name == "lamb" else None
    unorm, unorm_b = torch.zeros(1), torch.zeros(1)
    step, h = 3, _hyper(name)
    pb, s1b, s2b = p.clone(), s1.clone(), None if s2 is None else s2.clone()
    _step32(ops.optimizer_update_32bit, name, g, p, s1, s2, unorm, 1e4, step, h)
    _step32(bnb.optimizer_update_32bit, name, g, pb, s1b, s2b, unorm_b, 1e4, step, h)
    ratio = 1.0
    if name == "lamb":
        ratio = (1 - h["beta1"] ** step) / math.sqrt(1 - h["beta2"] ** step)
    torch.testing.assert_close(unorm_b, ratio * unorm.sqrt(), rtol=1e-4, atol=0)
    torch.testing.assert_close(p, pb, atol=1e-6, rtol=1e-5)


def test_skip_zeros_and_nan_gradients():
    # bitsandbytes' CPU kernels ignore skip_zeros and have no NaN guard; CUDA (and we) skip
    # zero-gradient elements in 32-bit and zero the 8-bit Adam states of NaN/Inf gradients
    p = torch.randn(512)
    g = torch.randn(512) * 0.1
    g[:10] = 0.0
    ours, theirs = p.clone(), p.clone()
    for op, q in ((ops.optimizer_update_32bit, ours), (bnb.optimizer_update_32bit, theirs)):
        op("momentum", g, q, torch.randn(512), None, None, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 1e-8, 0.0, 2, 1e-2, 1.0, True)
    assert torch.equal(ours[:10], p[:10]) and not torch.equal(theirs[:10], p[:10])

    g[5] = float("nan")
    qmap1, qmap2 = dynamic_map(signed=True), dynamic_map(signed=False)
    results = []
    for op in (ops.optimizer_update_8bit_blockwise, bnb.optimizer_update_8bit_blockwise):
        q, s1, s2 = p.clone(), torch.full((512,), 127, dtype=torch.uint8), torch.zeros(512, dtype=torch.uint8)
        a1, a2 = torch.zeros(2), torch.zeros(2)
        op("adam", g, q, s1, s2, 0.9, 0.999, 0.0, 0.0, 1e-8, 1, 1e-3, qmap1, qmap2, a1, a2, 0.0, 1.0, False)
        results.append((q, a1))
    (ours, a_ours), _ = results
    assert ours[5] == p[5] and torch.isfinite(ours).all() and torch.isfinite(a_ours).all()
    assert torch.isnan(results[1][0][5])


def test_8bit_sign_fix():
    # a tiny negative momentum next to a large one: CUDA (and we) move it to the smallest negative
    # code; bitsandbytes' CPU quantizer (not a nearest-code search) stores a positive code
    g = torch.zeros(256)
    g[0], g[1] = 1.0, -1e-9
    qmap1 = dynamic_map(signed=True)
    codes = []
    for op in (ops.optimizer_update_8bit_blockwise, bnb.optimizer_update_8bit_blockwise):
        s1, a1 = torch.full((256,), 127, dtype=torch.uint8), torch.zeros(1)
        op("momentum", g, torch.zeros(256), s1, None, 0.9, 0.0, 0.0, 0.0, 1e-8, 1, 1e-2, qmap1, None, a1, None, 0.0,
           1.0, False)
        codes.append(s1[1].item())
    assert codes[0] == 126 and qmap1[codes[0]] < 0
    assert qmap1[codes[1]] >= 0
