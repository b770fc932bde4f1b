"""Optimizer-update ops: ``optimizer_update_32bit`` and ``optimizer_update_8bit_blockwise``.

In-place updates of ``p`` and the states, with bitsandbytes' names and argument order. Names:
adam, ademamix, momentum, rmsprop, lion, adagrad (both widths) and lamb, lars (32-bit, through
``unorm_vec``/``max_unorm``). AdEMAMix stores ``state1`` as ``(2, *p.shape)`` (m1, m2) and, in
8-bit, ``absmax1`` as ``(2, blocks)``. 8-bit states use 256-element blocks. Formulas and the
deliberate differences from bitsandbytes are in ``reference/optim.py`` and
``docs/compatibility.md``.
"""

from __future__ import annotations

import torch
from torch.library import register_fake, register_kernel

from ..reference import optim as reference
from ..reference.optim import OPTIMIZER_8BIT_BLOCKSIZE, OPTIMIZERS_8BIT, OPTIMIZERS_32BIT, TWO_STATE_OPTIMIZERS
from ._checks import (
    FLOAT_DTYPES,
    check,
    check_code_table,
    check_dtype,
    check_numel,
    check_same_device,
    check_value,
    num_blocks,
)
from ._library import define

OPTIMIZER_UPDATE_32BIT = define(
    "optimizer_update_32bit(str optimizer_name, Tensor g, Tensor(a1!) p, Tensor(a2!) state1, "
    "Tensor(a3!)? state2, Tensor(a4!)? unorm_vec, float max_unorm, float param_norm, float beta1, "
    "float beta2, float beta3, float alpha, float eps, float weight_decay, int step, float lr, "
    "float gnorm_scale, bool skip_zeros=False) -> ()"
)
OPTIMIZER_UPDATE_8BIT_BLOCKWISE = define(
    "optimizer_update_8bit_blockwise(str optimizer_name, Tensor g, Tensor(a1!) p, Tensor(a2!) state1, "
    "Tensor(a3!)? state2, float beta1, float beta2, float beta3, float alpha, float eps, int step, "
    "float lr, Tensor qmap1, Tensor? qmap2, Tensor(a4!) absmax1, Tensor(a5!)? absmax2, "
    "float weight_decay, float gnorm_scale, bool skip_zeros=False) -> ()"
)


def _check_params(optimizer_name: str, names: tuple[str, ...], width: str, g: torch.Tensor, p: torch.Tensor, step: int) -> None:
    hint = " (lamb and lars need the update norm: use optimizer_update_32bit)" if optimizer_name in ("lamb", "lars") else ""
    check_value(optimizer_name in names, f"optimizer_name must be one of {names} for {width} states, got {optimizer_name!r}{hint}")
    check_dtype(p, "p", FLOAT_DTYPES)
    check(g.dtype == p.dtype, f"g must have p's dtype {p.dtype}, got {g.dtype}")
    check(g.numel() == p.numel(), f"g must have as many elements as p ({p.numel()}), got {g.numel()}")
    check_value(step >= 1, f"step must be >= 1, got {step}")


def _check_state_shape(state: torch.Tensor | None, name: str, p: torch.Tensor, stacked: bool) -> None:
    check(state is not None, f"{name} is required for this optimizer")
    expected = 2 * p.numel() if stacked else p.numel()
    what = "(2, *p.shape) for ademamix" if stacked else "one per element of p"
    check_numel(state, name, expected, what)


def check_optimizer_update_32bit(
    optimizer_name, g, p, state1, state2, unorm_vec, max_unorm, param_norm, step
) -> None:
    _check_params(optimizer_name, OPTIMIZERS_32BIT, "32-bit", g, p, step)
    _check_state_shape(state1, "state1", p, stacked=optimizer_name == "ademamix")
    check_dtype(state1, "state1", (torch.float32,))
    if optimizer_name in TWO_STATE_OPTIMIZERS:
        _check_state_shape(state2, "state2", p, stacked=False)
        check_dtype(state2, "state2", (torch.float32,))
    if max_unorm > 0:
        check(unorm_vec is not None, "unorm_vec (fp32, 1 element) is required when max_unorm > 0")
    if unorm_vec is not None:
        check_dtype(unorm_vec, "unorm_vec", (torch.float32,))
        check_numel(unorm_vec, "unorm_vec", 1, "the squared update norm")
    check_same_device("p", p, g=g, state1=state1, state2=state2, unorm_vec=unorm_vec)


def check_optimizer_update_8bit_blockwise(
    optimizer_name, g, p, state1, state2, step, qmap1, qmap2, absmax1, absmax2
) -> None:
    _check_params(optimizer_name, OPTIMIZERS_8BIT, "8-bit", g, p, step)
    stacked = optimizer_name == "ademamix"
    blocks = num_blocks(p.numel(), OPTIMIZER_8BIT_BLOCKSIZE)
    _check_state_shape(state1, "state1", p, stacked)
    check_dtype(state1, "state1", (torch.uint8,))
    check_code_table(qmap1, "qmap1", 256)
    check_dtype(absmax1, "absmax1", (torch.float32,))
    check_numel(absmax1, "absmax1", 2 * blocks if stacked else blocks, f"one per block of {OPTIMIZER_8BIT_BLOCKSIZE} per state")
    if stacked:
        check(absmax1.dim() == 2 and absmax1.shape[0] == 2, f"absmax1 must have shape (2, {blocks}) for ademamix, got {tuple(absmax1.shape)}")
    if optimizer_name in TWO_STATE_OPTIMIZERS:
        _check_state_shape(state2, "state2", p, stacked=False)
        check_dtype(state2, "state2", (torch.uint8,))
        check(qmap2 is not None and absmax2 is not None, "qmap2 and absmax2 are required for 2-state optimizers")
        check_code_table(qmap2, "qmap2", 256)
        check_dtype(absmax2, "absmax2", (torch.float32,))
        check_numel(absmax2, "absmax2", blocks, f"one per block of {OPTIMIZER_8BIT_BLOCKSIZE}")
    check_same_device("p", p, g=g, state1=state1, state2=state2, qmap1=qmap1, qmap2=qmap2, absmax1=absmax1, absmax2=absmax2)


@register_fake(OPTIMIZER_UPDATE_32BIT)
def _optimizer_update_32bit_fake(optimizer_name, g, p, state1, state2, unorm_vec, max_unorm, param_norm, beta1, beta2, beta3, alpha, eps, weight_decay, step, lr, gnorm_scale, skip_zeros=False):
    check_optimizer_update_32bit(optimizer_name, g, p, state1, state2, unorm_vec, max_unorm, param_norm, step)


@register_kernel(OPTIMIZER_UPDATE_32BIT, "cpu")
def _optimizer_update_32bit_cpu(optimizer_name, g, p, state1, state2, unorm_vec, max_unorm, param_norm, beta1, beta2, beta3, alpha, eps, weight_decay, step, lr, gnorm_scale, skip_zeros=False):
    check_optimizer_update_32bit(optimizer_name, g, p, state1, state2, unorm_vec, max_unorm, param_norm, step)
    # the checks accept any shapes with the right numel: compute in p's shape, write back in theirs
    result = reference.update_32bit(
        optimizer_name, g.reshape(p.shape), p,
        state1.reshape(-1, *p.shape) if optimizer_name == "ademamix" else state1.reshape(p.shape),
        None if state2 is None else state2.reshape(p.shape), unorm_vec, max_unorm, param_norm,
        beta1, beta2, beta3, alpha, eps, weight_decay, step, lr, gnorm_scale, skip_zeros,
    )
    p.copy_(result.p)
    state1.copy_(result.state1.reshape(state1.shape))
    if state2 is not None and result.state2 is not None:
        state2.copy_(result.state2.reshape(state2.shape))
    if unorm_vec is not None and result.unorm is not None:
        unorm_vec.copy_(result.unorm)


@register_fake(OPTIMIZER_UPDATE_8BIT_BLOCKWISE)
def _optimizer_update_8bit_blockwise_fake(optimizer_name, g, p, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1, qmap2, absmax1, absmax2, weight_decay, gnorm_scale, skip_zeros=False):
    check_optimizer_update_8bit_blockwise(optimizer_name, g, p, state1, state2, step, qmap1, qmap2, absmax1, absmax2)


@register_kernel(OPTIMIZER_UPDATE_8BIT_BLOCKWISE, "cpu")
def _optimizer_update_8bit_blockwise_cpu(optimizer_name, g, p, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1, qmap2, absmax1, absmax2, weight_decay, gnorm_scale, skip_zeros=False):
    check_optimizer_update_8bit_blockwise(optimizer_name, g, p, state1, state2, step, qmap1, qmap2, absmax1, absmax2)
    result = reference.update_8bit_blockwise(
        optimizer_name, g, p, state1.reshape(-1, *p.shape) if optimizer_name == "ademamix" else state1.reshape(p.shape),
        None if state2 is None else state2.reshape(p.shape), beta1, beta2, beta3, alpha, eps, step, lr,
        qmap1, qmap2, absmax1, absmax2, weight_decay, gnorm_scale, skip_zeros,
    )
    p.copy_(result.p)
    state1.copy_(result.state1.reshape(state1.shape))
    absmax1.copy_(result.absmax1)
    if state2 is not None and result.state2 is not None:
        state2.copy_(result.state2.reshape(state2.shape))
        absmax2.copy_(result.absmax2)
