"""4-bit NF4/FP4 blockwise quantization and the 4-bit matmuls (pure-torch reference).

Layout (bitsandbytes'): element ``2i`` goes in the high nibble of byte ``i``, element ``2i+1``
in the low nibble; an odd tail is padded with the code of 0.0. The packed bytes may be stored
in a wider dtype (``quant_storage``): the same bytes viewed as bf16/fp16/fp32, shape
``(bytes // itemsize, 1)``. Normalization, zero and non-finite blocks follow ``blockwise.py``.
NF4 picks the nearest code (fp32 midpoints); FP4 uses bitsandbytes' literal thresholds on
``|xn|`` and sets the sign bit for ``xn < 0`` (so -0.0 is stored as +0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..code_tables import (
    FP4_RANK_TO_CODE,
    FP4_SIGN_BIT,
    FP4_THRESHOLDS,
    get_4bit_code,
)
from .blockwise import blockwise_absmax, dequantize_codes, nearest_code, normalize_blocks, scale_blocks

__all__ = [
    "quantize_4bit_codes",
    "pack_nibbles",
    "unpack_nibbles",
    "byte_pairs",
    "quantize_4bit",
    "dequantize_4bit",
    "resolve_absmax",
    "gemv_4bit",
    "gemm_4bit",
    "swiglu",
]


def quantize_4bit_codes(normalized: torch.Tensor, quant_type: str) -> torch.Tensor:
    """4-bit code (int64, 0..15) of each normalized value."""
    if quant_type == "nf4":
        return nearest_code(normalized, get_4bit_code("nf4", normalized.device))
    thresholds = torch.tensor(FP4_THRESHOLDS, dtype=torch.float32, device=normalized.device)
    rank = torch.bucketize(normalized.abs(), thresholds, right=False)
    magnitude = torch.tensor(FP4_RANK_TO_CODE, device=normalized.device)[rank]
    return magnitude | torch.where(normalized < 0, FP4_SIGN_BIT, 0)


def pack_nibbles(codes: torch.Tensor, pad_code: int) -> torch.Tensor:
    """Pack a flat tensor of 4-bit codes two per byte, high nibble first."""
    if codes.numel() % 2:
        codes = F.pad(codes, (0, 1), value=pad_code)
    pairs = codes.view(-1, 2).to(torch.uint8)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """First ``n`` 4-bit codes of a flat uint8 tensor (high nibble first)."""
    return torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1)[:n]


def quantize_4bit(
    A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``A`` to packed 4-bit codes and fp32 per-block absmax.

    Returns ``(packed ((n + 1) // (2 * itemsize), 1) of quant_storage, absmax (ceil(n/bs),))``."""
    flat = A.reshape(-1)
    absmax = blockwise_absmax(flat, blocksize)
    normalized = normalize_blocks(flat, absmax, blocksize)
    codes = quantize_4bit_codes(normalized, quant_type)
    zero_code = int(quantize_4bit_codes(torch.zeros(1, device=A.device), quant_type))
    packed = pack_nibbles(codes, zero_code)
    return packed.view(quant_storage).unsqueeze(1), absmax


def dequantize_4bit(
    A: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: list[int] | tuple[int, ...],
    dtype: torch.dtype,
    code: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unpack and scale 4-bit codes to ``dtype`` with ``shape``.

    ``code`` overrides the table of ``quant_type`` (``gemv_4bit`` passes its own 16 entries)."""
    n = 1
    for size in shape:
        n *= size
    packed = A.contiguous().view(torch.uint8).reshape(-1)
    if code is None:
        code = get_4bit_code(quant_type, A.device)
    # one lookup per byte in a table of its two values (high nibble first): a third of the
    # temporaries of unpacking the nibbles, then looking each up
    values = byte_pairs(code).index_select(0, packed.int()).reshape(-1)[:n]
    return scale_blocks(values, absmax, blocksize, dtype).view(shape)


def byte_pairs(code: torch.Tensor) -> torch.Tensor:
    """fp32 ``[256, 2]`` table: row ``b`` holds ``(code[b >> 4], code[b & 15])``, the values of the
    two 4-bit codes packed in byte ``b``."""
    code = code.float()
    return torch.stack((code.repeat_interleave(16), code.repeat(16)), dim=1)


def resolve_absmax(
    absmax: torch.Tensor,
    absmax_8bit: torch.Tensor | None,
    absmax_code: torch.Tensor | None,
    absmax_offset: torch.Tensor | None,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """fp32 per-block absmax, undoing double quantization when ``absmax_8bit`` is given:
    ``absmax_code[absmax_8bit[i]] * absmax[i // 256] + absmax_offset``."""
    if absmax_8bit is None:
        return absmax.float()
    inner = dequantize_codes(absmax_8bit.reshape(-1), absmax_code, absmax, nested_blocksize, torch.float32)
    return inner + absmax_offset.float()


def gemv_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    shapeB: list[int] | tuple[int, ...],
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
) -> torch.Tensor:
    """``A @ W.T`` where ``W [N, K]`` is 4-bit packed in ``B`` with the 16-entry table ``code``.

    The weight is dequantized to A's dtype, then multiplied as ``F.linear`` does; works for any
    number of leading rows of A (bitsandbytes' CUDA gemv reads only the first). A is made
    contiguous first: BLAS sums in a layout-dependent order, and a strided A must give the same
    bits as its contiguous copy."""
    weight = dequantize_4bit(B, absmax, blocksize, "", shapeB, A.dtype, code=code)
    return F.linear(A.contiguous(), weight)


def gemm_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    shapeB: list[int] | tuple[int, ...],
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    bias: torch.Tensor | None = None,
    absmax_8bit: torch.Tensor | None = None,
    absmax_code: torch.Tensor | None = None,
    absmax_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(A, dequantize_4bit(W).to(A.dtype), bias)`` for any number of rows of A,
    with optional double-quantized absmax (see :func:`resolve_absmax`); A is made contiguous
    first, as in :func:`gemv_4bit`."""
    scales = resolve_absmax(absmax, absmax_8bit, absmax_code, absmax_offset)
    weight = dequantize_4bit(B, scales, blocksize, quant_type, shapeB, A.dtype)
    return F.linear(A.contiguous(), weight, bias)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` as the two ops compute it in ``gate``'s dtype: each op in fp32, its result
    rounded to the dtype (what a compiled ``F.silu(x @ W_gate.T) * (x @ W_up.T)`` gives)."""
    activated = F.silu(gate.float()).to(gate.dtype)
    return (activated.float() * up.float()).to(gate.dtype)
