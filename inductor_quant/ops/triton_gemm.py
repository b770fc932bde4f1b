"""GPU kernels of ``gemv_4bit`` (+ ``.out``), ``gemm_4bit``, ``gemm_4bit_grouped`` and ``gemm_4bit_swiglu``: the fused Triton kernels of
``inductor_quant.kernels.gemm`` up to ``FUSED_MAX_M`` rows of A, dequantize + ``F.linear``
(cuBLAS) above it, where the product is compute-bound and the weight is read only once per
``F.linear`` anyway. Registered for "cuda" and "xpu"; the checks are the CPU kernels' own.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.library import register_kernel

from ..code_tables import get_4bit_code
from ..kernels import gemm as kernels
from ..kernels._constants import to_device_constant
from ..reference import fourbit as reference
from ._checks import check_out
from ._library import TRITON_DEVICES
from .gemm import (
    GEMM_4BIT,
    GEMM_4BIT_GROUPED,
    GEMM_4BIT_SWIGLU,
    GEMV_4BIT,
    NESTED_BLOCKSIZE,
    check_gemm_4bit,
    check_gemm_4bit_grouped,
    check_gemm_4bit_swiglu,
    check_gemv_4bit,
    grouped_weights,
)


# Argument signatures (shapes, dtypes, devices, ints, strings) that passed the checks. The checks
# read only this metadata, and formatting their messages costs more than a small GEMV runs on the
# GPU, so a signature is checked once and then recognised. Bounded: cleared when full.
_CHECKED: set = set()
_CHECKED_MAX = 4096


def _meta(t: torch.Tensor | None):
    return None if t is None else (t.shape, t.dtype, t.device)


def _check_once(check, key, *args) -> None:
    if key in _CHECKED:
        return
    check(*args)
    if len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.clear()
    _CHECKED.add(key)


def _checked_gemv(A, B, shapeB, absmax, code, blocksize) -> None:
    key = ("gemv", _meta(A), _meta(B), tuple(shapeB), _meta(absmax), _meta(code), blocksize)
    _check_once(check_gemv_4bit, key, A, B, shapeB, absmax, code, blocksize)


def _checked_gemm(A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset) -> None:
    key = ("gemm", _meta(A), _meta(B), tuple(shapeB), _meta(absmax), blocksize, quant_type, _meta(bias),
           _meta(absmax_8bit), _meta(absmax_code), _meta(absmax_offset))
    _check_once(check_gemm_4bit, key, A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
                absmax_offset)


def _checked_grouped(A, B, out_features, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
                     absmax_offset, check=check_gemm_4bit_grouped) -> None:
    def metas(tensors):
        return None if tensors is None else tuple(map(_meta, tensors))

    key = (check.__name__, _meta(A), metas(B), tuple(out_features), metas(absmax), blocksize, quant_type, metas(bias),
           metas(absmax_8bit), metas(absmax_code), metas(absmax_offset))
    _check_once(check, key, A, B, out_features, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
                absmax_offset)


@functools.lru_cache(maxsize=None)
def _code_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16-entry table of ``quant_type`` on ``device``, made once (no copy per call), outside
    any CUDA-graph memory pool (``kernels/_constants.py``)."""
    return to_device_constant(get_4bit_code(quant_type), device)


def _has_device_kernel(op: str, device: torch.device) -> bool:
    key = "CUDA" if device.type == "cuda" else device.type.upper()
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def _dequantized_weight(B, shapeB, absmax, blocksize, quant_type, dtype, absmax_8bit, absmax_code, absmax_offset):
    """``W [N, K]`` in ``dtype`` through the dequantize ops' device kernels (the pure-torch
    reference where a device has none registered)."""
    device = B.device
    if absmax_8bit is not None:
        if _has_device_kernel("inductor_quant::dequantize_blockwise", device):
            absmax = torch.ops.inductor_quant.dequantize_blockwise(
                absmax_8bit, absmax, absmax_code, NESTED_BLOCKSIZE, torch.float32
            ) + absmax_offset.float()
        else:
            absmax = reference.resolve_absmax(absmax, absmax_8bit, absmax_code, absmax_offset, NESTED_BLOCKSIZE)
    if _has_device_kernel("inductor_quant::dequantize_4bit", device):
        return torch.ops.inductor_quant.dequantize_4bit(B, absmax, blocksize, quant_type, list(shapeB), dtype)
    return reference.dequantize_4bit(B, absmax, blocksize, quant_type, shapeB, dtype)


def _rows(A: torch.Tensor) -> int:
    """Number of rows of A (product of its leading dimensions)."""
    rows = 1
    for size in A.shape[:-1]:
        rows *= size
    return rows


def _as_rows(A: torch.Tensor, K: int) -> torch.Tensor:
    """A as ``[M, K]`` with unit stride along K (a view when possible)."""
    A2 = A.reshape(_rows(A), K)
    return A2 if A2.stride(1) == 1 or A2.shape[0] == 0 else A2.contiguous()


def _fused(A, B, shapeB, absmax, code, blocksize, bias=None, absmax_8bit=None, absmax_code=None, absmax_offset=None,
           out=None):
    N, K = shapeB
    A2 = _as_rows(A, K)
    out2 = out.view(A2.shape[0], N) if out is not None else None
    w = _contiguous_weight(B, N, absmax, bias, absmax_8bit, absmax_code, absmax_offset)
    result = kernels.gemm_4bit_fused(
        A2, w.B, N, K, w.absmax, code.contiguous(), blocksize, w.bias, w.absmax_8bit, w.absmax_code, w.absmax_offset,
        out=out2,
    )
    return result.view(*A.shape[:-1], N)


def _contiguous_weight(B, N, absmax, bias, absmax_8bit, absmax_code, absmax_offset) -> kernels.QuantizedWeight:
    """One weight's tensors as the fused kernels read them (contiguous; optional ones may be None)."""

    def contiguous(t):
        return t.contiguous() if t is not None else None

    return kernels.QuantizedWeight(B.contiguous(), N, absmax.contiguous(), contiguous(absmax_8bit),
                                   contiguous(absmax_code), absmax_offset, contiguous(bias))


def _gemv(A, B, shapeB, absmax, code, blocksize, out=None):
    N, K = shapeB
    if _rows(A) <= kernels.FUSED_MAX_M or K == 0:
        return _fused(A, B, shapeB, absmax, code, blocksize, out=out)
    weight = reference.dequantize_4bit(B, absmax, blocksize, "", shapeB, A.dtype, code=code)
    result = F.linear(A, weight)
    if out is not None:
        out.copy_(result)
    return result


def _gemv_4bit_gpu(A, B, shapeB, absmax, code, blocksize):
    _checked_gemv(A, B, shapeB, absmax, code, blocksize)
    return _gemv(A, B, shapeB, absmax, code, blocksize)


def _gemv_4bit_out_gpu(A, B, shapeB, absmax, code, blocksize, out):
    _checked_gemv(A, B, shapeB, absmax, code, blocksize)
    check_out(out, [*A.shape[:-1], shapeB[0]], A.dtype, A.device)
    if out.is_contiguous():
        _gemv(A, B, shapeB, absmax, code, blocksize, out=out)
    else:
        out.copy_(_gemv(A, B, shapeB, absmax, code, blocksize))


def _gemm_4bit_gpu(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None, absmax_code=None,
                   absmax_offset=None):
    _checked_gemm(A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset)
    N, K = shapeB
    if _rows(A) <= kernels.FUSED_MAX_M or K == 0:
        code = _code_table(quant_type, A.device)
        return _fused(A, B, shapeB, absmax, code, blocksize, bias, absmax_8bit, absmax_code, absmax_offset)
    weight = _dequantized_weight(B, shapeB, absmax, blocksize, quant_type, A.dtype, absmax_8bit, absmax_code,
                                 absmax_offset)
    return F.linear(A, weight, bias)


def _gemm_4bit_grouped_gpu(A, B, out_features, absmax, blocksize, quant_type, bias=None, absmax_8bit=None,
                           absmax_code=None, absmax_offset=None):
    _checked_grouped(A, B, out_features, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset)
    weights = grouped_weights(B, out_features, absmax, bias, absmax_8bit, absmax_code, absmax_offset)
    K = A.shape[-1]
    if _rows(A) > kernels.FUSED_MAX_M:
        return torch.cat(
            [_gemm_4bit_gpu(A, B_g, [N, K], absmax_g, blocksize, quant_type, bias_g, *nested)
             for B_g, N, absmax_g, bias_g, *nested in weights],
            dim=-1,
        )
    A2 = _as_rows(A, K)
    fused_weights = [_contiguous_weight(*weight) for weight in weights]
    out = kernels.gemm_4bit_grouped_fused(A2, fused_weights, K, _code_table(quant_type, A.device), blocksize)
    return out.view(*A.shape[:-1], out.shape[-1])


def _gemm_4bit_swiglu_gpu(A, B, out_features, absmax, blocksize, quant_type, bias=None, absmax_8bit=None,
                          absmax_code=None, absmax_offset=None):
    _checked_grouped(A, B, out_features, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset,
                     check=check_gemm_4bit_swiglu)
    K = A.shape[-1]
    gate, up = (_contiguous_weight(*w) for w in grouped_weights(B, out_features, absmax, bias, absmax_8bit, absmax_code,
                                                                  absmax_offset))
    if not kernels.swiglu_fusable(_rows(A), gate, up, K, blocksize):
        both = _gemm_4bit_grouped_gpu(A, B, out_features, absmax, blocksize, quant_type, bias, absmax_8bit,
                                      absmax_code, absmax_offset)
        return reference.swiglu(*both.split(gate.N, dim=-1))
    out = kernels.gemm_4bit_swiglu_fused(_as_rows(A, K), gate, up, K, _code_table(quant_type, A.device), blocksize)
    return out.view(*A.shape[:-1], gate.N)


register_kernel(GEMV_4BIT, TRITON_DEVICES, _gemv_4bit_gpu)
register_kernel(f"{GEMV_4BIT}.out", TRITON_DEVICES, _gemv_4bit_out_gpu)
register_kernel(GEMM_4BIT, TRITON_DEVICES, _gemm_4bit_gpu)
register_kernel(GEMM_4BIT_GROUPED, TRITON_DEVICES, _gemm_4bit_grouped_gpu)
register_kernel(GEMM_4BIT_SWIGLU, TRITON_DEVICES, _gemm_4bit_swiglu_gpu)
