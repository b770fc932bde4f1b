"""GPU kernels of ``quantize_blockwise``, ``dequantize_blockwise`` (+ ``.out``), ``quantize_4bit`` and
``dequantize_4bit`` (+ ``.out``): the hand-written Triton kernels of ``inductor_quant.kernels.blockwise``
and ``inductor_quant.kernels.fourbit``. Registered for "cuda" and "xpu"; the argument checks are the
CPU kernels' own (``check_*`` of ``ops.blockwise`` / ``ops.fourbit``), so every device rejects the
same calls with the same messages. Outputs are allocated here; the launchers fill them.
"""

from __future__ import annotations

import torch
from torch.library import register_kernel

from ..kernels import blockwise as blockwise_kernels
from ..kernels import fourbit as fourbit_kernels
from ._checks import check_out, num_blocks
from ._library import TRITON_DEVICES
from .blockwise import (
    DEQUANTIZE_BLOCKWISE,
    QUANTIZE_BLOCKWISE,
    check_dequantize_blockwise,
    check_quantize_blockwise,
)
from .fourbit import DEQUANTIZE_4BIT, QUANTIZE_4BIT, check_dequantize_4bit, check_quantize_4bit


def _register(op: str):
    """``register_kernel(op, TRITON_DEVICES)`` that hands the function back (tests call it directly)."""

    def decorator(fn):
        register_kernel(op, TRITON_DEVICES)(fn)
        return fn

    return decorator


def _fill_out(out: torch.Tensor, fill) -> None:
    """Run ``fill(dst)`` into ``out`` directly when it is contiguous, else through a temporary."""
    if out.is_contiguous():
        fill(out)
    else:
        tmp = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        fill(tmp)
        out.copy_(tmp)


@_register(QUANTIZE_BLOCKWISE)
def _quantize_blockwise_triton(A, code, blocksize):
    check_quantize_blockwise(A, code, blocksize)
    codes = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
    absmax = torch.empty((num_blocks(A.numel(), blocksize),), dtype=torch.float32, device=A.device)
    blockwise_kernels.quantize_blockwise(A, code, blocksize, codes, absmax)
    return codes, absmax


def _dequantize_blockwise_into(A, absmax, code, blocksize, out):
    blockwise_kernels.dequantize_blockwise(A, absmax, code, blocksize, out)


@_register(DEQUANTIZE_BLOCKWISE)
def _dequantize_blockwise_triton(A, absmax, code, blocksize, dtype):
    check_dequantize_blockwise(A, absmax, code, blocksize, dtype)
    out = torch.empty(A.shape, dtype=dtype, device=A.device)
    _dequantize_blockwise_into(A, absmax, code, blocksize, out)
    return out


@_register(f"{DEQUANTIZE_BLOCKWISE}.out")
def _dequantize_blockwise_out_triton(A, absmax, code, blocksize, dtype, out):
    check_dequantize_blockwise(A, absmax, code, blocksize, dtype)
    check_out(out, A.shape, dtype, A.device)
    _fill_out(out, lambda dst: _dequantize_blockwise_into(A, absmax, code, blocksize, dst))


@_register(QUANTIZE_4BIT)
def _quantize_4bit_triton(A, blocksize, quant_type, quant_storage):
    check_quantize_4bit(A, blocksize, quant_type, quant_storage)
    n = A.numel()
    packed = torch.empty(((n + 1) // (2 * quant_storage.itemsize), 1), dtype=quant_storage, device=A.device)
    absmax = torch.empty((num_blocks(n, blocksize),), dtype=torch.float32, device=A.device)
    fourbit_kernels.quantize_4bit(A, blocksize, quant_type, packed, absmax)
    return packed, absmax


def _dequantize_4bit_into(A, absmax, blocksize, quant_type, out):
    code = fourbit_kernels.code_table(quant_type, A.device)
    fourbit_kernels.dequantize_4bit(A, absmax, blocksize, code, out)


@_register(DEQUANTIZE_4BIT)
def _dequantize_4bit_triton(A, absmax, blocksize, quant_type, shape, dtype):
    check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype)
    out = torch.empty(shape, dtype=dtype, device=A.device)
    _dequantize_4bit_into(A, absmax, blocksize, quant_type, out)
    return out


@_register(f"{DEQUANTIZE_4BIT}.out")
def _dequantize_4bit_out_triton(A, absmax, blocksize, quant_type, shape, dtype, out):
    check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype)
    check_out(out, shape, dtype, A.device)
    _fill_out(out, lambda dst: _dequantize_4bit_into(A, absmax, blocksize, quant_type, dst))

