"""Functional optimizer-step ops for compiled graphs, and the Python API the optimizers call.

The mutating ops in ``ops/optim.py`` (``optimizer_update_32bit``, ``optimizer_update_8bit_blockwise``)
take ``lr`` and ``step`` as Python numbers and write into their arguments. Inside ``torch.compile``
that costs a recompile whenever the learning rate changes and hides the update behind
``auto_functionalized``. The ops here are the compiled-graph form of the same updates:

* they return new tensors instead of mutating (so Inductor can lower and fuse them; see
  ``inductor_quant.lowerings.optim``),
* ``lr``, ``step`` and the AdEMAMix schedule values ``beta3`` and ``alpha`` are tensors (one element,
  any real dtype, on ``p``'s device), so changing them does not recompile.

Numerics are those of ``reference/optim.py``: a quantity the reference computes from Python
numbers in double (``1 - lr * weight_decay``, ``1 - beta1 ** step``, ``eps * sqrt(1 - beta2 ** step)``)
is computed in float64 from the tensor values here too, then rounded to fp32 once. Pass ``lr`` as
a float64 tensor to get bit-identical results to a Python-float ``lr``.

Ops (``torch.ops.inductor_quant``):

``optimizer_step_8bit_blockwise(optimizer_name, g, p, state1, state2?, qmap1, qmap2?, absmax1,
absmax2?, lr, step, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale, skip_zeros) -> Tensor[]``
    returns ``[p, state1, absmax1]`` for 1-state optimizers (momentum, rmsprop, lion, adagrad) and
    ``[p, state1, absmax1, state2, absmax2]`` for adam and ademamix.

``optimizer_step_8bit_blockwise_(...same arguments...) -> ()``
    the in-place form (updates ``p``, the states and the absmaxes). On GPU it runs the
    hand-written kernel reading ``lr``/``step``/``beta3``/``alpha`` on the device (no host sync,
    CUDA-graph safe); in a compiled graph Inductor calls it in place on the state buffers.

``optimizer_step_32bit(optimizer_name, g, p, state1, state2?, lr, step, beta1, beta2, beta3, alpha,
eps, weight_decay, gnorm_scale, skip_zeros, max_unorm, param_norm?) -> Tensor[]``
    returns ``[p, state1]``, then ``state2`` for 2-state optimizers (adam, lamb, ademamix), then the
    squared update norm ``unorm`` (1 element) when ``max_unorm > 0`` (lamb, lars).

Python API (what ``inductor_quant.optim`` calls when ``torch.compiler.is_compiling()``)::

    step_8bit_blockwise(optimizer_name, g, p, state1, state2, qmap1, qmap2, absmax1, absmax2, *,
                        lr, step, beta1, beta2, beta3=0.0, alpha=0.0, eps, weight_decay=0.0,
                        gnorm_scale=1.0, skip_zeros=False) -> None
    step_32bit(optimizer_name, g, p, state1, state2, *, lr, step, beta1, beta2, beta3=0.0,
               alpha=0.0, eps, weight_decay=0.0, gnorm_scale=1.0, skip_zeros=False,
               max_unorm=0.0, param_norm=None, unorm_vec=None) -> None

``step_32bit`` calls the functional op and ``copy_()``s the results into ``p`` and the state
tensors, which Inductor turns back into in-place stores (one kernel per tensor once lowered).
``step_8bit_blockwise`` does the same on CPU; on Triton devices it calls the in-place op, whose
hand-written kernel is 3.5x faster on an H100 than the kernel Inductor generates from the
lowering (tools/BENCHMARKS.md), and is one update launch per tensor in a compiled graph too (after a
one-program launch that derives the step's scalars from the lr/step tensors). Arguments have the
meaning and layout of the mutating ops (AdEMAMix: ``state1`` is ``(2, *p.shape)``, ``absmax1``
``(2, blocks)``). ``lr``, ``step``, ``beta3`` and ``alpha`` may be Python numbers or tensors; a
Python number is baked into the compiled graph, so pass a tensor for anything that changes
between steps.

In eager mode the ops clone the states and run the mutating op on the clones, so their results
are, by construction, those of the mutating op on every device (with one host sync to read the
scalar tensors).
"""

from __future__ import annotations

import torch
from torch.library import register_fake, register_kernel

from ..reference.optim import TWO_STATE_OPTIMIZERS
from ._checks import check, check_dtype, check_numel
from ._library import TRITON_DEVICES, define
from .optim import check_optimizer_update_8bit_blockwise, check_optimizer_update_32bit

__all__ = [
    "OPTIMIZER_STEP_8BIT_BLOCKWISE",
    "OPTIMIZER_STEP_8BIT_BLOCKWISE_INPLACE",
    "OPTIMIZER_STEP_32BIT",
    "step_8bit_blockwise",
    "step_32bit",
    "as_scalar_tensor",
]

OPTIMIZER_STEP_8BIT_BLOCKWISE = define(
    "optimizer_step_8bit_blockwise(str optimizer_name, Tensor g, Tensor p, Tensor state1, Tensor? state2, "
    "Tensor qmap1, Tensor? qmap2, Tensor absmax1, Tensor? absmax2, Tensor lr, Tensor step, float beta1, "
    "float beta2, Tensor beta3, Tensor alpha, float eps, float weight_decay, float gnorm_scale, "
    "bool skip_zeros=False) -> Tensor[]"
)
OPTIMIZER_STEP_8BIT_BLOCKWISE_INPLACE = define(
    "optimizer_step_8bit_blockwise_(str optimizer_name, Tensor g, Tensor(a1!) p, Tensor(a2!) state1, "
    "Tensor(a3!)? state2, Tensor qmap1, Tensor? qmap2, Tensor(a4!) absmax1, Tensor(a5!)? absmax2, Tensor lr, "
    "Tensor step, float beta1, float beta2, Tensor beta3, Tensor alpha, float eps, float weight_decay, "
    "float gnorm_scale, bool skip_zeros=False) -> ()"
)
OPTIMIZER_STEP_32BIT = define(
    "optimizer_step_32bit(str optimizer_name, Tensor g, Tensor p, Tensor state1, Tensor? state2, "
    "Tensor lr, Tensor step, float beta1, float beta2, Tensor beta3, Tensor alpha, float eps, "
    "float weight_decay, float gnorm_scale, bool skip_zeros=False, float max_unorm=0.0, "
    "Tensor? param_norm=None) -> Tensor[]"
)

_SCALAR_DTYPES = (
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
)


def _check_scalar_tensor(value: torch.Tensor, name: str, p: torch.Tensor) -> None:
    check_dtype(value, name, _SCALAR_DTYPES)
    check_numel(value, name, 1, "a scalar")
    check(value.device == p.device, f"{name} must be on p's device ({p.device}), got {value.device}")


def _check_scalars(p: torch.Tensor, **scalars: torch.Tensor) -> None:
    for name, value in scalars.items():
        _check_scalar_tensor(value, name, p)


def _scalar(value: torch.Tensor) -> float:
    return float(value.reshape(()).item())


# --------------------------------------------------------------------------------------------
# 8-bit blockwise


def check_optimizer_step_8bit_blockwise(
    optimizer_name, g, p, state1, state2, qmap1, qmap2, absmax1, absmax2, lr, step, beta3, alpha
) -> None:
    """Checks of the mutating op (with step taken as valid: it is a tensor) plus the scalars."""
    check_optimizer_update_8bit_blockwise(optimizer_name, g, p, state1, state2, 1, qmap1, qmap2, absmax1, absmax2)
    _check_scalars(p, lr=lr, step=step, beta3=beta3, alpha=alpha)


@register_fake(OPTIMIZER_STEP_8BIT_BLOCKWISE)
def _optimizer_step_8bit_blockwise_fake(optimizer_name, g, p, state1, state2, qmap1, qmap2, absmax1, absmax2, lr, step, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale, skip_zeros=False):
    check_optimizer_step_8bit_blockwise(optimizer_name, g, p, state1, state2, qmap1, qmap2, absmax1, absmax2, lr, step, beta3, alpha)
    outputs = [torch.empty_like(p), torch.empty_like(state1), torch.empty_like(absmax1)]
    if optimizer_name in TWO_STATE_OPTIMIZERS:
        outputs += [torch.empty_like(state2), torch.empty_like(absmax2)]
    return outputs


@register_kernel(OPTIMIZER_STEP_8BIT_BLOCKWISE, None)
def _optimizer_step_8bit_blockwise_kernel(optimizer_name, g, p, state1, state2, qmap1, qmap2, absmax1, absmax2, lr, step, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale, skip_zeros=False):
    check_optimizer_step_8bit_blockwise(optimizer_name, g, p, state1, state2, qmap1, qmap2, absmax1, absmax2, lr, step, beta3, alpha)
    two_state = optimizer_name in TWO_STATE_OPTIMIZERS
    new_p, new1, new_absmax1 = p.clone(), state1.clone(), absmax1.clone()
    new2 = state2.clone() if two_state else None
    new_absmax2 = absmax2.clone() if two_state else None
    torch.ops.inductor_quant.optimizer_update_8bit_blockwise(
        optimizer_name, g, new_p, new1, new2, beta1, beta2, _scalar(beta3), _scalar(alpha), eps,
        int(_scalar(step)), _scalar(lr), qmap1, qmap2, new_absmax1, new_absmax2, weight_decay, gnorm_scale,
        skip_zeros,
    )
    outputs = [new_p, new1, new_absmax1]
    if two_state:
        outputs += [new2, new_absmax2]
    return outputs


@register_fake(OPTIMIZER_STEP_8BIT_BLOCKWISE_INPLACE)
def _optimizer_step_8bit_blockwise_inplace_fake(optimizer_name, g, p, state1, state2, qmap1, qmap2, absmax1, absmax2, lr, step, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale, skip_zeros=False):
    check_optimizer_step_8bit_blockwise(optimizer_name, g, p, state1, state2, qmap1, qmap2, absmax1, absmax2, lr, step, beta3, alpha)


@register_kernel(OPTIMIZER_STEP_8BIT_BLOCKWISE_INPLACE, "cpu")
def _optimizer_step_8bit_blockwise_inplace_cpu(optimizer_name, g, p, state1, state2, qmap1, qmap2, absmax1, absmax2, lr, step, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale, skip_zeros=False):
    check_optimizer_step_8bit_blockwise(optimizer_name, g, p, state1, state2, qmap1, qmap2, absmax1, absmax2, lr, step, beta3, alpha)
    torch.ops.inductor_quant.optimizer_update_8bit_blockwise(
        optimizer_name, g, p, state1, state2, beta1, beta2, _scalar(beta3), _scalar(alpha), eps,
        int(_scalar(step)), _scalar(lr), qmap1, qmap2, absmax1, absmax2, weight_decay, gnorm_scale, skip_zeros,
    )


# --------------------------------------------------------------------------------------------
# 32-bit


def check_optimizer_step_32bit(
    optimizer_name, g, p, state1, state2, lr, step, beta3, alpha, max_unorm, param_norm
) -> None:
    check_optimizer_update_32bit(optimizer_name, g, p, state1, state2, None, 0.0, 0.0, 1)
    _check_scalars(p, lr=lr, step=step, beta3=beta3, alpha=alpha)
    if max_unorm > 0:
        check(param_norm is not None, "param_norm (a 1-element tensor, ||p||) is required when max_unorm > 0")
    if param_norm is not None:
        _check_scalar_tensor(param_norm, "param_norm", p)


@register_fake(OPTIMIZER_STEP_32BIT)
def _optimizer_step_32bit_fake(optimizer_name, g, p, state1, state2, lr, step, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale, skip_zeros=False, max_unorm=0.0, param_norm=None):
    check_optimizer_step_32bit(optimizer_name, g, p, state1, state2, lr, step, beta3, alpha, max_unorm, param_norm)
    outputs = [torch.empty_like(p), torch.empty_like(state1)]
    if optimizer_name in TWO_STATE_OPTIMIZERS:
        outputs.append(torch.empty_like(state2))
    if max_unorm > 0:
        outputs.append(p.new_empty((1,), dtype=torch.float32))
    return outputs


@register_kernel(OPTIMIZER_STEP_32BIT, None)
def _optimizer_step_32bit_kernel(optimizer_name, g, p, state1, state2, lr, step, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale, skip_zeros=False, max_unorm=0.0, param_norm=None):
    check_optimizer_step_32bit(optimizer_name, g, p, state1, state2, lr, step, beta3, alpha, max_unorm, param_norm)
    two_state = optimizer_name in TWO_STATE_OPTIMIZERS
    new_p, new1 = p.clone(), state1.clone()
    new2 = state2.clone() if two_state else None
    unorm = p.new_zeros((1,), dtype=torch.float32) if max_unorm > 0 else None
    torch.ops.inductor_quant.optimizer_update_32bit(
        optimizer_name, g, new_p, new1, new2, unorm, max_unorm,
        _scalar(param_norm) if param_norm is not None else 0.0, beta1, beta2, _scalar(beta3), _scalar(alpha),
        eps, weight_decay, int(_scalar(step)), _scalar(lr), gnorm_scale, skip_zeros,
    )
    outputs = [new_p, new1]
    if two_state:
        outputs.append(new2)
    if unorm is not None:
        outputs.append(unorm)
    return outputs


# --------------------------------------------------------------------------------------------
# Python API


def as_scalar_tensor(value: float | int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a 1-element tensor on ``like``'s device (float64 for a Python number).

    Tensors pass through unchanged, so a tensor ``lr`` stays a graph input and changing its
    value does not recompile; a Python number becomes a constant of the compiled graph (a tiny
    generated fill kernel: pass tensors for none). The number is filled in on the device, not
    copied from the host, so this also works while a CUDA graph is being captured."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.full((), float(value), dtype=torch.float64, device=like.device)


def step_8bit_blockwise(
    optimizer_name: str,
    g: torch.Tensor,
    p: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor | None,
    qmap1: torch.Tensor,
    qmap2: torch.Tensor | None,
    absmax1: torch.Tensor,
    absmax2: torch.Tensor | None,
    *,
    lr: float | torch.Tensor,
    step: int | torch.Tensor,
    beta1: float,
    beta2: float,
    beta3: float | torch.Tensor = 0.0,
    alpha: float | torch.Tensor = 0.0,
    eps: float,
    weight_decay: float = 0.0,
    gnorm_scale: float = 1.0,
    skip_zeros: bool = False,
) -> None:
    """One 8-bit blockwise optimizer step, written so ``torch.compile`` fuses it.

    Same semantics as ``optimizer_update_8bit_blockwise`` (updates ``p``, ``state1``, ``state2``,
    ``absmax1``, ``absmax2`` in place); see the module docstring for the scalar arguments and
    for why Triton devices take the in-place op."""
    args = (
        optimizer_name, g, p, state1, state2, qmap1, qmap2, absmax1, absmax2,
        as_scalar_tensor(lr, p), as_scalar_tensor(step, p), beta1, beta2, as_scalar_tensor(beta3, p),
        as_scalar_tensor(alpha, p), eps, weight_decay, gnorm_scale, skip_zeros,
    )
    if p.device.type in TRITON_DEVICES:
        torch.ops.inductor_quant.optimizer_step_8bit_blockwise_(*args)
        return
    results = torch.ops.inductor_quant.optimizer_step_8bit_blockwise(*args)
    p.copy_(results[0])
    state1.copy_(results[1])
    absmax1.copy_(results[2])
    if len(results) == 5:
        state2.copy_(results[3])
        absmax2.copy_(results[4])


def step_32bit(
    optimizer_name: str,
    g: torch.Tensor,
    p: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor | None,
    *,
    lr: float | torch.Tensor,
    step: int | torch.Tensor,
    beta1: float,
    beta2: float,
    beta3: float | torch.Tensor = 0.0,
    alpha: float | torch.Tensor = 0.0,
    eps: float,
    weight_decay: float = 0.0,
    gnorm_scale: float = 1.0,
    skip_zeros: bool = False,
    max_unorm: float = 0.0,
    param_norm: float | torch.Tensor | None = None,
    unorm_vec: torch.Tensor | None = None,
) -> None:
    """One optimizer step with fp32 states, written so ``torch.compile`` fuses it.

    Same semantics as ``optimizer_update_32bit``; with ``max_unorm > 0`` (lamb, lars) pass
    ``param_norm`` (``||p||``, tensor or number) and ``unorm_vec`` receives the squared update norm."""
    results = torch.ops.inductor_quant.optimizer_step_32bit(
        optimizer_name, g, p, state1, state2, as_scalar_tensor(lr, p), as_scalar_tensor(step, p),
        beta1, beta2, as_scalar_tensor(beta3, p), as_scalar_tensor(alpha, p), eps, weight_decay,
        gnorm_scale, skip_zeros, max_unorm, None if param_norm is None else as_scalar_tensor(param_norm, p),
    )
    p.copy_(results[0])
    state1.copy_(results[1])
    index = 2
    if optimizer_name in TWO_STATE_OPTIMIZERS:
        state2.copy_(results[index])
        index += 1
    if max_unorm > 0 and unorm_vec is not None:
        unorm_vec.copy_(results[index])

