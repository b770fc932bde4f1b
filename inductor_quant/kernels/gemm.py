"""Fused 4-bit (NF4/FP4) matmul kernels: ``out = A @ W.T (+ bias)`` with ``W [N, K]`` packed.

The packed weight is read once and dequantized in registers; the dequantized weight never goes
to memory. Three kernels (and a grouped GEMV), chosen by :func:`gemm_4bit_fused`:

* ``_gemv_4bit_kernel`` (M = 1, CUDA cores): one program per ``BLOCK_N`` rows and row of ``A``.
  The weight is loaded as 32-bit words (8 codes each), every thread holding the same 4 words of
  each of the ``BLOCK_N`` rows and their activations; each thread sums ``code[q] * a`` over its 32
  codes of a row in fp32, scales once, and the row sums are reduced once at the end.
* ``_gemm_4bit_dot_kernel`` (small M, tensor cores): the same dequantization, rounded to A's dtype
  (``dtype(code[q] * absmax)``, exactly the reference's weight), then ``tl.dot`` with an fp32
  accumulator. Programs that share a weight tile run next to each other, so the tile comes from L2
  for every M-tile after the first.
* ``_gemv_4bit_grouped_kernel`` (M = 1, several weights, :func:`gemm_4bit_grouped_fused`): the
  GEMV of up to four weights that read the same activations, in one launch and one output.
* ``_gemv_4bit_swiglu_kernel`` (M = 1, :func:`gemm_4bit_swiglu_fused`): the gate and up GEMVs of a
  SwiGLU feed-forward, writing ``silu(gate) * up`` (their products never go to memory).
* ``_gemm_4bit_generic_kernel`` (any shape): per-element byte, nibble and block indexing, for the
  layouts the word kernels cannot read: ``K % blocksize != 0`` (blocks straddle rows), odd ``N * K``
  or a packed buffer that is not 4-byte aligned. Still fused; slower.

Both word kernels need ``K % blocksize == 0`` (so a row holds whole blocks and ``K / 8`` whole
words) and a 4-byte aligned packed buffer. Layout (bitsandbytes'): flat element ``e = n * K + k``
is nibble ``e % 2`` (high first) of byte ``e // 2``; its scale is ``absmax[e // blocksize]``, or
with double quantization ``absmax_code[absmax_8bit[b]] * absmax[b // 256] + absmax_offset``.

Code lookup. A gather from the 16-entry table costs a 64-bit address computation and a load per
element, which makes the GEMV issue-bound. On NVIDIA GPUs each lane instead holds
``code[lane % 16]`` in a register and a warp shuffle (``shfl.sync.idx``, which reads only the low
5 bits of its lane operand) fetches ``code[q]``: one shift and one shuffle per element. The
Triton interpreter and other backends use the gather (``USE_SHFL=False``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = [
    "NESTED_BLOCKSIZE",
    "FUSED_MAX_M",
    "KernelConfig",
    "GROUPED_MAX_WEIGHTS",
    "QuantizedWeight",
    "gemm_4bit_fused",
    "gemm_4bit_grouped_fused",
    "gemm_4bit_swiglu_fused",
    "swiglu_fusable",
    "is_word_aligned",
    "fused_path",
]

NESTED_BLOCKSIZE = 256

# Largest number of rows of A (tokens) for which the ops use the fused kernels; above it they
# dequantize and call F.linear (cuBLAS). H100 crossover (tools/notes_gemm.md): the fused kernel
# beats dequantize + F.linear up to M = 128 on 28672x8192 (269 vs 391 us) and on 4096x4096 with
# the dequantize op measured then (48 vs 71 us), and loses from M = 192 on the large weight.
FUSED_MAX_M = 128


# Weights one grouped GEMV launch takes (kernel arguments per weight slot).
GROUPED_MAX_WEIGHTS = 4


class QuantizedWeight(NamedTuple):
    """One packed 4-bit weight ``W [N, K]`` and its scales, as :func:`gemm_4bit_fused` takes them."""

    B: torch.Tensor
    N: int
    absmax: torch.Tensor
    absmax_8bit: torch.Tensor | None = None
    absmax_code: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one fused kernel launch."""

    block_n: int
    block_k: int
    num_warps: int
    block_m: int = 1
    num_stages: int = 1
    split_k: int | None = None  # dot kernel: None = enough K-splits to fill the GPU
    act_left: bool = False  # dot kernel: A @ W.T instead of W @ A.T


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _lane_code(code):
    """``code[laneid % 16]``: this lane's table entry for the shuffle lookup (a per-thread scalar)."""
    lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [0], dtype=tl.int32, is_pure=True, pack=1)
    return tl.load(code + (lane & 15))


@triton.jit
def _lookup(lane_code, code, q, USE_SHFL: tl.constexpr):
    """fp32 ``code[q & 15]`` for every element of the uint32 tensor ``q``.

    With ``USE_SHFL`` a warp shuffle reads lane ``q & 31`` (lanes ``j`` and ``j + 16`` both hold
    ``code[j]``, so bit 4 need not be cleared); otherwise a gather from ``code``."""
    if USE_SHFL:
        return tl.inline_asm_elementwise(
            "shfl.sync.idx.b32 $0, $1, $2, 31, -1;", "=r,r,r", [lane_code, q], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.load(code + (q & 15))


@triton.jit
def _word_codes(words, lane_code, code, USE_SHFL: tl.constexpr):
    """fp32 ``code[q]`` of the 8 codes of each uint32 word of ``words``, interleaved back to element
    order: returns ``[*words.shape, 2, 2, 2]`` (element ``e = 4 * i + 2 * j + k`` at ``[..., i, j, k]``).

    Little-endian word: byte ``j`` holds element ``2j`` in bits ``8j + 4 .. 8j + 7`` and element
    ``2j + 1`` in bits ``8j .. 8j + 3``."""
    c0 = _lookup(lane_code, code, words >> 4, USE_SHFL)
    c1 = _lookup(lane_code, code, words, USE_SHFL)
    c2 = _lookup(lane_code, code, words >> 12, USE_SHFL)
    c3 = _lookup(lane_code, code, words >> 8, USE_SHFL)
    c4 = _lookup(lane_code, code, words >> 20, USE_SHFL)
    c5 = _lookup(lane_code, code, words >> 16, USE_SHFL)
    c6 = _lookup(lane_code, code, words >> 28, USE_SHFL)
    c7 = _lookup(lane_code, code, words >> 24, USE_SHFL)
    # join appends a trailing axis (held in the thread's registers); nesting (e & 4, e & 2, e & 1)
    # from outer to inner gives element e = 4 * b2 + 2 * b1 + b0.
    even = tl.join(tl.join(c0, c4), tl.join(c2, c6))
    odd = tl.join(tl.join(c1, c5), tl.join(c3, c7))
    return tl.join(even, odd)


@triton.jit
def _dequant_words(words, scale, lane_code, code, USE_SHFL: tl.constexpr, R: tl.constexpr, NB: tl.constexpr,
                   GROUP: tl.constexpr):
    """``code[q] * scale`` (fp32) for the 8 codes of each word of ``words [R, NB, GROUP // 8]``
    (``scale [R, NB, 1]``), in element order: returns ``[R, NB, GROUP]``."""
    codes = _word_codes(words, lane_code, code, USE_SHFL)
    return tl.reshape(codes * scale[:, :, :, None, None, None], [R, NB, GROUP])


@triton.jit
def _block_scales(absmax, absmax_8bit, absmax_code, offset, blk, NESTED: tl.constexpr):
    """fp32 scale of the quantization blocks ``blk`` (int64 tensor)."""
    if NESTED:
        q = tl.load(absmax_8bit + blk).to(tl.int32)
        return tl.load(absmax_code + q) * tl.load(absmax + blk // 256) + offset
    else:
        return tl.load(absmax + blk)


@triton.jit
def _absmax_offset(absmax_offset, NESTED: tl.constexpr):
    if NESTED:
        return tl.load(absmax_offset).to(tl.float32)
    else:
        return 0.0


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _gemv_tile(words, a, scale, lane_code, code, USE_SHFL: tl.constexpr, R: tl.constexpr, W: tl.constexpr):
    """``sum(code[q] * a) * scale`` over each thread's 4-word (32-code) chunks of one K-tile:
    ``words [R, W]`` (uint32), ``a [W, 8]`` (fp32, the activations of each word), ``scale [R, W // 4]``
    (one quantization block per chunk) -> ``[R, W // 4]``."""
    codes = tl.reshape(_word_codes(words, lane_code, code, USE_SHFL), [R, W, 8])
    # one in-thread sum over the chunk's 32 products: a chain of FMAs
    return tl.sum(tl.reshape(codes * a[None, :, :], [R, W // 4, 32]), axis=2) * scale


@triton.jit
def _words_activations(a_loaded, T: tl.constexpr, W: tl.constexpr):
    """fp32 activations ``[W, 8]`` by word, from the load whose row ``v = t + j * T`` holds word
    ``4 t + j`` (see :func:`_gemv_rows`)."""
    a = tl.reshape(tl.permute(tl.reshape(a_loaded, [4, T, 8]), [1, 0, 2]), [W, 8])
    return a.to(tl.float32)


@triton.jit
def _gemv_rows(
    a_row, B, code, absmax, absmax_8bit, absmax_code, absmax_offset, rows, N, K,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_SHFL: tl.constexpr,
):
    """fp32 ``sum_k a_row[k] * W[n, k]`` for the ``BLOCK_N`` weight rows ``rows`` (rows past ``N``
    recompute row ``N - 1``; the caller masks them). Needs ``K % 32 == 0`` and ``BLOCKSIZE >= 32``.

    Layout (no shared memory in the loop on Triton 3.7; one small relayout on 3.6): a K-tile of a row is ``W = BLOCK_K / 8`` words, loaded
    4 consecutive words (16 bytes) per thread, so ``BLOCK_K = 1024 * num_warps`` gives every thread
    one 4-word chunk of every row: the ``BLOCK_N`` rows sit in the thread's registers and share its
    activations. The activations are loaded already in that thread mapping: vector ``v = t + j * T``
    of the load (``T = W / 4`` threads; Triton's 16-byte load layout hands vector ``v`` to thread
    ``v % T``) holds the 8 activations of word ``4 t + j``, and a permute renames ``v`` to the word
    index — a relabeling of registers, where a plain load would need a shared-memory round trip.
    A chunk of 32 codes lies in one quantization block (``BLOCKSIZE >= 32``): its products are
    summed, then scaled once. A last partial K-tile is masked."""
    W: tl.constexpr = BLOCK_K // 8
    T: tl.constexpr = W // 4
    rows_c = tl.minimum(rows, N - 1).to(tl.int64)
    # K // 32 * 4 (= K // 8) tells the compiler each row starts 16-byte aligned.
    words_ptrs = B.to(tl.pointer_type(tl.uint32)) + rows_c[:, None] * (K // 32 * 4) + tl.arange(0, W)[None, :]
    v = tl.arange(0, W)
    word_of_v = (v % T) * 4 + v // T
    a_ptrs = a_row + word_of_v[:, None] * 8 + tl.arange(0, 8)[None, :]
    chunk = tl.arange(0, T)
    blk = rows_c[:, None] * (K // BLOCKSIZE) + (chunk * 32 // BLOCKSIZE)[None, :]
    offset = _absmax_offset(absmax_offset, NESTED)
    lane_code = _lane_code(code) if USE_SHFL else 0.0

    acc = tl.zeros([BLOCK_N, T], dtype=tl.float32)
    k_full = K // BLOCK_K * BLOCK_K
    for k0 in range(0, k_full, BLOCK_K):
        words = tl.load(words_ptrs + k0 // 32 * 4)
        scale = _block_scales(absmax, absmax_8bit, absmax_code, offset, blk + k0 // BLOCKSIZE, NESTED)
        a = _words_activations(tl.load(a_ptrs + k0), T, W)
        acc += _gemv_tile(words, a, scale, lane_code, code, USE_SHFL, BLOCK_N, W)
    if k_full < K:
        word_in_k = (k_full + tl.arange(0, W) * 8) < K
        words = tl.load(words_ptrs + k_full // 32 * 4, mask=word_in_k[None, :], other=0)
        chunk_in_k = (k_full + chunk * 32) < K
        blk_tail = tl.where(chunk_in_k[None, :], blk + k_full // BLOCKSIZE, 0)
        scale = _block_scales(absmax, absmax_8bit, absmax_code, offset, blk_tail, NESTED)
        a = tl.load(a_ptrs + k_full, mask=(k_full + word_of_v * 8 < K)[:, None], other=0.0)
        a = _words_activations(a, T, W)
        acc += _gemv_tile(words, a, tl.where(chunk_in_k[None, :], scale, 0.0), lane_code, code, USE_SHFL, BLOCK_N, W)
    return tl.sum(acc, axis=1)


@triton.jit
def _gemv_4bit_kernel(
    A, B, code, absmax, absmax_8bit, absmax_code, absmax_offset, bias, out,
    M, N, K, stride_am, stride_om,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_SHFL: tl.constexpr,
):
    """``out[m, n-tile] = sum_k A[m, k] * W[n, k]`` on CUDA cores, one row of A per program."""
    pid = tl.program_id(0)
    pid_m = pid % M
    rows = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    res = _gemv_rows(
        A + pid_m.to(tl.int64) * stride_am, B, code, absmax, absmax_8bit, absmax_code, absmax_offset, rows, N, K,
        BLOCKSIZE, NESTED, BLOCK_N, BLOCK_K, USE_SHFL,
    )
    if HAS_BIAS:
        res += tl.load(bias + tl.minimum(rows, N - 1)).to(tl.float32)
    tl.store(out + pid_m.to(tl.int64) * stride_om + rows, res.to(out.dtype.element_ty), mask=rows < N)


@triton.jit
def _pick(index, x0, x1, x2, x3, GROUPS: tl.constexpr):
    """``(x0, x1, x2, x3)[index]`` for a scalar ``index < GROUPS`` (pointers or integers)."""
    x = x0
    if GROUPS > 1:
        x = tl.where(index == 1, x1, x)
    if GROUPS > 2:
        x = tl.where(index == 2, x2, x)
    if GROUPS > 3:
        x = tl.where(index == 3, x3, x)
    return x


@triton.jit
def _gemv_4bit_grouped_kernel(
    A, code, out,
    B0, B1, B2, B3,
    absmax0, absmax1, absmax2, absmax3,
    absmax_8bit0, absmax_8bit1, absmax_8bit2, absmax_8bit3,
    absmax_code0, absmax_code1, absmax_code2, absmax_code3,
    absmax_offset0, absmax_offset1, absmax_offset2, absmax_offset3,
    bias0, bias1, bias2, bias3,
    N0, N1, N2, N3, K,
    GROUPS: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_SHFL: tl.constexpr,
):
    """Up to four GEMVs of one activation row in one launch: ``out[0, col_g + n] = A[0] . W_g[n]``
    with ``col_g = N_0 + ... + N_{g-1}``. The programs of weight ``g`` follow those of weight
    ``g - 1``; each program picks its weight's pointers by its program id and runs the GEMV body."""
    pid = tl.program_id(0)
    end0 = tl.cdiv(N0, BLOCK_N)
    end1 = end0 + tl.cdiv(N1, BLOCK_N)
    end2 = end1 + tl.cdiv(N2, BLOCK_N)
    group = (pid >= end0).to(tl.int32) + (pid >= end1).to(tl.int32) + (pid >= end2).to(tl.int32)
    first_program = _pick(group, 0, end0, end1, end2, GROUPS)
    col = _pick(group, 0, N0, N0 + N1, N0 + N1 + N2, GROUPS)
    N = _pick(group, N0, N1, N2, N3, GROUPS)
    rows = (pid - first_program) * BLOCK_N + tl.arange(0, BLOCK_N)
    res = _gemv_rows(
        A,
        _pick(group, B0, B1, B2, B3, GROUPS),
        code,
        _pick(group, absmax0, absmax1, absmax2, absmax3, GROUPS),
        _pick(group, absmax_8bit0, absmax_8bit1, absmax_8bit2, absmax_8bit3, GROUPS),
        _pick(group, absmax_code0, absmax_code1, absmax_code2, absmax_code3, GROUPS),
        _pick(group, absmax_offset0, absmax_offset1, absmax_offset2, absmax_offset3, GROUPS),
        rows, N, K, BLOCKSIZE, NESTED, BLOCK_N, BLOCK_K, USE_SHFL,
    )
    if HAS_BIAS:
        bias = _pick(group, bias0, bias1, bias2, bias3, GROUPS)
        res += tl.load(bias + tl.minimum(rows, N - 1)).to(tl.float32)
    tl.store(out + col + rows, res.to(out.dtype.element_ty), mask=rows < N)


@triton.jit
def _gemv_4bit_swiglu_kernel(
    A, code, out,
    B0, B1, absmax0, absmax1, absmax_8bit0, absmax_8bit1, absmax_code0, absmax_code1, absmax_offset0, absmax_offset1,
    bias0, bias1, N, K,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_SHFL: tl.constexpr,
):
    """``out[0, n] = silu(A[0] . W_gate[n]) * (A[0] . W_up[n])``: each program runs the GEMV body on
    ``BLOCK_N`` rows of the gate weight (0) and the same rows of the up weight (1), and writes only
    the product. Rounding as two separate ops and a compiled SwiGLU would: each product to out's
    dtype, the SiLU (in fp32) to out's dtype, their product (in fp32) to out's dtype."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    gate = _gemv_rows(A, B0, code, absmax0, absmax_8bit0, absmax_code0, absmax_offset0, rows, N, K,
                      BLOCKSIZE, NESTED, BLOCK_N, BLOCK_K, USE_SHFL)
    up = _gemv_rows(A, B1, code, absmax1, absmax_8bit1, absmax_code1, absmax_offset1, rows, N, K,
                    BLOCKSIZE, NESTED, BLOCK_N, BLOCK_K, USE_SHFL)
    if HAS_BIAS:
        gate += tl.load(bias0 + tl.minimum(rows, N - 1)).to(tl.float32)
        up += tl.load(bias1 + tl.minimum(rows, N - 1)).to(tl.float32)
    dtype = out.dtype.element_ty
    gate = gate.to(dtype).to(tl.float32)
    activated = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out + rows, (activated * up.to(dtype).to(tl.float32)).to(dtype), mask=rows < N)


@triton.jit(do_not_specialize=["M"])
def _gemm_4bit_dot_kernel(
    A, B, code, absmax, absmax_8bit, absmax_code, absmax_offset, bias, out, workspace, counters,
    M, N, K, stride_am, stride_om,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    ACT_LEFT: tl.constexpr, USE_SHFL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """``out[m-tile, n-tile]`` with the dequantized weight tile rounded to A's dtype and ``tl.dot``.

    Needs ``K % (SPLIT_K * BLOCK_K) == 0`` and ``K % BLOCKSIZE == 0``. Loads run one K-tile ahead.
    With ``SPLIT_K > 1`` each of the ``SPLIT_K`` programs of a tile sums one slice of K into
    ``workspace [SPLIT_K, M, N]`` (fp32) and bumps ``counters[tile]``; the last to arrive adds the
    slices in split order (deterministic), writes ``out`` and resets the counter to 0.
    ``ACT_LEFT`` computes ``A @ W.T`` (activations as the left MMA operand, the weight tile from
    shared memory) instead of ``W @ A.T``; the result is the same."""
    pid = tl.program_id(0)
    split = pid % SPLIT_K
    tile = pid // SPLIT_K
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = tile % num_m  # M-tiles of one weight tile are neighbours: the tile is read from L2
    pid_n = tile // num_m
    GROUP: tl.constexpr = min(BLOCKSIZE, BLOCK_K)
    NB: tl.constexpr = BLOCK_K // GROUP
    WG: tl.constexpr = GROUP // 8
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.minimum(rows, N - 1).to(tl.int64)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ms_c = tl.minimum(ms, M - 1).to(tl.int64)  # tail rows of A repeat row M-1; not stored
    g = tl.arange(0, NB)
    words_ptrs = (
        B.to(tl.pointer_type(tl.uint32))
        + rows_c[:, None, None] * (K // 8)
        + (g * WG)[None, :, None]
        + tl.arange(0, WG)[None, None, :]
    )
    blk = rows_c[:, None] * (K // BLOCKSIZE) + (g * GROUP // BLOCKSIZE)[None, :]
    a_ptrs = A + ms_c[:, None] * stride_am + tl.arange(0, BLOCK_K)[None, :]
    offset = _absmax_offset(absmax_offset, NESTED)
    lane_code = _lane_code(code) if USE_SHFL else 0.0

    k_len = K // SPLIT_K
    k_begin = split * k_len
    k_last = k_begin + k_len - BLOCK_K
    if ACT_LEFT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    words = tl.load(words_ptrs + k_begin // 8)
    scale = _block_scales(absmax, absmax_8bit, absmax_code, offset, blk + k_begin // BLOCKSIZE, NESTED)
    for k0 in range(k_begin, k_begin + k_len, BLOCK_K):
        k_next = tl.minimum(k0 + BLOCK_K, k_last)
        words_next = tl.load(words_ptrs + k_next // 8)
        scale_next = _block_scales(absmax, absmax_8bit, absmax_code, offset, blk + k_next // BLOCKSIZE, NESTED)
        w = _dequant_words(words, scale[:, :, None], lane_code, code, USE_SHFL, BLOCK_N, NB, GROUP)
        w = tl.reshape(w, [BLOCK_N, BLOCK_K]).to(A.dtype.element_ty)
        a = tl.load(a_ptrs + k0)
        if ACT_LEFT:
            acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(w, tl.trans(a), acc, input_precision=DOT_PRECISION)
        words = words_next
        scale = scale_next
    if ACT_LEFT:
        acc = tl.trans(acc)

    mask = (rows[:, None] < N) & (ms[None, :] < M)
    tile_offsets = ms[None, :].to(tl.int64) * N + rows[:, None]
    if SPLIT_K > 1:
        tl.store(workspace + split * M * N + tile_offsets, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is stored before the counter is released
        arrived = tl.atomic_add(counters + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                acc += tl.load(workspace + s * M * N + tile_offsets, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(counters + tile, 0)
            _store_out(acc, bias, rows_c, out, ms, rows, stride_om, mask, HAS_BIAS)
    else:
        _store_out(acc, bias, rows_c, out, ms, rows, stride_om, mask, HAS_BIAS)


@triton.jit
def _store_out(acc, bias, rows_c, out, ms, rows, stride_om, mask, HAS_BIAS: tl.constexpr):
    """``out[m, n] = acc[n, m] (+ bias[n])`` in out's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias + rows_c).to(tl.float32)[:, None]
    out_ptrs = out + ms[None, :].to(tl.int64) * stride_om + rows[:, None]
    tl.store(out_ptrs, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _gemm_4bit_generic_kernel(
    A, B, code, absmax, absmax_8bit, absmax_code, absmax_offset, bias, out,
    M, N, K, stride_am, stride_ak, stride_om,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Any ``K`` and packed alignment: every element computes its own byte, nibble and block from
    its flat index ``n * K + k`` (int64). The weight tile is ``dtype(code[q] * scale)``."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m
    pid_n = pid // num_m
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    offset = _absmax_offset(absmax_offset, NESTED)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        w_mask = (rows[:, None] < N) & (kk[None, :] < K)
        e = rows[:, None].to(tl.int64) * K + kk[None, :]
        byte = tl.load(B + (e >> 1), mask=w_mask, other=0).to(tl.int32)
        q = (byte >> (4 - 4 * (e & 1)).to(tl.int32)) & 15
        scale = _block_scales(absmax, absmax_8bit, absmax_code, offset, e // BLOCKSIZE, NESTED)
        w = tl.where(w_mask, tl.load(code + q) * scale, 0.0).to(A.dtype.element_ty)
        a_mask = (ms[:, None] < M) & (kk[None, :] < K)
        a = tl.load(A + ms[:, None].to(tl.int64) * stride_am + kk[None, :] * stride_ak, mask=a_mask, other=0.0)
        acc = tl.dot(w, tl.trans(a), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out + ms[None, :].to(tl.int64) * stride_om + rows[:, None]
    tl.store(out_ptrs, acc.to(out.dtype.element_ty), mask=(rows[:, None] < N) & (ms[None, :] < M))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def is_word_aligned(B: torch.Tensor, K: int, blocksize: int) -> bool:
    """Whether the word kernels can read this weight: whole blocks per row, 4-byte aligned bytes."""
    return K % blocksize == 0 and B.data_ptr() % 4 == 0


def fused_path(M: int, B: torch.Tensor, K: int, blocksize: int) -> str:
    """Which fused kernel :func:`gemm_4bit_fused` uses: ``"gemv"``, ``"dot"`` or ``"generic"``."""
    if not is_word_aligned(B, K, blocksize):
        return "generic"
    return "gemv" if M == 1 else "dot"


def _cdiv(a: int, b: int) -> int:
    # triton.cdiv is a JIT-aware wrapper that costs ~10 us per host call.
    return (a + b - 1) // b


def _largest_dividing_pow2(K: int, limit: int) -> int:
    """Largest power of two ``<= limit`` that divides ``K`` (``K`` a multiple of 32)."""
    block = limit
    while K % block:
        block //= 2
    return block


@functools.lru_cache(maxsize=None)
def _gemv_config(N: int, K: int) -> KernelConfig:
    # H200 A/B of (rows, warps) on the Llama-3-8B shapes (tools/notes_gemm.md): 8 rows per thread
    # once there are enough rows to keep the GPU busy (with one warp per program from 16384 rows),
    # 4 rows otherwise, 4 warps for the small k/v projections. BLOCK_K = 1024 codes per warp gives
    # each thread one 4-word chunk per row and K-tile (see _gemv_rows).
    block_n = 8 if N >= 8192 else 4
    num_warps = 1 if N >= 16384 else (4 if N <= 2048 else 2)
    while num_warps > 1 and K < 1024 * num_warps:
        num_warps //= 2
    return KernelConfig(block_n=block_n, block_k=1024 * num_warps, num_warps=num_warps)


@functools.lru_cache(maxsize=None)
def _dot_config(M: int, N: int, K: int) -> KernelConfig:
    block_m = 16 if M <= 16 else (32 if M <= 32 else (64 if M <= 64 else 128))
    return KernelConfig(block_n=64, block_k=_largest_dividing_pow2(K, 128), num_warps=4, block_m=block_m)


def _generic_config(M: int, N: int, K: int) -> KernelConfig:
    return KernelConfig(block_n=64, block_k=64, num_warps=4, block_m=16 if M <= 16 else 32)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@functools.lru_cache(maxsize=None)
def _split_k(tiles: int, K: int, block_k: int, block_m: int, device: torch.device) -> int:
    """K-splits for the dot kernel: double while there are fewer programs than the target and each
    split keeps at least 4 K-tiles. Target (H100 sweep): 4 programs per multiprocessor for
    ``block_m <= 32``, 1.5 for the heavier ``block_m >= 64`` programs."""
    sms = _multiprocessors(device)
    target = 4 * sms if block_m <= 32 else 3 * sms // 2
    split = 1
    while tiles * split < target and K % (2 * split * block_k) == 0 and K // (2 * split) >= 4 * block_k:
        split *= 2
    return split


def _counters(tiles: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 arrival counters for the split-K reduction, allocated per call.

    A buffer cached across calls would outlive a CUDA-graph capture (cudagraph trees reject
    allocations from their pool that are not graph outputs); the memset is one tiny launch."""
    return torch.zeros(tiles, dtype=torch.int32, device=device)


def _uses_shuffle_lookup(device: torch.device) -> bool:
    # the warp-shuffle code lookup is NVIDIA PTX; the interpreter and ROCm use the gather
    return device.type == "cuda" and torch.version.hip is None


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 activations keep fp32 products (the reference's F.linear); 16-bit ones use the MMA.
    return "ieee" if dtype == torch.float32 else "tf32"


def gemm_4bit_fused(
    A: torch.Tensor,
    B: torch.Tensor,
    N: int,
    K: int,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    bias: torch.Tensor | None = None,
    absmax_8bit: torch.Tensor | None = None,
    absmax_code: torch.Tensor | None = None,
    absmax_offset: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    path: str | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """``A [M, K] @ W.T (+ bias)`` into ``out [M, N]`` (A's dtype) with one fused kernel.

    ``B`` holds the packed bytes of ``W [N, K]`` in any storage dtype; ``absmax`` is fp32, per block
    (or per 256 blocks with ``absmax_8bit``/``absmax_code``/``absmax_offset``); ``code`` is the
    16-entry fp32 table. Arguments are assumed checked (``ops._checks``). ``path`` and ``config``
    override the choice of kernel and tiles (tests and benchmarks); by default the kernel comes
    from :func:`fused_path`. ``out``, if given, is ``[M, N]`` with unit stride along N (the
    columns of a wider output are fine).
    """
    M = A.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=A.dtype, device=A.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        out.copy_(bias.expand(M, N) if bias is not None else torch.zeros((), dtype=A.dtype, device=A.device))
        return out
    packed = B.reshape(-1).view(torch.uint8)
    nested = absmax_8bit is not None
    dummy = absmax  # pointer for arguments a variant does not read
    args = (
        packed,
        code,
        absmax,
        absmax_8bit if nested else dummy,
        absmax_code if nested else dummy,
        absmax_offset if nested else dummy,
        bias if bias is not None else dummy,
        out,
    )
    use_shfl = _uses_shuffle_lookup(A.device)
    path = path or fused_path(M, packed, K, blocksize)
    if path != "generic" and A.stride(1) != 1:
        A = A.contiguous()
    common = dict(BLOCKSIZE=blocksize, NESTED=nested, HAS_BIAS=bias is not None)
    if path == "gemv":
        cfg = config or _gemv_config(N, K)
        grid = (_cdiv(N, cfg.block_n) * M,)
        _gemv_4bit_kernel[grid](
            A, *args, M, N, K, A.stride(0), out.stride(0), **common,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, USE_SHFL=use_shfl,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    elif path == "dot":
        cfg = config or _dot_config(M, N, K)
        tiles = _cdiv(N, cfg.block_n) * _cdiv(M, cfg.block_m)
        split_k = cfg.split_k or _split_k(tiles, K, cfg.block_k, cfg.block_m, A.device)
        if split_k > 1:
            workspace = torch.empty((split_k, M, N), dtype=torch.float32, device=A.device)
            counters = _counters(tiles, A.device)
        else:
            workspace = counters = dummy
        _gemm_4bit_dot_kernel[(tiles * split_k,)](
            A, *args, workspace, counters, M, N, K, A.stride(0), out.stride(0), **common,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split_k, ACT_LEFT=cfg.act_left,
            USE_SHFL=use_shfl,
            DOT_PRECISION=_dot_precision(A.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    elif path == "generic":
        cfg = config or _generic_config(M, N, K)
        grid = (_cdiv(N, cfg.block_n) * _cdiv(M, cfg.block_m),)
        _gemm_4bit_generic_kernel[grid](
            A, *args, M, N, K, A.stride(0), A.stride(1), out.stride(0), **common,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            DOT_PRECISION=_dot_precision(A.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    else:
        raise ValueError(f"path must be 'gemv', 'dot' or 'generic', got {path!r}")
    return out


def gemm_4bit_grouped_fused(
    A: torch.Tensor,
    weights: Sequence[QuantizedWeight],
    K: int,
    code: torch.Tensor,
    blocksize: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``cat([A @ W_g.T (+ bias_g) for g], dim=1)`` into ``out [M, sum N_g]``: several weights
    that read the same activations (q/k/v, gate/up projections) in one output.

    One row of ``A`` and up to :data:`GROUPED_MAX_WEIGHTS` word-aligned weights, all with or all
    without double quantization and bias: one launch of the grouped GEMV, whose programs cover
    every weight's rows (a small weight alone leaves most of the GPU idle; the launches of a
    decode step are latency-bound). Otherwise one :func:`gemm_4bit_fused` per weight into its
    columns of ``out``. Arguments are assumed checked (``ops._checks``).
    """
    M = A.shape[0]
    total = sum(w.N for w in weights)
    if out is None:
        out = torch.empty((M, total), dtype=A.dtype, device=A.device)
    if not (1 < len(weights) <= GROUPED_MAX_WEIGHTS and _one_gemv_launch(M, weights, K, blocksize)):
        column = 0
        for w in weights:
            gemm_4bit_fused(
                A, w.B, w.N, K, w.absmax, code, blocksize, w.bias, w.absmax_8bit, w.absmax_code, w.absmax_offset,
                out=out[:, column:column + w.N],
            )
            column += w.N
        return out
    if A.stride(1) != 1:
        A = A.contiguous()
    packed = [w.B.reshape(-1).view(torch.uint8) for w in weights]
    cfg = _gemv_config(total, K)  # the grid covers every weight's rows: size it by their sum
    padding = GROUPED_MAX_WEIGHTS - len(weights)

    def slots(values: list) -> list:
        return values + [values[0]] * padding  # unused slots repeat a valid pointer; never read

    def tensors(field: str) -> list:
        return slots([getattr(w, field) if getattr(w, field) is not None else w.absmax for w in weights])

    sizes = [w.N for w in weights] + [0] * padding
    grid = (sum(_cdiv(w.N, cfg.block_n) for w in weights),)
    _gemv_4bit_grouped_kernel[grid](
        A, code, out, *slots(packed), *tensors("absmax"), *tensors("absmax_8bit"), *tensors("absmax_code"),
        *tensors("absmax_offset"), *tensors("bias"), *sizes, K,
        GROUPS=len(weights), BLOCKSIZE=blocksize, NESTED=weights[0].absmax_8bit is not None,
        HAS_BIAS=weights[0].bias is not None,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, USE_SHFL=_uses_shuffle_lookup(A.device),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def _one_gemv_launch(M: int, weights: Sequence[QuantizedWeight], K: int, blocksize: int) -> bool:
    """What one launch of a multi-weight GEMV takes: one row of A, word-aligned weights that all
    have or all lack double quantization, and all have or all lack a bias."""
    return (
        M == 1
        and K > 0
        and len({w.absmax_8bit is None for w in weights}) == 1
        and len({w.bias is None for w in weights}) == 1
        and all(is_word_aligned(w.B.reshape(-1).view(torch.uint8), K, blocksize) for w in weights)
    )


def swiglu_fusable(M: int, gate: QuantizedWeight, up: QuantizedWeight, K: int, blocksize: int) -> bool:
    """Whether :func:`gemm_4bit_swiglu_fused` takes these weights: one launch's worth
    (:func:`_one_gemv_launch`) of two weights of one shape."""
    return gate.N == up.N and _one_gemv_launch(M, (gate, up), K, blocksize)


def gemm_4bit_swiglu_fused(
    A: torch.Tensor,
    gate: QuantizedWeight,
    up: QuantizedWeight,
    K: int,
    code: torch.Tensor,
    blocksize: int,
    out: torch.Tensor | None = None,
    *,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """``silu(A @ W_gate.T) * (A @ W_up.T)`` (biases added to each product) into ``out [1, N]``, one
    launch for weights that :func:`swiglu_fusable` accepts. Arguments are assumed checked."""
    if not swiglu_fusable(A.shape[0], gate, up, K, blocksize):
        raise ValueError("gemm_4bit_swiglu_fused needs one row of A and two word-aligned weights of one shape and format")
    N = gate.N
    if out is None:
        out = torch.empty((1, N), dtype=A.dtype, device=A.device)
    if N == 0:
        return out
    if A.stride(1) != 1:
        A = A.contiguous()
    # each program computes BLOCK_N rows of both weights: tiles sized as for their 2 N rows
    cfg = config or _gemv_config(2 * N, K)
    nested = gate.absmax_8bit is not None

    def pair(field: str) -> list:
        return [getattr(w, field) if getattr(w, field) is not None else w.absmax for w in (gate, up)]

    _gemv_4bit_swiglu_kernel[(_cdiv(N, cfg.block_n),)](
        A, code, out, gate.B.reshape(-1).view(torch.uint8), up.B.reshape(-1).view(torch.uint8),
        *pair("absmax"), *pair("absmax_8bit"), *pair("absmax_code"), *pair("absmax_offset"), *pair("bias"), N, K,
        BLOCKSIZE=blocksize, NESTED=nested, HAS_BIAS=gate.bias is not None,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, USE_SHFL=_uses_shuffle_lookup(A.device),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
