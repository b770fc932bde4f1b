"""Triton kernels for 8-bit blockwise quantization with a 256-entry code map, and their launchers.

Numerics are those of ``inductor_quant.reference.blockwise`` (bit-exact): fp32 block absmax
(NaN propagates), ``xn = x * div_rn(1, absmax)`` (an IEEE reciprocal, then one multiply; Triton's
``/`` is an approximate division on NVIDIA GPUs), NaN ``xn`` taken as 0.0, nearest code with ties to
the lower entry (= the number of fp32 midpoints strictly below ``xn``), and dequantization as one
fp32 multiply ``code[q] * absmax`` rounded once to the output dtype.

Nearest-code search. The map is an input (any sorted 256-entry table), so nothing about it is
hard-coded; a small launch derives two tables from it into global memory (18 KB with the default
16384 buckets, read by every program of the quantize launch through L1; built on a map's first
use, then cached):

* ``mid``: the 255 fp32 midpoints ``(code[i] + code[i + 1]) * 0.5``, padded with ``+inf``;
* ``first``: a bucket table. A value's bucket is its fp32 bit pattern made order-preserving
  (``bits ^ ((bits >> 31) & 0x7FFFFFFF)``), shifted right by ``KEY_SHIFT`` and offset to the middle
  of ``[0, BUCKETS)``: a monotone function of the value, ``2**(23 - KEY_SHIFT)`` buckets per octave.
  ``first[b]`` (uint8) is the number of midpoints whose bucket is below ``b`` (counted per bucket,
  32 buckets per program).

Because the bucket function is monotone, a value in bucket ``b`` lies above every midpoint of a lower
bucket and below every midpoint of a higher one, so its code is ``first[b]`` plus the number of
midpoints *of its own bucket* below it: ``first[b] + sum_j (xn > mid[first[b] + j])`` for ``j`` up to
the fullest bucket's count (``PROBES`` unrolled steps, then a run-time loop for any remainder). The
probes are independent lookups, not a dependent chain: for the signed dynamic map the fullest bucket
holds 1 midpoint with ``KEY_SHIFT=17`` (2 for the unsigned map; 2 and 3 with ``KEY_SHIFT=18``), so
an element costs 1 + 1 table lookups instead of the 8 dependent lookups of a binary search
(``SEARCH="bsearch"``, kept for comparison in the benchmark).

Blocks whose absmax is zero, non-finite or subnormal (reciprocal 0, NaN or Inf) are the only ones
where ``xn`` can be NaN or infinite; tiles without such a block skip the NaN fix and the bucket
clamp (see :func:`normalize_blocks_split`).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from ._constants import MapCache, to_device_constant

__all__ = [
    "block_absmax",
    "normalize_blocks_split",
    "load_tile",
    "prefetch_l2",
    "prefetch_tile_ahead",
    "prefetch_distance",
    "store_tile",
    "quantize_blockwise",
    "dequantize_blockwise",
    "QuantizeBlockwiseConfig",
    "DequantizeBlockwiseConfig",
]

CODE_ENTRIES = tl.constexpr(256)


# ----------------------------------------------------------------------------------------------
# Shared device helpers (also used by the 4-bit kernels)
# ----------------------------------------------------------------------------------------------


@triton.jit
def block_absmax(x):
    """fp32 ``max |x|`` of each row of a ``[ROWS, BLOCKSIZE]`` fp32 tile; NaN propagates.

    The maximum is taken over the bit patterns of ``|x|`` as int32, where NaN > Inf > finite:
    ``tl.max`` on floats drops NaN (``max.f32`` on the GPU, ``nanmax`` in the interpreter)."""
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.max(bits, 1).to(tl.float32, bitcast=True)


@triton.jit
def normalize_blocks_split(x, absmax):
    """``x * div_rn(1, absmax)`` per row with NaN results taken as 0.0 (the reference rule),
    split into a fast common case: returns ``(xn, special)``.

    When every row of the tile has a finite, non-zero reciprocal (``special == 0``), no ``xn`` can
    be NaN and ``|xn| <= 1 + 2**-22``, so the per-element NaN fix (and any clamping of ``xn``) is
    needed only for tiles with ``special != 0`` (a zero, Inf, NaN or tiny absmax)."""
    inv = tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), absmax)
    special = tl.max(((inv == 0.0) | (inv == float("inf")) | (inv != inv)).to(tl.int32), 0)
    xn = x * inv[:, None]
    if special != 0:
        # The barrier keeps this a branch: the compiler would otherwise if-convert it and pay
        # for the fix on every tile. ``special`` is uniform over the program, so it is legal.
        tl.debug_barrier()
        xn = tl.where(xn != xn, 0.0, xn)
    return xn, special


@triton.jit
def _order_key(v):
    """int32 keys of fp32 values in value order (-0.0 just below +0.0): the bits, with the
    magnitude bits of negative values flipped."""
    bits = v.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _bucket_key(v, KEY_SHIFT: tl.constexpr, BUCKETS: tl.constexpr):
    """Unclamped bucket of fp32 values: order-preserving bit key >> KEY_SHIFT, offset to the middle."""
    return (_order_key(v) >> KEY_SHIFT) + BUCKETS // 2


@triton.jit
def _bucket(v, KEY_SHIFT: tl.constexpr, BUCKETS: tl.constexpr):
    """Monotone bucket of any fp32 value (clamped to ``[0, BUCKETS)``)."""
    return tl.minimum(tl.maximum(_bucket_key(v, KEY_SHIFT, BUCKETS), 0), BUCKETS - 1)


@triton.jit
def prefetch_l2(address, nbytes):
    """Ask L2 for ``nbytes`` (a multiple of 16) at ``address`` (16-byte aligned): one bulk prefetch
    (``cp.async.bulk.prefetch.L2``, sm_90+) issued by thread 0 of the program. It puts DRAM reads in
    flight for a program that runs later without holding registers; nothing waits for it."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0; }",
        "=r,l,r", [address, nbytes], dtype=tl.int32, is_pure=False, pack=1,
    )


@triton.jit
def prefetch_tile_ahead(x_ptr, tile, n, AHEAD: tl.constexpr, TILE: tl.constexpr):
    """:func:`prefetch_l2` of the input tile ``AHEAD`` tiles after ``tile``, when ``AHEAD > 0`` and
    that tile is full. Needs a 16-byte aligned ``x_ptr``."""
    if AHEAD > 0:
        ahead = tile + AHEAD
        if (ahead + 1) * TILE <= n:
            prefetch_l2(x_ptr + ahead * TILE, TILE * (x_ptr.dtype.element_ty.primitive_bitwidth // 8))


def prefetch_distance(A: torch.Tensor, ahead: int) -> int:
    """The ``AHEAD`` a launch over ``A`` may use: ``ahead`` on NVIDIA GPUs of compute capability 9 or
    more with a 16-byte aligned ``A``, else 0 (no prefetch; the interpreter cannot run inline PTX)."""
    if ahead == 0 or A.device.type != "cuda" or torch.version.hip is not None or A.data_ptr() % 16:
        return 0
    return ahead if torch.cuda.get_device_capability(A.device) >= (9, 0) else 0


@triton.jit
def load_tile(x_ptr, start, remaining, offs, TILE: tl.constexpr):
    """Load ``TILE`` elements from ``x_ptr + start``; unmasked (vectorizable) for a full tile."""
    if remaining == TILE:
        x = tl.load(x_ptr + start + offs)
    else:
        x = tl.load(x_ptr + start + offs, mask=offs < remaining, other=0.0)
    return x


@triton.jit
def store_tile(ptr, start, remaining, offs, value, TILE: tl.constexpr):
    """Store ``TILE`` elements at ``ptr + start``; unmasked (vectorizable) for a full tile."""
    if remaining == TILE:
        tl.store(ptr + start + offs, value)
    else:
        tl.store(ptr + start + offs, value, mask=offs < remaining)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _midpoints(code_ptr, i):
    """fp32 midpoints ``(code[i] + code[i + 1]) * 0.5`` for ``i < 255``, +inf from 255 on; -0.0 made
    +0.0 so that bucket order equals value order."""
    lo = tl.load(code_ptr + i, mask=i < CODE_ENTRIES, other=float("inf"))
    hi = tl.load(code_ptr + i + 1, mask=i < CODE_ENTRIES - 1, other=float("inf"))
    mid = (lo + hi) * 0.5
    return tl.where(mid == 0.0, 0.0, mid)


@triton.jit
def _search_tables_kernel(
    code_ptr, mid_ptr, first_ptr, fullest_ptr,
    KEY_SHIFT: tl.constexpr, BUCKETS: tl.constexpr, BUCKETS_PER_PROGRAM: tl.constexpr,
):
    """The search tables of ``code``, ``BUCKETS_PER_PROGRAM`` buckets per program.

    ``first[b]`` (uint8) = the number of midpoints in buckets below ``b``, counted directly (a
    ``[buckets, 256]`` comparison: no histogram, so the buckets split over many small programs that
    each load the map once). ``fullest`` (one int32, zero before the launch): the largest number of
    midpoints in one bucket, maximized over programs by an atomic.
    Program 0 also writes ``mid`` (512 fp32 midpoints padded with +inf)."""
    bucket_j = _bucket(_midpoints(code_ptr, tl.arange(0, CODE_ENTRIES)), KEY_SHIFT, BUCKETS)
    b = tl.program_id(0) * BUCKETS_PER_PROGRAM + tl.arange(0, BUCKETS_PER_PROGRAM)
    # Below any bucket lie at most 255 midpoints (the +inf pad sits in the last bucket): fits a byte.
    first = tl.sum((bucket_j[None, :] < b[:, None]).to(tl.int32), axis=1)
    count = tl.sum((bucket_j[None, :] == b[:, None]).to(tl.int32), axis=1)
    tl.store(first_ptr + b, first.to(tl.uint8))
    tl.atomic_max(fullest_ptr, tl.max(count, 0))
    if tl.program_id(0) == 0:
        i = tl.arange(0, 2 * CODE_ENTRIES)
        tl.store(mid_ptr + i, _midpoints(code_ptr, i))


@triton.jit
def _quantize_blockwise_kernel(
    x_ptr,
    mid_ptr,
    first_ptr,
    fullest_ptr,
    q_ptr,
    absmax_ptr,
    n,
    BLOCKSIZE: tl.constexpr,
    ROWS: tl.constexpr,
    SEARCH: tl.constexpr,
    KEY_SHIFT: tl.constexpr,
    BUCKETS: tl.constexpr,
    PROBES: tl.constexpr,
    PREFETCH_AHEAD: tl.constexpr,
):
    TILE: tl.constexpr = ROWS * BLOCKSIZE
    MIDS: tl.constexpr = 2 * CODE_ENTRIES
    tile = tl.program_id(0).to(tl.int64)  # int64: offsets may exceed 2**31
    prefetch_tile_ahead(x_ptr, tile, n, PREFETCH_AHEAD, TILE)
    start = tile * TILE
    remaining = tl.minimum(n - start, TILE).to(tl.int32)
    offs = tl.arange(0, TILE)
    rows = tl.arange(0, ROWS)
    x = tl.reshape(load_tile(x_ptr, start, remaining, offs, TILE).to(tl.float32), [ROWS, BLOCKSIZE])
    absmax = block_absmax(x)
    tl.store(absmax_ptr + tile * ROWS + rows, absmax, mask=rows < (remaining + BLOCKSIZE - 1) // BLOCKSIZE)
    xn, special = normalize_blocks_split(x, absmax)
    xn = tl.reshape(xn, [TILE])
    if SEARCH == "bucket":
        b = _bucket_key(xn, KEY_SHIFT, BUCKETS)
        if special != 0:  # xn may be +-Inf (tiny absmax): clamp the bucket
            tl.debug_barrier()  # keeps this a branch (see normalize_blocks_split)
            b = tl.minimum(tl.maximum(b, 0), BUCKETS - 1)
        base = tl.load(first_ptr + b).to(tl.int32)
        q = base
        if special != 0:
            tl.debug_barrier()
            for p in tl.static_range(PROBES):
                q += (xn > tl.load(mid_ptr + base + p)).to(tl.int32)
        else:
            # For finite xn, xn > mid <=> the sign bit of the fp32 difference mid - xn (rounding
            # keeps the sign; equal values give +0): an add and a shift-add per probe instead of a
            # compare and a select chain.
            for p in tl.static_range(PROBES):
                mid = tl.load(mid_ptr + base + p)
                q += ((mid - xn).to(tl.uint32, bitcast=True) >> 31).to(tl.int32)
        for p in range(PROBES, tl.load(fullest_ptr)):
            q += (xn > tl.load(mid_ptr + tl.minimum(base + p, MIDS - 1))).to(tl.int32)
    else:
        q = tl.zeros([TILE], tl.int32)
        for level in tl.static_range(8):
            q += tl.where(xn > tl.load(mid_ptr + q + ((128 >> level) - 1)), 128 >> level, 0)
    store_tile(q_ptr, start, remaining, offs, q.to(tl.uint8), TILE)


@triton.jit
def _dequantize_blockwise_kernel(
    q_ptr,
    absmax_ptr,
    code_ptr,
    out_ptr,
    n,
    BLOCKSIZE: tl.constexpr,
    ROWS: tl.constexpr,
    SMEM_LUT: tl.constexpr,
):
    TILE: tl.constexpr = ROWS * BLOCKSIZE
    tile = tl.program_id(0).to(tl.int64)
    start = tile * TILE
    remaining = tl.minimum(n - start, TILE).to(tl.int32)
    offs = tl.arange(0, TILE)
    rows = tl.arange(0, ROWS)
    q = load_tile(q_ptr, start, remaining, offs, TILE).to(tl.int32)
    if SMEM_LUT:
        table = tl.load(code_ptr + tl.arange(0, CODE_ENTRIES))
        values = tl.gather(table, q, 0)
    else:
        values = tl.load(code_ptr + q)
    absmax = tl.load(absmax_ptr + tile * ROWS + rows, mask=rows < (remaining + BLOCKSIZE - 1) // BLOCKSIZE)
    out = tl.reshape(tl.reshape(values, [ROWS, BLOCKSIZE]) * absmax[:, None], [TILE])
    store_tile(out_ptr, start, remaining, offs, out.to(out_ptr.dtype.element_ty), TILE)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


def check_launch_shape(tile: int, num_warps: int) -> None:
    """Kernel configs take powers of two for the elements per program (Triton's ``tl.arange``) and
    the warps (a bad value would otherwise fail inside the kernel's compilation)."""
    for name, value in (("tile", tile), ("num_warps", num_warps)):
        if not (isinstance(value, int) and value > 0 and value & (value - 1) == 0):
            raise ValueError(f"{name} must be a positive power of two, got {value!r}")


def check_prefetch_ahead(prefetch_ahead: int) -> None:
    """A config's L2 prefetch distance in tiles: 0 (off) or positive."""
    if not (isinstance(prefetch_ahead, int) and prefetch_ahead >= 0):
        raise ValueError(f"prefetch_ahead must be an int >= 0, got {prefetch_ahead!r}")


class QuantizeBlockwiseConfig:
    """Launch parameters of the 8-bit quantize kernel.

    ``tile``: elements per program (rounded up to one block); ``num_warps``: warps for ``tile``
    elements (scaled up with the tile when a block is larger); ``search``: "bucket" (a uint8 bucket
    table, then the bucket's midpoints probed) or "bsearch" (a binary search of the midpoints);
    ``key_shift``/``buckets``: bucket table shape (``2**(23 - key_shift)`` buckets per octave);
    ``probes``: unrolled in-bucket comparisons of "bucket" (more run in a loop when a bucket
    holds more); ``prefetch_ahead``: each program asks L2 for the input tile this many tiles ahead
    (0: off; NVIDIA sm_90+ only, see :func:`prefetch_tile_ahead`).
    """

    def __init__(
        self,
        tile: int = 512,
        num_warps: int = 1,
        search: str = "bucket",
        key_shift: int = 17,
        buckets: int = 16384,
        probes: int = 1,
        prefetch_ahead: int = 4096,
    ) -> None:
        check_launch_shape(tile, num_warps)
        check_prefetch_ahead(prefetch_ahead)
        if search not in ("bucket", "bsearch"):
            raise ValueError(f"search must be 'bucket' or 'bsearch', got {search!r}")
        if buckets & (buckets - 1):
            raise ValueError(f"buckets must be a power of two, got {buckets}")
        # Unclamped buckets of |xn| <= 1 + 2**-22 (keys +-0x3F800001) must lie in [0, buckets).
        if buckets // 2 <= 0x3F800001 >> key_shift:
            raise ValueError(f"buckets={buckets} too few for key_shift={key_shift}")
        self.tile = tile
        self.num_warps = num_warps
        self.search = search
        self.key_shift = key_shift
        self.buckets = buckets
        self.probes = probes
        self.prefetch_ahead = prefetch_ahead

    def __repr__(self) -> str:
        return (
            f"QuantizeBlockwiseConfig(tile={self.tile}, num_warps={self.num_warps}, search={self.search!r}, "
            f"key_shift={self.key_shift}, buckets={self.buckets}, probes={self.probes}, "
            f"prefetch_ahead={self.prefetch_ahead})"
        )


class DequantizeBlockwiseConfig:
    """Launch parameters of the 8-bit dequantize kernel: elements per program, warps, and whether
    the code lookup goes through shared memory (``tl.gather``) or global memory (L1)."""

    def __init__(self, tile: int = 1024, num_warps: int = 4, smem_lut: bool = True) -> None:
        check_launch_shape(tile, num_warps)
        self.tile = tile
        self.num_warps = num_warps
        self.smem_lut = smem_lut

    def __repr__(self) -> str:
        return f"DequantizeBlockwiseConfig(tile={self.tile}, num_warps={self.num_warps}, smem_lut={self.smem_lut})"


# The Triton interpreter runs programs one after another: few, large programs keep CPU tests fast.
_INTERPRETER_TILE = 1 << 16


def _is_interpreted(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


# 64 buckets per octave: every bucket of the signed dynamic map holds at most one midpoint (the
# unsigned map: two, the second probed by the run-time loop), so an element costs two table reads.
# H100 (tools/notes_quant.md): 28672x8192 312 µs vs 354 µs with 32 buckets per octave (two probes)
# and 405 µs with 16 (three); the 16 KB bucket table stays in L1. Coarser tables only paid off
# while the table build was a slow one-program histogram. 512 elements per one-warp program: 294 µs
# vs 305 (1024, 2 warps) and 318 (2048, 4 warps) on 28672x8192, best on the smaller shapes too.
# The L2 prefetch of the tile 4096 programs ahead (a wave is ~3700 one-warp programs): 34.7 / 83.4 /
# 83.8 / 290.4 µs against 35.1 / 85.3 / 85.2 / 294.5 without, on the four benchmark shapes (Run 11);
# a 64-register cap (32 instead of 28 programs per SM) gained less and nothing on top of it.
_DEFAULT_QUANTIZE = QuantizeBlockwiseConfig()
# H100 sweeps (two runs): 1024 elements / 4 warps 22.5-22.9 µs on 4096x4096, 242.5-243.0 µs on
# 28672x8192 (8192 / 4 warps: 23.8 and 244.2).
_DEFAULT_DEQUANTIZE = DequantizeBlockwiseConfig()


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors (or the device's equivalent) of ``device``; 1 on CPU."""
    if device.type == "cpu":
        return 1
    return torch.get_device_module(device).get_device_properties(device).multi_processor_count


def device_guard(t: torch.Tensor):
    """Context manager that makes ``t``'s device current, so the launch goes to it."""
    if t.device.type == "cpu":
        return contextlib.nullcontext()
    return torch.get_device_module(t.device).device(t.device)


def _check_flat_output(out: torch.Tensor, name: str, numel: int, dtype: torch.dtype, like: torch.Tensor) -> None:
    if not (out.is_contiguous() and out.numel() == numel and out.dtype == dtype and out.device == like.device):
        raise ValueError(
            f"{name} must be a contiguous {dtype} tensor of {numel} elements on {like.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})"
        )


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_TABLE_CACHE: MapCache[torch.Tensor] = MapCache()
_TABLE_BYTES = 2 * CODE_ENTRIES * 4 + 4  # midpoints and the fullest bucket's count, then a byte per bucket
# [32, 256] comparisons: 64 per thread at 4 warps (a [256, 256] tile spills: 255 registers)
_BUCKETS_PER_PROGRAM = 32


def _build_search_tables(code: torch.Tensor, config: QuantizeBlockwiseConfig, tables: torch.Tensor) -> torch.Tensor:
    """Launch the table kernel for ``code`` into ``tables`` (see :func:`_split_tables`);
    returns ``tables``."""
    mid, fullest, first = _split_tables(tables, config)
    fullest.zero_()
    # the interpreter runs programs one after another: few large ones (a tile holds <= 2**20 elements)
    per_program = min(config.buckets, 2048 if _is_interpreted(code) else _BUCKETS_PER_PROGRAM)
    _search_tables_kernel[(config.buckets // per_program,)](
        code, mid, first, fullest, KEY_SHIFT=config.key_shift, BUCKETS=config.buckets, BUCKETS_PER_PROGRAM=per_program
    )
    return tables


def _split_tables(tables: torch.Tensor, config: QuantizeBlockwiseConfig) -> tuple[torch.Tensor, ...]:
    """``(mid, fullest, first)`` views of one uint8 buffer: 512 fp32 midpoints, one int32 (the
    fullest bucket's count), a uint8 per bucket."""
    mids_bytes = 2 * CODE_ENTRIES * 4
    return (
        tables[:mids_bytes].view(torch.float32),
        tables[mids_bytes:_TABLE_BYTES].view(torch.int32),
        tables[_TABLE_BYTES : _TABLE_BYTES + config.buckets],
    )


def _search_tables(code: torch.Tensor, config: QuantizeBlockwiseConfig) -> tuple[torch.Tensor, ...]:
    """``(mid, fullest, first)`` for ``code`` and the bucket table of ``config``.

    Building them costs a memset and a launch (8-13 µs on an H100 inside a CUDA graph), so they are
    cached per map (:class:`MapCache`: data pointer and version counter),
    in a buffer allocated outside any CUDA-graph pool (``to_device_constant``). While a CUDA graph
    is being captured, or for a non-contiguous map (its contiguous copy is new every call), they
    are built per call instead: a captured build runs only at replay, so caching its buffer would
    hand later calls unwritten tables."""
    nbytes = _TABLE_BYTES + config.buckets
    if not code.is_contiguous() or (code.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        tables = torch.empty(nbytes, dtype=torch.uint8, device=code.device)
        return _split_tables(_build_search_tables(code.contiguous(), config, tables), config)

    def build() -> torch.Tensor:
        return _build_search_tables(code, config, to_device_constant(torch.empty(nbytes, dtype=torch.uint8), code.device))

    tables = _TABLE_CACHE.get((code,), build, extra=(config.key_shift, config.buckets))
    return _split_tables(tables, config)


def quantize_blockwise(
    A: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    out: torch.Tensor,
    absmax: torch.Tensor,
    config: QuantizeBlockwiseConfig | None = None,
) -> None:
    """Quantize ``A`` (any float dtype, any strides) into ``out`` (uint8, A.numel() elements) and
    ``absmax`` (fp32, one per block) with the 256-entry sorted table ``code`` (fp32).

    One program per tile quantizes, reading the search tables of ``code`` (through L1);
    the tables come from :func:`_search_tables` (built by a small launch on a map's first use,
    then cached)."""
    n = A.numel()
    _check_flat_output(out, "out", n, torch.uint8, A)
    _check_flat_output(absmax, "absmax", -(-n // blocksize), torch.float32, A)
    if n == 0:
        return
    A = A.contiguous()
    if config is None:
        config = _DEFAULT_QUANTIZE
    tile = max(_INTERPRETER_TILE if _is_interpreted(A) else config.tile, blocksize)
    # a block larger than the configured tile keeps the configured elements per warp
    num_warps = min(16, config.num_warps * max(1, tile // config.tile))
    with device_guard(A):
        mid, fullest, first = _search_tables(code, config)
        _quantize_blockwise_kernel[(-(-n // tile),)](
            A,
            mid,
            first,
            fullest,
            out,
            absmax,
            n,
            BLOCKSIZE=blocksize,
            ROWS=tile // blocksize,
            SEARCH=config.search,
            KEY_SHIFT=config.key_shift,
            BUCKETS=config.buckets,
            PROBES=config.probes,
            PREFETCH_AHEAD=prefetch_distance(A, config.prefetch_ahead),
            num_warps=num_warps,
        )


def dequantize_blockwise(
    A: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    out: torch.Tensor,
    config: DequantizeBlockwiseConfig | None = None,
) -> None:
    """``out = out.dtype(code[A] * absmax[block])`` for uint8 codes ``A``; ``out`` is contiguous
    with A.numel() elements of fp32/fp16/bf16."""
    n = A.numel()
    _check_flat_output(out, "out", n, out.dtype, A)
    if n == 0:
        return
    A = A.contiguous()
    absmax = absmax.contiguous()
    code = code.contiguous()
    config = config or _DEFAULT_DEQUANTIZE
    tile = max(_INTERPRETER_TILE if _is_interpreted(A) else config.tile, blocksize)
    grid = (-(-n // tile),)
    with device_guard(A):
        _dequantize_blockwise_kernel[grid](
            A,
            absmax,
            code,
            out,
            n,
            BLOCKSIZE=blocksize,
            ROWS=tile // blocksize,
            SMEM_LUT=config.smem_lut,
            num_warps=config.num_warps,
        )
