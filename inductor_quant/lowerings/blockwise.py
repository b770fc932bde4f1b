"""Lowerings of the 8-bit blockwise ops: ``dequantize_blockwise`` and ``quantize_blockwise``.

``dequantize_blockwise`` becomes one ``Pointwise`` node, ``dtype(code[q] * absmax[i // bs])``
with the 256-entry table read by an indirect (gather) load, so it fuses into whatever consumes
it. ``quantize_blockwise`` becomes a ``max |x|`` block reduction followed by a pointwise
normalize + nearest-code search; when ``numel % blocksize == 0`` both run over
``(blocks, blocksize)`` ranges, which lets the scheduler fuse them (and their pointwise
producers) into one persistent-reduction kernel. Results are bit-identical to
``reference.blockwise``.
"""

from __future__ import annotations

import torch
from torch._inductor import ir
from torch._inductor.virtualized import ops
from torch.utils._sympy.functions import FloorDiv

from . import _ir

ops_ns = torch.ops.inductor_quant


def dequantize_blockwise(
    A: ir.TensorBox, absmax: ir.TensorBox, code: ir.TensorBox, blocksize: int, dtype: torch.dtype
) -> ir.TensorBox:
    sizes = A.get_size()
    load_q = A.make_loader()
    load_absmax = _ir.block_loader(absmax, _ir.numel(sizes), blocksize)
    load_code = _ir.flat_loader(code)

    def inner_fn(index: _ir.Index):
        i = _ir.flat_index(index, sizes)
        q = ops.to_dtype(load_q(index), torch.int32)
        value = _ir.gather(load_code, q, 256)
        return ops.to_dtype(ops.mul(value, load_absmax(i)), dtype)

    return _ir.pointwise(A.get_device(), dtype, inner_fn, sizes)


def quantize_blockwise(A: ir.TensorBox, code: ir.TensorBox, blocksize: int) -> tuple[ir.TensorBox, ir.TensorBox]:
    sizes = A.get_size()
    n = _ir.numel(sizes)
    device = A.get_device()
    load_x = _ir.flat_loader(A)
    load_code = _ir.flat_loader(code)

    def value(i):
        return _ir.load_f32(load_x, i)

    if _ir.is_zero(n):
        return _ir.fallback(ops_ns.quantize_blockwise.default, A, code, blocksize)
    absmax = _ir.block_absmax(device, lambda row, i: value(i), n, blocksize)
    load_absmax = _ir.block_loader(absmax, n, blocksize)

    def code_of(i):
        normalized = _ir.normalize(value(i), load_absmax(i))
        return ops.to_dtype(_ir.nearest_code_256(normalized, load_code), torch.uint8)

    if _ir.statically_multiple_of(n, blocksize):
        ranges = [FloorDiv(n, blocksize), blocksize]
        codes = _ir.pointwise(device, torch.uint8, lambda idx: code_of(idx[0] * blocksize + idx[1]), ranges)
    else:
        codes = _ir.pointwise(device, torch.uint8, lambda idx: code_of(idx[0]), [n])
    return _ir.reshape(codes, sizes), absmax


def register() -> None:
    _ir.register(ops_ns.dequantize_blockwise.default, dequantize_blockwise, standalone_to_kernel=True)
    _ir.register(ops_ns.quantize_blockwise.default, quantize_blockwise, standalone_to_kernel=True)
