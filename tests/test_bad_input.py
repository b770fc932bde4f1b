"""Bad input never gives a silent wrong answer: every op raises before any kernel runs, with a
message that names the argument (and says what was expected).

Tensor metadata errors are ``RuntimeError`` (``torch._check``); bad non-tensor arguments
(blocksize, quant_type, dtype, optimizer name, step, shapes) are ``ValueError``. The same checks
run in the fake (meta) implementation, so ``torch.compile`` fails the same way at trace time.
"""

import pytest
import torch

import inductor_quant.ops  # noqa: F401  (registers the ops)
from inductor_quant.code_tables import dynamic_map, get_4bit_code

ops = torch.ops.inductor_quant

torch.manual_seed(0)
A = torch.randn(64, 64)
CODE = dynamic_map()
Q8, ABSMAX8 = ops.quantize_blockwise(A, CODE, 64)
P4, ABSMAX4 = ops.quantize_4bit(A, 64, "nf4", torch.uint8)
NF4 = get_4bit_code("nf4")
X = torch.randn(2, 64)
NESTED_8BIT, NESTED_ABSMAX = ops.quantize_blockwise(ABSMAX4 - ABSMAX4.mean(), CODE, 256)
OFFSET = ABSMAX4.mean()
SHAPEB = [64, 64]

CASES = {
    # quantize_blockwise
    "q8/A int": (lambda: ops.quantize_blockwise(A.int(), CODE, 64), RuntimeError, r"^A must have dtype in .*int32"),
    "q8/A float64": (lambda: ops.quantize_blockwise(A.double(), CODE, 64), RuntimeError, r"^A must have dtype .*float64"),
    "q8/blocksize 48": (lambda: ops.quantize_blockwise(A, CODE, 48), ValueError, r"^blocksize must be a power of two in \[32, 4096\], got 48"),
    "q8/blocksize 16": (lambda: ops.quantize_blockwise(A, CODE, 16), ValueError, r"^blocksize .*got 16"),
    "q8/blocksize 8192": (lambda: ops.quantize_blockwise(A, CODE, 8192), ValueError, r"^blocksize .*got 8192"),
    "q8/code length": (lambda: ops.quantize_blockwise(A, CODE[:255], 64), RuntimeError, r"^code must be a 1-D table of 256 entries"),
    "q8/code dtype": (lambda: ops.quantize_blockwise(A, CODE.half(), 64), RuntimeError, r"^code must have dtype .*float16"),
    "q8/code device": (lambda: ops.quantize_blockwise(A, CODE.to("meta"), 64), RuntimeError, r"^code must be on the same device as A"),
    # dequantize_blockwise (+ .out)
    "dq8/A float": (lambda: ops.dequantize_blockwise(Q8.float(), ABSMAX8, CODE, 64, torch.float32), RuntimeError, r"^A must have dtype in \(torch.uint8\)"),
    "dq8/absmax dtype": (lambda: ops.dequantize_blockwise(Q8, ABSMAX8.half(), CODE, 64, torch.float32), RuntimeError, r"^absmax must have dtype"),
    "dq8/absmax numel": (lambda: ops.dequantize_blockwise(Q8, ABSMAX8[:-1], CODE, 64, torch.float32), RuntimeError, r"^absmax must have 64 elements .*got 63"),
    "dq8/absmax device": (lambda: ops.dequantize_blockwise(Q8, ABSMAX8.to("meta"), CODE, 64, torch.float32), RuntimeError, r"^absmax must be on the same device as A"),
    "dq8/dtype int": (lambda: ops.dequantize_blockwise(Q8, ABSMAX8, CODE, 64, torch.int32), ValueError, r"^dtype must be one of .*int32"),
    "dq8/dtype float64": (lambda: ops.dequantize_blockwise(Q8, ABSMAX8, CODE, 64, torch.float64), ValueError, r"^dtype must be one of"),
    "dq8/blocksize": (lambda: ops.dequantize_blockwise(Q8, ABSMAX8, CODE, 48, torch.float32), ValueError, r"^blocksize .*got 48"),
    "dq8/out shape": (lambda: ops.dequantize_blockwise.out(Q8, ABSMAX8, CODE, 64, torch.float32, torch.empty(64, 63)), RuntimeError, r"^out must have shape \[64, 64\], got \[64, 63\]"),
    "dq8/out dtype": (lambda: ops.dequantize_blockwise.out(Q8, ABSMAX8, CODE, 64, torch.float32, torch.empty(64, 64, dtype=torch.half)), RuntimeError, r"^out must have dtype torch.float32"),
    # quantize_4bit
    "q4/quant_type": (lambda: ops.quantize_4bit(A, 64, "int4", torch.uint8), ValueError, r"^quant_type must be one of \('nf4', 'fp4'\), got 'int4'"),
    "q4/storage dtype": (lambda: ops.quantize_4bit(A, 64, "nf4", torch.int32), ValueError, r"^quant_storage must be one of .*int32"),
    "q4/storage not dividing": (lambda: ops.quantize_4bit(torch.randn(12), 32, "nf4", torch.float32), RuntimeError, r"^A\.numel\(\) must be a multiple of 8 .*quant_storage=torch.float32.*got 12"),
    "q4/storage odd n": (lambda: ops.quantize_4bit(torch.randn(33), 32, "fp4", torch.bfloat16), RuntimeError, r"^A\.numel\(\) must be a multiple of 4 .*got 33"),
    "q4/A int": (lambda: ops.quantize_4bit(A.long(), 64, "nf4", torch.uint8), RuntimeError, r"^A must have dtype"),
    "q4/blocksize": (lambda: ops.quantize_4bit(A, 48, "nf4", torch.uint8), ValueError, r"^blocksize .*got 48"),
    # dequantize_4bit (+ .out)
    "dq4/shape numel": (lambda: ops.dequantize_4bit(P4, ABSMAX4, 64, "nf4", [64, 63], torch.float32), RuntimeError, r"^A must hold \(n \+ 1\) // 2 = 2016 bytes for n = 4032"),
    "dq4/shape negative": (lambda: ops.dequantize_4bit(P4, ABSMAX4, 64, "nf4", [-64, -64], torch.float32), ValueError, r"^shape must hold non-negative sizes"),
    "dq4/absmax numel": (lambda: ops.dequantize_4bit(P4, ABSMAX4[:-1], 64, "nf4", [64, 64], torch.float32), RuntimeError, r"^absmax must have 64 elements"),
    "dq4/absmax dtype": (lambda: ops.dequantize_4bit(P4, ABSMAX4.half(), 64, "nf4", [64, 64], torch.float32), RuntimeError, r"^absmax must have dtype"),
    "dq4/quant_type": (lambda: ops.dequantize_4bit(P4, ABSMAX4, 64, "nf5", [64, 64], torch.float32), ValueError, r"^quant_type must be one of"),
    "dq4/A dtype": (lambda: ops.dequantize_4bit(torch.zeros(512, 1, dtype=torch.int32), ABSMAX4, 64, "nf4", [64, 64], torch.float32), RuntimeError, r"^A must have dtype in .*int32"),
    "dq4/blocksize": (lambda: ops.dequantize_4bit(P4, ABSMAX4, 96, "nf4", [64, 64], torch.float32), ValueError, r"^blocksize .*got 96"),
    "dq4/dtype": (lambda: ops.dequantize_4bit(P4, ABSMAX4, 64, "nf4", [64, 64], torch.uint8), ValueError, r"^dtype must be one of"),
    "dq4/out shape": (lambda: ops.dequantize_4bit.out(P4, ABSMAX4, 64, "nf4", [64, 64], torch.float32, torch.empty(4096)), RuntimeError, r"^out must have shape \[64, 64\], got \[4096\]"),
    "dq4/out dtype": (lambda: ops.dequantize_4bit.out(P4, ABSMAX4, 64, "nf4", [64, 64], torch.float32, torch.empty(64, 64, dtype=torch.bfloat16)), RuntimeError, r"^out must have dtype torch.float32"),
    # gemv_4bit (+ .out)
    "gemv/A.shape[-1]": (lambda: ops.gemv_4bit(torch.randn(2, 63), P4, SHAPEB, ABSMAX4, NF4, 64), RuntimeError, r"^A\.shape\[-1\] must equal K = shapeB\[1\] = 64"),
    "gemv/shapeB 3-D": (lambda: ops.gemv_4bit(X, P4, [64, 8, 8], ABSMAX4, NF4, 64), ValueError, r"^shapeB must be the 2-D weight shape"),
    "gemv/code length": (lambda: ops.gemv_4bit(X, P4, SHAPEB, ABSMAX4, NF4[:15], 64), RuntimeError, r"^code must be a 1-D table of 16 entries"),
    "gemv/A dtype": (lambda: ops.gemv_4bit(X.int(), P4, SHAPEB, ABSMAX4, NF4, 64), RuntimeError, r"^A must have dtype"),
    "gemv/B bytes": (lambda: ops.gemv_4bit(X, P4[:-1], SHAPEB, ABSMAX4, NF4, 64), RuntimeError, r"^B must hold \(n \+ 1\) // 2 = 2048 bytes"),
    "gemv/B dtype": (lambda: ops.gemv_4bit(X, P4.view(torch.int8), SHAPEB, ABSMAX4, NF4, 64), RuntimeError, r"^B must have dtype in"),
    "gemv/absmax numel": (lambda: ops.gemv_4bit(X, P4, SHAPEB, ABSMAX4[:10], NF4, 64), RuntimeError, r"^absmax must have 64 elements"),
    "gemv/out shape": (lambda: ops.gemv_4bit.out(X, P4, SHAPEB, ABSMAX4, NF4, 64, torch.empty(2, 63)), RuntimeError, r"^out must have shape \[2, 64\]"),
    "gemv/out dtype": (lambda: ops.gemv_4bit.out(X, P4, SHAPEB, ABSMAX4, NF4, 64, torch.empty(2, 64, dtype=torch.half)), RuntimeError, r"^out must have dtype torch.float32"),
    # gemm_4bit
    "gemm/bias length": (lambda: ops.gemm_4bit(X, P4, SHAPEB, ABSMAX4, 64, "nf4", torch.randn(63)), RuntimeError, r"^bias must be 1-D of length N = 64, got shape \(63,\)"),
    "gemm/bias 2-D": (lambda: ops.gemm_4bit(X, P4, SHAPEB, ABSMAX4, 64, "nf4", torch.randn(1, 64)), RuntimeError, r"^bias must be 1-D"),
    "gemm/bias dtype": (lambda: ops.gemm_4bit(X, P4, SHAPEB, ABSMAX4, 64, "nf4", torch.randn(64).half()), RuntimeError, r"^bias must have A's dtype torch.float32, got torch.float16"),
    "gemm/nested only absmax_8bit": (lambda: ops.gemm_4bit(X, P4, SHAPEB, NESTED_ABSMAX, 64, "nf4", None, NESTED_8BIT, None, None), ValueError, r"^absmax_8bit, absmax_code and absmax_offset must be given together"),
    "gemm/nested no absmax_8bit": (lambda: ops.gemm_4bit(X, P4, SHAPEB, NESTED_ABSMAX, 64, "nf4", None, None, CODE, OFFSET), ValueError, r"^absmax_8bit, absmax_code and absmax_offset"),
    "gemm/nested no offset": (lambda: ops.gemm_4bit(X, P4, SHAPEB, NESTED_ABSMAX, 64, "nf4", None, NESTED_8BIT, CODE, None), ValueError, r"^absmax_8bit, absmax_code and absmax_offset"),
    "gemm/absmax_8bit dtype": (lambda: ops.gemm_4bit(X, P4, SHAPEB, NESTED_ABSMAX, 64, "nf4", None, ABSMAX4, CODE, OFFSET), RuntimeError, r"^absmax_8bit must have dtype in \(torch.uint8\)"),
    "gemm/absmax_8bit numel": (lambda: ops.gemm_4bit(X, P4, SHAPEB, NESTED_ABSMAX, 64, "nf4", None, NESTED_8BIT[:-1], CODE, OFFSET), RuntimeError, r"^absmax_8bit must have 64 elements"),
    "gemm/absmax_code length": (lambda: ops.gemm_4bit(X, P4, SHAPEB, NESTED_ABSMAX, 64, "nf4", None, NESTED_8BIT, NF4, OFFSET), RuntimeError, r"^absmax_code must be a 1-D table of 256 entries"),
    "gemm/absmax_offset numel": (lambda: ops.gemm_4bit(X, P4, SHAPEB, NESTED_ABSMAX, 64, "nf4", None, NESTED_8BIT, CODE, OFFSET.repeat(2)), RuntimeError, r"^absmax_offset must have 1 elements"),
    "gemm/nested absmax numel": (lambda: ops.gemm_4bit(X, P4, SHAPEB, ABSMAX4, 64, "nf4", None, NESTED_8BIT, CODE, OFFSET), RuntimeError, r"^absmax must have 1 elements \(one per 256 nested blocks\)"),
    "gemm/quant_type": (lambda: ops.gemm_4bit(X, P4, SHAPEB, ABSMAX4, 64, "fp8"), ValueError, r"^quant_type must be one of"),
    "gemm/absmax numel": (lambda: ops.gemm_4bit(X, P4, SHAPEB, ABSMAX4[:-1], 64, "nf4"), RuntimeError, r"^absmax must have 64 elements"),
    "gemm/blocksize": (lambda: ops.gemm_4bit(X, P4, SHAPEB, ABSMAX4, 8192, "nf4"), ValueError, r"^blocksize .*got 8192"),
    # gemm_4bit_grouped: list lengths, and a bad weight named by its index
    "grouped/no weights": (lambda: ops.gemm_4bit_grouped(X, [], [], [], 64, "nf4"), ValueError, r"^B must hold at least one packed weight"),
    "grouped/out_features length": (lambda: ops.gemm_4bit_grouped(X, [P4, P4], [64], [ABSMAX4, ABSMAX4], 64, "nf4"), ValueError, r"^out_features must have one entry per weight in B \(2\), got 1"),
    "grouped/bias length": (lambda: ops.gemm_4bit_grouped(X, [P4, P4], SHAPEB[:1] * 2, [ABSMAX4, ABSMAX4], 64, "nf4", [torch.randn(64)]), ValueError, r"^bias must have one entry per weight in B \(2\), got 1"),
    "grouped/second absmax": (lambda: ops.gemm_4bit_grouped(X, [P4, P4], SHAPEB[:1] * 2, [ABSMAX4, ABSMAX4[:-1]], 64, "nf4"), RuntimeError, r"^weight 1 of the group \(B\[1\], absmax\[1\], ...\): absmax must have 64 elements"),
    "grouped/K": (lambda: ops.gemm_4bit_grouped(X[:, :32], [P4], SHAPEB[:1], [ABSMAX4], 64, "nf4"), RuntimeError, r"^weight 0 of the group .*: B must hold .* = 1024 bytes for n = 2048 4-bit values"),
    # gemm_4bit_swiglu: exactly two weights of one shape, then the grouped checks
    "swiglu/one weight": (lambda: ops.gemm_4bit_swiglu(X, [P4], SHAPEB[:1], [ABSMAX4], 64, "nf4"), ValueError, r"^B must hold two packed weights \(gate, up\), got 1"),
    "swiglu/widths": (lambda: ops.gemm_4bit_swiglu(X, [P4, P4[:16]], [64, 32], [ABSMAX4, ABSMAX4[:32]], 64, "nf4"), ValueError, r"^out_features must be equal \(gate and up have the same rows\), got \[64, 32\]"),
    "swiglu/second absmax": (lambda: ops.gemm_4bit_swiglu(X, [P4, P4], SHAPEB[:1] * 2, [ABSMAX4, ABSMAX4[:-1]], 64, "nf4"), RuntimeError, r"^weight 1 of the group \(B\[1\], absmax\[1\], ...\): absmax must have 64 elements"),
}


@pytest.mark.parametrize("label", list(CASES))
def test_bad_quant_and_matmul_arguments(label):
    fn, exc, pattern = CASES[label]
    with pytest.raises(exc, match=pattern):
        fn()


# ---------------------------------------------------------------------------------------------
# Optimizers: errors are raised before anything is written
# ---------------------------------------------------------------------------------------------

N = 300
P = torch.randn(N)
G = torch.randn(N)
QMAP1, QMAP2 = dynamic_map(signed=True), dynamic_map(signed=False)


def _call32(name, *, g=None, p=None, s1=None, s2="default", unorm_vec=None, max_unorm=0.0, step=1):
    p = P.clone() if p is None else p
    g = G if g is None else g
    s1 = torch.zeros((2, N) if name == "ademamix" else N) if s1 is None else s1
    s2 = torch.zeros(N) if isinstance(s2, str) else s2
    before = (p.clone(), s1.clone())
    try:
        ops.optimizer_update_32bit(name, g, p, s1, s2, unorm_vec, max_unorm, 1.0, 0.9, 0.999, 0.9999, 5.0, 1e-8,
                                   0.0, step, 1e-3, 1.0, False)
    finally:
        assert torch.equal(p, before[0]) and torch.equal(s1, before[1]), "a rejected call must not write"


def _call8(name, *, g=None, p=None, s1=None, s2="default", qmap1=QMAP1, qmap2=QMAP2, absmax1=None, absmax2="default",
           step=1):
    p = P.clone() if p is None else p
    g = G if g is None else g
    s1 = torch.full((N,), 127, dtype=torch.uint8) if s1 is None else s1
    s2 = torch.zeros(N, dtype=torch.uint8) if isinstance(s2, str) else s2
    absmax1 = torch.zeros(2) if absmax1 is None else absmax1
    absmax2 = torch.zeros(2) if isinstance(absmax2, str) else absmax2
    before = (p.clone(), s1.clone(), absmax1.clone())
    try:
        ops.optimizer_update_8bit_blockwise(name, g, p, s1, s2, 0.9, 0.999, 0.9999, 5.0, 1e-8, step, 1e-3, qmap1,
                                            qmap2, absmax1, absmax2, 0.0, 1.0, False)
    finally:
        assert torch.equal(p, before[0]) and torch.equal(s1, before[1]) and torch.equal(absmax1, before[2])


OPTIM_CASES = {
    "32/name": (lambda: _call32("adamx"), ValueError, r"^optimizer_name must be one of .*for 32-bit states, got 'adamx'"),
    "32/g dtype": (lambda: _call32("adam", g=G.half()), RuntimeError, r"^g must have p's dtype torch.float32, got torch.float16"),
    "32/g numel": (lambda: _call32("adam", g=G[:-1]), RuntimeError, r"^g must have as many elements as p \(300\), got 299"),
    "32/p int": (lambda: _call32("adam", p=P.int(), g=G.int()), RuntimeError, r"^p must have dtype"),
    "32/p float64": (lambda: _call32("adam", p=P.double(), g=G.double()), RuntimeError, r"^p must have dtype .*float64"),
    "32/state2 missing": (lambda: _call32("adam", s2=None), RuntimeError, r"^state2 is required"),
    "32/state1 numel": (lambda: _call32("adam", s1=torch.zeros(N - 1)), RuntimeError, r"^state1 must have 300 elements"),
    "32/state1 dtype": (lambda: _call32("adam", s1=torch.zeros(N, dtype=torch.half)), RuntimeError, r"^state1 must have dtype"),
    "32/state2 dtype": (lambda: _call32("adam", s2=torch.zeros(N, dtype=torch.bfloat16)), RuntimeError, r"^state2 must have dtype"),
    "32/ademamix state1": (lambda: _call32("ademamix", s1=torch.zeros(N)), RuntimeError, r"^state1 must have 600 elements \(\(2, \*p.shape\) for ademamix\)"),
    "32/lamb unorm_vec missing": (lambda: _call32("lamb", max_unorm=1.0), RuntimeError, r"^unorm_vec .* is required when max_unorm > 0"),
    "32/lars unorm_vec dtype": (lambda: _call32("lars", s2=None, max_unorm=0.02, unorm_vec=torch.zeros(1, dtype=torch.half)), RuntimeError, r"^unorm_vec must have dtype"),
    "32/lamb unorm_vec numel": (lambda: _call32("lamb", max_unorm=1.0, unorm_vec=torch.zeros(2)), RuntimeError, r"^unorm_vec must have 1 elements"),
    "32/step": (lambda: _call32("adam", step=0), ValueError, r"^step must be >= 1, got 0"),
    "8/name": (lambda: _call8("adamx"), ValueError, r"^optimizer_name must be one of .*for 8-bit states, got 'adamx'"),
    "8/lamb": (lambda: _call8("lamb"), ValueError, r"^optimizer_name .*got 'lamb' \(lamb and lars need the update norm: use optimizer_update_32bit\)"),
    "8/lars": (lambda: _call8("lars", s2=None), ValueError, r"^optimizer_name .*got 'lars' \(lamb and lars"),
    "8/state1 dtype": (lambda: _call8("adam", s1=torch.zeros(N)), RuntimeError, r"^state1 must have dtype in \(torch.uint8\)"),
    "8/state1 numel": (lambda: _call8("momentum", s1=torch.zeros(N + 1, dtype=torch.uint8)), RuntimeError, r"^state1 must have 300 elements"),
    "8/absmax1 numel": (lambda: _call8("adam", absmax1=torch.zeros(1)), RuntimeError, r"^absmax1 must have 2 elements"),
    "8/absmax1 dtype": (lambda: _call8("adam", absmax1=torch.zeros(2, dtype=torch.half)), RuntimeError, r"^absmax1 must have dtype"),
    "8/absmax2 numel": (lambda: _call8("adam", absmax2=torch.zeros(3)), RuntimeError, r"^absmax2 must have 2 elements"),
    "8/qmap1 length": (lambda: _call8("adam", qmap1=QMAP1[:128]), RuntimeError, r"^qmap1 must be a 1-D table of 256 entries"),
    "8/qmap2 length": (lambda: _call8("adam", qmap2=QMAP2[:255]), RuntimeError, r"^qmap2 must be a 1-D table of 256 entries"),
    "8/qmap2 missing": (lambda: _call8("adam", qmap2=None), RuntimeError, r"^qmap2 and absmax2 are required"),
    "8/state2 missing": (lambda: _call8("adam", s2=None), RuntimeError, r"^state2 is required"),
    "8/ademamix state1": (lambda: _call8("ademamix"), RuntimeError, r"^state1 must have 600 elements"),
    "8/ademamix absmax1 1-D": (lambda: _call8("ademamix", s1=torch.zeros(2, N, dtype=torch.uint8), absmax1=torch.zeros(4)), RuntimeError, r"^absmax1 must have shape \(2, 2\) for ademamix, got \(4,\)"),
    "8/g numel": (lambda: _call8("adam", g=G[:10]), RuntimeError, r"^g must have as many elements as p"),
    "8/g dtype": (lambda: _call8("lion", g=G.bfloat16(), s2=None), RuntimeError, r"^g must have p's dtype"),
    "8/qmap1 device": (lambda: _call8("adam", qmap1=QMAP1.to("meta")), RuntimeError, r"^qmap1 must be on the same device as p"),
    "8/step": (lambda: _call8("adam", step=0), ValueError, r"^step must be >= 1"),
}


@pytest.mark.parametrize("label", list(OPTIM_CASES))
def test_bad_optimizer_arguments(label):
    fn, exc, pattern = OPTIM_CASES[label]
    with pytest.raises(exc, match=pattern):
        fn()


def test_fake_impl_rejects_like_the_kernel():
    # the same checks run at trace time on meta tensors
    with pytest.raises(RuntimeError, match=r"^A\.numel\(\) must be a multiple of 8"):
        ops.quantize_4bit(torch.empty(12, device="meta"), 32, "nf4", torch.float32)
    with pytest.raises(ValueError, match=r"^blocksize .*got 48"):
        ops.quantize_blockwise(torch.empty(64, device="meta"), CODE.to("meta"), 48)
    with pytest.raises(RuntimeError, match=r"^bias must be 1-D of length N = 64"):
        ops.gemm_4bit(X.to("meta"), P4.to("meta"), SHAPEB, ABSMAX4.to("meta"), 64, "nf4", torch.empty(3, device="meta"))


def test_compile_fails_at_trace_time():
    f = torch.compile(lambda a: ops.quantize_4bit(a, 48, "nf4", torch.uint8), backend="eager", fullgraph=True)
    with pytest.raises(Exception, match=r"blocksize must be a power of two"):
        f(A)
