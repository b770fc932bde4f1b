"""GPU kernels of the optimizer-update ops: the Triton kernels of ``kernels/optim.py``.

Registered for every device Triton compiles for (CUDA, XPU). Each kernel runs the same argument
checks as the fake and CPU kernels, then launches on contiguous tensors: a non-contiguous
in-place argument is updated through a contiguous copy that is written back.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch.library import register_kernel

from ..kernels import optim as kernels
from ._library import TRITON_DEVICES
from .optim import (
    OPTIMIZER_UPDATE_8BIT_BLOCKWISE,
    OPTIMIZER_UPDATE_32BIT,
    check_optimizer_update_8bit_blockwise,
    check_optimizer_update_32bit,
)
from .optim_functional import OPTIMIZER_STEP_8BIT_BLOCKWISE_INPLACE, check_optimizer_step_8bit_blockwise


class _Contiguous:
    """``tensor`` itself when contiguous, else a contiguous copy written back on exit."""

    def __init__(self, tensor: torch.Tensor | None) -> None:
        self.tensor = tensor
        self.work = tensor if tensor is None or tensor.is_contiguous() else tensor.contiguous()

    def __enter__(self) -> torch.Tensor | None:
        return self.work

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.work is not self.tensor:
            self.tensor.copy_(self.work)


def _optimizer_update_32bit_triton(
    optimizer_name, g, p, state1, state2, unorm_vec, max_unorm, param_norm, beta1, beta2, beta3, alpha, eps,
    weight_decay, step, lr, gnorm_scale, skip_zeros=False,
):
    check_optimizer_update_32bit(optimizer_name, g, p, state1, state2, unorm_vec, max_unorm, param_norm, step)
    with ExitStack() as stack:
        p_, s1, s2, unorm = (stack.enter_context(_Contiguous(t)) for t in (p, state1, state2, unorm_vec))
        kernels.update_32bit(
            optimizer_name, g.contiguous(), p_, s1, s2, unorm, max_unorm, float(param_norm), beta1, beta2, beta3,
            alpha, eps, weight_decay, step, lr, gnorm_scale, skip_zeros,
        )


def _update_8bit_blockwise_contiguous(optimizer_name, g, p, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1, qmap2, absmax1, absmax2, weight_decay, gnorm_scale, skip_zeros):
    with ExitStack() as stack:
        p_, s1, s2, a1, a2 = (stack.enter_context(_Contiguous(t)) for t in (p, state1, state2, absmax1, absmax2))
        kernels.update_8bit_blockwise(
            optimizer_name, g.contiguous(), p_, s1, s2, beta1, beta2, beta3, alpha, eps, step, lr,
            qmap1.contiguous(), None if qmap2 is None else qmap2.contiguous(), a1, a2, weight_decay, gnorm_scale,
            skip_zeros,
        )


def _optimizer_update_8bit_blockwise_triton(
    optimizer_name, g, p, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1, qmap2, absmax1,
    absmax2, weight_decay, gnorm_scale, skip_zeros=False,
):
    check_optimizer_update_8bit_blockwise(optimizer_name, g, p, state1, state2, step, qmap1, qmap2, absmax1, absmax2)
    _update_8bit_blockwise_contiguous(
        optimizer_name, g, p, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1, qmap2, absmax1,
        absmax2, weight_decay, gnorm_scale, skip_zeros,
    )


def _optimizer_step_8bit_blockwise_inplace_triton(
    optimizer_name, g, p, state1, state2, qmap1, qmap2, absmax1, absmax2, lr, step, beta1, beta2, beta3, alpha,
    eps, weight_decay, gnorm_scale, skip_zeros=False,
):
    """The same kernel with ``lr``/``step``/``beta3``/``alpha`` read on the device."""
    check_optimizer_step_8bit_blockwise(optimizer_name, g, p, state1, state2, qmap1, qmap2, absmax1, absmax2, lr, step, beta3, alpha)
    _update_8bit_blockwise_contiguous(
        optimizer_name, g, p, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1, qmap2, absmax1,
        absmax2, weight_decay, gnorm_scale, skip_zeros,
    )


register_kernel(OPTIMIZER_UPDATE_32BIT, TRITON_DEVICES, _optimizer_update_32bit_triton)
register_kernel(OPTIMIZER_UPDATE_8BIT_BLOCKWISE, TRITON_DEVICES, _optimizer_update_8bit_blockwise_triton)
register_kernel(OPTIMIZER_STEP_8BIT_BLOCKWISE_INPLACE, TRITON_DEVICES, _optimizer_step_8bit_blockwise_inplace_triton)
