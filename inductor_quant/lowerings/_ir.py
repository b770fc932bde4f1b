"""Shared building blocks of the lowerings: flat loads, scalar loads, block reductions, code lookups.

Everything here runs while Inductor lowers a graph (``GraphLowering``): tensor arguments are
``TensorBox`` IR nodes, index arithmetic is sympy, and values are built with
``torch._inductor.virtualized.ops`` inside ``inner_fn`` closures. The quantizers' rules (flattened
blocks, ``x * (1 / absmax)``, NaN -> 0, nearest code with ties to the lower entry) are those of
``inductor_quant.reference.blockwise``; each helper names the reference function it mirrors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import sympy
import torch
from torch._inductor import ir
from torch._inductor.lowering import fallback_handler, lowerings, register_lowering
from torch._inductor.ops_handler import OpsHandler
from torch._inductor.virtualized import V, ops
from torch.utils._sympy.functions import CeilDiv, FloorDiv

from ..patterns.standalone import STANDALONE_KEY

aten = torch.ops.aten
_HAS_DIV_RN = hasattr(OpsHandler, "div_rn")

Loader = Callable[[sympy.Expr], Any]
Index = Sequence[sympy.Expr]


def numel(sizes: Sequence[sympy.Expr]) -> sympy.Expr:
    total: sympy.Expr = sympy.S.One
    for size in sizes:
        total = total * size
    return total


def flat_index(index: Index, sizes: Sequence[sympy.Expr]) -> sympy.Expr:
    """Row-major linear index of ``index`` in a tensor of ``sizes`` (the "flattened tensor")."""
    flat: sympy.Expr = sympy.S.Zero
    for i, size in zip(index, sizes):
        flat = flat * size + i
    return flat


def flat_loader(x: ir.TensorBox) -> Loader:
    """Loader of ``x.reshape(-1)``: takes one linear index (a view, no copy for contiguous ``x``)."""
    flat = lowerings[aten.reshape.default](x, [-1])
    load = flat.make_loader()
    return lambda i: load([i])


def scalar_loader(x: ir.TensorBox) -> Callable[[], Any]:
    """Loader of the single element of a 1-element tensor (any number of dims)."""
    load = x.make_loader()
    zeros = [sympy.S.Zero] * len(x.get_size())
    return lambda: load(zeros)


def load_f32(load: Loader, i: sympy.Expr) -> Any:
    return ops.to_dtype(load(i), torch.float32)


@functools.lru_cache(maxsize=None)
def _table_tensor(values: tuple[float, ...], device: str) -> torch.Tensor:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return torch.tensor(values, dtype=torch.float32, device=device)


def constant_table(values: Sequence[float], device: torch.device) -> Loader:
    """Loader of a small fp32 constant table embedded in the compiled module (a LUT gather).

    The tensor is cached per (values, device), so every lowering in a graph that asks for the
    same table gets the same constant buffer (Inductor dedups constants by tensor identity)."""
    buffer = V.graph.add_tensor_constant(_table_tensor(tuple(values), str(device)))
    load = buffer.make_loader()
    return lambda i: load([i])


def gather(table: Loader, code: Any, size: int) -> Any:
    """``table[code]`` for an integral ops value known to lie in ``[0, size)``."""
    return table(ops.indirect_indexing(code, size, check=False))


def index_value(expr: sympy.Expr, dtype: torch.dtype = torch.int64) -> Any:
    return ops.index_expr(expr, dtype)


def statically_multiple_of(n: sympy.Expr, blocksize: int) -> bool:
    return V.graph.sizevars.statically_known_multiple_of(n, blocksize)


def block_absmax(
    device: torch.device,
    value: Callable[[sympy.Expr, sympy.Expr], Any],
    n: sympy.Expr,
    blocksize: int,
    rows: int = 1,
    pairs: bool = False,
) -> ir.TensorBox:
    """fp32 ``max |v|`` of each ``blocksize`` run of a flat value (``reference.blockwise_absmax``).

    ``value(row, i)`` builds element ``i`` (fp32) of row ``row`` (``rows`` independent flat
    tensors of ``n`` elements, e.g. AdEMAMix's two momenta; the result is ``(rows * blocks,)``,
    row-major). A partial last block reduces over its own elements (the rest count as 0, which
    cannot change a max of absolute values). NaN propagates. With ``pairs`` (``n % blocksize == 0``
    only), the reduction runs over ``blocksize // 2`` pairs of adjacent elements so that its
    ranges match a per-byte 4-bit packing loop and Inductor can fuse the two into one
    persistent-reduction kernel. The result is realized (a buffer that loaders can read)."""
    blocks = CeilDiv(n, blocksize)
    whole = statically_multiple_of(n, blocksize)
    assert whole or not pairs

    def split(index: Index) -> tuple[sympy.Expr, sympy.Expr]:
        return (index[0], index[1]) if rows > 1 else (sympy.S.Zero, index[0])

    if pairs:

        def inner_fn(index: Index, rindex: Index) -> Any:
            row, block = split(index)
            first = block * blocksize + 2 * rindex[0]
            return ops.maximum(ops.abs(value(row, first)), ops.abs(value(row, first + 1)))

        reduction_size = blocksize // 2
    else:

        def inner_fn(index: Index, rindex: Index) -> Any:
            row, block = split(index)
            i = block * blocksize + rindex[0]
            if whole:
                return ops.abs(value(row, i))
            inside = ops.lt(index_value(i), index_value(n))
            return ops.masked(inside, lambda: ops.abs(value(row, i)), 0.0)

        reduction_size = blocksize

    absmax = ir.Reduction.create(
        device=device,
        dst_dtype=torch.float32,
        src_dtype=torch.float32,
        inner_fn=inner_fn,
        ranges=[rows, blocks] if rows > 1 else [blocks],
        reduction_ranges=[reduction_size],
        reduction_type="max",
    )
    absmax.realize()
    return reshape(absmax, [-1])


def block_loader(absmax: ir.TensorBox, n: sympy.Expr, blocksize: int) -> Callable[..., Any]:
    """Loader of ``absmax[offset + i // blocksize]`` for a flat element index ``i`` of an
    ``n``-element tensor (``offset``, default 0, selects a row of per-row block scales).

    When ``n`` is not statically a multiple of ``blocksize`` the block number is computed as a
    value (a shift) and used as an indirect index, so no ``i // blocksize`` appears in the
    indexing expressions: Inductor's C++ loop-split pass (torch 2.13) rewrites a loop over ``n``
    with such an index into ``n // blocksize`` whole blocks and drops the partial tail."""
    load = flat_loader(absmax)
    size = numel(absmax.get_size())
    if statically_multiple_of(n, blocksize):
        return lambda i, offset=sympy.S.Zero: load(offset + FloorDiv(i, blocksize))
    shift = blocksize.bit_length() - 1

    def load_block(i: sympy.Expr, offset: sympy.Expr = sympy.S.Zero) -> Any:
        block = ops.bitwise_right_shift(index_value(i), ops.constant(shift, torch.int64))
        if offset != 0:
            block = ops.add(block, index_value(offset))
        return load(ops.indirect_indexing(block, size, check=False))

    return load_block


def reciprocal_rn(x: Any) -> Any:
    """fp32 ``1 / x`` rounded to nearest, as the kernels (``div_rn``) and the reference compute it.

    Inductor's Triton ``reciprocal`` and ``/`` are approximate divisions on NVIDIA GPUs
    (``div.full.f32``), and bf16 inputs land exactly on an 8-bit midpoint often enough that the
    approximation moved ~0.1 % of the codes (H100). Where Inductor has a ``div_rn`` op it emits
    ``tl.div_rn``. Older ones (torch 2.11) refine the approximate reciprocal by one Newton step
    (an fma residual), which leaves it within one ulp of ``1 / x``, then keep whichever of it and its
    two fp32 neighbours has the smallest exact residual ``|fma(-x, c, 1)| = x * |1 / x - c|``: the
    nearest. (Correcting the quotient by its remainder, as CUDA's ``div.rn`` does after an
    accurate ``rcp``, can land on a tie-breaking error from a 2-ulp start: ``x = (2**24 - 1) *
    2**-148``.) This covers normal ``x`` in ``[2**-125, 2**125]`` (``x >= 0``: an absmax); zero, Inf
    and NaN keep ``1 / x`` (already exact), and so do subnormals (blocks of subnormal values only)."""
    one = ops.constant(1.0, torch.float32)
    if _HAS_DIV_RN:
        return ops.div_rn(one, x)
    approx = ops.reciprocal(x)
    minus_x = ops.neg(x)
    refined = ops.fma(approx, ops.fma(minus_x, approx, one), approx)
    bits = ops.to_dtype_bitcast(refined, torch.int32, torch.float32)

    def neighbour(step: int) -> Any:
        return ops.to_dtype_bitcast(ops.add(bits, ops.constant(step, torch.int32)), torch.float32, torch.int32)

    def error(candidate: Any) -> Any:
        return ops.abs(ops.fma(minus_x, candidate, one))

    corrected = refined
    for candidate in (neighbour(-1), neighbour(1)):
        corrected = ops.where(ops.lt(error(candidate), error(corrected)), candidate, corrected)
    magnitude = ops.abs(x)
    normal = ops.logical_and(
        ops.ge(magnitude, ops.constant(2.0**-125, torch.float32)),
        ops.le(magnitude, ops.constant(2.0**125, torch.float32)),
    )
    return ops.where(normal, corrected, approx)


def normalize(x: Any, absmax: Any) -> Any:
    """``x * reciprocal_rn(absmax)`` with NaN taken as 0.0 (``reference.normalize_blocks``)."""
    scaled = ops.mul(x, reciprocal_rn(absmax))
    return ops.where(ops.isnan(scaled), ops.constant(0.0, torch.float32), scaled)


def count_below(x: Any, thresholds: Sequence[float]) -> Any:
    """Number of fp32 constants in ``thresholds`` strictly below ``x`` (int32): ``bucketize`` with
    ``right=False`` against a small constant table, unrolled into compares."""
    count = ops.constant(0, torch.int32)
    for threshold in thresholds:
        below = ops.lt(ops.constant(threshold, torch.float32), x)
        count = ops.add(count, ops.to_dtype(below, torch.int32))
    return count


def nearest_code_256(x: Any, code: Loader) -> Any:
    """Index (int32) of the nearest entry of a sorted 256-entry fp32 table ``code``; ties take the
    lower entry (``reference.nearest_code``: the number of fp32 midpoints strictly below ``x``).

    A binary search over ``code[1..255]`` finds ``t``, the number of entries above index 0 that
    are strictly below ``x`` (8 dependent gathers); the answer is ``t`` plus one when the midpoint
    ``(code[t] + code[t + 1]) * 0.5`` is strictly below ``x``. Every midpoint left of ``t`` lies
    below ``code[t] < x`` and every midpoint right of it lies above ``code[t + 1] >= x``, so this
    equals the midpoint count for any sorted table."""
    low = ops.constant(0, torch.int32)
    for step in (128, 64, 32, 16, 8, 4, 2, 1):
        probe = ops.add(low, ops.constant(step, torch.int32))
        go_right = ops.lt(gather(code, probe, 256), x)
        low = ops.where(go_right, probe, low)
    upper = ops.minimum(ops.add(low, ops.constant(1, torch.int32)), ops.constant(255, torch.int32))
    midpoint = ops.mul(ops.add(gather(code, low, 256), gather(code, upper, 256)), ops.constant(0.5, torch.float32))
    above_mid = ops.logical_and(ops.lt(midpoint, x), ops.lt(low, ops.constant(255, torch.int32)))
    return ops.add(low, ops.to_dtype(above_mid, torch.int32))


def pointwise(device: torch.device, dtype: torch.dtype, inner_fn: Callable[[Index], Any], ranges: Sequence[sympy.Expr]) -> ir.TensorBox:
    return ir.Pointwise.create(device=device, dtype=dtype, inner_fn=inner_fn, ranges=list(ranges))


def reshape(x: ir.TensorBox, sizes: Sequence[sympy.Expr]) -> ir.TensorBox:
    return lowerings[aten.reshape.default](x, list(sizes))


def as_uint8(x: ir.TensorBox) -> ir.TensorBox:
    """The bytes of a packed 4-bit tensor stored as uint8/bf16/fp16/fp32, as a flat uint8 tensor."""
    if x.get_dtype() != torch.uint8:
        x = view_dtype(x, torch.uint8)
    return reshape(x, [-1])


def view_dtype(x: ir.TensorBox, dtype: torch.dtype) -> ir.TensorBox:
    """``x.view(dtype)`` (an aliasing view; differing item sizes go through aten's view)."""
    return lowerings[aten.view.dtype](x, dtype)


def register(op: torch._ops.OpOverload, lowering: Callable[..., Any], *, standalone_to_kernel: bool = False) -> None:
    """Install ``lowering`` for ``op`` in Inductor's (process-global) lowering table.

    With ``standalone_to_kernel``, a node that ``patterns.standalone`` marked (a quant op with no
    fusible neighbour, on a device with a hand-written kernel) is lowered to a call of the op
    instead: its registered implementation is that kernel."""
    if standalone_to_kernel:
        inner = lowering

        @functools.wraps(inner)
        def lowering(*args: Any, **kwargs: Any) -> Any:
            node = V.graph.current_node
            if node is not None and node.meta.get(STANDALONE_KEY):
                return fallback(op, *args, **kwargs)
            return inner(*args, **kwargs)

    register_lowering(op, type_promotion_kind=None)(lowering)


def fallback(op: torch._ops.OpOverload, *args: Any, **kwargs: Any) -> Any:
    """Lower ``op`` as an opaque call of its registered kernel (cases the IR lowering skips)."""
    return fallback_handler(op, add_to_fallback_set=False)(*args, **kwargs)


def is_zero(n: sympy.Expr) -> bool:
    return V.graph.sizevars.statically_known_equals(n, 0)
