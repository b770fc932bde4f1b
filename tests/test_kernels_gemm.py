"""Fused 4-bit matmul kernels (``inductor_quant.kernels.gemm``) and their GPU op registrations.

CPU: the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET) on small
shapes and must match the float64 product of the dequantized weight and the pure-torch reference
(which rounds the weight to A's dtype first). The interpreter has no bf16 arithmetic, so CPU cases
use fp32 and fp16; bf16 and the warp-shuffle code lookup are checked on the GPU. The registered
GPU functions are called directly with CPU tensors to test their argument handling (reshape, out,
errors), since the dispatcher sends CPU tensors to the CPU kernels.

GPU (skipped without CUDA): real sizes through ``torch.ops.inductor_quant``, against float64 and
bitsandbytes' CUDA kernels.
"""

from __future__ import annotations

import pytest
import torch

from inductor_quant.code_tables import dynamic_map, get_4bit_code
from inductor_quant.kernels import gemm as kernels
from inductor_quant.ops import triton_gemm
from inductor_quant.reference import blockwise as ref_blockwise
from inductor_quant.reference import fourbit as ref

from conftest import requires_cuda

# Relative error bounds ||out - target|| / ||target||: float64 of the exact weight, and the
# reference (whose weight is rounded to A's dtype, so its own error is of that order).
REL_TOL_F64 = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}
REL_TOL_REF = {torch.float32: 1e-5, torch.float16: 1.5e-3, torch.bfloat16: 6e-3}


def _rel(out: torch.Tensor, target: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output has NaN/Inf (an element was not written?)"
    return ((out.double() - target.double()).norm() / target.double().norm()).item()


class Weight:
    """A random weight quantized as bitsandbytes does, optionally with double-quantized absmax."""

    def __init__(self, N, K, blocksize=64, quant_type="nf4", storage=torch.uint8, nested=False, device="cpu"):
        self.N, self.K, self.blocksize, self.quant_type = N, K, blocksize, quant_type
        W = torch.randn(N, K, device=device)
        self.B, absmax = ref.quantize_4bit(W, blocksize, quant_type, storage)
        self.code = get_4bit_code(quant_type, device)
        self.nested = {}
        if nested:
            offset = absmax.mean()
            absmax_8bit, absmax2 = ref_blockwise.quantize_blockwise(absmax - offset, dynamic_map(device=device), 256)
            self.nested = dict(absmax_8bit=absmax_8bit, absmax_code=dynamic_map(device=device), absmax_offset=offset)
            self.absmax = absmax2
        else:
            self.absmax = absmax
        scales = ref.resolve_absmax(self.absmax, **self.nested) if nested else self.absmax
        self.dequant_fp32 = ref.dequantize_4bit(self.B, scales, blocksize, quant_type, [N, K], torch.float32)

    def fused(self, A2, bias=None, **kw):
        return kernels.gemm_4bit_fused(
            A2, self.B, self.N, self.K, self.absmax, self.code, self.blocksize, bias, **self.nested, **kw
        )

    def float64(self, A, bias=None):
        out = A.double() @ self.dequant_fp32.double().T
        return out + bias.double() if bias is not None else out

    def reference(self, A, bias=None):
        return ref.gemm_4bit(A, self.B, [self.N, self.K], self.absmax, self.blocksize, self.quant_type, bias,
                             **self.nested)


def _check(out, A, weight, bias=None):
    assert out.dtype == A.dtype and out.shape == (*A.shape[:-1], weight.N)
    assert _rel(out, weight.float64(A, bias)) < REL_TOL_F64[A.dtype]
    assert _rel(out, weight.reference(A, bias)) < REL_TOL_REF[A.dtype]


# ------------------------------------------------------------------------------------------------
# CPU (interpreter): the three kernels directly
# ------------------------------------------------------------------------------------------------

# (path, M, N, K, blocksize, quant_type, dtype, bias, nested): every value of every axis appears.
FUSED_CASES = [
    ("gemv", 1, 64, 256, 64, "nf4", torch.float32, False, False),
    ("gemv", 1, 48, 512, 128, "fp4", torch.float16, True, False),
    ("gemv", 1, 64, 256, 32, "nf4", torch.float32, True, True),
    ("gemv", 3, 40, 192, 64, "fp4", torch.float32, False, True),
    # whole K-tiles (1024 / 2048 codes) followed by a masked partial one
    ("gemv", 1, 24, 1280, 64, "nf4", torch.float32, True, True),
    ("gemv", 2, 40, 2304, 128, "fp4", torch.float16, False, False),
    ("dot", 3, 64, 256, 64, "nf4", torch.float32, True, False),
    ("dot", 16, 80, 256, 64, "fp4", torch.float16, False, True),
    ("dot", 16, 64, 128, 32, "nf4", torch.float16, True, True),
    ("dot", 1, 32, 256, 256, "fp4", torch.float32, False, False),
    ("generic", 1, 33, 100, 32, "nf4", torch.float32, True, False),
    ("generic", 3, 64, 96, 64, "fp4", torch.float16, False, True),
    ("generic", 16, 24, 64, 64, "nf4", torch.float32, True, True),
]


@pytest.mark.parametrize("path, M, N, K, blocksize, quant_type, dtype, has_bias, nested", FUSED_CASES)
def test_fused_matches_float64_and_reference(path, M, N, K, blocksize, quant_type, dtype, has_bias, nested):
    weight = Weight(N, K, blocksize, quant_type, nested=nested)
    A = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype) if has_bias else None
    out = torch.full((M, N), float("nan"), dtype=dtype)
    weight.fused(A, bias, out=out, path=path)
    _check(out, A, weight, bias)


@pytest.mark.parametrize("path", ["gemv", "dot"])
def test_tiles_smaller_than_a_block(path):
    """BLOCK_K < blocksize: one scale covers several K-tiles; rows do not fill whole tiles."""
    weight = Weight(50, 512, blocksize=256)
    A = torch.randn(2, 512)
    config = kernels.KernelConfig(block_n=16, block_k=64, num_warps=4, block_m=16)
    _check(weight.fused(A, path=path, config=config), A, weight)


@pytest.mark.parametrize("split_k, has_bias, act_left", [(2, True, False), (4, False, True), (1, True, True)])
def test_dot_split_k_reduces_deterministically_and_resets_counters(split_k, has_bias, act_left):
    weight = Weight(40, 1024, nested=True)
    A = torch.randn(20, 1024, dtype=torch.float16)
    bias = torch.randn(40, dtype=torch.float16) if has_bias else None
    config = kernels.KernelConfig(block_n=64, block_k=128, num_warps=4, block_m=16, split_k=split_k,
                                  act_left=act_left)
    out = weight.fused(A, bias, path="dot", config=config)
    _check(out, A, weight, bias)
    assert (kernels._counters(1, A.device) == 0).all()
    again = weight.fused(A, bias, path="dot", config=config)
    torch.testing.assert_close(again, out, rtol=0, atol=0)


def test_split_k_choice():
    cpu = torch.device("cpu")  # counts as 4 multiprocessors
    # Few tiles and a long K: split until 4 programs per multiprocessor (block_m <= 32) ...
    assert kernels._split_k(1, 4096, 128, 16, cpu) == 8
    assert kernels._split_k(64, 4096, 128, 16, cpu) == 1
    assert kernels._split_k(1, 512, 128, 16, cpu) == 1  # each split keeps >= 4 K-tiles
    assert kernels._split_k(1, 5 * 128 * 4, 128, 16, cpu) == 4  # K / 8 not a multiple of 128
    # ... or 1.5 per multiprocessor for block_m >= 64.
    assert kernels._split_k(1, 4096, 128, 64, cpu) == 8
    assert kernels._split_k(3, 4096, 128, 64, cpu) == 2


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32])
def test_quant_storage_is_viewed_back_to_bytes(storage):
    weight = Weight(32, 128, storage=storage)
    assert weight.B.dtype == storage
    A = torch.randn(1, 128)
    _check(weight.fused(A), A, weight)


def test_path_selection():
    aligned = torch.zeros(64, dtype=torch.uint8)
    assert kernels.fused_path(1, aligned, 256, 64) == "gemv"
    assert kernels.fused_path(5, aligned, 256, 64) == "dot"
    assert kernels.fused_path(1, aligned, 96, 64) == "generic"  # K % blocksize != 0
    assert kernels.fused_path(1, aligned[1:], 256, 64) == "generic"  # bytes not 4-byte aligned


def test_unaligned_layouts_take_the_generic_kernel():
    # Odd K (N * K odd): blocks and bytes straddle rows.
    weight = Weight(33, 65, blocksize=32, quant_type="fp4")
    A = torch.randn(3, 65)
    _check(weight.fused(A), A, weight)
    # Packed bytes at an odd address.
    weight = Weight(16, 128)
    shifted = torch.empty(weight.B.numel() + 1, dtype=torch.uint8)
    shifted[1:] = weight.B.reshape(-1)
    weight.B = shifted[1:]
    assert weight.B.data_ptr() % 4 != 0
    A = torch.randn(1, 128)
    _check(weight.fused(A), A, weight)


def _grouped(weights, biases=None):
    biases = biases or [None] * len(weights)
    return [kernels.QuantizedWeight(w.B, w.N, w.absmax, **w.nested, bias=b) for w, b in zip(weights, biases)]


def _check_grouped(out, A, weights, biases=None):
    biases = biases or [None] * len(weights)
    assert out.shape == (A.shape[0], sum(w.N for w in weights))
    column = 0
    for w, b in zip(weights, biases):
        _check(out[:, column : column + w.N], A, w, b)
        column += w.N


@pytest.mark.parametrize(
    "sizes, K, dtype, nested, has_bias",
    [
        ((64, 30, 46), 256, torch.float32, False, False),  # q/k/v-like: tails inside every weight
        ((40, 40), 512, torch.float16, True, True),  # gate/up-like
        ((8, 16, 24, 12), 128, torch.float32, True, False),  # four weights: every kernel slot
    ],
)
def test_grouped_gemv_one_launch_matches_each_weight(sizes, K, dtype, nested, has_bias, monkeypatch):
    weights = [Weight(N, K, nested=nested) for N in sizes]
    biases = [torch.randn(w.N).to(dtype) for w in weights] if has_bias else None
    A = torch.randn(1, K).to(dtype)
    launches = []
    monkeypatch.setattr(kernels, "gemm_4bit_fused", lambda *a, **k: launches.append(a))  # must not be called
    out = torch.full((1, sum(sizes)), float("nan"), dtype=dtype)
    kernels.gemm_4bit_grouped_fused(A, _grouped(weights, biases), K, weights[0].code, 64, out=out)
    assert not launches
    _check_grouped(out, A, weights, biases)


@pytest.mark.parametrize(
    "M, mixed", [(3, False), (1, True)], ids=["several rows", "one nested, one plain weight"]
)
def test_grouped_falls_back_to_one_fused_call_per_weight(M, mixed):
    weights = [Weight(40, 256, nested=True), Weight(24, 256, nested=not mixed)]
    A = torch.randn(M, 256)
    out = torch.full((M, 64), float("nan"))
    kernels.gemm_4bit_grouped_fused(A, _grouped(weights), 256, weights[0].code, 64, out=out)
    _check_grouped(out, A, weights)


def _swiglu_float64(A, gate, up, biases=None):
    g, u = (w.float64(A, b) for w, b in zip((gate, up), biases or (None, None)))
    return torch.nn.functional.silu(g) * u


@pytest.mark.parametrize(
    "N, K, dtype, nested, has_bias",
    [(40, 512, torch.bfloat16, True, False), (33, 1280, torch.float16, False, True), (24, 256, torch.float32, True, True)],
)
def test_swiglu_gemv_writes_silu_gate_times_up(N, K, dtype, nested, has_bias):
    gate, up = Weight(N, K, nested=nested), Weight(N, K, nested=nested)
    biases = [torch.randn(N).to(dtype) for _ in range(2)] if has_bias else None
    A = (torch.randn(1, K) / K**0.5).to(dtype)  # products of order 1: the SiLU is not saturated
    out = torch.full((1, N), float("nan"), dtype=dtype)
    kernels.gemm_4bit_swiglu_fused(A, *_grouped([gate, up], biases), K, gate.code, 64, out=out)
    # the same products from the grouped GEMV (tiles sized for the same 2 N rows), combined as two ops would
    products = kernels.gemm_4bit_grouped_fused(A, _grouped([gate, up], biases), K, gate.code, 64)
    expected = ref.swiglu(*products.split(N, dim=1))
    ulp = {torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(out, expected, rtol=ulp, atol=ulp)  # the kernel's exp may differ by an ulp
    # three roundings to dtype (each product, the SiLU, the output) instead of one
    assert _rel(out, _swiglu_float64(A, gate, up, biases)) < 4 * REL_TOL_F64[dtype]


def test_swiglu_gemv_rejects_what_it_cannot_fuse():
    gate, up = Weight(40, 256), Weight(24, 256)
    with pytest.raises(ValueError, match="two word-aligned weights of one shape"):
        kernels.gemm_4bit_swiglu_fused(torch.randn(1, 256), *_grouped([gate, up]), 256, gate.code, 64)
    assert not kernels.swiglu_fusable(2, *_grouped([gate, gate]), 256, 64)


# ------------------------------------------------------------------------------------------------
# CPU: the registered GPU functions (argument handling), called with CPU tensors
# ------------------------------------------------------------------------------------------------


def test_gemm_op_function_handles_batch_dims_and_noncontiguous_A():
    weight = Weight(40, 128, nested=True)
    bias = torch.randn(40)
    A = torch.randn(2, 128, 3).transpose(1, 2)  # [2, 3, 128], K stride 3
    assert not A.is_contiguous()
    out = triton_gemm._gemm_4bit_gpu(A, weight.B, [40, 128], weight.absmax, 64, "nf4", bias, **weight.nested)
    _check(out, A, weight, bias)


def test_gemv_op_function_uses_every_row_and_the_given_table():
    weight = Weight(32, 128, quant_type="fp4")
    A = torch.randn(3, 128)
    out = triton_gemm._gemv_4bit_gpu(A, weight.B, [32, 128], weight.absmax, weight.code, 64)
    _check(out, A, weight)


def test_gemv_out_writes_only_its_elements():
    weight = Weight(24, 128)
    A = torch.randn(1, 2, 128)
    guard = torch.full((2 * 24 + 64,), 123.0)
    out = guard[32 : 32 + 2 * 24].view(1, 2, 24)
    out.fill_(float("nan"))
    triton_gemm._gemv_4bit_out_gpu(A, weight.B, [24, 128], weight.absmax, weight.code, 64, out)
    _check(out, A, weight)
    assert (guard[:32] == 123.0).all() and (guard[32 + 48 :] == 123.0).all()
    # A non-contiguous out is written through a copy.
    out_t = torch.full((24, 2), float("nan")).T.unsqueeze(0)
    triton_gemm._gemv_4bit_out_gpu(A, weight.B, [24, 128], weight.absmax, weight.code, 64, out_t)
    _check(out_t, A, weight)


def test_large_M_dequantizes_and_calls_linear():
    weight = Weight(16, 64)
    A = torch.randn(kernels.FUSED_MAX_M + 1, 64)
    out = triton_gemm._gemm_4bit_gpu(A, weight.B, [16, 64], weight.absmax, 64, "nf4")
    torch.testing.assert_close(out, weight.reference(A), rtol=0, atol=0)


def test_empty_inputs():
    weight = Weight(16, 64)
    out = triton_gemm._gemm_4bit_gpu(torch.randn(0, 64), weight.B, [16, 64], weight.absmax, 64, "nf4")
    assert out.shape == (0, 16)
    bias = torch.randn(16)
    empty = torch.empty(0, dtype=torch.uint8)
    out = triton_gemm._gemm_4bit_gpu(torch.randn(3, 0), empty, [16, 0], torch.empty(0), 64, "nf4", bias)
    torch.testing.assert_close(out, bias.expand(3, 16))


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(A=torch.randn(1, 128, dtype=torch.float64)), RuntimeError, "A must have dtype"),
        (dict(A=torch.randn(1, 96)), RuntimeError, "A.shape"),
        (dict(absmax=torch.ones(3)), RuntimeError, "absmax must have"),
        (dict(blocksize=48), ValueError, "blocksize"),
        (dict(quant_type="int4"), ValueError, "quant_type"),
        (dict(bias=torch.ones(31)), RuntimeError, "bias must be 1-D"),
        (dict(absmax_8bit=torch.zeros(64, dtype=torch.uint8)), ValueError, "given together"),
        (dict(B=torch.zeros(10, dtype=torch.uint8)), RuntimeError, "B must hold"),
    ],
)
def test_gemm_bad_inputs_raise_naming_the_argument(change, error, match):
    args = dict(A=torch.randn(1, 128), B=torch.zeros(32 * 64, dtype=torch.uint8), shapeB=[32, 128],
                absmax=torch.ones(64), blocksize=64, quant_type="nf4", bias=None)
    args.update(change)
    with pytest.raises(error, match=match):
        triton_gemm._gemm_4bit_gpu(**args)


def test_gemv_bad_code_table_raises():
    with pytest.raises(RuntimeError, match="code must be a 1-D table of 16"):
        triton_gemm._gemv_4bit_gpu(torch.randn(1, 128), torch.zeros(32 * 64, dtype=torch.uint8), [32, 128],
                                   torch.ones(64), torch.ones(8), 64)


def test_grouped_op_function_reshapes_and_takes_the_large_M_path():
    weights = [Weight(40, 128, nested=True), Weight(24, 128, nested=True)]
    args = (
        [w.B for w in weights], [40, 24], [w.absmax for w in weights], 64, "nf4", None,
        *([w.nested[k] for w in weights] for k in ("absmax_8bit", "absmax_code", "absmax_offset")),
    )
    for A in (torch.randn(1, 1, 128), torch.randn(2, 3, 128), torch.randn(kernels.FUSED_MAX_M + 1, 128)):
        out = triton_gemm._gemm_4bit_grouped_gpu(A, *args)
        assert out.shape == (*A.shape[:-1], 64)
        _check_grouped(out.reshape(-1, 64), A.reshape(-1, 128), weights)


def test_swiglu_op_function_fuses_one_row_and_falls_back_otherwise():
    gate, up = Weight(40, 256, nested=True), Weight(40, 256, nested=True)
    args = (
        [gate.B, up.B], [40, 40], [gate.absmax, up.absmax], 64, "nf4", None,
        *([w.nested[k] for w in (gate, up)] for k in ("absmax_8bit", "absmax_code", "absmax_offset")),
    )
    for A in (torch.randn(1, 1, 256) / 16, torch.randn(2, 3, 256) / 16):
        out = triton_gemm._gemm_4bit_swiglu_gpu(A, *args)
        assert out.shape == (*A.shape[:-1], 40)
        expected = ops.gemm_4bit_swiglu(A, *args)  # the CPU kernel: reference products, reference.swiglu
        assert _rel(out, expected) < REL_TOL_REF[torch.float32]


def test_registered_for_gpu_device_types():
    for op in ("inductor_quant::gemm_4bit", "inductor_quant::gemm_4bit_grouped", "inductor_quant::gemv_4bit",
               "inductor_quant::gemv_4bit.out", "inductor_quant::gemm_4bit_swiglu"):
        for key in ("CUDA", "XPU"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), (op, key)


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------

ops = torch.ops.inductor_quant


def _bnb():
    return pytest.importorskip("bitsandbytes")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 4, 16, 64, 300])
@pytest.mark.parametrize("quant_type, nested", [("nf4", True), ("fp4", False)])
def test_gpu_gemm_op(dtype, M, quant_type, nested):
    N, K = 3072, 4096
    weight = Weight(N, K, 64, quant_type, nested=nested, device="cuda")
    A = torch.randn(M, K, device="cuda").to(dtype)
    bias = torch.randn(N, device="cuda").to(dtype)
    out = ops.gemm_4bit(A, weight.B, [N, K], weight.absmax, 64, quant_type, bias, **weight.nested)
    _check(out, A, weight, bias)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N, K, blocksize", [(4096, 4096, 64), (1000, 5120, 128), (512, 2048, 4096)])
def test_gpu_gemv_vs_bitsandbytes(dtype, N, K, blocksize):
    """At least as close to float64 as bitsandbytes' CUDA gemv (M = 1, its only valid case)."""
    bnb = _bnb()
    W = torch.randn(N, K, device="cuda", dtype=dtype)
    B, state = bnb.functional.quantize_4bit(W, blocksize=blocksize, quant_type="nf4")
    A = torch.randn(1, 1, K, device="cuda", dtype=dtype)
    exact = A.double() @ bnb.functional.dequantize_4bit(B, state).double().T
    ours = ops.gemv_4bit(A, B, [N, K], state.absmax, state.code, blocksize)
    theirs = bnb.functional.gemv_4bit(A, B, state=state)
    assert _rel(ours, exact) <= max(1.2 * _rel(theirs, exact), REL_TOL_F64[dtype] / 4)
    assert _rel(ours, theirs) < REL_TOL_REF[dtype]
    out = torch.full_like(ours, float("nan"))
    ops.gemv_4bit.out(A, B, [N, K], state.absmax, state.code, blocksize, out=out)
    torch.testing.assert_close(out, ours, rtol=0, atol=0)


@requires_cuda
@pytest.mark.parametrize("M", [1, 4, 16, 64, 200])
def test_gpu_gemm_vs_bitsandbytes_nested(M):
    bnb = _bnb()
    if not hasattr(torch.ops.bitsandbytes, "gemm_4bit"):
        pytest.skip("this bitsandbytes has no gemm_4bit op")
    N, K = 4096, 4096
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    B, state = bnb.functional.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    A = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    nested = dict(absmax_8bit=state.absmax, absmax_code=state.state2.code, absmax_offset=state.offset)
    ours = ops.gemm_4bit(A, B, [N, K], state.state2.absmax, 64, "nf4", bias, **nested)
    theirs = torch.ops.bitsandbytes.gemm_4bit(A, B, [N, K], state.state2.absmax, 64, "nf4", bias, **nested)
    exact = A.double() @ bnb.functional.dequantize_4bit(B, state).double().T + bias.double()
    assert _rel(ours, exact) <= max(1.2 * _rel(theirs, exact), REL_TOL_F64[torch.bfloat16] / 4)


@requires_cuda
@pytest.mark.parametrize("path", ["gemv", "dot", "generic"])
def test_gpu_shuffle_lookup_matches_gather(path):
    """The warp-shuffle code lookup equals the gather (same products, same order)."""
    weight = Weight(1024, 2048, 64, "fp4", device="cuda")
    A = torch.randn(1 if path == "gemv" else 16, 2048, device="cuda", dtype=torch.bfloat16)
    out = weight.fused(A, path=path, config=kernels.KernelConfig(64, 128, 4, 16, split_k=1) if path == "dot" else None)
    _check(out, A, weight)
    if path != "generic":
        args = (A, weight.B.reshape(-1), weight.code, weight.absmax, *([weight.absmax] * 4))
        gather = torch.empty_like(out)
        cfg = kernels._gemv_config(1024, 2048) if path == "gemv" else kernels._dot_config(A.shape[0], 1024, 2048)
        if path == "gemv":
            kernels._gemv_4bit_kernel[(1024 // cfg.block_n,)](
                *args, gather, 1, 1024, 2048, 2048, 1024, BLOCKSIZE=64, NESTED=False, HAS_BIAS=False,
                BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, USE_SHFL=False, num_warps=cfg.num_warps)
        else:
            kernels._gemm_4bit_dot_kernel[(1024 // cfg.block_n,)](
                *args, gather, weight.absmax, weight.absmax, 16, 1024, 2048, 2048, 1024, BLOCKSIZE=64,
                NESTED=False, HAS_BIAS=False, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                SPLIT_K=1, ACT_LEFT=False, USE_SHFL=False, DOT_PRECISION="tf32", num_warps=cfg.num_warps)
        torch.testing.assert_close(out, gather, rtol=0, atol=0)


@requires_cuda
def test_gpu_unaligned_and_odd_shapes():
    for N, K, bs in [(1001, 4000, 64), (513, 1023, 32)]:
        weight = Weight(N, K, bs, device="cuda")
        for M in (1, 7):
            A = torch.randn(M, K, device="cuda", dtype=torch.float16)
            out = ops.gemm_4bit(A, weight.B, [N, K], weight.absmax, bs, "nf4")
            _check(out, A, weight)


@requires_cuda
def test_gpu_compiled_graph_calls_the_op():
    weight = Weight(2048, 2048, device="cuda")

    def f(x):
        return torch.relu(ops.gemm_4bit(x, weight.B, [2048, 2048], weight.absmax, 64, "nf4"))

    A = torch.randn(4, 2048, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(A), f(A), rtol=0, atol=0)


@requires_cuda
@pytest.mark.parametrize("N, K, nested", [(14336, 4096, True), (1000, 3008, False)])
def test_gpu_swiglu_gemv_equals_grouped_products(N, K, nested):
    """The SwiGLU launch (shuffle lookup, bf16) equals silu(gate) * up of the grouped GEMV's products
    on the same tiles, up to the SiLU's last bit; through the op at one row and at several."""
    gate, up = Weight(N, K, 64, "nf4", nested=nested, device="cuda"), Weight(N, K, 64, "nf4", nested=nested, device="cuda")
    A = (torch.randn(1, K, device="cuda") / K**0.5).to(torch.bfloat16)
    out = torch.full((1, N), float("nan"), device="cuda", dtype=torch.bfloat16)
    kernels.gemm_4bit_swiglu_fused(A, *_grouped([gate, up]), K, gate.code, 64, out=out)
    products = kernels.gemm_4bit_grouped_fused(A, _grouped([gate, up]), K, gate.code, 64)
    torch.testing.assert_close(out, ref.swiglu(*products.split(N, dim=1)), rtol=2**-7, atol=2**-7)
    assert _rel(out, _swiglu_float64(A, gate, up)) < 4 * REL_TOL_F64[torch.bfloat16]
    nested_lists = [[w.nested[k] for w in (gate, up)] for k in ("absmax_8bit", "absmax_code", "absmax_offset")] if nested else []
    for rows in (1, 3):
        A_rows = (torch.randn(rows, K, device="cuda") / K**0.5).to(torch.bfloat16)
        op_out = ops.gemm_4bit_swiglu(A_rows, [gate.B, up.B], [N, N], [gate.absmax, up.absmax], 64, "nf4", None, *nested_lists)
        assert _rel(op_out, _swiglu_float64(A_rows, gate, up)) < 4 * REL_TOL_F64[torch.bfloat16]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sizes, nested", [((4096, 1024, 1024), True), ((1000, 3000), False)])
def test_gpu_grouped_gemv_equals_separate_gemms(dtype, sizes, nested):
    """The grouped launch (shuffle lookup) gives each weight's fused GEMV result bit for bit when
    both use the same tiles (same per-row arithmetic, one launch)."""
    K = 4096
    weights = [Weight(N, K, 64, "nf4", nested=nested, device="cuda") for N in sizes]
    A = torch.randn(1, K, device="cuda").to(dtype)
    nested_lists = [[w.nested[k] for w in weights] for k in ("absmax_8bit", "absmax_code", "absmax_offset")] if nested else []
    out = ops.gemm_4bit_grouped(A, [w.B for w in weights], list(sizes), [w.absmax for w in weights], 64, "nf4", None,
                                *nested_lists)
    config = kernels._gemv_config(sum(sizes), K)  # the grouped launch's tiles
    separate = torch.cat([
        kernels.gemm_4bit_fused(A, w.B, w.N, K, w.absmax, w.code, 64, **w.nested, path="gemv", config=config)
        for w in weights
    ], 1)
    torch.testing.assert_close(out, separate, rtol=0, atol=0)
    _check_grouped(out, A, weights)
