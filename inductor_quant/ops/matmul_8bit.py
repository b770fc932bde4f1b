"""8-bit blockwise weight matmul: ``linear_8bit``.

``linear_8bit(A, B, absmax, code, blocksize, bias=None) = F.linear(A, W, bias)`` where
``W = dequantize_blockwise(B, absmax, code, blocksize, A.dtype)`` is the ``[N, K]`` weight stored
as uint8 codes ``B [N, K]`` with one fp32 absmax per ``blocksize`` run of the flattened weight.
It is what the dequantize+linear pass (``inductor_quant.patterns.dequant_linear``) puts in place
of ``dequantize_blockwise`` feeding ``mm``/``addmm``, the 8-bit counterpart of ``gemm_4bit``.

The kernel is registered for every device (``CompositeExplicitAutograd``): it calls
``dequantize_blockwise`` (whose per-device kernel is used) and ``F.linear``, so the result is
bit-identical to the unfused program on the same device. A fused GPU kernel can be registered
for ``cuda`` later without changing the schema.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.library import register_fake, register_kernel

from ._checks import FLOAT_DTYPES, check, check_blocksize, check_code_table, check_dtype, check_numel, check_same_device, num_blocks
from ._library import define

__all__ = ["LINEAR_8BIT", "check_linear_8bit"]

LINEAR_8BIT = define(
    "linear_8bit(Tensor A, Tensor B, Tensor absmax, Tensor code, int blocksize, Tensor? bias=None) -> Tensor"
)


def check_linear_8bit(A, B, absmax, code, blocksize, bias) -> None:
    check_dtype(A, "A", FLOAT_DTYPES)
    check_dtype(B, "B", (torch.uint8,))
    check(B.dim() == 2, f"B must be the 2-D [N, K] weight codes, got shape {tuple(B.shape)}")
    N, K = B.shape
    check(A.dim() >= 1 and A.shape[-1] == K, f"A.shape[-1] must equal K = B.shape[1] = {K}, got A.shape = {tuple(A.shape)}")
    check_dtype(absmax, "absmax", (torch.float32,))
    check_code_table(code, "code", 256)
    check_blocksize(blocksize)
    check_numel(absmax, "absmax", num_blocks(N * K, blocksize), f"one per block of {blocksize}")
    if bias is not None:
        check(bias.dim() == 1 and bias.shape[0] == N, f"bias must be 1-D of length N = {N}, got shape {tuple(bias.shape)}")
        check(bias.dtype == A.dtype, f"bias must have A's dtype {A.dtype}, got {bias.dtype}")
    check_same_device("A", A, B=B, absmax=absmax, code=code, bias=bias)


@register_fake(LINEAR_8BIT)
def _linear_8bit_fake(A, B, absmax, code, blocksize, bias=None):
    check_linear_8bit(A, B, absmax, code, blocksize, bias)
    return A.new_empty([*A.shape[:-1], B.shape[0]])


@register_kernel(LINEAR_8BIT, None)
def _linear_8bit_kernel(A, B, absmax, code, blocksize, bias=None):
    check_linear_8bit(A, B, absmax, code, blocksize, bias)
    weight = torch.ops.inductor_quant.dequantize_blockwise(B, absmax, code, blocksize, A.dtype)
    return F.linear(A, weight, bias)
