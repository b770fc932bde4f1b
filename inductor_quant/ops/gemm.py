"""4-bit matmul ops: ``gemv_4bit`` (+ ``.out``), ``gemm_4bit``, ``gemm_4bit_grouped`` and ``gemm_4bit_swiglu``.

Both compute ``A @ W.T`` for a weight ``W [N, K]`` packed by ``quantize_4bit`` (row-major,
``shapeB = [N, K]``). ``gemv_4bit`` takes the 16-entry table itself (``code``) and already
dequantized fp32 absmax, as bitsandbytes' op; ``gemm_4bit`` takes ``quant_type``, an optional
bias and optional double-quantized absmax (``absmax_8bit``, ``absmax_code``, ``absmax_offset``,
nested blocksize 256), as bitsandbytes 0.50's. Unlike bitsandbytes' CUDA gemv, every row of ``A``
is used, and ``K`` need not be a multiple of ``blocksize``.

``gemm_4bit_grouped`` is ``cat([gemm_4bit(A, B[g], ...) for g], dim=-1)``: the matmuls of
several weights that read the same activations (a layer's q/k/v or gate/up projections), as one
op and one output; on GPU, one row of ``A`` takes one kernel launch for all of them. The
dequantize+linear pass groups sibling ``gemm_4bit`` calls into it.

``gemm_4bit_swiglu`` takes the same arguments for exactly two weights of one shape (gate, up) and
returns ``silu(gate) * up`` of their products (:func:`reference.swiglu`): a SwiGLU feed-forward's
input to its down projection. On GPU, one row of ``A`` is one launch whose programs compute a
gate row and its up row and write only the product (``patterns.swiglu_epilogue`` inserts it).
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

GEMM_4BIT_GROUPED = define(
    "gemm_4bit_grouped(Tensor A, Tensor[] B, SymInt[] out_features, Tensor[] absmax, int blocksize, str quant_type, "
    "Tensor[]? bias=None, Tensor[]? absmax_8bit=None, Tensor[]? absmax_code=None, Tensor[]? absmax_offset=None) "
    "-> Tensor"
)

GEMM_4BIT_SWIGLU = define(
    "gemm_4bit_swiglu(Tensor A, Tensor[] B, SymInt[] out_features, Tensor[] absmax, int blocksize, str quant_type, "
    "Tensor[]? bias=None, Tensor[]? absmax_8bit=None, Tensor[]? absmax_code=None, Tensor[]? absmax_offset=None) "
    "-> Tensor"
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


def grouped_weights(B, out_features, absmax, bias, absmax_8bit, absmax_code, absmax_offset) -> list[tuple]:
    """The per-weight arguments of ``gemm_4bit_grouped`` as ``(B, N, absmax, bias, absmax_8bit,
    absmax_code, absmax_offset)`` tuples, after checking that every list has one entry per weight."""
    count = len(B)
    check_value(count >= 1, "B must hold at least one packed weight, got an empty list")
    lists = dict(out_features=out_features, absmax=absmax, bias=bias, absmax_8bit=absmax_8bit,
                 absmax_code=absmax_code, absmax_offset=absmax_offset)
    for name, values in lists.items():
        check_value(
            values is None or len(values) == count,
            lambda: f"{name} must have one entry per weight in B ({count}), got {len(values)}",
        )
    none = [None] * count
    return list(zip(B, out_features, absmax, bias or none, absmax_8bit or none, absmax_code or none,
                    absmax_offset or none))


def check_gemm_4bit_grouped(A, B, out_features, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
                            absmax_offset) -> None:
    """``check_gemm_4bit`` for each weight ``[out_features[g], A.shape[-1]]``; a message names the
    weight's index."""
    check(A.dim() >= 1, lambda: f"A must have at least one dimension, got shape {tuple(A.shape)}")
    weights = grouped_weights(B, out_features, absmax, bias, absmax_8bit, absmax_code, absmax_offset)
    for g, (B_g, N, absmax_g, bias_g, absmax_8bit_g, absmax_code_g, absmax_offset_g) in enumerate(weights):
        try:
            check_gemm_4bit(A, B_g, [N, A.shape[-1]], absmax_g, blocksize, quant_type, bias_g, absmax_8bit_g,
                            absmax_code_g, absmax_offset_g)
        except (RuntimeError, ValueError) as error:
            if type(error) not in (RuntimeError, ValueError):  # e.g. a data-dependent guard: not ours to reword
                raise
            raise type(error)(f"weight {g} of the group (B[{g}], absmax[{g}], ...): {error}") from None


def check_gemm_4bit_swiglu(A, B, out_features, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
                           absmax_offset) -> None:
    """``check_gemm_4bit_grouped`` for exactly two weights (gate, up) with the same number of rows."""
    check_value(len(B) == 2, lambda: f"B must hold two packed weights (gate, up), got {len(B)}")
    check_value(
        len(out_features) != 2 or out_features[0] == out_features[1],
        lambda: f"out_features must be equal (gate and up have the same rows), got {list(out_features)}",
    )
    check_gemm_4bit_grouped(A, B, out_features, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
                            absmax_offset)


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


@register_fake(GEMM_4BIT_GROUPED)
def _gemm_4bit_grouped_fake(A, B, out_features, absmax, blocksize, quant_type, bias=None, absmax_8bit=None,
                            absmax_code=None, absmax_offset=None):
    check_gemm_4bit_grouped(A, B, out_features, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
                            absmax_offset)
    return A.new_empty([*A.shape[:-1], sum(out_features)])


@register_kernel(GEMM_4BIT_GROUPED, "cpu")
def _gemm_4bit_grouped_cpu(A, B, out_features, absmax, blocksize, quant_type, bias=None, absmax_8bit=None,
                           absmax_code=None, absmax_offset=None):
    check_gemm_4bit_grouped(A, B, out_features, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
                            absmax_offset)
    return torch.cat(
        _reference_products(A, B, out_features, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
                            absmax_offset),
        dim=-1,
    )


def _reference_products(A, B, out_features, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
                        absmax_offset) -> list[torch.Tensor]:
    """``reference.gemm_4bit`` of A with each weight of a group (arguments already checked)."""
    return [
        reference.gemm_4bit(A, B_g, [N, A.shape[-1]], absmax_g, blocksize, quant_type, bias_g, absmax_8bit_g,
                            absmax_code_g, absmax_offset_g)
        for B_g, N, absmax_g, bias_g, absmax_8bit_g, absmax_code_g, absmax_offset_g
        in grouped_weights(B, out_features, absmax, bias, absmax_8bit, absmax_code, absmax_offset)
    ]


@register_fake(GEMM_4BIT_SWIGLU)
def _gemm_4bit_swiglu_fake(A, B, out_features, absmax, blocksize, quant_type, bias=None, absmax_8bit=None,
                           absmax_code=None, absmax_offset=None):
    check_gemm_4bit_swiglu(A, B, out_features, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
                           absmax_offset)
    return A.new_empty([*A.shape[:-1], out_features[0]])


@register_kernel(GEMM_4BIT_SWIGLU, "cpu")
def _gemm_4bit_swiglu_cpu(A, B, out_features, absmax, blocksize, quant_type, bias=None, absmax_8bit=None,
                          absmax_code=None, absmax_offset=None):
    check_gemm_4bit_swiglu(A, B, out_features, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
                           absmax_offset)
    gate, up = _reference_products(A, B, out_features, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
                                   absmax_offset)
    return reference.swiglu(gate, up)
