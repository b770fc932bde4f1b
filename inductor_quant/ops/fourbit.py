"""4-bit NF4/FP4 ops: ``quantize_4bit`` and ``dequantize_4bit`` (+ ``.out``).

bitsandbytes' layout: two codes per byte, element ``2i`` in the high nibble; the packed bytes are
returned as ``((n + 1) // (2 * itemsize), 1)`` of ``quant_storage`` (uint8, or bf16/fp16/fp32 for
FSDP sharding, which needs ``n % (2 * itemsize) == 0``); absmax is fp32 ``(ceil(n / blocksize),)``.
"""

from __future__ import annotations

import torch
from torch.library import register_fake, register_kernel

from ..reference import fourbit as reference
from ._checks import (
    FLOAT_DTYPES,
    check,
    check_blocksize,
    check_dtype,
    check_float_dtype_arg,
    check_numel,
    check_out,
    check_packed_4bit,
    check_quant_type,
    check_same_device,
    check_shape_arg,
    check_storage_dtype_arg,
    num_blocks,
    prod,
)
from ._library import define

QUANTIZE_4BIT = define(
    "quantize_4bit(Tensor A, int blocksize, str quant_type, ScalarType quant_storage) -> (Tensor, Tensor)"
)
DEQUANTIZE_4BIT = define(
    "dequantize_4bit(Tensor A, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, "
    "ScalarType dtype) -> Tensor"
)
define(
    "dequantize_4bit.out(Tensor A, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, "
    "ScalarType dtype, Tensor(a!) out) -> ()"
)


def check_quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype) -> None:
    check_dtype(A, "A", FLOAT_DTYPES)
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    check_storage_dtype_arg(quant_storage)
    itemsize = quant_storage.itemsize
    if itemsize > 1:
        check(
            A.numel() % (2 * itemsize) == 0,
            f"A.numel() must be a multiple of {2 * itemsize} to pack into quant_storage={quant_storage} "
            f"(2 codes per byte, {itemsize} bytes per element), got {A.numel()}",
        )


def check_dequantize_4bit(
    A: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape,
    dtype: torch.dtype,
) -> None:
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    check_shape_arg(shape)
    check_float_dtype_arg(dtype)
    n = prod(shape)
    check_packed_4bit(A, "A", n)
    check_dtype(absmax, "absmax", (torch.float32,))
    check_numel(absmax, "absmax", num_blocks(n, blocksize), f"one per block of {blocksize}")
    check_same_device("A", A, absmax=absmax)


@register_fake(QUANTIZE_4BIT)
def _quantize_4bit_fake(A, blocksize, quant_type, quant_storage):
    check_quantize_4bit(A, blocksize, quant_type, quant_storage)
    n = A.numel()
    packed = A.new_empty(((n + 1) // (2 * quant_storage.itemsize), 1), dtype=quant_storage)
    return packed, A.new_empty((num_blocks(n, blocksize),), dtype=torch.float32)


@register_kernel(QUANTIZE_4BIT, "cpu")
def _quantize_4bit_cpu(A, blocksize, quant_type, quant_storage):
    check_quantize_4bit(A, blocksize, quant_type, quant_storage)
    return reference.quantize_4bit(A, blocksize, quant_type, quant_storage)


@register_fake(DEQUANTIZE_4BIT)
def _dequantize_4bit_fake(A, absmax, blocksize, quant_type, shape, dtype):
    check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype)
    return A.new_empty(shape, dtype=dtype)


@register_kernel(DEQUANTIZE_4BIT, "cpu")
def _dequantize_4bit_cpu(A, absmax, blocksize, quant_type, shape, dtype):
    check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype)
    return reference.dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype)


@register_kernel(f"{DEQUANTIZE_4BIT}.out", "cpu")
def _dequantize_4bit_out_cpu(A, absmax, blocksize, quant_type, shape, dtype, out):
    check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype)
    check_out(out, shape, dtype, A.device)
    out.copy_(reference.dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype))
