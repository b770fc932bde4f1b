"""Optimizer updates with 32-bit and blockwise 8-bit states (pure-torch reference).

Formulas follow bitsandbytes' CUDA kernels (the library's reference numerics), computed in fp32,
with the deliberate differences listed in ``docs/compatibility.md``:

* ``beta ** step`` is evaluated in Python double (CUDA uses an approximate ``__powf``);
* 8-bit RMSprop/Adagrad use the scaled, weight-decayed gradient in the numerator, as their 32-bit
  versions do (CUDA 8-bit uses the raw gradient there);
* AdEMAMix keeps one absmax row per state (``(2, blocks)``) with no aliasing when
  ``n % 256 != 0``;
* LAMB/LARS exist in 32-bit only (they need the update norm); the 8-bit op rejects them.

Every function is functional: it returns new tensors and leaves its inputs untouched. The
mutating ops copy the results into their arguments.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .blockwise import blockwise_absmax, dequantize_codes, nearest_code, normalize_blocks

__all__ = [
    "TWO_STATE_OPTIMIZERS",
    "ONE_STATE_OPTIMIZERS",
    "OPTIMIZERS_32BIT",
    "OPTIMIZERS_8BIT",
    "OPTIMIZER_8BIT_BLOCKSIZE",
    "Update32bit",
    "Update8bit",
    "update_32bit",
    "update_8bit_blockwise",
    "requantize_state",
]

TWO_STATE_OPTIMIZERS = ("adam", "lamb", "ademamix")
ONE_STATE_OPTIMIZERS = ("momentum", "lars", "rmsprop", "lion", "adagrad")
OPTIMIZERS_32BIT = TWO_STATE_OPTIMIZERS + ONE_STATE_OPTIMIZERS
OPTIMIZERS_8BIT = ("adam", "ademamix", "momentum", "rmsprop", "lion", "adagrad")
OPTIMIZER_8BIT_BLOCKSIZE = 256

# lamb and lars are adam and momentum with update-norm clipping.
_FORMULA = {"lamb": "adam", "lars": "momentum"}


class Update32bit(NamedTuple):
    p: torch.Tensor
    state1: torch.Tensor
    state2: torch.Tensor | None
    unorm: torch.Tensor | None


class Update8bit(NamedTuple):
    p: torch.Tensor
    state1: torch.Tensor
    state2: torch.Tensor | None
    absmax1: torch.Tensor
    absmax2: torch.Tensor | None


def _bias_corrections(beta1: float, beta2: float, step: int) -> tuple[float, float]:
    """``c1 = 1 - beta1**t`` and ``c2 = sqrt(1 - beta2**t)`` in double."""
    return 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)


def _new_states_and_direction(
    formula: str,
    g: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor | None,
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    eps: float,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """fp32 new states and the update direction ``u`` (``p_new = p - lr * scale * u``)."""
    c1, c2 = _bias_corrections(beta1, beta2, step)
    if formula == "adam":
        m = beta1 * state1 + (1 - beta1) * g
        v = beta2 * state2 + (1 - beta2) * g * g
        return m, v, (m / (v.sqrt() + eps * c2)) * (c2 / c1)
    if formula == "ademamix":
        m1 = beta1 * state1[0] + (1 - beta1) * g
        m2 = beta3 * state1[1] + (1 - beta3) * g
        nu = beta2 * state2 + (1 - beta2) * g * g
        return torch.stack((m1, m2)), nu, (m1 / c1 + alpha * m2) / (nu.sqrt() / c2 + eps)
    if formula == "momentum":
        m = g.clone() if step == 1 else beta1 * state1 + g
        return m, None, m
    if formula == "lion":
        direction = torch.sign(beta1 * state1 + (1 - beta1) * g)
        return beta2 * state1 + (1 - beta2) * g, None, direction
    if formula == "rmsprop":
        v = beta1 * state1 + (1 - beta1) * g * g
        return v, None, g / (v.sqrt() + eps)
    if formula == "adagrad":
        v = state1 + g * g
        return v, None, g / (v.sqrt() + eps)
    raise AssertionError(formula)


def _update_norm_scale(
    direction: torch.Tensor, max_unorm: float, param_norm: float, eps: float, two_state: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(unorm = sum(u**2), scale)`` with ``scale = min(1, max_unorm * ||p|| / ||u||)``;
    1-state optimizers add ``eps`` to the bound and to ``||u||`` as bitsandbytes does."""
    unorm = direction.square().sum()
    norm = unorm.sqrt()
    bound = max_unorm * param_norm
    if two_state:
        scale = torch.where(norm > bound, bound / norm, 1.0)
    else:
        scale = torch.where(norm > bound + eps, (bound + eps) / (norm + eps), 1.0)
    return unorm.reshape(1), scale


def update_32bit(
    optimizer_name: str,
    g: torch.Tensor,
    p: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor | None,
    unorm_vec: torch.Tensor | None,
    max_unorm: float,
    param_norm: float,
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    step: int,
    lr: float,
    gnorm_scale: float,
    skip_zeros: bool = False,
) -> Update32bit:
    """One optimizer step with fp32 states (same argument order as the op)."""
    formula = _FORMULA.get(optimizer_name, optimizer_name)
    two_state = optimizer_name in TWO_STATE_OPTIMIZERS
    raw_g = g.float()
    p32 = p.float()
    g = raw_g * gnorm_scale
    if not two_state and formula != "lion" and weight_decay > 0:
        g = g + weight_decay * p32
    state2_f = None if state2 is None else state2.float()
    new1, new2, direction = _new_states_and_direction(
        formula, g, state1.float(), state2_f, beta1, beta2, beta3, alpha, eps, step
    )
    keep = (raw_g != 0) if skip_zeros and formula != "ademamix" else None
    if keep is not None:
        direction = torch.where(keep, direction, 0.0)
    unorm = None
    scale: torch.Tensor | float = 1.0
    if max_unorm > 0 and formula not in ("ademamix", "adagrad"):
        unorm, scale = _update_norm_scale(direction, max_unorm, param_norm, eps, two_state)
    elif unorm_vec is not None:
        unorm = unorm_vec.float().clone()
    if formula == "lion" and weight_decay > 0:
        p32 = p32 * (1 - lr * weight_decay)
    new_p = (p32 - lr * scale * direction).to(p.dtype)
    if two_state and weight_decay > 0:
        new_p = (new_p.float() * (1 - lr * weight_decay)).to(p.dtype)
    if keep is not None:
        new_p = torch.where(keep, new_p, p)
        new1 = torch.where(keep, new1, state1)
        new2 = None if new2 is None else torch.where(keep, new2, state2)
    return Update32bit(
        new_p,
        new1.to(state1.dtype),
        None if new2 is None else new2.to(state2.dtype),
        None if unorm is None else unorm.to(unorm_vec.dtype),
    )


def _dequantize_state(state: torch.Tensor, qmap: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    return dequantize_codes(state.reshape(-1), qmap, absmax, OPTIMIZER_8BIT_BLOCKSIZE, torch.float32)


def requantize_state(
    values: torch.Tensor, qmap: torch.Tensor, signed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise (256) quantization of a new fp32 state with the nearest-code rule.

    Signed states get bitsandbytes' sign fix: a negative value whose nearest code is >= 0 (a
    tiny negative rounding to 0.0) moves one code down, and a positive value whose nearest code
    is negative moves one up, so the sign of the momentum survives quantization."""
    flat = values.reshape(-1)
    absmax = blockwise_absmax(flat, OPTIMIZER_8BIT_BLOCKSIZE)
    normalized = normalize_blocks(flat, absmax, OPTIMIZER_8BIT_BLOCKSIZE)
    codes = nearest_code(normalized, qmap)
    if signed:
        code_values = qmap.float()[codes]
        codes = codes - ((flat < 0) & (code_values >= 0)).long() + ((flat > 0) & (code_values < 0)).long()
    return codes.to(torch.uint8).view(values.shape), absmax


def update_8bit_blockwise(
    optimizer_name: str,
    g: torch.Tensor,
    p: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor | None,
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    eps: float,
    step: int,
    lr: float,
    qmap1: torch.Tensor,
    qmap2: torch.Tensor | None,
    absmax1: torch.Tensor,
    absmax2: torch.Tensor | None,
    weight_decay: float,
    gnorm_scale: float,
    skip_zeros: bool = False,
) -> Update8bit:
    """One optimizer step with 8-bit blockwise states (same argument order as the op).

    States are dequantized, updated in fp32, used unquantized for the parameter update, then
    requantized with a fresh absmax per 256-element block. 2-state optimizers (adam, ademamix)
    zero both states and leave ``p`` unchanged where the gradient is NaN/Inf; 1-state optimizers
    honour ``skip_zeros``."""
    formula = optimizer_name
    two_state = optimizer_name in TWO_STATE_OPTIMIZERS
    shape = p.shape
    raw_g = g.float().reshape(-1)
    p32 = p.float().reshape(-1)
    g = raw_g * gnorm_scale
    if formula == "ademamix":
        s1 = torch.stack([_dequantize_state(state1[i], qmap1, absmax1[i]) for i in range(2)])
    else:
        s1 = _dequantize_state(state1, qmap1, absmax1)
    s2 = None if state2 is None else _dequantize_state(state2, qmap2, absmax2)

    if not two_state and formula != "lion" and weight_decay > 0:
        g = g + weight_decay * p32
    if formula == "lion" and weight_decay > 0:
        p32 = (p32 * (1 - lr * weight_decay)).to(p.dtype).float()
    new1, new2, direction = _new_states_and_direction(
        formula, g, s1, s2, beta1, beta2, beta3, alpha, eps, step
    )
    if formula == "lion":
        new_p = (p32 - (lr * direction).to(p.dtype).float()).to(p.dtype)
    else:
        new_p = (p32 - lr * direction).to(p.dtype)
    if two_state and weight_decay > 0:
        new_p = (new_p.float() * (1 - lr * weight_decay)).to(p.dtype)

    if two_state:
        finite = torch.isfinite(raw_g)
        new_p = torch.where(finite, new_p, p.reshape(-1))
        new1 = torch.where(finite, new1, 0.0)
        new2 = torch.where(finite, new2, 0.0)
    elif skip_zeros:
        keep = raw_g != 0
        new_p = torch.where(keep, new_p, p.reshape(-1))
        new1 = torch.where(keep, new1, s1)

    if formula == "ademamix":
        rows = [requantize_state(new1[i], qmap1, signed=True) for i in range(2)]
        q1 = torch.stack([r[0] for r in rows]).view(state1.shape)
        a1 = torch.stack([r[1] for r in rows])
    else:
        q1, a1 = requantize_state(new1, qmap1, signed=True)
        q1 = q1.view(state1.shape)
    q2 = a2 = None
    if new2 is not None:
        q2, a2 = requantize_state(new2, qmap2, signed=False)
        q2 = q2.view(state2.shape)
    return Update8bit(new_p.view(shape), q1, q2, a1.view(absmax1.shape), None if a2 is None else a2.view(absmax2.shape))
