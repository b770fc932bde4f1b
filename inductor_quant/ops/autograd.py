"""Autograd for the 4-bit matmul op: the QLoRA backward through a frozen 4-bit weight.

``gemm_4bit(A, B, ...)`` computes ``F.linear(A, W, bias)`` with ``W = dequantize_4bit(B)``. The
packed weight and its quantization state are frozen data, so the only gradients are

* ``grad_A = grad_out @ W`` (``W`` dequantized in ``grad_out``'s dtype, as bitsandbytes' ``MatMul4Bit``);
* ``grad_bias = grad_out`` summed over every leading dimension;

and ``None`` for ``B``, ``absmax`` and the double-quantization tensors. The formula is registered
on the op with ``torch.library.register_autograd``, so it applies eagerly and under
``torch.compile`` (AOTAutograd traces this backward into the joint graph, where it is the ops
``dequantize_blockwise``/``dequantize_4bit`` followed by a matmul).
"""

from __future__ import annotations

import torch

from .gemm import GEMM_4BIT, NESTED_BLOCKSIZE


def _gemm_4bit_setup_context(ctx, inputs, output) -> None:
    A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset = inputs
    ctx.save_for_backward(B, absmax, absmax_8bit, absmax_code, absmax_offset)
    ctx.shapeB = list(shapeB)
    ctx.blocksize = blocksize
    ctx.quant_type = quant_type


def _gemm_4bit_backward(ctx, grad_out: torch.Tensor):
    B, absmax, absmax_8bit, absmax_code, absmax_offset = ctx.saved_tensors
    # The dispatcher drops trailing arguments equal to their defaults (bias=None, ...), so the
    # gradient tuple has one entry per argument actually passed.
    needs_grad = ctx.needs_input_grad
    grads: list[torch.Tensor | None] = [None] * len(needs_grad)
    if needs_grad[0]:
        scales = absmax
        if absmax_8bit is not None:
            scales = torch.ops.inductor_quant.dequantize_blockwise(
                absmax_8bit, absmax, absmax_code, NESTED_BLOCKSIZE, torch.float32
            ) + absmax_offset.float()
        weight = torch.ops.inductor_quant.dequantize_4bit(
            B, scales, ctx.blocksize, ctx.quant_type, ctx.shapeB, grad_out.dtype
        )
        grads[0] = torch.matmul(grad_out, weight)
    if len(needs_grad) > 6 and needs_grad[6]:
        grads[6] = grad_out.reshape(-1, ctx.shapeB[0]).sum(0)
    return tuple(grads)


torch.library.register_autograd(GEMM_4BIT, _gemm_4bit_backward, setup_context=_gemm_4bit_setup_context)
