"""Multi-tensor optimizer updates: a whole parameter group in one kernel launch.

On a Triton device (CUDA, XPU) each group of tensors that share a device, parameter dtype and
step is updated by one launch of the kernels in ``inductor_quant.kernels.optim`` (pointer tables
built once per set of tensors and cached). Anywhere else, and for tensors the one-launch path
does not take (non-contiguous ones, or lamb/lars with ``max_unorm > 0``, which need each tensor's
update norm), the functions call the ops ``torch.ops.inductor_quant.optimizer_update_8bit_blockwise``
/ ``optimizer_update_32bit`` tensor by tensor. Results equal those per-tensor op calls.

Validation: a tensor goes through the launch only if plain metadata comparisons show it is
valid and contiguous; any other tensor goes through the op, whose checks raise the error that
names the bad argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat

import torch

from .kernels import optim as kernels
from .ops._checks import FLOAT_DTYPES, check_code_table
from .ops._library import TRITON_DEVICES
from .reference.optim import OPTIMIZER_8BIT_BLOCKSIZE, OPTIMIZERS_8BIT, OPTIMIZERS_32BIT, TWO_STATE_OPTIMIZERS

__all__ = ["multi_tensor_update_8bit_blockwise", "multi_tensor_update_32bit"]


def _as_list(values: Sequence | None, name: str, count: int, required: bool) -> list:
    if values is None:
        if required:
            raise ValueError(f"{name} is required for this optimizer")
        return [None] * count
    values = list(values)
    if len(values) != count:
        raise ValueError(f"{name} must have one entry per parameter ({count}), got {len(values)}")
    return values


def _steps(step: int | Sequence[int], count: int) -> list[int]:
    steps = list(repeat(step, count)) if isinstance(step, int) else _as_list(step, "step", count, True)
    for i, s in enumerate(steps):
        if not isinstance(s, int) or s < 1:
            raise ValueError(f"step must be an int >= 1 (or one per parameter), got {s!r} at index {i}")
    return steps


def multi_tensor_update_8bit_blockwise(
    optimizer_name: str,
    grads: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    states1: Sequence[torch.Tensor],
    states2: Sequence[torch.Tensor] | None,
    absmax1s: Sequence[torch.Tensor],
    absmax2s: Sequence[torch.Tensor] | None,
    qmap1: torch.Tensor,
    qmap2: torch.Tensor | None,
    *,
    beta1: float,
    beta2: float = 0.0,
    beta3: float = 0.0,
    alpha: float = 0.0,
    eps: float = 1e-8,
    step: int | Sequence[int],
    lr: float,
    weight_decay: float = 0.0,
    gnorm_scale: float = 1.0,
    skip_zeros: bool = False,
) -> None:
    """In-place 8-bit blockwise update of every ``params[i]`` and its states, as
    ``optimizer_update_8bit_blockwise(optimizer_name, grads[i], params[i], states1[i], states2[i],
    beta1, beta2, beta3, alpha, eps, step[i], lr, qmap1, qmap2, absmax1s[i], absmax2s[i],
    weight_decay, gnorm_scale, skip_zeros)`` for each ``i``.

    Args:
        optimizer_name: adam, ademamix, momentum, rmsprop, lion or adagrad.
        grads, params: one gradient per parameter (same dtype and element count; fp32/fp16/bf16).
        states1: uint8 codes shaped like the parameter (``(2, *p.shape)`` for ademamix).
        states2: uint8 second states (adam, ademamix), else None.
        absmax1s: fp32 ``(ceil(n / 256),)`` absmax per state1 (``(2, blocks)`` for ademamix).
        absmax2s: fp32 ``(ceil(n / 256),)`` per state2 (adam, ademamix), else None.
        qmap1, qmap2: the 256-entry maps shared by the group (signed and unsigned dynamic maps;
            qmap2 None for 1-state optimizers).
        step: one step for all, or one per parameter (groups of equal steps launch separately).

    One launch per (device, parameter dtype, step) group on CUDA/XPU; a per-tensor op loop
    elsewhere.
    """
    params = list(params)
    count = len(params)
    grads = _as_list(grads, "grads", count, True)
    states1 = _as_list(states1, "states1", count, True)
    absmax1s = _as_list(absmax1s, "absmax1s", count, True)
    two_state = optimizer_name in TWO_STATE_OPTIMIZERS
    states2 = _as_list(states2, "states2", count, two_state)
    absmax2s = _as_list(absmax2s, "absmax2s", count, two_state)
    steps = _steps(step, count)
    if not count:
        return
    op = torch.ops.inductor_quant.optimizer_update_8bit_blockwise

    def one(i: int) -> None:
        op(optimizer_name, grads[i], params[i], states1[i], states2[i], beta1, beta2, beta3, alpha, eps, steps[i], lr,
           qmap1, qmap2, absmax1s[i], absmax2s[i], weight_decay, gnorm_scale, skip_zeros)

    if params[0].device.type not in TRITON_DEVICES or optimizer_name not in OPTIMIZERS_8BIT:
        for i in range(count):
            one(i)
        return
    check_code_table(qmap1, "qmap1", 256)
    if two_state:
        check_code_table(qmap2, "qmap2", 256)
    formula = kernels.FORMULAS[optimizer_name]
    stacked = 2 if optimizer_name == "ademamix" else 1
    maps_ok = qmap1.is_contiguous() and (not two_state or qmap2.is_contiguous())
    groups: dict[tuple, list[tuple[int, ...]]] = {}
    for i, p in enumerate(params):
        # Plain metadata comparisons in one pass (the op's checks cost far more per tensor).
        g, s1, a1, s2, a2 = grads[i], states1[i], absmax1s[i], states2[i], absmax2s[i]
        n, device, dtype = p.numel(), p.device, p.dtype
        blocks = (n + OPTIMIZER_8BIT_BLOCKSIZE - 1) // OPTIMIZER_8BIT_BLOCKSIZE
        ok = (
            maps_ok and dtype in FLOAT_DTYPES and g.dtype == dtype and g.numel() == n
            and s1.dtype == torch.uint8 and s1.numel() == stacked * n
            and a1.dtype == torch.float32 and a1.numel() == stacked * blocks
            and (stacked == 1 or (a1.dim() == 2 and a1.shape[0] == 2))
            and p.is_contiguous() and g.is_contiguous() and s1.is_contiguous() and a1.is_contiguous()
            and g.device == device and s1.device == device and a1.device == device and qmap1.device == device
        )
        if ok and two_state:
            ok = (
                s2.dtype == torch.uint8 and s2.numel() == n and a2.dtype == torch.float32 and a2.numel() == blocks
                and s2.is_contiguous() and a2.is_contiguous()
                and s2.device == device and a2.device == device and qmap2.device == device
            )
        if not ok:
            one(i)
        elif n:
            row = kernels.row_8bit(formula, g, p, s1, s2, a1, a2)
            groups.setdefault((device, dtype, steps[i]), []).append(row)
    for (device, dtype, group_step), rows in groups.items():
        kernels.launch_multi_8bit(
            optimizer_name, rows, dtype, device, qmap1, qmap2 if two_state else None, beta1, beta2, beta3, alpha,
            eps, group_step, lr, weight_decay, gnorm_scale, skip_zeros,
        )


def multi_tensor_update_32bit(
    optimizer_name: str,
    grads: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    states1: Sequence[torch.Tensor],
    states2: Sequence[torch.Tensor] | None,
    *,
    beta1: float,
    beta2: float = 0.0,
    beta3: float = 0.0,
    alpha: float = 0.0,
    eps: float = 1e-8,
    step: int | Sequence[int],
    lr: float,
    weight_decay: float = 0.0,
    gnorm_scale: float = 1.0,
    skip_zeros: bool = False,
    unorm_vecs: Sequence[torch.Tensor] | None = None,
    max_unorm: float = 0.0,
    param_norms: Sequence[float] | None = None,
) -> None:
    """In-place 32-bit update of every ``params[i]`` and its fp32 states, as
    ``optimizer_update_32bit(optimizer_name, grads[i], params[i], states1[i], states2[i],
    unorm_vecs[i], max_unorm, param_norms[i], beta1, beta2, beta3, alpha, eps, weight_decay,
    step[i], lr, gnorm_scale, skip_zeros)`` for each ``i``.

    Args:
        optimizer_name: adam, ademamix, momentum, rmsprop, lion, adagrad, lamb or lars.
        grads, params: one gradient per parameter (same dtype and element count; fp32/fp16/bf16).
        states1: fp32 states shaped like the parameter (``(2, *p.shape)`` for ademamix).
        states2: fp32 second states (adam, lamb, ademamix), else None.
        step: one step for all, or one per parameter.
        unorm_vecs: fp32 ``(1,)`` per parameter, required when ``max_unorm > 0``.
        param_norms: ``||p||`` per parameter for ``max_unorm > 0``; computed here (one device
            sync per tensor) when None.

    One launch per (device, parameter dtype, step) group on CUDA/XPU. With ``max_unorm > 0``
    (except ademamix/adagrad, which ignore it) every tensor needs its own update norm, and the
    tensors go through the op one by one.
    """
    params = list(params)
    count = len(params)
    grads = _as_list(grads, "grads", count, True)
    states1 = _as_list(states1, "states1", count, True)
    two_state = optimizer_name in TWO_STATE_OPTIMIZERS
    states2 = _as_list(states2, "states2", count, two_state)
    norm = max_unorm > 0
    unorm_vecs = _as_list(unorm_vecs, "unorm_vecs", count, norm)
    steps = _steps(step, count)
    if not count:
        return
    op = torch.ops.inductor_quant.optimizer_update_32bit
    uses_norm = norm and optimizer_name not in ("ademamix", "adagrad")
    if uses_norm and param_norms is None:
        param_norms = [float(p.detach().float().norm()) for p in params]
    param_norms = _as_list(param_norms, "param_norms", count, False)

    def one(i: int) -> None:
        op(optimizer_name, grads[i], params[i], states1[i], states2[i], unorm_vecs[i], max_unorm,
           float(param_norms[i] or 0.0), beta1, beta2, beta3, alpha, eps, weight_decay, steps[i], lr, gnorm_scale,
           skip_zeros)

    if params[0].device.type not in TRITON_DEVICES or optimizer_name not in OPTIMIZERS_32BIT or uses_norm:
        for i in range(count):
            one(i)
        return
    formula = kernels.FORMULAS[optimizer_name]
    stacked = 2 if optimizer_name == "ademamix" else 1
    groups: dict[tuple, list[tuple[int, ...]]] = {}
    for i, p in enumerate(params):
        g, s1, s2 = grads[i], states1[i], states2[i]
        n, device, dtype = p.numel(), p.device, p.dtype
        ok = (
            dtype in FLOAT_DTYPES and g.dtype == dtype and g.numel() == n
            and s1.dtype == torch.float32 and s1.numel() == stacked * n
            and p.is_contiguous() and g.is_contiguous() and s1.is_contiguous()
            and g.device == device and s1.device == device
        )
        if ok and two_state:
            ok = s2.dtype == torch.float32 and s2.numel() == n and s2.is_contiguous() and s2.device == device
        if not ok:
            one(i)
        elif n:
            groups.setdefault((device, dtype, steps[i]), []).append(kernels.row_32bit(formula, g, p, s1, s2))
    for (device, dtype, group_step), rows in groups.items():
        kernels.launch_multi_32bit(
            optimizer_name, rows, dtype, device, beta1, beta2, beta3, alpha, eps, group_step, lr, weight_decay,
            gnorm_scale, skip_zeros,
        )
