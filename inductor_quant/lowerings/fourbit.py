"""Lowerings of the 4-bit ops: ``dequantize_4bit`` and ``quantize_4bit`` (NF4 and FP4).

``dequantize_4bit`` is one ``Pointwise`` node: element ``i`` reads byte ``i // 2`` (high nibble
for even ``i``), gathers the code value from a 16-entry constant table embedded in the compiled
module, and scales it by ``absmax[i // blocksize]``. ``quantize_4bit`` is a ``max |x|`` block
reduction plus a pointwise that encodes two elements per output byte. When
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

from ..code_tables import FP4_RANK_TO_CODE, FP4_SIGN_BIT, FP4_THRESHOLDS, QUANT_TYPES, code_midpoints, get_4bit_code
from ..reference.fourbit import quantize_4bit_codes
from . import _ir

ops_ns = torch.ops.inductor_quant


def _fp32_values(values: Sequence[float]) -> list[float]:
    """``values`` rounded to fp32 (as the reference's ``torch.tensor(..., float32)`` does)."""
    return torch.tensor(list(values), dtype=torch.float32).tolist()


NF4_MIDPOINTS = code_midpoints(get_4bit_code("nf4")).tolist()
FP4_THRESHOLDS_FP32 = _fp32_values(FP4_THRESHOLDS)
# Code of 0.0, which pads the low nibble of the last byte when numel is odd.
ZERO_CODE = {quant_type: int(quantize_4bit_codes(torch.zeros(1), quant_type)) for quant_type in QUANT_TYPES}


def encode_4bit(normalized, quant_type: str):
    """4-bit code (int32) of a normalized fp32 value (``reference.quantize_4bit_codes``)."""
    if quant_type == "nf4":
        return _ir.count_below(normalized, NF4_MIDPOINTS)
    rank = _ir.count_below(ops.abs(normalized), FP4_THRESHOLDS_FP32)
    magnitude = ops.constant(FP4_RANK_TO_CODE[0], torch.int32)
    for r in range(1, len(FP4_RANK_TO_CODE)):
        magnitude = ops.where(ops.eq(rank, ops.constant(r, torch.int32)), ops.constant(FP4_RANK_TO_CODE[r], torch.int32), magnitude)
    negative = ops.lt(normalized, ops.constant(0.0, torch.float32))
    sign = ops.where(negative, ops.constant(FP4_SIGN_BIT, torch.int32), ops.constant(0, torch.int32))
    return ops.bitwise_or(magnitude, sign)


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

    def code_of(i):
        return encode_4bit(_ir.normalize(value(i), load_absmax(i)), quant_type)

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
