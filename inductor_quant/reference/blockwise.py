"""Blockwise absmax quantization with a 256-entry code map (bitsandbytes' 8-bit scheme).

This is the pure-torch reference: the CPU kernel of the ops and the oracle every Triton kernel
is tested against. The rules (shared with the 4-bit quantizers in ``fourbit.py``):

* blocks are contiguous runs of the flattened tensor; the last block may be partial and uses
  only its own elements;
* ``absmax[b] = max |x|`` over the block, in fp32;
* ``xn = float32(x) * (1 / absmax[b])`` (one IEEE reciprocal per block, then one multiply);
* a NaN ``xn`` (all-zero block: ``0 * inf``; a block holding ±Inf: ``x * 0``) is taken as 0.0,
  so zero blocks store the code of 0.0 and non-finite blocks dequantize to NaN, never to a
  finite wrong value;
* the stored code is the nearest entry of the table; at an exact midpoint the lower one wins;
* dequantize is ``dtype(float32(code[q]) * absmax[b])``: one fp32 multiply, one rounding.
"""

from __future__ import annotations

import torch

from ..code_tables import code_midpoints

__all__ = [
    "blockwise_absmax",
    "normalize_blocks",
    "nearest_code",
    "quantize_blockwise",
    "dequantize_blockwise",
    "dequantize_codes",
    "scale_blocks",
]


def _as_blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Zero-pad a 1-D fp32 tensor to whole blocks and view it as ``(blocks, blocksize)``."""
    pad = -flat.numel() % blocksize
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, blocksize)


def blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """fp32 ``max |x|`` of each block of a flat tensor, shape ``(ceil(n / blocksize),)``.

    NaN propagates (a block holding NaN has a NaN absmax)."""
    blocks = _as_blocks(flat.float(), blocksize)
    if blocks.numel() == 0:
        return blocks.new_empty((0,))
    return blocks.abs().amax(dim=1)


def normalize_blocks(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``float32(x) * (1 / absmax)`` per block, with NaN results replaced by 0.0 (module doc)."""
    n = flat.numel()
    blocks = _as_blocks(flat.float(), blocksize)
    inv = torch.reciprocal(absmax.float()).reshape(-1, 1)
    normalized = (blocks * inv).reshape(-1)[:n]
    return torch.where(torch.isnan(normalized), 0.0, normalized)


def nearest_code(normalized: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the ascending table ``code`` (ties to the lower entry).

    Equals the number of fp32 midpoints strictly below the value."""
    return torch.bucketize(normalized, code_midpoints(code), right=False)


def scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """``dtype(values[i] * absmax[i // blocksize])`` for a flat fp32 tensor of code values
    (``absmax`` of any shape holding one value per block, in block order): one fp32 multiply,
    one rounding."""
    n = values.numel()
    return (_as_blocks(values, blocksize) * absmax.float().reshape(-1, 1)).reshape(-1)[:n].to(dtype)


def dequantize_codes(
    indices: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    """``dtype(code[q] * absmax[i // blocksize])`` for a flat tensor of code indices (``absmax``
    of any shape holding one value per block, in block order)."""
    return scale_blocks(code.float().index_select(0, indices.reshape(-1).int()), absmax, blocksize, dtype)


def quantize_blockwise(
    A: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``A`` to uint8 indices into ``code`` with one fp32 absmax per block.

    Returns ``(codes shaped like A, absmax of shape (ceil(n / blocksize),))``."""
    flat = A.reshape(-1)
    absmax = blockwise_absmax(flat, blocksize)
    normalized = normalize_blocks(flat, absmax, blocksize)
    codes = nearest_code(normalized, code).to(torch.uint8)
    return codes.view(A.shape), absmax


def dequantize_blockwise(
    A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``dtype(code[A] * absmax[block])`` shaped like A."""
    return dequantize_codes(A.reshape(-1), code, absmax, blocksize, dtype).view(A.shape)
