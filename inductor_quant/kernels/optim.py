"""Triton kernels for the optimizer updates: 32-bit states, blockwise 8-bit states, multi-tensor.

Numerics follow ``inductor_quant.reference.optim`` (the oracle). Every state is computed in fp32
with the reference's order of operations and FMA contraction disabled (``enable_fp_fusion=False``),
so new states equal the reference's bit for bit. Only the update direction of adam, rmsprop and
adagrad uses the fast ``div.full``/``sqrt.approx`` instructions: it moves ``p`` by ``lr * u``, a
product of quotients with a few ulp of error relative to the step (the reference's CPU ``sqrt``
is not correctly rounded either). AdEMAMix's direction adds two terms that can cancel, so it
divides with IEEE ``div_rn``/``sqrt_rn``.
Host constants (``1 - beta``, ``beta ** step``, ``eps * c2``, ``1 - lr * wd``) are computed in
Python double and rounded to fp32 once, as the reference's ``float * tensor`` arithmetic does.

8-bit states (256-element blocks; a program updates ``BLOCKS`` blocks): codes are dequantized
in registers (``qmap[q] * absmax``), updated, used unquantized for the parameter, then requantized
with a fresh per-block absmax. The nearest code ``#{midpoints < x}`` is found without a search
loop: a bucket table indexed by the fp32 bits of ``x`` (sign, exponent clamped to the 24 binades
below 2.0, top 7 mantissa bits; monotone in ``x``) holds the number of midpoints in lower buckets,
and ``K`` compares against the next midpoints finish the count, where ``K`` is the most midpoints
any bucket holds (1 for both dynamic maps). Maps with ``K > MAX_BUCKET_CODES`` use a branch-free
search over the 255 midpoints in breadth-first (Eytzinger) order instead. The tables are built
on the host once per map (cached by data pointer and version counter).

Full chunks run without masks from pointers advanced by a scalar int64 offset, so loads are
16-byte vectors and per-element index math is 32-bit; only a tensor's last chunk is masked.
Offsets are int64, so tensors may exceed 2**31 elements.

Multi-tensor: one launch updates a list of tensors of one parameter dtype. Each program reads
one row of a program table (int64 data pointers already advanced to its chunk, and the elements
left), built on the host, cached by the tensors' pointers and sizes, and copied to the device once.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from ._constants import MapCache, to_device_constant

__all__ = [
    "BLOCKSIZE",
    "FORMULAS",
    "SearchTables",
    "bucket_keys",
    "search_tables",
    "update_8bit_blockwise",
    "update_32bit",
    "multi_update_8bit_blockwise",
    "multi_update_32bit",
    "row_8bit",
    "row_32bit",
    "rows_8bit",
    "rows_32bit",
    "launch_multi_8bit",
    "launch_multi_32bit",
]

BLOCKSIZE = 256

ADAM: tl.constexpr = tl.constexpr(0)
ADEMAMIX: tl.constexpr = tl.constexpr(1)
MOMENTUM: tl.constexpr = tl.constexpr(2)
RMSPROP: tl.constexpr = tl.constexpr(3)
LION: tl.constexpr = tl.constexpr(4)
ADAGRAD: tl.constexpr = tl.constexpr(5)

# lamb and lars are adam and momentum plus update-norm clipping.
FORMULAS = {"adam": 0, "lamb": 0, "ademamix": 1, "momentum": 2, "lars": 2, "rmsprop": 3, "lion": 4, "adagrad": 5}
_TWO_STATE = (0, 1)
_NO_NORM = (1, 5)  # ademamix and adagrad ignore max_unorm

# Bucket table of the nearest-code search (module docstring).
LUT_EXPONENTS: tl.constexpr = tl.constexpr(24)
LUT_MANTISSA_BITS: tl.constexpr = tl.constexpr(7)
LUT_SIDE: tl.constexpr = tl.constexpr((24 + 1) << 7)
LUT_PAD: tl.constexpr = tl.constexpr(8192)  # power of two >= 2 * LUT_SIDE (for tl.gather)
MAX_BUCKET_CODES = 4
SEARCH_BUCKETS = 0
SEARCH_TREE = 1

# The interpreter truncates fp32 -> bf16 casts; kernels round by hand there (see _round).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Launch shapes (measured on H100, tools/notes_optim.md).
BLOCKS_8BIT = 8
WARPS_8BIT = 8
GATHER_8BIT = True
GATHER_LUT_8BIT = True
MAXNREG_8BIT = 80  # 3 programs of 8 warps per SM (the multi-tensor kernel would take ~100 registers)


def _register_cap(formula: int, maxnreg: int | None) -> int | None:
    """AdEMAMix (three states) would spill under the cap: it keeps the compiler's choice."""
    return None if formula == 1 else maxnreg
BLOCK_32BIT = 2048
WARPS_32BIT = 8

# Multi-tensor table row (int64): data pointers, then the element count.
_A1, _N = 5, 8
_COLUMNS: tl.constexpr = tl.constexpr(10)


# ---------------------------------------------------------------------------------------------
# Shared device functions
# ---------------------------------------------------------------------------------------------


@triton.jit
def _round(x, DTYPE: tl.constexpr, EXACT_BF16: tl.constexpr):
    """``x`` (fp32) rounded to nearest-even in ``DTYPE``, returned as fp32."""
    if DTYPE == tl.float32:
        return x
    elif EXACT_BF16 and DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _states_and_direction(
    g, s1, s1b, s2, first_step, beta1, omb1, beta2, omb2, beta3, omb3, alpha, eps, bias1, bias2,
    OPT: tl.constexpr,
):
    """New fp32 states and the update direction ``u`` (``p -= lr * u``).

    ``s1b`` is AdEMAMix's second momentum. Host constants: adam ``eps = eps * c2`` and
    ``bias1 = c2 / c1``; ademamix ``bias1 = c1``, ``bias2 = c2``."""
    if OPT == ADAM:
        new1 = beta1 * s1 + omb1 * g
        new2 = beta2 * s2 + omb2 * g * g
        new1b = new1
        direction = new1 / (tl.sqrt(new2) + eps) * bias1
    elif OPT == ADEMAMIX:
        new1 = beta1 * s1 + omb1 * g
        new1b = beta3 * s1b + omb3 * g
        new2 = beta2 * s2 + omb2 * g * g
        # IEEE division and sqrt here: m1 / c1 + alpha * m2 can cancel, which would magnify the
        # fast division's error far beyond the few ulp the other formulas keep.
        numerator = tl.math.div_rn(new1, bias1) + alpha * new1b
        direction = tl.math.div_rn(numerator, tl.math.div_rn(tl.sqrt_rn(new2), bias2) + eps)
    elif OPT == MOMENTUM:
        new1 = tl.where(first_step != 0, g, beta1 * s1 + g)
        new1b = new1
        new2 = new1
        direction = new1
    elif OPT == RMSPROP:
        new1 = beta1 * s1 + omb1 * g * g
        new1b = new1
        new2 = new1
        direction = g / (tl.sqrt(new1) + eps)
    elif OPT == LION:
        mix = beta1 * s1 + omb1 * g
        direction = (mix > 0).to(tl.float32) - (mix < 0).to(tl.float32)
        new1 = beta2 * s1 + omb2 * g
        new1b = new1
        new2 = new1
    else:  # ADAGRAD
        new1 = s1 + g * g
        new1b = new1
        new2 = new1
        direction = g / (tl.sqrt(new1) + eps)
    return new1, new1b, new2, direction


@triton.jit
def _load(pointers, mask, MASKED: tl.constexpr):
    """Masked load (zeros outside) or, for a full chunk, a plain one."""
    if MASKED:
        return tl.load(pointers, mask=mask, other=0)
    else:
        return tl.load(pointers)


@triton.jit
def _pointer(row_ptr, column: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """A data pointer read from a multi-tensor table row (16-byte aligned when ``ALIGNED``)."""
    pointer = tl.load(row_ptr + column).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


# ---------------------------------------------------------------------------------------------
# 8-bit blockwise
# ---------------------------------------------------------------------------------------------


@triton.jit
def _bucket(x):
    """Bucket of ``x`` in the search table: monotone non-decreasing in ``x`` (``bucket_keys``).

    Only normalized values reach it, so ``|x| < 2`` (``state * (1 / absmax)``, NaN replaced by 0)
    and the exponent needs no upper clamp."""
    bits = x.to(tl.int32, bitcast=True)
    low: tl.constexpr = (127 - LUT_EXPONENTS) << 23
    index = (tl.maximum(bits & 0x7FFFFFFF, low) - low) >> (23 - LUT_MANTISSA_BITS)
    return tl.where(bits < 0, LUT_SIDE - 1 - index, LUT_SIDE + index)


@triton.jit
def _lookup(table, table_ptr, index, BLOCKS: tl.constexpr, GATHER: tl.constexpr):
    """``table[index]`` for a ``(BLOCKS, 256)`` index tile: from registers through ``tl.gather``
    (``table``) or from the L1-resident table in global memory (``table_ptr``)."""
    if GATHER:
        flat = tl.reshape(index, [BLOCKS * 256])
        return tl.reshape(tl.gather(table, flat, 0), [BLOCKS, 256])
    else:
        return tl.load(table_ptr + index)


@triton.jit
def _nearest_code(
    x, lut, lut_ptr, mids, mids_ptr,
    BLOCKS: tl.constexpr, SEARCH: tl.constexpr, K: tl.constexpr, GATHER: tl.constexpr, GATHER_LUT: tl.constexpr,
):
    """``#{midpoints < x}`` (int32): bucket table plus ``K`` compares, or the Eytzinger search
    (``mids`` then holds the tree, node ``k`` at index ``k``)."""
    if SEARCH == 0:
        low = _lookup(lut, lut_ptr, _bucket(x), BLOCKS, GATHER_LUT).to(tl.int32)
        code = low
        for j in tl.static_range(K):
            if j == 0:
                index = low
            else:
                index = tl.minimum(low + j, 255)  # midpoint 255 is +inf: indices past it count nothing
            code += (_lookup(mids, mids_ptr, index, BLOCKS, GATHER) < x).to(tl.int32)
    else:
        node = 2 + (x > tl.load(mids_ptr + 1)).to(tl.int32)
        for _ in tl.static_range(7):
            node = 2 * node + (_lookup(mids, mids_ptr, node, BLOCKS, GATHER) < x).to(tl.int32)
        code = node - 256
    return code


@triton.jit
def _dequantize(
    q_ptr, absmax_ptr, offs, mask, rows, row_mask, qmap, qmap_ptr,
    MASKED: tl.constexpr, BLOCKS: tl.constexpr, GATHER: tl.constexpr,
):
    codes = _load(q_ptr + offs, mask, MASKED).to(tl.int32)
    absmax = _load(absmax_ptr + rows, row_mask, MASKED)
    return _lookup(qmap, qmap_ptr, codes, BLOCKS, GATHER) * absmax[:, None]


@triton.jit
def _requantize(
    state, q_ptr, absmax_ptr, offs, mask, rows, row_mask, lut, lut_ptr, mids, mids_ptr, negatives,
    SIGNED: tl.constexpr, MASKED: tl.constexpr, BLOCKS: tl.constexpr, SEARCH: tl.constexpr, K: tl.constexpr,
    GATHER: tl.constexpr, GATHER_LUT: tl.constexpr,
):
    """Store the nearest codes of ``state * (1 / absmax)`` and the new per-block absmax.

    ``absmax`` is the integer max of the magnitude bits (NaN-propagating, like ``amax``); a NaN
    normalized value (zero or non-finite block) takes the code of 0.0. Signed states get the sign
    fix: a negative value on a code >= 0 moves one code down, a positive one on a negative code
    one up (``negatives`` = number of negative codes of the ascending map)."""
    magnitude = state.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    if MASKED:
        magnitude = tl.where(mask, magnitude, 0)
    absmax = tl.max(magnitude, axis=1).to(tl.float32, bitcast=True)
    inverse = tl.math.div_rn(tl.full([BLOCKS], 1.0, tl.float32), absmax)
    normalized = state * inverse[:, None]
    normalized = tl.where(normalized != normalized, 0.0, normalized)
    code = _nearest_code(normalized, lut, lut_ptr, mids, mids_ptr, BLOCKS, SEARCH, K, GATHER, GATHER_LUT)
    if SIGNED:
        nonnegative = code >= negatives
        code = code - ((state < 0) & nonnegative).to(tl.int32) + ((state > 0) & (~nonnegative)).to(tl.int32)
    tl.store(q_ptr + offs, code.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + rows, absmax, mask=row_mask)


@triton.jit
def _update_8bit_tile(
    g_ptr, p_ptr, s1_ptr, s1b_ptr, s2_ptr, a1_ptr, a1b_ptr, a2_ptr, qmap1_ptr, qmap2_ptr, lut_ptr, mids_ptr,
    negatives, remaining,
    first_step, beta1, omb1, beta2, omb2, beta3, omb3, alpha, eps, bias1, bias2, lr, wd, decay, gnorm_scale,
    OPT: tl.constexpr, HAS_WD: tl.constexpr, SKIP_ZEROS: tl.constexpr, EXACT_BF16: tl.constexpr,
    BLOCKS: tl.constexpr, SEARCH: tl.constexpr, K: tl.constexpr, GATHER: tl.constexpr, GATHER_LUT: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Update ``BLOCKS`` blocks; pointers are already advanced to the chunk. ``MASKED``: only the
    first ``remaining`` elements exist."""
    P_DTYPE: tl.constexpr = p_ptr.dtype.element_ty
    TWO_STATE: tl.constexpr = OPT == ADAM or OPT == ADEMAMIX
    rows = tl.arange(0, BLOCKS)
    offs = rows[:, None] * 256 + tl.arange(0, 256)[None, :]
    if MASKED:
        mask = offs < remaining
        row_mask = rows * 256 < remaining
    else:
        mask = None
        row_mask = None
    table_index = tl.arange(0, 256)
    if GATHER:
        qmap1 = tl.load(qmap1_ptr + table_index)
        qmap2 = tl.load(qmap2_ptr + table_index)
        mids1 = tl.load(mids_ptr + table_index)
        mids2 = tl.load(mids_ptr + 256 + table_index)
    else:
        qmap1 = qmap1_ptr
        qmap2 = qmap2_ptr
        mids1 = mids_ptr
        mids2 = mids_ptr
    if GATHER_LUT:
        lut1 = tl.load(lut_ptr + tl.arange(0, LUT_PAD))
        lut2 = tl.load(lut_ptr + LUT_PAD + tl.arange(0, LUT_PAD))
    else:
        lut1 = lut_ptr
        lut2 = lut_ptr

    raw_g = _load(g_ptr + offs, mask, MASKED).to(tl.float32)
    p_old = _load(p_ptr + offs, mask, MASKED).to(tl.float32)
    s1 = _dequantize(s1_ptr, a1_ptr, offs, mask, rows, row_mask, qmap1, qmap1_ptr, MASKED, BLOCKS, GATHER)
    s1b = s1
    s2 = s1
    if OPT == ADEMAMIX:
        s1b = _dequantize(s1b_ptr, a1b_ptr, offs, mask, rows, row_mask, qmap1, qmap1_ptr, MASKED, BLOCKS, GATHER)
    if TWO_STATE:
        s2 = _dequantize(s2_ptr, a2_ptr, offs, mask, rows, row_mask, qmap2, qmap2_ptr, MASKED, BLOCKS, GATHER)

    g = raw_g * gnorm_scale
    p = p_old
    if HAS_WD and not TWO_STATE and OPT != LION:
        g = g + wd * p
    if HAS_WD and OPT == LION:
        p = _round(p * decay, P_DTYPE, EXACT_BF16)
    new1, new1b, new2, direction = _states_and_direction(
        g, s1, s1b, s2, first_step, beta1, omb1, beta2, omb2, beta3, omb3, alpha, eps, bias1, bias2, OPT
    )
    if OPT == LION:
        new_p = _round(p - _round(lr * direction, P_DTYPE, EXACT_BF16), P_DTYPE, EXACT_BF16)
    else:
        new_p = _round(p - lr * direction, P_DTYPE, EXACT_BF16)
    if HAS_WD and TWO_STATE:
        new_p = _round(new_p * decay, P_DTYPE, EXACT_BF16)

    if TWO_STATE:
        finite = tl.abs(raw_g) < float("inf")
        new_p = tl.where(finite, new_p, p_old)
        new1 = tl.where(finite, new1, 0.0)
        new1b = tl.where(finite, new1b, 0.0)
        new2 = tl.where(finite, new2, 0.0)
    elif SKIP_ZEROS:
        keep = raw_g != 0
        new_p = tl.where(keep, new_p, p_old)
        new1 = tl.where(keep, new1, s1)

    tl.store(p_ptr + offs, new_p.to(P_DTYPE), mask=mask)
    _requantize(new1, s1_ptr, a1_ptr, offs, mask, rows, row_mask, lut1, lut_ptr, mids1, mids_ptr, negatives,
                True, MASKED, BLOCKS, SEARCH, K, GATHER, GATHER_LUT)
    if OPT == ADEMAMIX:
        _requantize(new1b, s1b_ptr, a1b_ptr, offs, mask, rows, row_mask, lut1, lut_ptr, mids1, mids_ptr, negatives,
                    True, MASKED, BLOCKS, SEARCH, K, GATHER, GATHER_LUT)
    if TWO_STATE:
        _requantize(new2, s2_ptr, a2_ptr, offs, mask, rows, row_mask, lut2, lut_ptr + LUT_PAD, mids2, mids_ptr + 256,
                    negatives, False, MASKED, BLOCKS, SEARCH, K, GATHER, GATHER_LUT)


@triton.jit
def _update_8bit_span(
    g_ptr, p_ptr, s1_ptr, s1b_ptr, s2_ptr, a1_ptr, a1b_ptr, a2_ptr, qmap1_ptr, qmap2_ptr, lut_ptr, mids_ptr,
    negatives, remaining,
    first_step, beta1, omb1, beta2, omb2, beta3, omb3, alpha, eps, bias1, bias2, lr, wd, decay, gnorm_scale,
    OPT: tl.constexpr, HAS_WD: tl.constexpr, SKIP_ZEROS: tl.constexpr, EXACT_BF16: tl.constexpr,
    BLOCKS: tl.constexpr, SEARCH: tl.constexpr, K: tl.constexpr, GATHER: tl.constexpr, GATHER_LUT: tl.constexpr,
):
    """The chunk at the (already advanced) pointers, ``remaining`` (int64) elements left in its
    tensor: a full chunk runs the unmasked tile, a tensor's last one the masked tile."""
    if remaining >= BLOCKS * 256:
        _update_8bit_tile(
            g_ptr, p_ptr, s1_ptr, s1b_ptr, s2_ptr, a1_ptr, a1b_ptr, a2_ptr, qmap1_ptr, qmap2_ptr, lut_ptr, mids_ptr,
            negatives, BLOCKS * 256,
            first_step, beta1, omb1, beta2, omb2, beta3, omb3, alpha, eps, bias1, bias2, lr, wd, decay, gnorm_scale,
            OPT, HAS_WD, SKIP_ZEROS, EXACT_BF16, BLOCKS, SEARCH, K, GATHER, GATHER_LUT, False,
        )
    else:
        _update_8bit_tile(
            g_ptr, p_ptr, s1_ptr, s1b_ptr, s2_ptr, a1_ptr, a1b_ptr, a2_ptr, qmap1_ptr, qmap2_ptr, lut_ptr, mids_ptr,
            negatives, remaining.to(tl.int32),
            first_step, beta1, omb1, beta2, omb2, beta3, omb3, alpha, eps, bias1, bias2, lr, wd, decay, gnorm_scale,
            OPT, HAS_WD, SKIP_ZEROS, EXACT_BF16, BLOCKS, SEARCH, K, GATHER, GATHER_LUT, True,
        )


@triton.jit
def _power(base, exponent):
    """``base ** exponent`` for an fp64 ``base`` and an int64 ``exponent >= 0``, by squaring
    (a loop of ``bit_length(exponent)`` scalar steps; exact for exponents 1 and 2)."""
    result = base * 0.0 + 1.0
    while exponent > 0:
        result = tl.where((exponent & 1) == 1, result * base, result)
        base = base * base
        exponent = exponent >> 1
    return result


@triton.jit
def _device_scalars(hyper_ptr, lr_ptr, step_ptr, beta3_ptr, alpha_ptr, OPT: tl.constexpr):
    """The step-dependent launch scalars of ``_scalars``, from 1-element tensors on the device.

    ``hyper_ptr`` holds ``beta1, beta2, eps, weight_decay`` in fp64: like the host, the bias
    corrections and ``1 - lr * wd`` are computed in double and rounded to fp32 once. Returns
    ``first_step, beta3, omb3, alpha, eps, bias1, bias2, lr, decay``."""
    beta1 = tl.load(hyper_ptr)
    beta2 = tl.load(hyper_ptr + 1)
    eps = tl.load(hyper_ptr + 2)
    wd = tl.load(hyper_ptr + 3)
    lr = tl.load(lr_ptr).to(tl.float64)
    step = tl.load(step_ptr).to(tl.int64)
    beta3 = tl.load(beta3_ptr).to(tl.float64)
    c1 = 1.0 - _power(beta1, step)
    c2 = tl.sqrt(1.0 - _power(beta2, step))  # fp64: IEEE sqrt and division (no fast forms)
    bias1 = c1 * 0.0 + 1.0
    bias2 = bias1
    if OPT == ADAM:
        eps = eps * c2
        bias1 = c2 / c1
    elif OPT == ADEMAMIX:
        bias1 = c1
        bias2 = c2
    first_step = (step == 1).to(tl.int32)
    return (
        first_step, beta3.to(tl.float32), (1.0 - beta3).to(tl.float32), tl.load(alpha_ptr).to(tl.float32),
        eps.to(tl.float32), bias1.to(tl.float32), bias2.to(tl.float32), lr.to(tl.float32),
        (1.0 - lr * wd).to(tl.float32),
    )


DERIVED_SCALARS = 9  # fp32 values _derive_scalars_kernel writes (the order of _device_scalars)


@triton.jit
def _derive_scalars_kernel(hyper_ptr, lr_ptr, step_ptr, beta3_ptr, alpha_ptr, out_ptr, OPT: tl.constexpr):
    """One program: the step-dependent scalars of an update (``_device_scalars``) into
    ``out_ptr[0:DERIVED_SCALARS]`` as fp32, so the update's programs load 9 values instead of
    each running the fp64 powers, square root and division."""
    first_step, beta3, omb3, alpha, eps, bias1, bias2, lr, decay = _device_scalars(
        hyper_ptr, lr_ptr, step_ptr, beta3_ptr, alpha_ptr, OPT
    )
    tl.store(out_ptr, first_step.to(tl.float32))
    tl.store(out_ptr + 1, beta3)
    tl.store(out_ptr + 2, omb3)
    tl.store(out_ptr + 3, alpha)
    tl.store(out_ptr + 4, eps)
    tl.store(out_ptr + 5, bias1)
    tl.store(out_ptr + 6, bias2)
    tl.store(out_ptr + 7, lr)
    tl.store(out_ptr + 8, decay)


@triton.jit
def _load_derived_scalars(derived_ptr):
    """The values :func:`_derive_scalars_kernel` wrote, as ``_device_scalars`` returns them."""
    return (
        tl.load(derived_ptr).to(tl.int32), tl.load(derived_ptr + 1), tl.load(derived_ptr + 2),
        tl.load(derived_ptr + 3), tl.load(derived_ptr + 4), tl.load(derived_ptr + 5), tl.load(derived_ptr + 6),
        tl.load(derived_ptr + 7), tl.load(derived_ptr + 8),
    )


@triton.jit
def _update_8bit_kernel(
    g_ptr, p_ptr, s1_ptr, s1b_ptr, s2_ptr, a1_ptr, a1b_ptr, a2_ptr, qmap1_ptr, qmap2_ptr, lut_ptr, mids_ptr,
    negatives, n,
    first_step, beta1, omb1, beta2, omb2, beta3, omb3, alpha, eps, bias1, bias2, lr, wd, decay, gnorm_scale,
    derived_ptr,
    OPT: tl.constexpr, HAS_WD: tl.constexpr, SKIP_ZEROS: tl.constexpr, EXACT_BF16: tl.constexpr,
    BLOCKS: tl.constexpr, SEARCH: tl.constexpr, K: tl.constexpr, GATHER: tl.constexpr, GATHER_LUT: tl.constexpr,
    DEVICE_SCALARS: tl.constexpr,
):
    """Program ``pid`` updates chunk ``pid`` (``BLOCKS`` blocks, int64 offsets) of the ``n`` elements.

    ``DEVICE_SCALARS``: the scalars that depend on ``lr``, ``step``, ``beta3`` and ``alpha`` are
    read from ``derived_ptr``, which ``_derive_scalars_kernel`` filled from 1-element tensors just
    before, so a compiled step or a CUDA graph replays with new values and the host never syncs.
    (Deriving them in every program, fp64 powers included, made the update 23 % slower on an
    H100.)"""
    if DEVICE_SCALARS:
        first_step, beta3, omb3, alpha, eps, bias1, bias2, lr, decay = _load_derived_scalars(derived_ptr)
    block0 = tl.program_id(0).to(tl.int64) * BLOCKS
    start = block0 * 256
    remaining = n - start
    g_ptr += start
    p_ptr += start
    s1_ptr += start
    s1b_ptr += start
    s2_ptr += start
    a1_ptr += block0
    a1b_ptr += block0
    a2_ptr += block0
    _update_8bit_span(
        g_ptr, p_ptr, s1_ptr, s1b_ptr, s2_ptr, a1_ptr, a1b_ptr, a2_ptr, qmap1_ptr, qmap2_ptr, lut_ptr, mids_ptr,
        negatives, remaining,
        first_step, beta1, omb1, beta2, omb2, beta3, omb3, alpha, eps, bias1, bias2, lr, wd, decay, gnorm_scale,
        OPT, HAS_WD, SKIP_ZEROS, EXACT_BF16, BLOCKS, SEARCH, K, GATHER, GATHER_LUT,
    )


@triton.jit
def _multi_update_8bit_kernel(
    program_table_ptr, qmap1_ptr, qmap2_ptr, lut_ptr, mids_ptr, negatives,
    first_step, beta1, omb1, beta2, omb2, beta3, omb3, alpha, eps, bias1, bias2, lr, wd, decay, gnorm_scale,
    P_DTYPE: tl.constexpr, OPT: tl.constexpr, HAS_WD: tl.constexpr, SKIP_ZEROS: tl.constexpr,
    EXACT_BF16: tl.constexpr, BLOCKS: tl.constexpr, SEARCH: tl.constexpr, K: tl.constexpr,
    GATHER: tl.constexpr, GATHER_LUT: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Program ``pid`` updates one chunk: ``program_table[pid]`` holds its data pointers, already
    advanced to the chunk, and the number of elements left in its tensor from there."""
    row = program_table_ptr + tl.program_id(0).to(tl.int64) * _COLUMNS
    g_ptr = _pointer(row, 0, P_DTYPE, ALIGNED)
    p_ptr = _pointer(row, 1, P_DTYPE, ALIGNED)
    s1_ptr = _pointer(row, 2, tl.uint8, ALIGNED)
    s1b_ptr = _pointer(row, 3, tl.uint8, ALIGNED)
    s2_ptr = _pointer(row, 4, tl.uint8, ALIGNED)
    a1_ptr = _pointer(row, 5, tl.float32, False)
    a1b_ptr = _pointer(row, 6, tl.float32, False)
    a2_ptr = _pointer(row, 7, tl.float32, False)
    remaining = tl.load(row + 8)
    _update_8bit_span(
        g_ptr, p_ptr, s1_ptr, s1b_ptr, s2_ptr, a1_ptr, a1b_ptr, a2_ptr, qmap1_ptr, qmap2_ptr, lut_ptr, mids_ptr,
        negatives, remaining,
        first_step, beta1, omb1, beta2, omb2, beta3, omb3, alpha, eps, bias1, bias2, lr, wd, decay, gnorm_scale,
        OPT, HAS_WD, SKIP_ZEROS, EXACT_BF16, BLOCKS, SEARCH, K, GATHER, GATHER_LUT,
    )


# ---------------------------------------------------------------------------------------------
# 32-bit
# ---------------------------------------------------------------------------------------------


@triton.jit
def _norm_scale(unorm_ptr, bound, eps, TWO_STATE: tl.constexpr):
    """``min(1, bound / ||u||)`` as the reference computes it: ``bound = max_unorm * ||p||``
    (1-state: ``+ eps``, and ``||u|| + eps`` in the denominator)."""
    norm = tl.sqrt_rn(tl.load(unorm_ptr))
    if TWO_STATE:
        scale = tl.where(norm > bound, tl.math.div_rn(bound, norm), 1.0)
    else:
        scale = tl.where(norm > bound, tl.math.div_rn(bound, norm + eps), 1.0)
    return scale


@triton.jit
def _update_32bit_tile(
    g_ptr, p_ptr, s1_ptr, s1b_ptr, s2_ptr, unorm_ptr, partial_ptr, remaining,
    first_step, beta1, omb1, beta2, omb2, beta3, omb3, alpha, eps, bias1, bias2, lr, wd, decay, gnorm_scale,
    norm_bound, norm_eps,
    OPT: tl.constexpr, HAS_WD: tl.constexpr, SKIP_ZEROS: tl.constexpr, NORM: tl.constexpr, PHASE: tl.constexpr,
    EXACT_BF16: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr,
):
    """``PHASE == 0``: the update of ``BLOCK`` elements (scaled by the update norm when ``NORM``).
    ``PHASE == 1``: only store this chunk's ``sum(u ** 2)`` at ``partial_ptr``."""
    P_DTYPE: tl.constexpr = p_ptr.dtype.element_ty
    TWO_STATE: tl.constexpr = OPT == ADAM or OPT == ADEMAMIX
    SKIP: tl.constexpr = SKIP_ZEROS and OPT != ADEMAMIX
    offs = tl.arange(0, BLOCK)
    if MASKED:
        mask = offs < remaining
    else:
        mask = None
    raw_g = _load(g_ptr + offs, mask, MASKED).to(tl.float32)
    p_old = _load(p_ptr + offs, mask, MASKED).to(tl.float32)
    s1 = _load(s1_ptr + offs, mask, MASKED)
    s1b = s1
    s2 = s1
    if OPT == ADEMAMIX:
        s1b = _load(s1b_ptr + offs, mask, MASKED)
    if TWO_STATE:
        s2 = _load(s2_ptr + offs, mask, MASKED)

    g = raw_g * gnorm_scale
    if HAS_WD and not TWO_STATE and OPT != LION:
        g = g + wd * p_old
    new1, new1b, new2, direction = _states_and_direction(
        g, s1, s1b, s2, first_step, beta1, omb1, beta2, omb2, beta3, omb3, alpha, eps, bias1, bias2, OPT
    )
    if SKIP:
        keep = raw_g != 0
        direction = tl.where(keep, direction, 0.0)
    if PHASE == 1:
        squares = direction * direction
        if MASKED:
            squares = tl.where(mask, squares, 0.0)
        tl.store(partial_ptr, tl.sum(squares, axis=0))
    else:
        step_size = lr
        if NORM:
            step_size = lr * _norm_scale(unorm_ptr, norm_bound, norm_eps, TWO_STATE)
        p = p_old
        if HAS_WD and OPT == LION:
            p = p * decay
        new_p = _round(p - step_size * direction, P_DTYPE, EXACT_BF16)
        if HAS_WD and TWO_STATE:
            new_p = _round(new_p * decay, P_DTYPE, EXACT_BF16)
        if SKIP:
            new_p = tl.where(keep, new_p, p_old)
            new1 = tl.where(keep, new1, s1)
            new2 = tl.where(keep, new2, s2)
        tl.store(p_ptr + offs, new_p.to(P_DTYPE), mask=mask)
        tl.store(s1_ptr + offs, new1, mask=mask)
        if OPT == ADEMAMIX:
            tl.store(s1b_ptr + offs, new1b, mask=mask)
        if TWO_STATE:
            tl.store(s2_ptr + offs, new2, mask=mask)


@triton.jit
def _update_32bit_span(
    g_ptr, p_ptr, s1_ptr, s1b_ptr, s2_ptr, unorm_ptr, partial_ptr, remaining,
    first_step, beta1, omb1, beta2, omb2, beta3, omb3, alpha, eps, bias1, bias2, lr, wd, decay, gnorm_scale,
    norm_bound, norm_eps,
    OPT: tl.constexpr, HAS_WD: tl.constexpr, SKIP_ZEROS: tl.constexpr, NORM: tl.constexpr, PHASE: tl.constexpr,
    EXACT_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    """As ``_update_8bit_span``: the unmasked tile for a full chunk, the masked one for the last."""
    if remaining >= BLOCK:
        _update_32bit_tile(
            g_ptr, p_ptr, s1_ptr, s1b_ptr, s2_ptr, unorm_ptr, partial_ptr, BLOCK,
            first_step, beta1, omb1, beta2, omb2, beta3, omb3, alpha, eps, bias1, bias2, lr, wd, decay, gnorm_scale,
            norm_bound, norm_eps, OPT, HAS_WD, SKIP_ZEROS, NORM, PHASE, EXACT_BF16, BLOCK, False,
        )
    else:
        _update_32bit_tile(
            g_ptr, p_ptr, s1_ptr, s1b_ptr, s2_ptr, unorm_ptr, partial_ptr, remaining.to(tl.int32),
            first_step, beta1, omb1, beta2, omb2, beta3, omb3, alpha, eps, bias1, bias2, lr, wd, decay, gnorm_scale,
            norm_bound, norm_eps, OPT, HAS_WD, SKIP_ZEROS, NORM, PHASE, EXACT_BF16, BLOCK, True,
        )


@triton.jit
def _update_32bit_kernel(
    g_ptr, p_ptr, s1_ptr, s1b_ptr, s2_ptr, unorm_ptr, partial_ptr, n,
    first_step, beta1, omb1, beta2, omb2, beta3, omb3, alpha, eps, bias1, bias2, lr, wd, decay, gnorm_scale,
    norm_bound, norm_eps,
    OPT: tl.constexpr, HAS_WD: tl.constexpr, SKIP_ZEROS: tl.constexpr, NORM: tl.constexpr, PHASE: tl.constexpr,
    EXACT_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program ``pid`` updates chunk ``pid`` (``BLOCK`` elements, int64 offsets) of the ``n`` elements."""
    chunk = tl.program_id(0).to(tl.int64)
    start = chunk * BLOCK
    remaining = n - start
    g_ptr += start
    p_ptr += start
    s1_ptr += start
    s1b_ptr += start
    s2_ptr += start
    partial_ptr += chunk
    _update_32bit_span(
        g_ptr, p_ptr, s1_ptr, s1b_ptr, s2_ptr, unorm_ptr, partial_ptr, remaining,
        first_step, beta1, omb1, beta2, omb2, beta3, omb3, alpha, eps, bias1, bias2, lr, wd, decay, gnorm_scale,
        norm_bound, norm_eps, OPT, HAS_WD, SKIP_ZEROS, NORM, PHASE, EXACT_BF16, BLOCK,
    )


@triton.jit
def _multi_update_32bit_kernel(
    program_table_ptr,
    first_step, beta1, omb1, beta2, omb2, beta3, omb3, alpha, eps, bias1, bias2, lr, wd, decay, gnorm_scale,
    P_DTYPE: tl.constexpr, OPT: tl.constexpr, HAS_WD: tl.constexpr, SKIP_ZEROS: tl.constexpr,
    EXACT_BF16: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """As ``_multi_update_8bit_kernel`` (row: g, p, s1, s1b, s2, -, -, -, remaining), no update norm."""
    row = program_table_ptr + tl.program_id(0).to(tl.int64) * _COLUMNS
    g_ptr = _pointer(row, 0, P_DTYPE, ALIGNED)
    p_ptr = _pointer(row, 1, P_DTYPE, ALIGNED)
    s1_ptr = _pointer(row, 2, tl.float32, ALIGNED)
    s1b_ptr = _pointer(row, 3, tl.float32, ALIGNED)
    s2_ptr = _pointer(row, 4, tl.float32, ALIGNED)
    remaining = tl.load(row + 8)
    _update_32bit_span(
        g_ptr, p_ptr, s1_ptr, s1b_ptr, s2_ptr, s1_ptr, s1_ptr, remaining,
        first_step, beta1, omb1, beta2, omb2, beta3, omb3, alpha, eps, bias1, bias2, lr, wd, decay, gnorm_scale,
        0.0, 0.0, OPT, HAS_WD, SKIP_ZEROS, False, 0, EXACT_BF16, BLOCK,
    )


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


class _Scalars(NamedTuple):
    """Runtime scalars of one update, in kernel argument order."""

    first_step: int
    beta1: float
    omb1: float
    beta2: float
    omb2: float
    beta3: float
    omb3: float
    alpha: float
    eps: float
    bias1: float
    bias2: float
    lr: float
    wd: float
    decay: float
    gnorm_scale: float


def _scalars(
    formula: int, beta1: float, beta2: float, beta3: float, alpha: float, eps: float, step: int,
    lr: float, weight_decay: float, gnorm_scale: float,
) -> _Scalars:
    """Host constants in double (``beta ** step`` as the reference), one fp32 rounding each."""
    c1 = 1.0 - beta1**step
    c2 = math.sqrt(1.0 - beta2**step)
    bias1 = bias2 = 1.0
    if formula == 0:
        eps, bias1 = eps * c2, c2 / c1
    elif formula == 1:
        bias1, bias2 = c1, c2
    return _Scalars(
        int(step == 1), beta1, 1.0 - beta1, beta2, 1.0 - beta2, beta3, 1.0 - beta3, alpha, eps, bias1, bias2,
        lr, weight_decay, 1.0 - lr * weight_decay, gnorm_scale,
    )


def bucket_keys(x: torch.Tensor) -> torch.Tensor:
    """Host twin of the kernel's ``_bucket`` for an fp32 tensor (int64 keys in ``[0, 2 * LUT_SIDE)``)."""
    bits = x.float().contiguous().view(torch.int32).long()
    low = (127 - LUT_EXPONENTS.value) << 23
    index = ((bits & 0x7FFFFFFF).clamp(low, (128 << 23) - 1) - low) >> (23 - LUT_MANTISSA_BITS.value)
    side = LUT_SIDE.value
    return torch.where(bits < 0, side - 1 - index, side + index)


class SearchTables(NamedTuple):
    """Device tables of the nearest-code search for ``(qmap1, qmap2)`` (module docstring).

    ``mids``: ``(2, 256)`` fp32, the 255 midpoints then +inf (bucket search) or the Eytzinger tree
    (tree search); ``lut``: ``(2, LUT_PAD)`` uint8 midpoints-in-lower-buckets counts; ``search``:
    ``SEARCH_BUCKETS`` or ``SEARCH_TREE``; ``k``: compares after the bucket lookup;
    ``negatives``: negative entries of ``qmap1`` (the sign fix)."""

    mids: torch.Tensor
    lut: torch.Tensor
    search: int
    k: int
    negatives: int


def _eytzinger(midpoints: torch.Tensor) -> torch.Tensor:
    """Midpoints in breadth-first order: node ``k`` (1..255) of depth ``d`` is in-order index
    ``(2 * (k - 2**d) + 1) * 2**(7 - d) - 1``; node 0 is unused (0.0)."""
    node = torch.arange(1, 256)
    depth = torch.floor(torch.log2(node.double())).long()
    index = (2 * (node - (1 << depth)) + 1) * (128 >> depth) - 1
    return torch.cat([midpoints.new_zeros(1), midpoints[index]])


def _build_search_tables(qmap1: torch.Tensor, qmap2: torch.Tensor) -> SearchTables:
    maps = [q.detach().to("cpu", torch.float32) for q in (qmap1, qmap2)]
    midpoints = [(q[:-1] + q[1:]) * 0.5 for q in maps]
    keys = [bucket_keys(m) for m in midpoints]
    k = max(int(torch.bincount(key).max()) for key in keys)
    lut = torch.zeros((2, LUT_PAD.value), dtype=torch.uint8)
    buckets = torch.arange(2 * LUT_SIDE.value)
    for i, key in enumerate(keys):
        lut[i, : buckets.numel()] = torch.searchsorted(key, buckets, right=False).to(torch.uint8)
    if k <= MAX_BUCKET_CODES:
        search = SEARCH_BUCKETS
        mids = torch.stack([torch.cat([m, m.new_full((1,), math.inf)]) for m in midpoints])
    else:
        search = SEARCH_TREE
        mids = torch.stack([_eytzinger(m) for m in midpoints])
    device = qmap1.device
    return SearchTables(to_device_constant(mids, device), to_device_constant(lut, device), search, min(k, MAX_BUCKET_CODES), int((maps[0] < 0).sum()))


_TABLE_CACHE: MapCache[SearchTables] = MapCache()


def search_tables(qmap1: torch.Tensor, qmap2: torch.Tensor | None) -> SearchTables:
    """Search tables for ``qmap1`` and ``qmap2`` (``qmap1`` twice for 1-state optimizers).

    Built on the host (one device sync) the first time a map is seen, then cached per map
    (:class:`MapCache`: data pointer and version counter). A map first seen while a CUDA graph is
    being captured cannot be read on the host: that raises, naming the usual cause (cudagraph
    trees copy inputs that are not static into buffers of their own)."""
    qmap2 = qmap1 if qmap2 is None else qmap2

    def build() -> SearchTables:
        if qmap1.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "qmap1/qmap2 of the 8-bit optimizer update are new to it inside a CUDA-graph capture, where its "
                "search tables cannot be built (they need a host copy of the maps). Under "
                "torch.compile(mode='reduce-overhead') mark the maps static (torch._dynamo.mark_static_address), "
                "as the optimizer classes' state is, so the graph reads the maps the warm-up step saw."
            )
        return _build_search_tables(qmap1, qmap2)

    return _TABLE_CACHE.get((qmap1, qmap2), build)


_HYPER_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()


def _hyper_table(device: torch.device, beta1: float, beta2: float, eps: float, weight_decay: float) -> torch.Tensor:
    """``[beta1, beta2, eps, weight_decay]`` as an fp64 device tensor (``_device_scalars``),
    cached per device and values: the hyperparameters of a run are few and fixed."""
    key = (device, beta1, beta2, eps, weight_decay)
    table = _HYPER_CACHE.get(key)
    if table is None:
        table = to_device_constant(torch.tensor([beta1, beta2, eps, weight_decay], dtype=torch.float64), device)
        _HYPER_CACHE[key] = table
        if len(_HYPER_CACHE) > _TABLE_CACHE.size:
            _HYPER_CACHE.popitem(last=False)
    else:
        _HYPER_CACHE.move_to_end(key)
    return table


def update_8bit_blockwise(
    optimizer_name: str, g: torch.Tensor, p: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor | None,
    beta1: float, beta2: float, beta3: float | torch.Tensor, alpha: float | torch.Tensor, eps: float,
    step: int | torch.Tensor, lr: float | torch.Tensor,
    qmap1: torch.Tensor, qmap2: torch.Tensor | None, absmax1: torch.Tensor, absmax2: torch.Tensor | None,
    weight_decay: float, gnorm_scale: float, skip_zeros: bool = False, *,
    blocks: int | None = None, num_warps: int | None = None, gather: bool | None = None,
    gather_lut: bool | None = None, tables: SearchTables | None = None, maxnreg: int | None = MAXNREG_8BIT,
) -> None:
    """In-place 8-bit blockwise update (one launch) of contiguous, already checked tensors.

    ``lr``, ``step``, ``beta3`` and ``alpha`` are all Python numbers (baked into the launch) or
    all 1-element tensors on ``p``'s device, read by the kernel (no host sync; the form the
    compiled step and CUDA graphs need). The keyword-only arguments override the launch shape
    and the search tables (tests, tools)."""
    n = p.numel()
    if n == 0:
        return
    formula = FORMULAS[optimizer_name]
    device_scalars = isinstance(lr, torch.Tensor)
    if device_scalars:
        scalars = _scalars(formula, beta1, beta2, 0.0, 0.0, eps, 1, 0.0, weight_decay, gnorm_scale)
        derived = torch.empty(DERIVED_SCALARS, dtype=torch.float32, device=p.device)
        _derive_scalars_kernel[(1,)](
            _hyper_table(p.device, beta1, beta2, eps, weight_decay), lr, step, beta3, alpha, derived, OPT=formula,
        )
    else:
        scalars = _scalars(formula, beta1, beta2, beta3, alpha, eps, step, lr, weight_decay, gnorm_scale)
        derived = None
    tables = tables or search_tables(qmap1, qmap2)
    blocks = blocks or BLOCKS_8BIT
    nblocks = triton.cdiv(n, BLOCKSIZE)
    flat1 = state1.view(-1)
    state1b, absmax1b = (flat1[n:], absmax1.view(-1)[nblocks:]) if formula == 1 else (flat1, absmax1)
    _update_8bit_kernel[(triton.cdiv(nblocks, blocks),)](
        g, p, flat1, state1b, flat1 if state2 is None else state2, absmax1, absmax1b,
        absmax1 if absmax2 is None else absmax2, qmap1, qmap1 if qmap2 is None else qmap2,
        tables.lut, tables.mids, tables.negatives, n, *scalars, derived,
        OPT=formula, HAS_WD=weight_decay > 0, SKIP_ZEROS=skip_zeros, EXACT_BF16=_INTERPRET, BLOCKS=blocks,
        SEARCH=tables.search, K=tables.k, GATHER=GATHER_8BIT if gather is None else gather,
        GATHER_LUT=GATHER_LUT_8BIT if gather_lut is None else gather_lut, DEVICE_SCALARS=device_scalars,
        num_warps=num_warps or WARPS_8BIT, maxnreg=_register_cap(formula, maxnreg), enable_fp_fusion=False,
    )


def update_32bit(
    optimizer_name: str, g: torch.Tensor, p: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor | None,
    unorm_vec: torch.Tensor | None, max_unorm: float, param_norm: float, beta1: float, beta2: float,
    beta3: float, alpha: float, eps: float, weight_decay: float, step: int, lr: float, gnorm_scale: float,
    skip_zeros: bool = False, *, block: int | None = None, num_warps: int | None = None,
) -> None:
    """In-place 32-bit update of contiguous, already checked tensors.

    With ``max_unorm > 0`` (lamb, lars, and every formula but ademamix/adagrad) a first launch
    stores per-chunk sums of ``u ** 2``, their sum goes to ``unorm_vec``, and the update launch
    reads it back on the device (no host sync)."""
    n = p.numel()
    formula = FORMULAS[optimizer_name]
    norm = max_unorm > 0 and formula not in _NO_NORM
    if n == 0:
        if norm:
            unorm_vec.zero_()
        return
    scalars = _scalars(formula, beta1, beta2, beta3, alpha, eps, step, lr, weight_decay, gnorm_scale)
    block = block or BLOCK_32BIT
    grid = (triton.cdiv(n, block),)
    bound = max_unorm * param_norm if formula in _TWO_STATE else max_unorm * param_norm + eps
    flat1 = state1.view(-1)
    state1b = flat1[n:] if formula == 1 else flat1
    state2 = flat1 if state2 is None else state2
    launch = dict(
        OPT=formula, HAS_WD=weight_decay > 0, SKIP_ZEROS=skip_zeros, NORM=norm, EXACT_BF16=_INTERPRET,
        BLOCK=block, num_warps=num_warps or WARPS_32BIT, enable_fp_fusion=False,
    )
    if norm:
        partial = torch.empty(grid[0], dtype=torch.float32, device=p.device)
        _update_32bit_kernel[grid](g, p, flat1, state1b, state2, unorm_vec, partial, n, *scalars, bound, eps, PHASE=1, **launch)
        torch.sum(partial, dim=0, keepdim=True, out=unorm_vec.view(1))
    _update_32bit_kernel[grid](
        g, p, flat1, state1b, state2, unorm_vec if norm else flat1, flat1, n, *scalars, bound, eps, PHASE=0, **launch
    )


# ---- multi-tensor -----------------------------------------------------------------------------

_PLAN_CACHE: OrderedDict[tuple, tuple[torch.Tensor, bool]] = OrderedDict()
_PLAN_CACHE_SIZE = 16
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _program_table(
    rows: Sequence[tuple[int, ...]], chunk: int, p_dtype: torch.dtype, state_steps: tuple[int, ...],
    device: torch.device,
):
    """``(program_table, aligned)`` for one multi-tensor launch, cached by the rows.

    ``rows[t]`` = ``(g, p, s1, s1b, s2, a1, a1b, a2, n)`` (byte addresses); a tensor of ``n``
    elements gets ``ceil(n / chunk)`` programs, whose rows hold the addresses advanced by
    ``c * steps`` for chunk ``c`` and ``n - c * chunk`` elements left, where ``steps`` is
    ``chunk`` elements of ``p_dtype`` for ``g`` and ``p``, then ``state_steps`` bytes for the other
    six columns. The table is a function of the key (rows, chunk, steps) alone, so a cache hit is
    always valid, also for new tensors that reuse old memory."""
    size = torch.empty((), dtype=p_dtype).element_size()
    steps = (size * chunk, size * chunk) + state_steps
    key = (device, chunk, steps, tuple(rows))
    plan = _PLAN_CACHE.get(key)
    if plan is not None:
        _PLAN_CACHE.move_to_end(key)
        return plan
    base = torch.tensor(rows, dtype=torch.int64)
    chunks = (base[:, _N] + chunk - 1) // chunk
    index = torch.repeat_interleave(torch.arange(len(rows)), chunks)
    chunk_index = torch.arange(index.numel()) - torch.repeat_interleave(torch.cumsum(chunks, 0) - chunks, chunks)
    advance = torch.tensor(steps + (-chunk,), dtype=torch.int64)
    table = torch.zeros((index.numel(), _COLUMNS.value), dtype=torch.int64)
    table[:, : _N + 1] = base[index] + chunk_index[:, None] * advance
    aligned = bool((base[:, : _A1] % 16 == 0).all())
    plan = (to_device_constant(table, device), aligned)
    _PLAN_CACHE[key] = plan
    if len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
        _PLAN_CACHE.popitem(last=False)
    return plan


def row_8bit(
    formula: int, g: torch.Tensor, p: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor | None, a1: torch.Tensor,
    a2: torch.Tensor | None,
) -> tuple[int, ...]:
    """Row ``(g, p, s1, s1b, s2, a1, a1b, a2, n)`` of byte addresses of one non-empty tensor
    (``formula``: a ``FORMULAS`` value; ``s2``/``a2`` are read only for 2-state formulas)."""
    n = p.numel()
    s1_ptr, a1_ptr = s1.data_ptr(), a1.data_ptr()
    s1b, a1b = (s1_ptr + n, a1_ptr + 4 * ((n + BLOCKSIZE - 1) // BLOCKSIZE)) if formula == 1 else (s1_ptr, a1_ptr)
    s2_ptr, a2_ptr = (s2.data_ptr(), a2.data_ptr()) if formula in _TWO_STATE else (s1_ptr, a1_ptr)
    return (g.data_ptr(), p.data_ptr(), s1_ptr, s1b, s2_ptr, a1_ptr, a1b, a2_ptr, n)


def row_32bit(
    formula: int, g: torch.Tensor, p: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor | None,
) -> tuple[int, ...]:
    """Row ``(g, p, s1, s1b, s2, 0, 0, 0, n)`` of byte addresses of one non-empty tensor, as :func:`row_8bit`."""
    n = p.numel()
    s1_ptr = s1.data_ptr()
    s2_ptr = s2.data_ptr() if formula in _TWO_STATE else s1_ptr
    return (g.data_ptr(), p.data_ptr(), s1_ptr, s1_ptr + 4 * n if formula == 1 else s1_ptr, s2_ptr, 0, 0, 0, n)


def rows_8bit(
    optimizer_name: str, grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
    states1: Sequence[torch.Tensor], states2: Sequence[torch.Tensor] | None,
    absmax1s: Sequence[torch.Tensor], absmax2s: Sequence[torch.Tensor] | None,
) -> list[tuple[int, ...]]:
    """Per-tensor rows ``(g, p, s1, s1b, s2, a1, a1b, a2, n)`` of byte addresses (empty tensors skipped)."""
    formula = FORMULAS[optimizer_name]
    two_state = formula in _TWO_STATE
    return [
        row_8bit(formula, grads[i], p, states1[i], states2[i] if two_state else None, absmax1s[i],
                 absmax2s[i] if two_state else None)
        for i, p in enumerate(params) if p.numel()
    ]


def rows_32bit(
    optimizer_name: str, grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
    states1: Sequence[torch.Tensor], states2: Sequence[torch.Tensor] | None,
) -> list[tuple[int, ...]]:
    """Per-tensor rows ``(g, p, s1, s1b, s2, 0, 0, 0, n)`` of byte addresses (empty tensors skipped)."""
    formula = FORMULAS[optimizer_name]
    two_state = formula in _TWO_STATE
    return [
        row_32bit(formula, grads[i], p, states1[i], states2[i] if two_state else None)
        for i, p in enumerate(params) if p.numel()
    ]


def launch_multi_8bit(
    optimizer_name: str, rows: Sequence[tuple[int, ...]], p_dtype: torch.dtype, device: torch.device,
    qmap1: torch.Tensor, qmap2: torch.Tensor | None, beta1: float, beta2: float, beta3: float, alpha: float,
    eps: float, step: int, lr: float, weight_decay: float, gnorm_scale: float, skip_zeros: bool, *,
    maxnreg: int | None = MAXNREG_8BIT,
) -> None:
    """One launch over the tensors of ``rows`` (from :func:`rows_8bit`): contiguous, checked, of
    parameter dtype ``p_dtype`` on ``device``, sharing the step and the maps (``maxnreg``: the
    register cap, overridable for the benchmark's sweep)."""
    if not rows:
        return
    formula = FORMULAS[optimizer_name]
    chunk = BLOCKS_8BIT * BLOCKSIZE
    state_steps = (chunk, chunk, chunk, 4 * BLOCKS_8BIT, 4 * BLOCKS_8BIT, 4 * BLOCKS_8BIT)
    table, aligned = _program_table(rows, chunk, p_dtype, state_steps, device)
    tables = search_tables(qmap1, qmap2)
    _multi_update_8bit_kernel[(table.shape[0],)](
        table, qmap1, qmap1 if qmap2 is None else qmap2, tables.lut, tables.mids, tables.negatives,
        *_scalars(formula, beta1, beta2, beta3, alpha, eps, step, lr, weight_decay, gnorm_scale),
        P_DTYPE=_TL_DTYPES[p_dtype], OPT=formula, HAS_WD=weight_decay > 0, SKIP_ZEROS=skip_zeros,
        EXACT_BF16=_INTERPRET, BLOCKS=BLOCKS_8BIT, SEARCH=tables.search, K=tables.k, GATHER=GATHER_8BIT,
        GATHER_LUT=GATHER_LUT_8BIT, ALIGNED=aligned, num_warps=WARPS_8BIT, maxnreg=_register_cap(formula, maxnreg),
        enable_fp_fusion=False,
    )


def launch_multi_32bit(
    optimizer_name: str, rows: Sequence[tuple[int, ...]], p_dtype: torch.dtype, device: torch.device,
    beta1: float, beta2: float, beta3: float, alpha: float, eps: float, step: int, lr: float,
    weight_decay: float, gnorm_scale: float, skip_zeros: bool,
) -> None:
    """One launch over the tensors of ``rows`` (from :func:`rows_32bit`), as :func:`launch_multi_8bit`."""
    if not rows:
        return
    formula = FORMULAS[optimizer_name]
    chunk = BLOCK_32BIT
    table, aligned = _program_table(rows, chunk, p_dtype, (4 * chunk, 4 * chunk, 4 * chunk, 0, 0, 0), device)
    _multi_update_32bit_kernel[(table.shape[0],)](
        table, *_scalars(formula, beta1, beta2, beta3, alpha, eps, step, lr, weight_decay, gnorm_scale),
        P_DTYPE=_TL_DTYPES[p_dtype], OPT=formula, HAS_WD=weight_decay > 0, SKIP_ZEROS=skip_zeros,
        EXACT_BF16=_INTERPRET, BLOCK=chunk, ALIGNED=aligned, num_warps=WARPS_32BIT, enable_fp_fusion=False,
    )


def multi_update_8bit_blockwise(
    optimizer_name: str, grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
    states1: Sequence[torch.Tensor], states2: Sequence[torch.Tensor] | None,
    absmax1s: Sequence[torch.Tensor], absmax2s: Sequence[torch.Tensor] | None,
    qmap1: torch.Tensor, qmap2: torch.Tensor | None, beta1: float, beta2: float, beta3: float, alpha: float,
    eps: float, step: int, lr: float, weight_decay: float, gnorm_scale: float, skip_zeros: bool,
) -> None:
    """One launch over contiguous, checked tensors of one dtype and step, sharing the maps."""
    if not params:
        return
    rows = rows_8bit(optimizer_name, grads, params, states1, states2, absmax1s, absmax2s)
    launch_multi_8bit(optimizer_name, rows, params[0].dtype, params[0].device, qmap1, qmap2, beta1, beta2, beta3,
                      alpha, eps, step, lr, weight_decay, gnorm_scale, skip_zeros)


def multi_update_32bit(
    optimizer_name: str, grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
    states1: Sequence[torch.Tensor], states2: Sequence[torch.Tensor] | None, beta1: float, beta2: float,
    beta3: float, alpha: float, eps: float, step: int, lr: float, weight_decay: float, gnorm_scale: float,
    skip_zeros: bool,
) -> None:
    """One launch over contiguous, checked tensors of one dtype and step (no update norm)."""
    if not params:
        return
    rows = rows_32bit(optimizer_name, grads, params, states1, states2)
    launch_multi_32bit(optimizer_name, rows, params[0].dtype, params[0].device, beta1, beta2, beta3, alpha, eps,
                       step, lr, weight_decay, gnorm_scale, skip_zeros)
