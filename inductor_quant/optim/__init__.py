"""8-bit and 32-bit optimizers with bitsandbytes' names, defaults, state keys and checkpoint layout.

``Adam8bit``, ``AdamW8bit``, ``Lion8bit``, ``SGD8bit``, ``RMSprop8bit``, ``Adagrad8bit``,
``AdEMAMix8bit``, their ``*32bit`` counterparts, the width-generic ``Adam(..., optim_bits=8)``
forms, and ``LAMB`` / ``LARS`` (32-bit). All are ``torch.optim.Optimizer`` subclasses: param
groups, LR schedulers, ``state_dict`` / ``load_state_dict`` and ``torch.compile`` of the step work
as with torch's own optimizers. See :mod:`inductor_quant.optim.optimizer` for the state layout.
"""

from .optimizer import QUANT_STATE_KEY, Optimizer8bit, ademamix_schedule
from .optimizers import (
    LAMB,
    LARS,
    SGD,
    Adagrad,
    Adagrad8bit,
    Adagrad32bit,
    Adam,
    Adam8bit,
    Adam32bit,
    AdamW,
    AdamW8bit,
    AdamW32bit,
    AdEMAMix,
    AdEMAMix8bit,
    AdEMAMix32bit,
    LAMB32bit,
    LARS32bit,
    Lion,
    Lion8bit,
    Lion32bit,
    RMSprop,
    RMSprop8bit,
    RMSprop32bit,
    SGD8bit,
    SGD32bit,
)

__all__ = [
    "QUANT_STATE_KEY",
    "Optimizer8bit",
    "ademamix_schedule",
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
