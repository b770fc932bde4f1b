"""``torch.library.opcheck`` (schema, fake impl, autograd registration, AOT dispatch) for every op
and overload of ``torch.ops.inductor_quant``.

The quantize ops run the full cross product dtype x blocksize x quant_type x quant_storage x
{odd n, n not divisible by blocksize}; a storage wider than one byte needs
``n % (2 * itemsize) == 0``, so those combinations assert the clear error instead. Each opcheck
costs ~0.1 s (AOT tracing), so dequantize, the matmuls and the optimizers run covering subsets:
every listed value of every axis appears at least once for every overload.
"""

import itertools

import pytest
import torch
from torch.library import opcheck

import inductor_quant.ops  # noqa: F401  (registers the ops)
from inductor_quant.code_tables import dynamic_map, get_4bit_code

ops = torch.ops.inductor_quant

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [32, 64, 128, 256, 4096]
QUANT_TYPES = ["nf4", "fp4"]
STORAGES = [torch.uint8, torch.bfloat16, torch.float32]
N_KINDS = ["odd", "ragged"]


def _ids(value):
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)


def _shape(kind: str, blocksize: int) -> tuple[int, ...]:
    """``odd``: 1-D, odd n spanning two blocks. ``ragged``: 2-D, n = 2 * blocksize + 24 (a multiple
    of 8, so every storage can hold it, but not of the blocksize)."""
    if kind == "odd":
        return (blocksize + 3,)
    return (2, blocksize + 12)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _storage_fits(n: int, storage: torch.dtype) -> bool:
    return storage.itemsize == 1 or n % (2 * storage.itemsize) == 0


def _input_packing_without_nan(shape, dtype, blocksize, quant_type, storage) -> torch.Tensor:
    """Random input whose packed bytes, viewed as ``storage``, hold no NaN bit pattern.

    opcheck compares eager and AOT outputs with ``assert_close``, which treats NaN != NaN, so a
    code pattern that spells a bf16/fp32 NaN fails it although the bytes are identical
    (``test_4bit_storage_bytes_under_compile`` checks those bytes directly). Elements of a
    NaN-spelling storage word are zeroed (code of 0.0 never spells NaN) until none is left."""
    A = torch.randn(shape, dtype=dtype)
    per_word = 2 * storage.itemsize
    for _ in range(50):
        packed, _ = ops.quantize_4bit(A, blocksize, quant_type, storage)
        bad = packed.reshape(-1).isnan().nonzero().flatten()
        if bad.numel() == 0:
            return A
        flat = A.view(-1)
        for word in bad.tolist():
            flat[word * per_word : (word + 1) * per_word] = 0
    raise AssertionError("could not build a NaN-free packing")


@pytest.mark.parametrize("kind", N_KINDS)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_blockwise_8bit(dtype, blocksize, kind):
    A = torch.randn(_shape(kind, blocksize), dtype=dtype)
    code = dynamic_map()
    opcheck(ops.quantize_blockwise.default, (A, code, blocksize))
    q, absmax = ops.quantize_blockwise(A, code, blocksize)
    assert q.shape == A.shape and absmax.shape == (-(-A.numel() // blocksize),)
    # dequantize (whose inputs do not depend on A's dtype) on two diagonals of the product: every
    # blocksize and n kind with a cycling output dtype, for each overload
    diagonal = (BLOCKSIZES.index(blocksize) + N_KINDS.index(kind) - DTYPES.index(dtype)) % len(DTYPES)
    if diagonal == 0:
        opcheck(ops.dequantize_blockwise.default, (q, absmax, code, blocksize, dtype))
    elif diagonal == 1:
        out = torch.full(A.shape, float("nan"), dtype=dtype)
        opcheck(ops.dequantize_blockwise.out, (q, absmax, code, blocksize, dtype, out))


@pytest.mark.parametrize("kind", N_KINDS)
@pytest.mark.parametrize("storage", STORAGES, ids=_ids)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_4bit(dtype, blocksize, quant_type, storage, kind):
    shape = _shape(kind, blocksize)
    n = _numel(shape)
    if not _storage_fits(n, storage):
        A = torch.randn(shape, dtype=dtype)
        with pytest.raises(RuntimeError, match=r"A\.numel\(\) must be a multiple of"):
            ops.quantize_4bit(A, blocksize, quant_type, storage)
        with pytest.raises(RuntimeError, match=r"A\.numel\(\) must be a multiple of"):
            ops.quantize_4bit(A.to("meta"), blocksize, quant_type, storage)
        return
    A = _input_packing_without_nan(shape, dtype, blocksize, quant_type, storage)
    opcheck(ops.quantize_4bit.default, (A, blocksize, quant_type, storage))
    packed, absmax = ops.quantize_4bit(A, blocksize, quant_type, storage)
    assert packed.dtype == storage and packed.shape == ((n + 1) // (2 * storage.itemsize), 1)
    # dequantize on two diagonals: every (blocksize, quant_type, storage, n kind) runs the default
    # overload with one output dtype and .out with another; every dtype appears for both
    axes = BLOCKSIZES.index(blocksize) + QUANT_TYPES.index(quant_type) + STORAGES.index(storage)
    diagonal = (axes - DTYPES.index(dtype)) % len(DTYPES)
    if diagonal == 0:
        opcheck(ops.dequantize_4bit.default, (packed, absmax, blocksize, quant_type, list(shape), dtype))
    elif diagonal == 1:
        out = torch.full(shape, float("nan"), dtype=dtype)
        opcheck(ops.dequantize_4bit.out, (packed, absmax, blocksize, quant_type, list(shape), dtype, out))


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32], ids=_ids)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_4bit_storage_bytes_under_compile(quant_type, storage):
    # The bytes themselves, including words that spell NaN, are identical eager vs AOT-compiled.
    A = torch.randn(64, 64)
    f = torch.compile(ops.quantize_4bit, backend="aot_eager", fullgraph=True)
    eager, eager_absmax = ops.quantize_4bit(A, 64, quant_type, storage)
    compiled, compiled_absmax = f(A, 64, quant_type, storage)
    assert compiled.dtype == storage
    assert torch.equal(eager.view(torch.uint8), compiled.view(torch.uint8))
    assert torch.equal(eager_absmax, compiled_absmax)


@pytest.mark.parametrize("storage", STORAGES, ids=_ids)
@pytest.mark.parametrize("blocksize", [32, 4096])
def test_dequantize_4bit_flat_shape(blocksize, storage):
    # A 1-D `shape` (bitsandbytes' CPU/CUDA dequantize fail on it) for every storage.
    A = torch.randn(3, blocksize + 8)
    n = A.numel()
    packed, absmax = ops.quantize_4bit(A, blocksize, "nf4", storage)
    opcheck(ops.dequantize_4bit.default, (packed, absmax, blocksize, "nf4", [n], torch.float16))
    out = torch.empty(n, dtype=torch.float16)
    opcheck(ops.dequantize_4bit.out, (packed, absmax, blocksize, "nf4", [n], torch.float16, out))


def _matmul_cases():
    """dtype x blocksize in full; quant_type, storage, n kind and the leading dims of A cycle so
    every value of every axis appears."""
    cycle = itertools.cycle(itertools.product(QUANT_TYPES, STORAGES, N_KINDS))
    cases = []
    for dtype, blocksize in itertools.product(DTYPES, BLOCKSIZES):
        quant_type, storage, kind = next(cycle)
        if kind == "odd":
            storage = torch.uint8  # an odd N * K only fits byte storage
        cases.append((dtype, blocksize, quant_type, storage, kind))
    return cases


def _weight(dtype, blocksize, quant_type, storage, kind):
    """A packed weight W [N, K] with K not a multiple of the blocksize (odd N * K for `odd`)."""
    N, K = (3, blocksize + 1) if kind == "odd" else (3, blocksize + 8)
    W = torch.randn(N, K, dtype=dtype)
    packed, absmax = ops.quantize_4bit(W, blocksize, quant_type, storage)
    return [N, K], packed, absmax


@pytest.mark.parametrize("dtype,blocksize,quant_type,storage,kind", _matmul_cases(), ids=_ids)
def test_gemv_4bit(dtype, blocksize, quant_type, storage, kind):
    shapeB, packed, absmax = _weight(dtype, blocksize, quant_type, storage, kind)
    code = get_4bit_code(quant_type)
    A = torch.randn(2, 3, shapeB[1], dtype=dtype)
    opcheck(ops.gemv_4bit.default, (A, packed, shapeB, absmax, code, blocksize))
    A = torch.randn(1, shapeB[1], dtype=dtype)
    out = torch.full((1, shapeB[0]), float("nan"), dtype=dtype)
    opcheck(ops.gemv_4bit.out, (A, packed, shapeB, absmax, code, blocksize, out))


def _nested(absmax: torch.Tensor, offset_dtype: torch.dtype):
    """Double-quantize ``absmax`` as bitsandbytes' ``compress_statistics`` does (256-blocks)."""
    offset = absmax.mean()
    code = dynamic_map()
    absmax_8bit, outer = ops.quantize_blockwise(absmax - offset, code, 256)
    return outer, absmax_8bit, code, offset.to(offset_dtype)


@pytest.mark.parametrize("dtype,blocksize,quant_type,storage,kind", _matmul_cases(), ids=_ids)
def test_gemm_4bit(dtype, blocksize, quant_type, storage, kind):
    shapeB, packed, absmax = _weight(dtype, blocksize, quant_type, storage, kind)
    A = torch.randn(2, 5, shapeB[1], dtype=dtype)
    bias = torch.randn(shapeB[0], dtype=dtype)
    offset_dtype = torch.float16 if blocksize == 64 else torch.float32  # a non-fp32 offset too
    outer, absmax_8bit, code, offset = _nested(absmax, offset_dtype)
    nested = (outer, blocksize, quant_type)
    # alternate the pairs so both bias and nesting appear with and without the other
    if BLOCKSIZES.index(blocksize) % 2:
        opcheck(ops.gemm_4bit.default, (A, packed, shapeB, absmax, blocksize, quant_type))
        opcheck(ops.gemm_4bit.default, (A, packed, shapeB, *nested, bias, absmax_8bit, code, offset))
    else:
        opcheck(ops.gemm_4bit.default, (A, packed, shapeB, absmax, blocksize, quant_type, bias))
        opcheck(ops.gemm_4bit.default, (A[0, :1], packed, shapeB, *nested, None, absmax_8bit, code, offset))


def test_gemm_4bit_nested_many_blocks():
    # more than 256 weight blocks, so the nested absmax has several outer blocks
    W = torch.randn(40, 300)
    packed, absmax = ops.quantize_4bit(W, 32, "nf4", torch.uint8)
    outer, absmax_8bit, code, offset = _nested(absmax, torch.float32)
    assert outer.numel() == 2
    A = torch.randn(4, 300)
    opcheck(ops.gemm_4bit.default, (A, packed, [40, 300], outer, 32, "nf4", None, absmax_8bit, code, offset))



@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested, has_bias", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("op, sizes", [("gemm_4bit_grouped", (3, 5, 2)), ("gemm_4bit_swiglu", (6, 6))])
def test_gemm_4bit_multi_weight(op, sizes, dtype, nested, has_bias):
    """The ops over a list of weights: gemm_4bit_grouped (any widths), gemm_4bit_swiglu (gate, up)."""
    K, blocksize = 160, 64
    weights = [ops.quantize_4bit(torch.randn(N, K, dtype=dtype), blocksize, "nf4", torch.uint8) for N in sizes]
    packed = [w[0] for w in weights]
    absmax = [w[1] for w in weights]
    optional = {}
    if has_bias:
        optional["bias"] = [torch.randn(N, dtype=dtype) for N in sizes]
    if nested:
        parts = [_nested(a, torch.float32) for a in absmax]
        absmax = [p[0] for p in parts]
        optional.update(absmax_8bit=[p[1] for p in parts], absmax_code=[p[2] for p in parts],
                        absmax_offset=[p[3] for p in parts])
    for A in (torch.randn(2, 3, K, dtype=dtype), torch.randn(1, K, dtype=dtype)):
        opcheck(getattr(ops, op).default, (A, packed, list(sizes), absmax, blocksize, "nf4"), optional)


OPTIMIZERS_32BIT = ["adam", "lamb", "ademamix", "momentum", "lars", "rmsprop", "lion", "adagrad"]
OPTIMIZERS_8BIT = ["adam", "ademamix", "momentum", "rmsprop", "lion", "adagrad"]
TWO_STATE = ("adam", "lamb", "ademamix")
P_SHAPE = (3, 100)  # 300 elements: two 256-blocks, the last one partial


def _hyper(name: str, step: int):
    return dict(beta1=0.9, beta2=0.99 if name == "lion" else 0.999, beta3=0.9999, alpha=5.0, eps=1e-8, step=step)


def _optimizer_cases(names):
    """Every name once with a cycling dtype, and adam with every dtype."""
    cases = [(name, DTYPES[i % len(DTYPES)]) for i, name in enumerate(names)]
    return cases + [("adam", dtype) for dtype in DTYPES if ("adam", dtype) not in cases]


@pytest.mark.parametrize("name,dtype", _optimizer_cases(OPTIMIZERS_32BIT), ids=_ids)
def test_optimizer_update_32bit(name, dtype):
    p = torch.randn(P_SHAPE, dtype=dtype)
    g = torch.randn(P_SHAPE, dtype=dtype) * 0.1
    lead = (2,) if name == "ademamix" else ()
    state1 = torch.randn(*lead, *P_SHAPE) * 0.01
    state2 = torch.rand(P_SHAPE) * 0.01 if name in TWO_STATE else None
    clipped = name in ("lamb", "lars")
    unorm_vec = torch.zeros(1) if clipped else None
    max_unorm = 1.0 if name == "lamb" else 0.02 if name == "lars" else 0.0
    h = _hyper(name, step=3)
    weight_decay = 0.0 if dtype == torch.float16 else 0.01
    skip_zeros = dtype == torch.bfloat16 and name != "ademamix"
    args = (
        name, g, p, state1, state2, unorm_vec, max_unorm, float(p.float().norm()), h["beta1"], h["beta2"],
        h["beta3"], h["alpha"], h["eps"], weight_decay, h["step"], 1e-3, 1.0, skip_zeros,
    )
    opcheck(ops.optimizer_update_32bit.default, args)


@pytest.mark.parametrize("name,dtype", _optimizer_cases(OPTIMIZERS_8BIT), ids=_ids)
def test_optimizer_update_8bit_blockwise(name, dtype):
    p = torch.randn(P_SHAPE, dtype=dtype)
    g = torch.randn(P_SHAPE, dtype=dtype) * 0.1
    qmap1, qmap2 = dynamic_map(signed=True), dynamic_map(signed=False)
    lead = (2,) if name == "ademamix" else ()
    s1 = torch.randn(*lead, *P_SHAPE) * 0.01
    if name == "ademamix":
        rows = [ops.quantize_blockwise(s1[i], qmap1, 256) for i in range(2)]
        state1 = torch.stack([r[0] for r in rows])
        absmax1 = torch.stack([r[1] for r in rows])
    else:
        state1, absmax1 = ops.quantize_blockwise(s1, qmap1, 256)
    state2 = absmax2 = None
    if name in TWO_STATE:
        state2, absmax2 = ops.quantize_blockwise(torch.rand(P_SHAPE) * 0.01, qmap2, 256)
    h = _hyper(name, step=2)
    weight_decay = 0.0 if dtype == torch.float16 else 0.01
    skip_zeros = dtype == torch.bfloat16
    args = (
        name, g, p, state1, state2, h["beta1"], h["beta2"], h["beta3"], h["alpha"], h["eps"], h["step"], 1e-3,
        qmap1, qmap2 if name in TWO_STATE else None, absmax1, absmax2, weight_decay, 1.0, skip_zeros,
    )
    opcheck(ops.optimizer_update_8bit_blockwise.default, args)
