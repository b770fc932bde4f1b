"""The optimizer classes, with bitsandbytes' names, signatures and defaults.

Every algorithm comes as ``Name(..., optim_bits=32)`` (pick the state width), ``Name8bit`` and
``Name32bit``. Arguments that bitsandbytes accepts but silently ignores (``amsgrad``,
``nesterov``, ``dampening``, RMSprop ``momentum``, ...) raise here unless they have their no-op
value: an optimizer must not quietly run a different algorithm than the one asked for.

| class | kernel | lr | betas | eps | weight decay |
|---|---|---|---|---|---|
| Adam | adam | 1e-3 | (0.9, 0.999) | 1e-8 | 0, decoupled (as bitsandbytes: Adam with decay is AdamW) |
| AdamW | adam | 1e-3 | (0.9, 0.999) | 1e-8 | 1e-2, decoupled |
| Lion | lion | 1e-4 | (0.9, 0.99) | 0 | 0, decoupled |
| AdEMAMix | ademamix | 1e-3 | (0.9, 0.999, 0.9999), alpha 5 | 1e-8 | 1e-2, decoupled |
| SGD | momentum | required | (momentum, 0) | 0 | 0, added to the gradient |
| RMSprop | rmsprop | 1e-2 | (alpha 0.99, 0) | 1e-8 | 0, added to the gradient |
| Adagrad | adagrad | 1e-2 | (0, 0) | 1e-10 | 0, added to the gradient |
| LAMB | lamb (32-bit) | 1e-3 | (0.9, 0.999) | 1e-8 | 0, max_unorm 1.0 |
| LARS | lars (32-bit) | required | (momentum, 0) | 0 | 0, max_unorm 0.02 |
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .optimizer import Optimizer8bit

__all__ = [
    "Adam", "Adam8bit", "Adam32bit",
    "AdamW", "AdamW8bit", "AdamW32bit",
    "Lion", "Lion8bit", "Lion32bit",
    "AdEMAMix", "AdEMAMix8bit", "AdEMAMix32bit",
    "SGD", "SGD8bit", "SGD32bit",
    "RMSprop", "RMSprop8bit", "RMSprop32bit",
    "Adagrad", "Adagrad8bit", "Adagrad32bit",
    "LAMB", "LAMB32bit",
    "LARS", "LARS32bit",
]

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _no_paging(is_paged: bool) -> None:
    _require(not is_paged, "is_paged=True is not supported: states live in ordinary device memory")


class Adam(Optimizer8bit):
    """Adam with decoupled weight decay (bitsandbytes' ``Adam``; with ``weight_decay > 0`` it is AdamW)."""

    def __init__(self, params: Params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, optim_bits: int = 32,
                 min_8bit_size: int = 4096, is_paged: bool = False, *, skip_zeros: bool = False) -> None:
        _require(not amsgrad, f"{type(self).__name__} does not support amsgrad=True")
        _no_paging(is_paged)
        super().__init__("adam", params, lr, betas, eps, weight_decay, optim_bits, min_8bit_size, skip_zeros=skip_zeros)


class Adam8bit(Adam):
    """:class:`Adam` with 8-bit states."""

    def __init__(self, params: Params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False,
                 min_8bit_size: int = 4096, is_paged: bool = False, *, skip_zeros: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, 8, min_8bit_size, is_paged, skip_zeros=skip_zeros)


class Adam32bit(Adam):
    """:class:`Adam` with fp32 states."""

    def __init__(self, params: Params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False,
                 min_8bit_size: int = 4096, is_paged: bool = False, *, skip_zeros: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, 32, min_8bit_size, is_paged, skip_zeros=skip_zeros)


class AdamW(Adam):
    """AdamW: :class:`Adam` with bitsandbytes' default ``weight_decay=1e-2``."""

    def __init__(self, params: Params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, optim_bits: int = 32,
                 min_8bit_size: int = 4096, is_paged: bool = False, *, skip_zeros: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, min_8bit_size, is_paged, skip_zeros=skip_zeros)


class AdamW8bit(AdamW):
    """:class:`AdamW` with 8-bit states."""

    def __init__(self, params: Params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False,
                 min_8bit_size: int = 4096, is_paged: bool = False, *, skip_zeros: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, 8, min_8bit_size, is_paged, skip_zeros=skip_zeros)


class AdamW32bit(AdamW):
    """:class:`AdamW` with fp32 states."""

    def __init__(self, params: Params, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False,
                 min_8bit_size: int = 4096, is_paged: bool = False, *, skip_zeros: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, 32, min_8bit_size, is_paged, skip_zeros=skip_zeros)


class Lion(Optimizer8bit):
    """Lion: ``p -= lr * sign(b1 m + (1 - b1) g)``, then ``m = b2 m + (1 - b2) g``; decoupled decay."""

    def __init__(self, params: Params, lr: float | torch.Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, optim_bits: int = 32, min_8bit_size: int = 4096,
                 is_paged: bool = False, *, skip_zeros: bool = False) -> None:
        _no_paging(is_paged)
        super().__init__("lion", params, lr, betas, 0.0, weight_decay, optim_bits, min_8bit_size, skip_zeros=skip_zeros)


class Lion8bit(Lion):
    """:class:`Lion` with 8-bit states."""

    def __init__(self, params: Params, lr: float | torch.Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, min_8bit_size: int = 4096, is_paged: bool = False, *,
                 skip_zeros: bool = False) -> None:
        super().__init__(params, lr, betas, weight_decay, 8, min_8bit_size, is_paged, skip_zeros=skip_zeros)


class Lion32bit(Lion):
    """:class:`Lion` with fp32 states."""

    def __init__(self, params: Params, lr: float | torch.Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, min_8bit_size: int = 4096, is_paged: bool = False, *,
                 skip_zeros: bool = False) -> None:
        super().__init__(params, lr, betas, weight_decay, 32, min_8bit_size, is_paged, skip_zeros=skip_zeros)


class AdEMAMix(Optimizer8bit):
    """AdEMAMix: Adam plus a slow EMA ``m2`` (``beta3``) mixed in with weight ``alpha``.

    ``t_alpha`` / ``t_beta3`` warm ``alpha`` and ``beta3`` up over that many steps (the paper's
    schedulers). ``state1`` stacks (m1, m2) as ``(2, *p.shape)``."""

    def __init__(self, params: Params, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float, float] = (0.9, 0.999, 0.9999), alpha: float = 5.0,
                 t_alpha: int | None = None, t_beta3: int | None = None, eps: float = 1e-8,
                 weight_decay: float = 1e-2, optim_bits: int = 32, min_8bit_size: int = 4096,
                 is_paged: bool = False) -> None:
        _no_paging(is_paged)
        super().__init__("ademamix", params, lr, betas, eps, weight_decay, optim_bits, min_8bit_size,
                         alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3)


class AdEMAMix8bit(AdEMAMix):
    """:class:`AdEMAMix` with 8-bit states."""

    def __init__(self, params: Params, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float, float] = (0.9, 0.999, 0.9999), alpha: float = 5.0,
                 t_alpha: int | None = None, t_beta3: int | None = None, eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_size: int = 4096, is_paged: bool = False) -> None:
        super().__init__(params, lr, betas, alpha, t_alpha, t_beta3, eps, weight_decay, 8, min_8bit_size, is_paged)


class AdEMAMix32bit(AdEMAMix):
    """:class:`AdEMAMix` with fp32 states."""

    def __init__(self, params: Params, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float, float] = (0.9, 0.999, 0.9999), alpha: float = 5.0,
                 t_alpha: int | None = None, t_beta3: int | None = None, eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_size: int = 4096, is_paged: bool = False) -> None:
        super().__init__(params, lr, betas, alpha, t_alpha, t_beta3, eps, weight_decay, 32, min_8bit_size, is_paged)


def _check_momentum(name: str, momentum: float, dampening: float, nesterov: bool) -> None:
    _require(momentum != 0, f"{name} without momentum is not supported (momentum must be > 0)")
    _require(dampening == 0, f"{name} does not support dampening (got dampening={dampening})")
    _require(not nesterov, f"{name} does not support nesterov=True")


class SGD(Optimizer8bit):
    """SGD with (heavy-ball) momentum: ``m = g`` at step 1, then ``m = momentum * m + g``; ``p -= lr * m``."""

    def __init__(self, params: Params, lr: float | torch.Tensor, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, optim_bits: int = 32,
                 min_8bit_size: int = 4096, *, skip_zeros: bool = False) -> None:
        _check_momentum(type(self).__name__, momentum, dampening, nesterov)
        super().__init__("momentum", params, lr, (momentum, dampening), 0.0, weight_decay, optim_bits, min_8bit_size,
                         skip_zeros=skip_zeros)


class SGD8bit(SGD):
    """:class:`SGD` with 8-bit momentum."""

    def __init__(self, params: Params, lr: float | torch.Tensor, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, min_8bit_size: int = 4096, *,
                 skip_zeros: bool = False) -> None:
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, 8, min_8bit_size, skip_zeros=skip_zeros)


class SGD32bit(SGD):
    """:class:`SGD` with fp32 momentum."""

    def __init__(self, params: Params, lr: float | torch.Tensor, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, min_8bit_size: int = 4096, *,
                 skip_zeros: bool = False) -> None:
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, 32, min_8bit_size, skip_zeros=skip_zeros)


class RMSprop(Optimizer8bit):
    """RMSprop: ``v = alpha v + (1 - alpha) g^2``; ``p -= lr g / (sqrt(v) + eps)`` (no momentum, not centered)."""

    def __init__(self, params: Params, lr: float | torch.Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False, optim_bits: int = 32,
                 min_8bit_size: int = 4096, *, skip_zeros: bool = False) -> None:
        name = type(self).__name__
        _require(alpha != 0, f"{name} with alpha=0 is not supported")
        _require(momentum == 0, f"{name} does not support momentum (got momentum={momentum})")
        _require(not centered, f"{name} does not support centered=True")
        super().__init__("rmsprop", params, lr, (alpha, momentum), eps, weight_decay, optim_bits, min_8bit_size,
                         skip_zeros=skip_zeros)


class RMSprop8bit(RMSprop):
    """:class:`RMSprop` with an 8-bit second moment."""

    def __init__(self, params: Params, lr: float | torch.Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False,
                 min_8bit_size: int = 4096, *, skip_zeros: bool = False) -> None:
        super().__init__(params, lr, alpha, eps, weight_decay, momentum, centered, 8, min_8bit_size, skip_zeros=skip_zeros)


class RMSprop32bit(RMSprop):
    """:class:`RMSprop` with an fp32 second moment."""

    def __init__(self, params: Params, lr: float | torch.Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False,
                 min_8bit_size: int = 4096, *, skip_zeros: bool = False) -> None:
        super().__init__(params, lr, alpha, eps, weight_decay, momentum, centered, 32, min_8bit_size, skip_zeros=skip_zeros)


class Adagrad(Optimizer8bit):
    """Adagrad: ``v += g^2``; ``p -= lr g / (sqrt(v) + eps)`` (no lr decay, zero initial accumulator)."""

    def __init__(self, params: Params, lr: float | torch.Tensor = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0, eps: float = 1e-10,
                 optim_bits: int = 32, min_8bit_size: int = 4096, *, skip_zeros: bool = False) -> None:
        name = type(self).__name__
        _require(initial_accumulator_value == 0.0, f"{name}: initial_accumulator_value != 0 is not supported")
        _require(lr_decay == 0.0, f"{name}: lr_decay != 0 is not supported")
        super().__init__("adagrad", params, lr, (0.0, 0.0), eps, weight_decay, optim_bits, min_8bit_size,
                         skip_zeros=skip_zeros)


class Adagrad8bit(Adagrad):
    """:class:`Adagrad` with an 8-bit accumulator."""

    def __init__(self, params: Params, lr: float | torch.Tensor = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0, eps: float = 1e-10,
                 min_8bit_size: int = 4096, *, skip_zeros: bool = False) -> None:
        super().__init__(params, lr, lr_decay, weight_decay, initial_accumulator_value, eps, 8, min_8bit_size,
                         skip_zeros=skip_zeros)


class Adagrad32bit(Adagrad):
    """:class:`Adagrad` with an fp32 accumulator."""

    def __init__(self, params: Params, lr: float | torch.Tensor = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0, eps: float = 1e-10,
                 min_8bit_size: int = 4096, *, skip_zeros: bool = False) -> None:
        super().__init__(params, lr, lr_decay, weight_decay, initial_accumulator_value, eps, 32, min_8bit_size,
                         skip_zeros=skip_zeros)


class LAMB(Optimizer8bit):
    """LAMB as bitsandbytes defines it: Adam whose update is clipped to ``max_unorm * ||p||`` (fp32 states)."""

    def __init__(self, params: Params, lr: float | torch.Tensor = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 amsgrad: bool = False, adam_w_mode: bool = True, optim_bits: int = 32,
                 min_8bit_size: int = 4096, max_unorm: float = 1.0) -> None:
        name = type(self).__name__
        _require(bias_correction, f"{name} does not support bias_correction=False")
        _require(not amsgrad, f"{name} does not support amsgrad=True")
        _require(adam_w_mode, f"{name} does not support adam_w_mode=False (decay is always decoupled)")
        super().__init__("lamb", params, lr, betas, eps, weight_decay, optim_bits, min_8bit_size, max_unorm=max_unorm)


class LAMB32bit(LAMB):
    """:class:`LAMB` (fp32 states; there is no 8-bit LAMB)."""

    def __init__(self, params: Params, lr: float | torch.Tensor = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 amsgrad: bool = False, adam_w_mode: bool = True, min_8bit_size: int = 4096,
                 max_unorm: float = 1.0) -> None:
        super().__init__(params, lr, bias_correction, betas, eps, weight_decay, amsgrad, adam_w_mode, 32, min_8bit_size, max_unorm)


class LARS(Optimizer8bit):
    """LARS as bitsandbytes defines it: SGD momentum clipped to ``max_unorm * ||p||`` (fp32 states)."""

    def __init__(self, params: Params, lr: float | torch.Tensor, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, optim_bits: int = 32,
                 min_8bit_size: int = 4096, max_unorm: float = 0.02) -> None:
        _check_momentum(type(self).__name__, momentum, dampening, nesterov)
        super().__init__("lars", params, lr, (momentum, dampening), 0.0, weight_decay, optim_bits, min_8bit_size,
                         max_unorm=max_unorm)


class LARS32bit(LARS):
    """:class:`LARS` (fp32 states; there is no 8-bit LARS)."""

    def __init__(self, params: Params, lr: float | torch.Tensor, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, min_8bit_size: int = 4096,
                 max_unorm: float = 0.02) -> None:
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, 32, min_8bit_size, max_unorm)
