"""8-bit blockwise ops: ``quantize_blockwise`` and ``dequantize_blockwise`` (+ ``.out``).

Same names, argument order and meaning as ``torch.ops.bitsandbytes``: ``code`` is a 256-entry
fp32 table (``code_tables.dynamic_map()`` by default), one fp32 absmax per ``blocksize`` run of
the flattened input.
"""

from __future__ import annotations

import torch
from torch.library import register_fake, register_kernel

from ..reference import blockwise as reference
from ._checks import (
    FLOAT_DTYPES,
    check_blocksize,
    check_code_table,
    check_dtype,
    check_float_dtype_arg,
    check_numel,
    check_out,
    check_same_device,
    num_blocks,
)
from ._library import define

QUANTIZE_BLOCKWISE = define("quantize_blockwise(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)")
DEQUANTIZE_BLOCKWISE = define(
    "dequantize_blockwise(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor"
)
define(
    "dequantize_blockwise.out(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype, "
    "Tensor(a!) out) -> ()"
)


def check_quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> None:
    check_dtype(A, "A", FLOAT_DTYPES)
    check_code_table(code, "code", 256)
    check_blocksize(blocksize)
    check_same_device("A", A, code=code)


def check_dequantize_blockwise(
    A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> None:
    check_dtype(A, "A", (torch.uint8,))
    check_dtype(absmax, "absmax", (torch.float32,))
    check_code_table(code, "code", 256)
    check_blocksize(blocksize)
    check_float_dtype_arg(dtype)
    check_numel(absmax, "absmax", num_blocks(A.numel(), blocksize), f"one per block of {blocksize}")
    check_same_device("A", A, absmax=absmax, code=code)


@register_fake(QUANTIZE_BLOCKWISE)
def _quantize_blockwise_fake(A, code, blocksize):
    check_quantize_blockwise(A, code, blocksize)
    return A.new_empty(A.shape, dtype=torch.uint8), A.new_empty((num_blocks(A.numel(), blocksize),), dtype=torch.float32)


@register_kernel(QUANTIZE_BLOCKWISE, "cpu")
def _quantize_blockwise_cpu(A, code, blocksize):
    check_quantize_blockwise(A, code, blocksize)
    return reference.quantize_blockwise(A, code, blocksize)


@register_fake(DEQUANTIZE_BLOCKWISE)
def _dequantize_blockwise_fake(A, absmax, code, blocksize, dtype):
    check_dequantize_blockwise(A, absmax, code, blocksize, dtype)
    return A.new_empty(A.shape, dtype=dtype)


@register_kernel(DEQUANTIZE_BLOCKWISE, "cpu")
def _dequantize_blockwise_cpu(A, absmax, code, blocksize, dtype):
    check_dequantize_blockwise(A, absmax, code, blocksize, dtype)
    return reference.dequantize_blockwise(A, absmax, code, blocksize, dtype)


@register_kernel(f"{DEQUANTIZE_BLOCKWISE}.out", "cpu")
def _dequantize_blockwise_out_cpu(A, absmax, code, blocksize, dtype, out):
    check_dequantize_blockwise(A, absmax, code, blocksize, dtype)
    check_out(out, A.shape, dtype, A.device)
    out.copy_(reference.dequantize_blockwise(A, absmax, code, blocksize, dtype))
