"""8-bit and 32-bit optimizers with bitsandbytes' names, defaults, state keys and checkpoint layout.

``Adam8bit``, ``AdamW8bit``, ``Lion8bit``, ``SGD8bit``, ``RMSprop8bit``, ``Adagrad8bit``,
``AdEMAMix8bit``, their ``*32bit`` counterparts, the width-generic ``Adam(..., optim_bits=8)``
forms, and ``LAMB`` / ``LARS`` (32-bit). All are ``torch.optim.Optimizer`` subclasses: param
groups, LR schedulers, ``state_dict`` / ``load_state_dict`` and ``torch.compile`` of the step work
as with torch's own optimizers. See :mod:`inductor_quant.optim.optimizer` for the state layout.

Compiled training step: pass the learning rate as a tensor (as for torch's optimizers), so an LR
scheduler updates it in place and the compiled graph never recompiles::

    opt = inductor_quant.optim.AdamW8bit(model.parameters(), lr=torch.tensor(1e-3))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)

    @torch.compile(fullgraph=True)
    def opt_step():
        opt.step()

    for batch in data:
        loss_fn(model, batch).backward()
        opt_step()
        sched.step()
        opt.zero_grad()

A float ``lr`` works too, but then every new value is a new graph.
"""

from . import optimizers
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

__all__ = ["QUANT_STATE_KEY", "Optimizer8bit", "ademamix_schedule"]
__all__ += optimizers.__all__
