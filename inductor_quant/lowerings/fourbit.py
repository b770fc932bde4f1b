"""Lowerings of the 4-bit ops: ``dequantize_4bit`` and ``quantize_4bit`` (NF4 and FP4).

``dequantize_4bit`` is one ``Pointwise`` node: element ``i`` reads byte ``i // 2`` (high nibble
for even ``i``), gathers the code value from a 16-entry constant table embedded in the compiled
module, and scales it by ``absmax[i // blocksize]``. ``quantize_4bit`` is a ``max |x|`` block
reduction plus a pointwise that encodes two elements per output byte, each by one lookup in a
64-entry constant bucket table (the hand-written kernel's table and arithmetic, so the generated
code needs one comparison per element instead of one per threshold). When
``numel % blocksize == 0`` the reduction runs over pairs of elements so that it and the packing
loop share ``(blocks, blocksize // 2)`` ranges and fuse into one kernel. Packed data stored as
bf16/fp16/fp32 (``quant_storage``) is reinterpreted as bytes through a dtype view. Results are
bit-identical to ``reference.fourbit``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sympy
import torch
from torch._inductor import ir
from torch._inductor.virtualized import ops
from torch.utils._sympy.functions import FloorDiv, ModularIndexing

from .. import code_tables
from ..code_tables import FP4_SIGN_BIT, QUANT_TYPES, get_4bit_code
from ..reference.fourbit import quantize_4bit_codes
from . import _ir

ops_ns = torch.ops.inductor_quant


# Code of 0.0, which pads the low nibble of the last byte when numel is odd.
ZERO_CODE = {quant_type: int(quantize_4bit_codes(torch.zeros(1), quant_type)) for quant_type in QUANT_TYPES}
# v * 16 + BUCKET_BIAS rounds once to an integer in [2**23, 2**24): the bucket is its low 6 bits.
BUCKET_BIAS = 1.5 * 2**23 + 32


def encode_4bit(normalized, quant_type: str, load_table: _ir.Loader):
    """4-bit code (int32) of a normalized fp32 value (``reference.quantize_4bit_codes``) by one
    lookup in the bucket table ``load_table`` (``code_tables.fourbit_bucket_table``), as the Triton
    kernel does: the bucket of ``v`` (``normalized``, or ``|normalized|`` for FP4) holds at most one
    threshold, so one comparison with it picks the code. ``v * 16`` is exact, so the product and the
    sum round once, like the kernel's fma."""
    v = normalized if quant_type == "nf4" else ops.abs(normalized)
    limit = code_tables.FOURBIT_BUCKET_RANGE
    # a tiny absmax makes normalized values infinite: clamp them into the table's range
    v = ops.minimum(ops.maximum(v, ops.constant(-limit, torch.float32)), ops.constant(limit, torch.float32))
    key = ops.add(ops.mul(v, ops.constant(16.0, torch.float32)), ops.constant(BUCKET_BIAS, torch.float32))
    bucket = ops.bitwise_and(
        ops.to_dtype_bitcast(key, torch.int32, torch.float32), ops.constant(code_tables.FOURBIT_BUCKETS - 1, torch.int32)
    )
    entry = _ir.gather(load_table, bucket, code_tables.FOURBIT_BUCKETS)
    threshold = ops.to_dtype_bitcast(ops.to_dtype(entry, torch.int32), torch.float32, torch.int32)
    codes = ops.to_dtype(ops.bitwise_right_shift(entry, ops.constant(32, torch.int64)), torch.int32)
    code = ops.where(
        ops.gt(v, threshold),
        ops.bitwise_right_shift(codes, ops.constant(4, torch.int32)),
        ops.bitwise_and(codes, ops.constant(15, torch.int32)),
    )
    if quant_type == "nf4":
        return code
    negative = ops.lt(normalized, ops.constant(0.0, torch.float32))
    sign = ops.where(negative, ops.constant(FP4_SIGN_BIT, torch.int32), ops.constant(0, torch.int32))
    return ops.bitwise_or(code, sign)


def dequantize_4bit(
    A: ir.TensorBox,
    absmax: ir.TensorBox,
    blocksize: int,
    quant_type: str,
    shape: Sequence[sympy.Expr],
    dtype: torch.dtype,
) -> ir.TensorBox:
    device = A.get_device()
    load_byte = _ir.flat_loader(_ir.as_uint8(A))
    load_absmax = _ir.block_loader(absmax, _ir.numel(shape), blocksize)
    load_code = _ir.constant_table(get_4bit_code(quant_type).tolist(), device)

    def inner_fn(index: _ir.Index):
        i = _ir.flat_index(index, shape)
        byte = ops.to_dtype(load_byte(FloorDiv(i, 2)), torch.int32)
        odd = ops.ne(_ir.index_value(ModularIndexing(i, 1, 2), torch.int32), ops.constant(0, torch.int32))
        high = ops.bitwise_right_shift(byte, ops.constant(4, torch.int32))
        low = ops.bitwise_and(byte, ops.constant(15, torch.int32))
        nibble = ops.where(odd, low, high)
        value = _ir.gather(load_code, nibble, 16)
        return ops.to_dtype(ops.mul(value, load_absmax(i)), dtype)

    return _ir.pointwise(device, dtype, inner_fn, list(shape))


def quantize_4bit(
    A: ir.TensorBox, blocksize: int, quant_type: str, quant_storage: torch.dtype
) -> tuple[ir.TensorBox, ir.TensorBox]:
    n = _ir.numel(A.get_size())
    if _ir.is_zero(n):
        return _ir.fallback(ops_ns.quantize_4bit.default, A, blocksize, quant_type, quant_storage)
    device = A.get_device()
    load_x = _ir.flat_loader(A)

    def value(i):
        return _ir.load_f32(load_x, i)

    whole = _ir.statically_multiple_of(n, blocksize)
    absmax = _ir.block_absmax(device, lambda row, i: value(i), n, blocksize, pairs=whole)
    load_absmax = _ir.block_loader(absmax, n, blocksize)

    load_table = _ir.constant_table(code_tables.fourbit_bucket_table(quant_type).tolist(), device, torch.int64)

    def code_of(i):
        return encode_4bit(_ir.normalize(value(i), load_absmax(i)), quant_type, load_table)

    def pack(high, low):
        return ops.to_dtype(ops.bitwise_or(ops.bitwise_left_shift(high, ops.constant(4, torch.int32)), low), torch.uint8)

    if whole:
        half = blocksize // 2
        packed = _ir.pointwise(
            device,
            torch.uint8,
            lambda idx: pack(code_of(idx[0] * blocksize + 2 * idx[1]), code_of(idx[0] * blocksize + 2 * idx[1] + 1)),
            [FloorDiv(n, blocksize), half],
        )
    else:
        nbytes = FloorDiv(n + 1, 2)

        def byte_fn(idx: _ir.Index):
            second = 2 * idx[0] + 1
            inside = ops.lt(_ir.index_value(second), _ir.index_value(n))
            low = ops.masked(inside, lambda: code_of(second), ZERO_CODE[quant_type])
            return pack(code_of(2 * idx[0]), low)

        packed = _ir.pointwise(device, torch.uint8, byte_fn, [nbytes])
    itemsize = quant_storage.itemsize
    packed = _ir.reshape(packed, [-1, itemsize])
    if quant_storage != torch.uint8:
        packed = _ir.view_dtype(packed, quant_storage)
    return packed, absmax


def register() -> None:
    _ir.register(ops_ns.dequantize_4bit.default, dequantize_4bit, standalone_to_kernel=True)
    _ir.register(ops_ns.quantize_4bit.default, quantize_4bit, standalone_to_kernel=True)
