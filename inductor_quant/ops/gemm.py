"""4-bit matmul ops: ``gemv_4bit`` (+ ``.out``) and ``gemm_4bit``.

Both compute ``A @ W.T`` for a weight ``W [N, K]`` packed by ``quantize_4bit`` (row-major,
``shapeB = [N, K]``). ``gemv_4bit`` takes the 16-entry table itself (``code``) and already
dequantized fp32 absmax, as bitsandbytes' op; ``gemm_4bit`` takes ``quant_type``, an optional
bias and optional double-quantized absmax (``absmax_8bit``, ``absmax_code``, ``absmax_offset``,
nested blocksize 256), as bitsandbytes 0.50's. Unlike bitsandbytes' CUDA gemv, every row of ``A``
is used, and ``K`` need not be a multiple of ``blocksize``.
"""

from __future__ import annotations

import torch
from torch.library import register_fake, register_kernel

from ..reference import fourbit as reference
from ._checks import (
    FLOAT_DTYPES,
    check,
    check_blocksize,
    check_code_table,
    check_dtype,
    check_numel,
    check_out,
    check_packed_4bit,
    check_quant_type,
    check_same_device,
    check_value,
    num_blocks,
)
from ._library import define

NESTED_BLOCKSIZE = 256

GEMV_4BIT = define(
    "gemv_4bit(Tensor A, Tensor B, SymInt[] shapeB, Tensor absmax, Tensor code, int blocksize) -> Tensor"
)
define(
    "gemv_4bit.out(Tensor A, Tensor B, SymInt[] shapeB, Tensor absmax, Tensor code, int blocksize, "
    "Tensor(a!) out) -> ()"
)
GEMM_4BIT = define(
    "gemm_4bit(Tensor A, Tensor B, SymInt[] shapeB, Tensor absmax, int blocksize, str quant_type, "
    "Tensor? bias=None, Tensor? absmax_8bit=None, Tensor? absmax_code=None, Tensor? absmax_offset=None) -> Tensor"
)


def _check_weight(A: torch.Tensor, B: torch.Tensor, shapeB, blocksize: int) -> None:
    check_dtype(A, "A", FLOAT_DTYPES)
    check_value(len(shapeB) == 2, f"shapeB must be the 2-D weight shape [N, K], got {list(shapeB)}")
    check_blocksize(blocksize)
    N, K = shapeB
    check(A.dim() >= 1 and A.shape[-1] == K, f"A.shape[-1] must equal K = shapeB[1] = {K}, got A.shape = {tuple(A.shape)}")
    check_packed_4bit(B, "B", N * K)


def check_gemv_4bit(A, B, shapeB, absmax, code, blocksize) -> None:
    _check_weight(A, B, shapeB, blocksize)
    check_dtype(absmax, "absmax", (torch.float32,))
    check_numel(absmax, "absmax", num_blocks(shapeB[0] * shapeB[1], blocksize), f"one per block of {blocksize}")
    check_code_table(code, "code", 16)
    check_same_device("A", A, B=B, absmax=absmax, code=code)


def check_gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset) -> None:
    _check_weight(A, B, shapeB, blocksize)
    check_quant_type(quant_type)
    N, K = shapeB
    blocks = num_blocks(N * K, blocksize)
    check_dtype(absmax, "absmax", (torch.float32,))
    nested = (absmax_8bit is not None, absmax_code is not None, absmax_offset is not None)
    check_value(
        all(nested) or not any(nested),
        "absmax_8bit, absmax_code and absmax_offset must be given together (double-quantized absmax) or not at all",
    )
    if absmax_8bit is not None:
        check_dtype(absmax_8bit, "absmax_8bit", (torch.uint8,))
        check(absmax_8bit.dim() == 1, f"absmax_8bit must be 1-D, got shape {tuple(absmax_8bit.shape)}")
        check_numel(absmax_8bit, "absmax_8bit", blocks, f"one per block of {blocksize}")
        check_code_table(absmax_code, "absmax_code", 256)
        check_dtype(absmax_offset, "absmax_offset", FLOAT_DTYPES)
        check_numel(absmax_offset, "absmax_offset", 1, "a scalar")
        check_numel(absmax, "absmax", num_blocks(blocks, NESTED_BLOCKSIZE), f"one per {NESTED_BLOCKSIZE} nested blocks")
    else:
        check_numel(absmax, "absmax", blocks, f"one per block of {blocksize}")
    if bias is not None:
        check(bias.dim() == 1 and bias.shape[0] == N, f"bias must be 1-D of length N = {N}, got shape {tuple(bias.shape)}")
        check(bias.dtype == A.dtype, f"bias must have A's dtype {A.dtype}, got {bias.dtype}")
    check_same_device(
        "A", A, B=B, absmax=absmax, bias=bias, absmax_8bit=absmax_8bit, absmax_code=absmax_code, absmax_offset=absmax_offset
    )


def _output_shape(A: torch.Tensor, shapeB) -> list:
    return [*A.shape[:-1], shapeB[0]]


@register_fake(GEMV_4BIT)
def _gemv_4bit_fake(A, B, shapeB, absmax, code, blocksize):
    check_gemv_4bit(A, B, shapeB, absmax, code, blocksize)
    return A.new_empty(_output_shape(A, shapeB))


@register_kernel(GEMV_4BIT, "cpu")
def _gemv_4bit_cpu(A, B, shapeB, absmax, code, blocksize):
    check_gemv_4bit(A, B, shapeB, absmax, code, blocksize)
    return reference.gemv_4bit(A, B, shapeB, absmax, code, blocksize)


@register_kernel(f"{GEMV_4BIT}.out", "cpu")
def _gemv_4bit_out_cpu(A, B, shapeB, absmax, code, blocksize, out):
    check_gemv_4bit(A, B, shapeB, absmax, code, blocksize)
    check_out(out, _output_shape(A, shapeB), A.dtype, A.device)
    out.copy_(reference.gemv_4bit(A, B, shapeB, absmax, code, blocksize))


@register_fake(GEMM_4BIT)
def _gemm_4bit_fake(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None, absmax_code=None, absmax_offset=None):
    check_gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset)
    return A.new_empty(_output_shape(A, shapeB))


@register_kernel(GEMM_4BIT, "cpu")
def _gemm_4bit_cpu(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None, absmax_code=None, absmax_offset=None):
    check_gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset)
    return reference.gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset)
