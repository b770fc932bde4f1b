"""Triton quantize / dequantize kernels (``inductor_quant.kernels.blockwise`` / ``.fourbit``) and
their GPU op registrations (``inductor_quant.ops.triton_quant``).

Launcher tests run on ``DEVICE``: CPU tensors under the Triton interpreter (conftest sets
TRITON_INTERPRET) where there is no GPU, CUDA tensors where there is one. Results must equal the
pure-torch reference bit for bit: codes, absmax (NaN where the reference has NaN) and dequantized
values. The interpreter truncates fp32 -> bf16 instead of rounding, so on CPU bf16 outputs are
compared with the reference's fp32 values truncated the same way (exact otherwise). Outputs are
views into poisoned buffers with guard bytes on both sides.

GPU only (skipped without CUDA): the registered ops at real sizes against the reference, 4-bit
bytes against bitsandbytes' CUDA kernels, and a dequantize with more than 2**31 output elements.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inductor_quant.code_tables import FP4_THRESHOLDS, code_midpoints, dynamic_map, get_4bit_code
from inductor_quant.kernels import blockwise as k8
from inductor_quant.kernels import fourbit as k4
from inductor_quant.reference import blockwise as ref8
from inductor_quant.reference import fourbit as ref4

from conftest import HAS_CUDA, requires_cuda

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
GUARD = 64
POISON = 0x5A
# Zero, non-finite and subnormal blocks divide by zero, overflow and multiply inf by 0 on purpose
# (numpy warns under the interpreter).
pytestmark = pytest.mark.filterwarnings(
    "ignore:divide by zero:RuntimeWarning",
    "ignore:invalid value encountered:RuntimeWarning",
    "ignore:overflow encountered:RuntimeWarning",
)
DEVICE = "cuda" if HAS_CUDA else "cpu"
# Two full tiles of the 8-bit quantize launch under the interpreter (many on a GPU): a tile with a
# partial or special block takes the kernel's slow branch, so the fast one needs full tiles.
FULL_8BIT_TILES = 2 * k8._INTERPRETER_TILE
# the 8-bit quantize's searches: the uint8 bucket table (default, with an L2 prefetch 4096 tiles
# ahead; also without it, and prefetching the next tile — the prefetch only runs on NVIDIA sm_90+
# GPUs), a binary search
SEARCH_CONFIGS = {
    "bucket": k8.QuantizeBlockwiseConfig(),
    "bucket-no-prefetch": k8.QuantizeBlockwiseConfig(prefetch_ahead=0),
    "bucket-prefetch-next": k8.QuantizeBlockwiseConfig(prefetch_ahead=1),
    "bsearch": k8.QuantizeBlockwiseConfig(search="bsearch"),
}
SEARCHES = tuple(SEARCH_CONFIGS)
SETTINGS = settings(max_examples=6 if HAS_CUDA else 12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


class Guarded:
    """A contiguous output view of ``numel`` elements inside a poisoned byte buffer with guards."""

    def __init__(self, numel: int, dtype: torch.dtype, device="cpu", shape=None):
        size = torch.empty((), dtype=dtype).element_size()
        self.buffer = torch.full((2 * GUARD + numel * size,), POISON, dtype=torch.uint8, device=device)
        self.view = self.buffer[GUARD : GUARD + numel * size].view(dtype)
        if shape is not None:
            self.view = self.view.view(shape)

    def check_guards(self) -> None:
        assert (self.buffer[:GUARD] == POISON).all(), "kernel wrote before its output"
        assert (self.buffer[-GUARD:] == POISON).all(), "kernel wrote past its output"


def truncate_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 by dropping the low 16 bits, as the Triton interpreter converts."""
    return (x.float().view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)


def assert_same_cast(out: torch.Tensor, values_fp32: torch.Tensor) -> None:
    """``out`` equals the reference's fp32 values converted to ``out.dtype`` as the kernel does.

    Under the interpreter (CPU) fp32 -> bf16 truncates, and its conversion of fp32 subnormals is
    wrong (it renormalizes them and clamps the exponent), so those few values (from blocks with a
    subnormal absmax) are left out there; on the GPU every element is compared."""
    if out.dtype == torch.bfloat16 and out.device.type == "cpu":
        normal = ~((values_fp32.abs() < torch.finfo(torch.float32).tiny) & (values_fp32 != 0))
        assert_same(out[normal], truncate_to_bf16(values_fp32)[normal])
    else:
        assert_same(out, values_fp32.to(out.dtype))


def assert_same(out: torch.Tensor, expected: torch.Tensor) -> None:
    """Bitwise equality, with any NaN equal to any NaN."""
    assert out.shape == expected.shape and out.dtype == expected.dtype
    nan_out, nan_exp = torch.isnan(out), torch.isnan(expected)
    assert torch.equal(nan_out, nan_exp), f"NaN positions differ ({(nan_out != nan_exp).sum()} elements)"
    a = torch.where(nan_out, 0, out)
    b = torch.where(nan_exp, 0, expected)
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[out.element_size()]
    mismatch = (a.view(bits) != b.view(bits)).nonzero().flatten()
    assert mismatch.numel() == 0, (
        f"{mismatch.numel()} of {out.numel()} elements differ; first at {mismatch[:5].tolist()}: "
        f"{a.flatten()[mismatch[:5]].tolist()} vs {b.flatten()[mismatch[:5]].tolist()}"
    )


def random_input(n: int, dtype: torch.dtype, blocksize: int, specials: bool, device="cpu", scale=3.0) -> torch.Tensor:
    """Normal values with a random per-block scale; optionally a zero block, a NaN block, an Inf
    block and a block of subnormals (whose reciprocal absmax overflows to Inf, so xn is +-Inf).

    The interpreter converts bf16 subnormals to fp32 wrongly, so on CPU that block is made for fp32
    only (fp16 has no such values: they become a zero block)."""
    blocks = -(-n // blocksize)
    x = torch.randn(n, device=device) * scale
    x *= torch.exp2(torch.randint(-6, 6, (blocks,), device=device).float()).repeat_interleave(blocksize)[:n]
    if specials and blocks >= 5:
        x[:blocksize] = 0.0
        x[blocksize + 1] = float("nan")
        x[2 * blocksize + 3] = float("inf")
        x[2 * blocksize + 4] = -float("inf")
        if dtype == torch.float32 or torch.device(device).type != "cpu":
            x[3 * blocksize : 4 * blocksize] *= 1e-41
            x[3 * blocksize] = 0.0
    return x.to(dtype)


def run_quantize_blockwise(A, code, blocksize, config=None):
    n = A.numel()
    q = Guarded(n, torch.uint8, A.device)
    absmax = Guarded(-(-n // blocksize), torch.float32, A.device)
    k8.quantize_blockwise(A, code, blocksize, q.view, absmax.view, config)
    q.check_guards()
    absmax.check_guards()
    return q.view.view(A.shape), absmax.view


def check_quantize_blockwise(A, code, blocksize, config=None):
    q, absmax = run_quantize_blockwise(A, code, blocksize, config)
    ref_q, ref_absmax = ref8.quantize_blockwise(A, code, blocksize)
    assert_same(absmax, ref_absmax)
    assert_same(q, ref_q)
    return ref_q, ref_absmax


def check_dequantize_blockwise(q, absmax, code, blocksize, dtype):
    out = Guarded(q.numel(), dtype, q.device)
    k8.dequantize_blockwise(q, absmax, code, blocksize, out.view)
    out.check_guards()
    assert_same_cast(out.view, ref8.dequantize_blockwise(q, absmax, code, blocksize, torch.float32).reshape(-1))


def check_quantize_4bit(A, blocksize, quant_type, storage=torch.uint8, config=None):
    n = A.numel()
    packed = Guarded((n + 1) // (2 * storage.itemsize), storage, A.device, shape=((n + 1) // (2 * storage.itemsize), 1))
    absmax = Guarded(-(-n // blocksize), torch.float32, A.device)
    k4.quantize_4bit(A, blocksize, quant_type, packed.view, absmax.view, config)
    packed.check_guards()
    absmax.check_guards()
    ref_packed, ref_absmax = ref4.quantize_4bit(A, blocksize, quant_type, storage)
    assert_same(absmax.view, ref_absmax)
    assert_same(packed.view.view(torch.uint8), ref_packed.view(torch.uint8))
    return ref_packed, ref_absmax


def check_dequantize_4bit(packed, absmax, blocksize, quant_type, n, dtype):
    out = Guarded(n, dtype, packed.device)
    k4.dequantize_4bit(packed, absmax, blocksize, k4.code_table(quant_type, packed.device), out.view)
    out.check_guards()
    assert_same_cast(out.view, ref4.dequantize_4bit(packed, absmax, blocksize, quant_type, (n,), torch.float32))


# ----------------------------------------------------------------------------------------------
# CPU: Triton interpreter against the reference
# ----------------------------------------------------------------------------------------------


ROUNDTRIP = dict(  # the inputs both round-trip tests draw
    n=st.integers(1, 40_000),
    blocksize=st.sampled_from(BLOCKSIZES),
    dtype=st.sampled_from(FLOATS),
    out_dtype=st.sampled_from(FLOATS),
)


@SETTINGS
@given(
    **ROUNDTRIP,
    signed=st.booleans(),
    search=st.sampled_from(SEARCHES),
    specials=st.booleans(),
)
def test_blockwise_roundtrip_matches_reference(n, blocksize, dtype, out_dtype, signed, search, specials):
    code = dynamic_map(signed, device=DEVICE)
    A = random_input(n, dtype, blocksize, specials, device=DEVICE)
    if not signed:
        A = A.abs()
    q, absmax = check_quantize_blockwise(A, code, blocksize, SEARCH_CONFIGS[search])
    check_dequantize_blockwise(q, absmax, code, blocksize, out_dtype)


@SETTINGS
@given(
    **ROUNDTRIP,
    quant_type=st.sampled_from(("nf4", "fp4")),
    specials=st.booleans(),
)
def test_4bit_roundtrip_matches_reference(n, blocksize, dtype, out_dtype, quant_type, specials):
    A = random_input(n, dtype, blocksize, specials, device=DEVICE)
    packed, absmax = check_quantize_4bit(A, blocksize, quant_type)
    check_dequantize_4bit(packed, absmax, blocksize, quant_type, n, out_dtype)


QUANTIZE_4BIT_CONFIGS = [
    k4.Quantize4bitConfig(smem_table=False),
    k4.Quantize4bitConfig(),
    k4.Quantize4bitConfig(prefetch_ahead=0),
    k4.Quantize4bitConfig(prefetch_ahead=1),
]


@pytest.mark.parametrize("config", QUANTIZE_4BIT_CONFIGS, ids=repr)
@pytest.mark.parametrize(
    "dtype, offset, blocksize, quant_type",
    [
        (torch.bfloat16, 0, 64, "nf4"),
        (torch.bfloat16, 0, 4096, "fp4"),
        (torch.bfloat16, 1, 64, "nf4"),  # 2 bytes past a 4-byte boundary
        (torch.float16, 0, 128, "fp4"),
    ],
)
def test_4bit_quantize_configs_match_reference(config, dtype, offset, blocksize, quant_type):
    """Both table lookups (shared memory / L1), with and without the L2 prefetch (and prefetching
    the next tile), on two full tiles (the fast path) plus a partial one with special blocks."""
    tile = k4._tile(torch.empty(0, device=DEVICE), config.tile, blocksize)
    n = 2 * tile + 3 * blocksize + 5
    A = random_input(n + offset, dtype, blocksize, True, device=DEVICE)[offset:]
    check_quantize_4bit(A, blocksize, quant_type, config=config)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_bucket_table_equals_threshold_count(quant_type):
    """The kernel's bucket lookup, emulated in torch, equals the reference on every threshold,
    its fp32 neighbours, and a dense sweep of [-1.01, 1.01] (strict '>' at the thresholds)."""
    table = k4.bucket_table(quant_type)
    thr = (table & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    pairs = table >> 32
    if quant_type == "nf4":
        thresholds = code_midpoints(get_4bit_code("nf4"))
    else:
        thresholds = torch.tensor(FP4_THRESHOLDS)
        thresholds = torch.cat([thresholds, -thresholds])
    values = torch.cat(
        [
            thresholds,
            torch.nextafter(thresholds, torch.tensor(2.0)),
            torch.nextafter(thresholds, torch.tensor(-2.0)),
            torch.linspace(-1.01, 1.01, 200_001),
            torch.tensor([0.0, -0.0, 1.0, -1.0, 1.9375, -1.9375]),
        ]
    )
    v = values.abs() if quant_type == "fp4" else values
    b = k4.bucket_of(v)
    q = torch.where(v > thr[b], pairs[b] >> 4, pairs[b] & 15)
    if quant_type == "fp4":
        q = q | torch.where(values < 0, 8, 0)
    assert torch.equal(q.long(), ref4.quantize_4bit_codes(values, quant_type))


@pytest.mark.parametrize("search", SEARCHES)
def test_blockwise_arbitrary_tables(search):
    """Any sorted 256-entry table: one whose midpoints crowd into a single bucket (the run-time
    probe loop), one with repeated entries and signed zeros, and a uniform one."""
    crowded = torch.sort(0.5 + 0.01 * torch.rand(256))[0]
    crowded[0], crowded[-1] = -1.0, 1.0
    repeated = torch.sort(torch.cat([torch.full((100,), -0.0), torch.full((56,), 0.0), torch.randn(100).tanh()]))[0]
    uniform = torch.linspace(-1, 1, 256)
    for code in (crowded, repeated, uniform):
        half = FULL_8BIT_TILES // 2
        full_tiles = torch.cat([torch.randn(half), 0.5 + 0.01 * torch.rand(half)])
        A = torch.cat([full_tiles, torch.randn(3000), torch.zeros(64), -torch.zeros(64)])
        check_quantize_blockwise(A.to(DEVICE), code.to(DEVICE), 256, SEARCH_CONFIGS[search])


@pytest.mark.parametrize(
    "config",
    [k8.QuantizeBlockwiseConfig(), k8.QuantizeBlockwiseConfig(key_shift=19, buckets=4096, probes=3),
     k8.QuantizeBlockwiseConfig(key_shift=21, buckets=1024)],
    ids=repr,
)
def test_8bit_search_tables_equal_a_bucket_count(config):
    """The table launch (buckets split over programs) against a torch count: ``mid`` the padded
    midpoints, ``first[b]`` the midpoints in buckets below ``b``, and the fullest bucket's count;
    for the signed and unsigned dynamic maps, a map whose midpoints crowd into one bucket, and one
    with repeated entries."""
    crowded = torch.sort(0.5 + 0.01 * torch.rand(256))[0]
    crowded[0], crowded[-1] = -1.0, 1.0
    repeated = torch.sort(torch.cat([torch.linspace(-1, 1, 254), torch.tensor([0.25, 0.25])]))[0]
    for code in (dynamic_map(), dynamic_map(signed=False), crowded, repeated):
        tables = torch.full((k8._TABLE_BYTES + config.buckets,), POISON, dtype=torch.uint8, device=DEVICE)
        mid, fullest, first = k8._split_tables(k8._build_search_tables(code.to(DEVICE), config, tables), config)
        expected_mid = torch.cat([code_midpoints(code), torch.full((257,), float("inf"))])
        expected_mid = torch.where(expected_mid == 0, 0.0, expected_mid)
        bits = expected_mid[:256].view(torch.int32)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        bucket = ((key >> config.key_shift) + config.buckets // 2).clamp(0, config.buckets - 1)
        expected_first = (bucket[None, :] < torch.arange(config.buckets)[:, None]).sum(1)
        count = torch.bincount(bucket, minlength=config.buckets)
        assert torch.equal(mid.cpu(), expected_mid)
        assert fullest.item() == count.max().item()
        assert torch.equal(first.cpu().long(), expected_first)


@pytest.mark.parametrize(
    "config_class",
    [k8.QuantizeBlockwiseConfig, k8.DequantizeBlockwiseConfig, k4.Quantize4bitConfig, k4.Dequantize4bitConfig],
)
@pytest.mark.parametrize("kwargs, name", [(dict(tile=3000), "tile"), (dict(tile=0), "tile"), (dict(num_warps=3), "num_warps")])
def test_kernel_configs_reject_launch_shapes_triton_cannot_compile(config_class, kwargs, name):
    with pytest.raises(ValueError, match=f"{name} must be a positive power of two"):
        config_class(**kwargs)


def test_8bit_quantize_config_rejects_bucket_tables_it_cannot_build():
    with pytest.raises(ValueError, match="buckets must be a power of two, got 12000"):
        k8.QuantizeBlockwiseConfig(buckets=12000)
    with pytest.raises(ValueError, match="buckets=8192 too few for key_shift=17"):
        k8.QuantizeBlockwiseConfig(key_shift=17, buckets=8192)


@pytest.mark.parametrize("config_class", [k8.QuantizeBlockwiseConfig, k4.Quantize4bitConfig])
@pytest.mark.parametrize("prefetch_ahead", [-1, 2.0])
def test_quantize_configs_reject_bad_prefetch_distances(config_class, prefetch_ahead):
    with pytest.raises(ValueError, match="prefetch_ahead must be an int >= 0, got"):
        config_class(prefetch_ahead=prefetch_ahead)


def test_prefetch_is_off_where_the_kernel_cannot_issue_it():
    """The interpreter (CPU tensors) and unaligned inputs launch without the inline-PTX prefetch."""
    A = torch.randn(4096)
    assert k8.prefetch_distance(A, 0) == 0
    assert k8.prefetch_distance(A, 8) == 0
    if HAS_CUDA:
        G = torch.randn(4097, device="cuda")
        assert k8.prefetch_distance(G[1:], 8) == 0
        sm90 = torch.cuda.get_device_capability() >= (9, 0) and torch.version.hip is None
        assert k8.prefetch_distance(G, 8) == (8 if sm90 else 0)


@pytest.mark.parametrize("search", SEARCHES)
def test_blockwise_exact_codes_and_midpoints(search):
    """Every code value maps to itself; every exact midpoint maps to the lower code, its next fp32
    value above to the upper one; on full tiles (the kernel's fast path) and a partial one."""
    code = dynamic_map(device=DEVICE)
    mids = code_midpoints(code)
    values = torch.cat([code, mids, torch.nextafter(mids, torch.tensor(2.0, device=DEVICE))])
    pattern = torch.stack([values, torch.ones_like(values)], 1).reshape(-1)  # absmax 1
    A = pattern.repeat(-(-FULL_8BIT_TILES // pattern.numel()) + 1)  # full tiles, then a partial one
    q, _ = check_quantize_blockwise(A, code, 32, SEARCH_CONFIGS[search])
    q = q.view(-1, values.numel(), 2)[..., 0].long().cpu()
    assert torch.equal(q[:, :256], torch.arange(256).expand(q.shape[0], -1))
    assert torch.equal(q[:, 256:511], torch.arange(255).expand(q.shape[0], -1))
    assert torch.equal(q[:, 511:], torch.arange(1, 256).expand(q.shape[0], -1))


@pytest.mark.parametrize("dtype", FLOATS)
def test_noncontiguous_inputs(dtype):
    A = random_input(96 * 130, dtype, 64, True, device=DEVICE).view(96, 130).t()
    assert not A.is_contiguous()
    code = dynamic_map(device=DEVICE)
    q, absmax = check_quantize_blockwise(A, code, 64)
    check_dequantize_blockwise(q.t(), absmax, code, 64, dtype)
    packed, absmax4 = check_quantize_4bit(A, 64, "nf4")
    packed_nc = torch.stack([packed.flatten(), packed.flatten()], 1)[:, 0]
    assert not packed_nc.is_contiguous()
    check_dequantize_4bit(packed_nc, absmax4, 64, "nf4", A.numel(), dtype)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_quant_storage_views(storage, quant_type):
    A = random_input(64 * 33, torch.bfloat16, 64, True, device=DEVICE)
    packed, absmax = check_quantize_4bit(A, 64, quant_type, storage)
    assert packed.dtype == storage
    check_dequantize_4bit(packed, absmax, 64, quant_type, A.numel(), torch.bfloat16)


def test_empty_tensors():
    A = torch.empty(0, 7, device=DEVICE)
    code = dynamic_map(device=DEVICE)
    q, absmax = check_quantize_blockwise(A, code, 64)
    assert q.shape == (0, 7) and absmax.shape == (0,)
    check_dequantize_blockwise(q, absmax, code, 64, torch.bfloat16)
    packed, absmax4 = check_quantize_4bit(A, 64, "nf4")
    assert packed.numel() == 0 and absmax4.numel() == 0
    check_dequantize_4bit(packed, absmax4, 64, "nf4", 0, torch.float16)


def test_launcher_rejects_bad_outputs():
    A = torch.randn(1000)
    with pytest.raises(ValueError, match="out must be a contiguous torch.uint8"):
        k8.quantize_blockwise(A, dynamic_map(), 64, torch.empty(999, dtype=torch.uint8), torch.empty(16))
    with pytest.raises(ValueError, match="absmax must be a contiguous fp32"):
        k4.quantize_4bit(A, 64, "nf4", torch.empty(500, dtype=torch.uint8), torch.empty(15))
    with pytest.raises(ValueError, match="quant_type"):
        k4.quantize_4bit(A, 64, "int4", torch.empty(500, dtype=torch.uint8), torch.empty(16))
    with pytest.raises(ValueError, match="search"):
        k8.QuantizeBlockwiseConfig(search="linear")


@pytest.mark.skipif(HAS_CUDA, reason="checks the registered GPU functions' handling with CPU tensors")
def test_registered_functions_on_cpu_tensors():
    """The functions registered for cuda/xpu, called directly with CPU tensors (the interpreter
    runs them): allocation, quant_storage shapes, .out into a non-contiguous view, and the shared
    argument checks."""
    from inductor_quant.ops import triton_quant

    A = random_input(64 * 40 + 8, torch.float16, 64, True)
    q, absmax = triton_quant._quantize_blockwise_triton(A, dynamic_map(), 64)
    ref_q, ref_absmax = ref8.quantize_blockwise(A, dynamic_map(), 64)
    assert_same(q, ref_q)
    assert_same(absmax, ref_absmax)
    out = torch.full((2, A.numel()), 7.0)[:, ::2]  # (2, n/2) view, non-contiguous
    q2 = q.view(2, -1)
    triton_quant._dequantize_blockwise_out_triton(q2, absmax, dynamic_map(), 64, torch.float32, out)
    assert_same(out, ref8.dequantize_blockwise(q2, absmax, dynamic_map(), 64, torch.float32))

    packed, absmax4 = triton_quant._quantize_4bit_triton(A, 64, "fp4", torch.float16)
    assert packed.shape == (A.numel() // 4, 1) and packed.dtype == torch.float16
    ref_packed, ref_absmax4 = ref4.quantize_4bit(A, 64, "fp4", torch.float16)
    assert_same(packed.view(torch.uint8), ref_packed.view(torch.uint8))
    deq = triton_quant._dequantize_4bit_triton(packed, absmax4, 64, "fp4", [2, A.numel() // 2], torch.float32)
    assert_same(deq, ref4.dequantize_4bit(ref_packed, ref_absmax4, 64, "fp4", [2, A.numel() // 2], torch.float32))
    out4 = torch.empty(A.numel() // 2, 2).t()
    triton_quant._dequantize_4bit_out_triton(packed, absmax4, 64, "fp4", [2, A.numel() // 2], torch.float32, out4)
    assert_same(out4, deq)

    with pytest.raises(ValueError, match="blocksize must be a power of two"):
        triton_quant._quantize_4bit_triton(A, 48, "nf4", torch.uint8)
    with pytest.raises(RuntimeError, match="A.numel\\(\\) must be a multiple of 8"):
        triton_quant._quantize_4bit_triton(A[:-2], 64, "nf4", torch.float32)
    with pytest.raises(RuntimeError, match="absmax must have"):
        triton_quant._dequantize_blockwise_triton(q, absmax[:-1], dynamic_map(), 64, torch.float16)


# ----------------------------------------------------------------------------------------------
# GPU: registered ops at real sizes, bitsandbytes CUDA, > 2**31 elements
# ----------------------------------------------------------------------------------------------

# (shape, blocksize, input dtype): each case compiles its own kernels, so the matrix is sparse.
GPU_CASES = [
    ((4096, 4096), 64, torch.bfloat16),
    ((4096, 4096), 256, torch.bfloat16),
    ((4096, 4096), 32, torch.float16),
    ((1000, 4097), 64, torch.float16),
    ((1000, 4097), 256, torch.float32),
    ((1000, 4097), 4096, torch.bfloat16),
    ((3, 5), 32, torch.bfloat16),
    ((8192, 1), 4096, torch.float32),
]


@requires_cuda
@pytest.mark.parametrize("shape, blocksize, dtype", GPU_CASES)
def test_gpu_ops_match_reference(shape, blocksize, dtype):
    ops = torch.ops.inductor_quant
    n = shape[0] * shape[1]
    A = random_input(n, dtype, blocksize, True, device="cuda").view(shape)
    code = dynamic_map(device="cuda")
    q, absmax = ops.quantize_blockwise(A, code, blocksize)
    ref_q, ref_absmax = ref8.quantize_blockwise(A, code, blocksize)
    assert_same(absmax, ref_absmax)
    assert_same(q, ref_q)
    for out_dtype in FLOATS:
        assert_same(
            ops.dequantize_blockwise(q, absmax, code, blocksize, out_dtype),
            ref8.dequantize_blockwise(q, absmax, code, blocksize, out_dtype),
        )
    for quant_type in ("nf4", "fp4"):
        packed, absmax4 = ops.quantize_4bit(A, blocksize, quant_type, torch.uint8)
        ref_packed, ref_absmax4 = ref4.quantize_4bit(A, blocksize, quant_type, torch.uint8)
        assert_same(absmax4, ref_absmax4)
        assert_same(packed, ref_packed)
        for out_dtype in FLOATS:
            out = torch.full(shape, float("nan"), dtype=out_dtype, device="cuda")
            ops.dequantize_4bit.out(packed, absmax4, blocksize, quant_type, list(shape), out_dtype, out=out)
            assert_same(out, ref4.dequantize_4bit(packed, absmax4, blocksize, quant_type, shape, out_dtype))


@requires_cuda
def test_gpu_search_variants_and_unsigned_map():
    """Every search on both dynamic maps (the unsigned map's fuller buckets take the run-time probe
    loop)."""
    A = random_input(1 << 22, torch.bfloat16, 256, True, device="cuda")
    configs = list(SEARCH_CONFIGS.values())
    for signed in (True, False):
        code = dynamic_map(signed, device="cuda")
        x = A if signed else A.abs()
        ref_q, _ = ref8.quantize_blockwise(x, code, 256)
        for config in configs:
            q, _ = run_quantize_blockwise(x, code, 256, config)
            assert_same(q, ref_q)


def _bnb_cuda():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return None
    if not hasattr(torch.ops, "bitsandbytes") or not hasattr(torch.ops.bitsandbytes, "quantize_4bit"):
        return None
    return torch.ops.bitsandbytes


@requires_cuda
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_4bit_bytes_equal_bitsandbytes(quant_type, blocksize, dtype):
    """Packed codes and absmax against bitsandbytes' CUDA kernel on random inputs.

    bitsandbytes is built with fast-math: its ``1/absmax`` is an approximate reciprocal, ours (and
    the reference's) the IEEE one. With a power-of-two absmax per block both are exact, so every
    byte must match. On plain random data a code may differ only where ``xn`` lies within a few
    ulps of a decision threshold (FP4's literal thresholds sit within an ulp of ratios such as 5/6
    that bf16/fp16 inputs hit exactly)."""
    bnb = _bnb_cuda()
    if bnb is None:
        pytest.skip("bitsandbytes with CUDA kernels is not installed")
    n = 4096 * 1024
    A = torch.randn(n, device="cuda") * 2
    A_pow2 = A.clone().view(-1, blocksize)
    A_pow2 = A_pow2 / A_pow2.abs().amax(1, keepdim=True)  # |x| <= 1 with one element exactly +-1
    A_pow2 *= torch.exp2(torch.randint(-8, 8, (A_pow2.shape[0], 1), device="cuda").float())
    if quant_type == "nf4":
        thresholds = code_midpoints(get_4bit_code("nf4", "cuda"))
    else:
        thresholds = torch.tensor(FP4_THRESHOLDS, device="cuda")
    for x, exact in ((A_pow2.reshape(-1).to(dtype), True), (A.to(dtype), False)):
        ours, ours_absmax = torch.ops.inductor_quant.quantize_4bit(x, blocksize, quant_type, torch.uint8)
        theirs, theirs_absmax = bnb.quantize_4bit(x, blocksize, quant_type, torch.uint8)
        assert_same(ours_absmax, theirs_absmax)
        differ = (ref4.unpack_nibbles(ours.flatten(), n) != ref4.unpack_nibbles(theirs.flatten(), n)).nonzero().flatten()
        if exact:
            assert differ.numel() == 0, f"{differ.numel()} codes differ from bitsandbytes"
            continue
        assert differ.numel() <= n * 1e-3, f"{differ.numel()} codes differ from bitsandbytes"
        xn = x.flatten()[differ].float() * torch.reciprocal(ours_absmax[differ // blocksize])
        v = xn.abs() if quant_type == "fp4" else xn
        distance = (v[:, None] - thresholds[None, :]).abs().min(1).values
        assert (distance <= 4 * torch.finfo(torch.float32).eps * v.abs()).all(), (
            f"codes differ away from a threshold: xn = {xn[distance > 4e-7 * v.abs()][:5].tolist()}"
        )


@requires_cuda
def test_gpu_dequantize_4bit_beyond_int32_offsets():
    """Dequantize to more than 2**31 bf16 elements (4.3 GB): the tiles past 2**31 must hold the
    right values (64-bit offsets). Checked on the blocks around 2**31 and at the end."""
    blocksize = 64
    n = (1 << 31) + 3 * 1024 * 1024 + 64 * 5 + 3  # odd, not a multiple of the tile
    free, _ = torch.cuda.mem_get_info()
    if free < 8 * 1024**3:
        pytest.skip("needs ~8 GB of free GPU memory")
    nbytes = (n + 1) // 2
    packed = torch.randint(0, 256, (nbytes, 1), dtype=torch.uint8, device="cuda")
    absmax = torch.rand(-(-n // blocksize), device="cuda") + 0.5
    out = torch.ops.inductor_quant.dequantize_4bit(packed, absmax, blocksize, "nf4", [n], torch.bfloat16)
    for first_block in ((1 << 31) // blocksize - 64, -(-n // blocksize) - 64):
        start = first_block * blocksize
        stop = min(n, start + 128 * blocksize)
        sub_packed = packed[start // 2 : (stop + 1) // 2]
        sub_absmax = absmax[first_block : -(-stop // blocksize)]
        expected = ref4.dequantize_4bit(sub_packed, sub_absmax, blocksize, "nf4", (stop - start,), torch.bfloat16)
        assert_same(out[start:stop], expected)
    del out


@requires_cuda
def test_gpu_8bit_quantize_inside_cuda_graph_capture():
    """A map first used while a CUDA graph is captured: the tables are built inside the graph
    (not cached unwritten), replay is correct, and a later eager call builds and caches its own."""
    k8._TABLE_CACHE.clear()
    A = torch.randn(5000, device="cuda")
    code = dynamic_map(device="cuda")
    q = torch.empty(5000, dtype=torch.uint8, device="cuda")
    absmax = torch.empty(20, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        k8.quantize_blockwise(A, code, 256, q, absmax)
    assert len(k8._TABLE_CACHE) == 0
    q.fill_(0)
    graph.replay()
    ref_q, ref_absmax = ref8.quantize_blockwise(A.cpu(), code.cpu(), 256)
    assert_same(q.cpu(), ref_q)
    check_quantize_blockwise(A, code, 256)
    assert len(k8._TABLE_CACHE) == 1


def test_8bit_search_tables_are_cached_per_map_and_version():
    """The second quantize with the same map reuses its tables; an in-place change of the map, or
    another map, builds new ones, and every result equals the reference."""
    k8._TABLE_CACHE.clear()
    A = torch.randn(3000, device=DEVICE)
    code = dynamic_map(device=DEVICE).clone()
    check_quantize_blockwise(A, code, 256)
    check_quantize_blockwise(A * 0.5, code, 256)
    assert len(k8._TABLE_CACHE) == 1
    code[1:255] = torch.sort(torch.rand(254, device=DEVICE) * 2 - 1).values  # same storage, new contents
    check_quantize_blockwise(A, code, 256)
    check_quantize_blockwise(A, dynamic_map(signed=False, device=DEVICE), 256)
    assert len(k8._TABLE_CACHE) == 3
    with torch.inference_mode():  # no version counter: built per call, never cached
        check_quantize_blockwise(A, torch.linspace(-1, 1, 256, device=DEVICE), 256)
    check_quantize_blockwise(A, torch.linspace(-1, 1, 512, device=DEVICE)[::2], 256)  # non-contiguous: never cached
    assert len(k8._TABLE_CACHE) == 3
