"""Triton kernels for 4-bit NF4/FP4 blockwise quantization, and their launchers.

Numerics and layout are those of ``inductor_quant.reference.fourbit`` (bit-exact): fp32 block absmax
(NaN propagates), ``xn = x * div_rn(1, absmax)`` with NaN taken as 0.0, element ``2i`` in the high
nibble of byte ``i``, an odd tail padded with the code of 0.0, dequantization as one fp32 multiply
``code[q] * absmax`` rounded once to the output dtype.

Code selection without a comparison tree. NF4 picks the number of fp32 midpoints strictly below
``xn``; FP4 the number of bitsandbytes' literal thresholds strictly below ``|xn|`` (then maps that
rank to its code bits and adds the sign bit for ``xn < 0``). In both tables adjacent thresholds are
more than 1/16 apart, so the monotone bucket ``b = round_half_even(v * 16 + 32)`` (``v`` = xn for
NF4, ``|xn|`` for FP4, in ``[-1.9375, 1.9375]``) holds at most one threshold. The kernel gets ``b``
without a float-to-int conversion: ``v * 16 + (1.5 * 2**23 + 32)`` is one fused multiply-add whose
single rounding lands on an integer, kept in the low mantissa bits (``& 63``). A value exactly on a
bucket edge may take either bucket; both give the same code (every threshold of the lower bucket
is below it, none of the upper one is). One 64-entry table gives per bucket that threshold (or
+inf) and the codes below and above it, in one 8-byte word: ``q = v > thr[b] ? above[b] :
below[b]``, one lookup instead of four dependent comparisons. The table is built on the host from
``code_tables`` (:func:`bucket_table`) with the same arithmetic, and read from shared memory
(default) or, with ``Quantize4bitConfig(smem_table=False)``, through L1, which made the kernel
26 % slower on an H100 (``tools/notes_quant.md``, Run 7). ``|xn| <= 1 + 2**-22`` except in blocks
with a zero, non-finite or tiny absmax; only tiles holding such a block pay for the NaN fix and a
clamp.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..code_tables import FP4_RANK_TO_CODE, FP4_THRESHOLDS, code_midpoints, get_4bit_code
from ._constants import to_device_constant
from .blockwise import (
    block_absmax,
    check_launch_shape,
    check_prefetch_ahead,
    device_guard,
    load_tile,
    normalize_blocks_split,
    prefetch_distance,
    prefetch_tile_ahead,
    store_tile,
)

__all__ = [
    "BUCKETS",
    "bucket_of",
    "bucket_table",
    "code_table",
    "quantize_4bit",
    "dequantize_4bit",
    "Quantize4bitConfig",
    "Dequantize4bitConfig",
]

BUCKETS = 64
_BUCKETS = tl.constexpr(BUCKETS)  # the same, for the kernels
V_MIN, V_MAX = -1.9375, 1.9375  # the kernel clamps xn to this range where it may be infinite


def bucket_of(v: torch.Tensor) -> torch.Tensor:
    """Host version of the kernel's bucket function (fp32 in, int64 bucket out): the product and
    sum are exact in float64, ``torch.round`` rounds half to even as the kernel's fma does."""
    return torch.round(v.float().clamp(V_MIN, V_MAX).double() * 16.0 + 32.0).to(torch.int64)


def _thresholds(quant_type: str) -> tuple[torch.Tensor, list[int]]:
    """Ascending fp32 decision thresholds and the code of each rank (0..len(thresholds))."""
    if quant_type == "nf4":
        return code_midpoints(get_4bit_code("nf4")), list(range(16))
    return torch.tensor(FP4_THRESHOLDS, dtype=torch.float32), list(FP4_RANK_TO_CODE)


@functools.lru_cache(maxsize=None)
def _bucket_table_cpu(quant_type: str) -> torch.Tensor:
    thresholds, rank_code = _thresholds(quant_type)
    buckets = bucket_of(thresholds)
    if buckets.unique().numel() != buckets.numel():
        raise AssertionError(f"{quant_type}: two thresholds share a bucket; the kernel needs at most one")
    thr = torch.full((BUCKETS,), float("inf"), dtype=torch.float32)
    codes = torch.zeros(BUCKETS, dtype=torch.int64)
    for b in range(BUCKETS):
        below = int((buckets < b).sum())  # thresholds below any value of bucket b
        inside = (buckets == b).nonzero().flatten()
        above = below
        if inside.numel():
            thr[b] = thresholds[inside[0]]
            above = below + 1
        codes[b] = rank_code[below] | (rank_code[above] << 4)
    return thr.view(torch.int32).to(torch.int64) & 0xFFFFFFFF | (codes << 32)


def bucket_table(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """int64 ``[64]``: low word the fp32 bits of the bucket's threshold (+inf if none), high word
    ``below | above << 4`` (the 4-bit codes on either side of it)."""
    return to_device_constant(_bucket_table_cpu(quant_type), device)


@functools.lru_cache(maxsize=None)
def _device_tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return bucket_table(quant_type, device), to_device_constant(get_4bit_code(quant_type), device)


def code_table(quant_type: str, device: torch.device | str) -> torch.Tensor:
    """The 16-entry fp32 table of ``quant_type`` on ``device`` (cached; do not modify)."""
    return _device_tables(quant_type, torch.device(device))[1]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _codes(xn, table_ptr, table, FP4: tl.constexpr, SMEM_TABLE: tl.constexpr):
    """4-bit codes of normalized values ``xn`` (``|xn| <= 1.9375``) by one bucket-table lookup:
    with ``SMEM_TABLE`` a gather from ``table`` (the whole table as a register tensor, which Triton
    stages in shared memory), otherwise a load from ``table_ptr`` (L1)."""
    if FP4:
        v = tl.abs(xn)
    else:
        v = xn
    # round_half_even(v * 16 + 32): the fma's result lies in [2**23, 2**24), where floats are integers
    bucket = (v * 16.0 + 12582944.0).to(tl.int32, bitcast=True) & 63
    if SMEM_TABLE:
        entry = tl.reshape(tl.gather(table, tl.reshape(bucket, [bucket.numel]), 0), bucket.shape)
    else:
        entry = tl.load(table_ptr + bucket)
    codes = (entry >> 32).to(tl.int32)
    q = tl.where(v > entry.to(tl.int32).to(tl.float32, bitcast=True), codes >> 4, codes & 15)
    if FP4:
        q = q | tl.where(xn < 0.0, 8, 0)
    return q


@triton.jit
def _into_table_range(xn, special):
    """``xn`` clamped into the table's range where the tile holds a special block (a tiny absmax
    makes ``xn`` infinite)."""
    if special != 0:
        tl.debug_barrier()  # keeps this a branch (see normalize_blocks_split)
        xn = tl.minimum(tl.maximum(xn, -1.9375), 1.9375)
    return xn


@triton.jit
def _quantize_4bit_kernel(
    x_ptr, table_ptr, packed_ptr, absmax_ptr, n,
    BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, FP4: tl.constexpr, SMEM_TABLE: tl.constexpr,
    PREFETCH_AHEAD: tl.constexpr,
):
    """Any float dtype, any ``n``: one ``[ROWS, BLOCKSIZE]`` tile of elements per program."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    TILE: tl.constexpr = ROWS * BLOCKSIZE
    tile = tl.program_id(0).to(tl.int64)  # int64: offsets may exceed 2**31
    prefetch_tile_ahead(x_ptr, tile, n, PREFETCH_AHEAD, TILE)
    start = tile * TILE
    remaining = tl.minimum(n - start, TILE).to(tl.int32)
    rows = tl.arange(0, ROWS)
    offs = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    x = load_tile(x_ptr, start, remaining, offs, TILE).to(tl.float32)
    absmax = block_absmax(x)
    tl.store(absmax_ptr + tile * ROWS + rows, absmax, mask=rows < (remaining + BLOCKSIZE - 1) // BLOCKSIZE)
    xn, special = normalize_blocks_split(x, absmax)
    xn = _into_table_range(xn, special)
    table = tl.load(table_ptr + tl.arange(0, _BUCKETS))  # used by the shared-memory gather only (else eliminated)
    q = _codes(xn, table_ptr, table, FP4, SMEM_TABLE)
    hi, lo = tl.split(tl.reshape(q, [ROWS, HALF, 2]))
    packed = ((hi << 4) | lo).to(tl.uint8)
    byte_offs = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    store_tile(packed_ptr, tile * (TILE // 2), (remaining + 1) // 2, byte_offs, packed, TILE // 2)


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    out_ptr,
    n,
    BLOCKSIZE: tl.constexpr,
    TILE_BYTES: tl.constexpr,
    SMEM_LUT: tl.constexpr,
):
    HALF: tl.constexpr = BLOCKSIZE // 2
    tile = tl.program_id(0).to(tl.int64)  # int64: offsets may exceed 2**31
    remaining = tl.minimum(n - tile * (2 * TILE_BYTES), 2 * TILE_BYTES).to(tl.int32)
    byte_offs = tl.arange(0, TILE_BYTES)
    packed = load_tile(packed_ptr, tile * TILE_BYTES, (remaining + 1) // 2, byte_offs, TILE_BYTES).to(tl.int32)
    ROWS: tl.constexpr = TILE_BYTES // HALF
    rows = tl.arange(0, ROWS)
    absmax = tl.load(
        absmax_ptr + tile * ROWS + rows, mask=rows < (remaining + BLOCKSIZE - 1) // BLOCKSIZE, other=0.0
    )
    absmax = tl.reshape(tl.broadcast_to(absmax[:, None], [ROWS, HALF]), [TILE_BYTES])
    if SMEM_LUT:
        table = tl.load(code_ptr + tl.arange(0, 16))
        hi = tl.gather(table, packed >> 4, 0)
        lo = tl.gather(table, packed & 15, 0)
    else:
        hi = tl.load(code_ptr + (packed >> 4))
        lo = tl.load(code_ptr + (packed & 15))
    out = tl.interleave(hi * absmax, lo * absmax).to(out_ptr.dtype.element_ty)
    offs = tl.arange(0, 2 * TILE_BYTES)
    store_tile(out_ptr, tile * (2 * TILE_BYTES), remaining, offs, out, 2 * TILE_BYTES)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


class Quantize4bitConfig:
    """Launch parameters of the 4-bit quantize kernel: input elements per program, warps, whether
    the bucket table is read from shared memory (``tl.gather``) or through L1, and an L2 prefetch
    distance in tiles (``prefetch_ahead``; 0: off; see ``blockwise.prefetch_tile_ahead``)."""

    def __init__(self, tile: int = 2048, num_warps: int = 2, smem_table: bool = True, prefetch_ahead: int = 2048) -> None:
        check_launch_shape(tile, num_warps)
        check_prefetch_ahead(prefetch_ahead)
        self.tile = tile
        self.num_warps = num_warps
        self.smem_table = smem_table
        self.prefetch_ahead = prefetch_ahead

    def __repr__(self) -> str:
        return (
            f"Quantize4bitConfig(tile={self.tile}, num_warps={self.num_warps}, smem_table={self.smem_table}, "
            f"prefetch_ahead={self.prefetch_ahead})"
        )


class Dequantize4bitConfig:
    """Launch parameters of the 4-bit dequantize kernel: output elements per program, warps, and
    whether the 16-entry code lookup goes through shared memory (``tl.gather``) or L1."""

    def __init__(self, tile: int = 4096, num_warps: int = 4, smem_lut: bool = True) -> None:
        check_launch_shape(tile, num_warps)
        self.tile = tile
        self.num_warps = num_warps
        self.smem_lut = smem_lut

    def __repr__(self) -> str:
        return f"Dequantize4bitConfig(tile={self.tile}, num_warps={self.num_warps}, smem_lut={self.smem_lut})"


# H100 sweeps (tools/notes_quant.md, Run 7): the table in shared memory, 2048 elements / 2 warps
# 206.4 µs on 28672x8192 and 23.6 µs on 4096x4096 (4096 / 4: 214.9-215.4 and 24.3-24.6; through L1
# 292.7 and 29.0-29.4); reading bf16 tiles as element pairs (fewer instructions, more registers)
# was slower than the shared-memory table (223.7 / 24.7) and was removed. The L2 prefetch of the
# tile 2048 programs ahead (one wave is ~2100 two-warp programs): 22.1 / 58.3 / 58.6 / 203.5 µs
# against 23.5 / 59.4 / 59.8 / 205.9 without, on the four benchmark shapes (Run 11); capping the
# registers for more resident warps (56 / 48 / 40) tied or lost.
_DEFAULT_QUANTIZE = Quantize4bitConfig()
# H100 sweeps (two runs, tools/notes_quant.md): 4096 elements / 4 warps with the table in shared
# memory 20.1-20.3 µs on 4096x4096 and 209.4-209.6 µs on 28672x8192 (16384 / 8 warps / L1: 21.2
# and 210.7). An element-wise form (each output its own byte, no interleave) was slower: 21.1 and 217.
_DEFAULT_DEQUANTIZE = Dequantize4bitConfig()
_INTERPRETER_TILE = 1 << 16


def _tile(t: torch.Tensor, tile: int, blocksize: int) -> int:
    return max(_INTERPRETER_TILE if t.device.type == "cpu" else tile, blocksize)


def _byte_view(t: torch.Tensor, name: str, nbytes: int) -> torch.Tensor:
    """Flat uint8 view of the contiguous storage tensor ``t`` (any quant_storage dtype)."""
    if not t.is_contiguous() or t.numel() * t.element_size() != nbytes:
        raise ValueError(
            f"{name} must be contiguous and hold {nbytes} bytes, got {tuple(t.shape)} {t.dtype} "
            f"(contiguous={t.is_contiguous()})"
        )
    return t.reshape(-1).view(torch.uint8)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def quantize_4bit(
    A: torch.Tensor,
    blocksize: int,
    quant_type: str,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    config: Quantize4bitConfig | None = None,
) -> None:
    """Quantize ``A`` (any float dtype, any strides) to 4-bit codes: ``packed`` (contiguous, any
    storage dtype, ``(n + 1) // 2`` bytes) and ``absmax`` (fp32, one per block)."""
    n = A.numel()
    out_bytes = _byte_view(packed, "packed", (n + 1) // 2)
    if not (absmax.is_contiguous() and absmax.dtype == torch.float32 and absmax.numel() == -(-n // blocksize)):
        raise ValueError(f"absmax must be a contiguous fp32 tensor of {-(-n // blocksize)} elements")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if n == 0:
        return
    A = A.contiguous()
    config = config or _DEFAULT_QUANTIZE
    tile = _tile(A, config.tile, blocksize)
    table, _ = _device_tables(quant_type, A.device)
    with device_guard(A):
        _quantize_4bit_kernel[(-(-n // tile),)](
            A,
            table,
            out_bytes,
            absmax,
            n,
            BLOCKSIZE=blocksize,
            ROWS=tile // blocksize,
            FP4=quant_type == "fp4",
            SMEM_TABLE=config.smem_table,
            PREFETCH_AHEAD=prefetch_distance(A, config.prefetch_ahead),
            num_warps=config.num_warps,
        )


def dequantize_4bit(
    A: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    code: torch.Tensor,
    out: torch.Tensor,
    config: Dequantize4bitConfig | None = None,
) -> None:
    """``out = out.dtype(code[q] * absmax[block])`` for the 4-bit codes packed in ``A`` (any
    storage dtype); ``code`` is the 16-entry fp32 table, ``out`` contiguous with n elements."""
    n = out.numel()
    packed = _byte_view(A.contiguous(), "A", (n + 1) // 2)
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if n == 0:
        return
    absmax = absmax.contiguous()
    code = code.contiguous()
    config = config or _DEFAULT_DEQUANTIZE
    tile = _tile(out, config.tile, blocksize)
    with device_guard(out):
        _dequantize_4bit_kernel[(-(-n // tile),)](
            packed,
            absmax,
            code,
            out,
            n,
            BLOCKSIZE=blocksize,
            TILE_BYTES=tile // 2,
            SMEM_LUT=config.smem_lut,
            num_warps=config.num_warps,
        )
