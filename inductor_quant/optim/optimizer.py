"""Base class of the bitsandbytes-style optimizers: state layout, eager and compiled steps, state_dict.

One class drives every algorithm; subclasses only pick the kernel name (``adam``, ``lion``,
``momentum``, ``rmsprop``, ``adagrad``, ``ademamix``, ``lamb``, ``lars``) and map their
constructor arguments to bitsandbytes' ``(betas, eps, weight_decay)`` convention.

State per parameter (bitsandbytes' keys, so checkpoints move between the libraries):

* ``step``: number of updates taken. A 0-dim fp32 tensor while training, so a compiled ``step()``
  reads it as a graph input instead of specializing on it; ``state_dict()`` writes it as an int.
* ``state1`` (and ``state2`` for adam/lamb/ademamix): fp32 like the parameter when the group's
  ``optim_bits`` is 32 or ``p.numel() < min_8bit_size``; otherwise uint8 codes with ``qmap1``
  (signed dynamic map) / ``qmap2`` (unsigned) and fp32 ``absmax1`` / ``absmax2`` with one entry per
  256-element block. AdEMAMix stacks (m1, m2) in ``state1`` as ``(2, *p.shape)`` and ``absmax1``
  as ``(2, blocks)``.
* ``unorm_vec``: fp32 ``(1,)`` squared update norm, when ``max_unorm > 0`` (LAMB, LARS).

``optim_bits``, ``min_8bit_size``, ``max_unorm`` and ``skip_zeros`` are per-param-group settings
(they replace bitsandbytes' ``GlobalOptimManager`` overrides: put the parameters that should keep
32-bit states in their own group).

The eager step updates contiguous CUDA parameters with the multi-tensor Triton launcher of
``inductor_quant.kernels.optim`` (one launch per state width, dtype and step count) and every
other parameter with ``torch.ops.inductor_quant.optimizer_update_{32bit,8bit_blockwise}`` (the
CPU path, and LAMB/LARS, whose update norm needs a per-tensor launch). When ``step()`` runs
under ``torch.compile`` it calls ``step_8bit_blockwise`` / ``step_32bit`` of
``inductor_quant.ops.optim_functional`` instead, which take ``lr`` and ``step`` as tensors: with
``lr=torch.tensor(...)`` an LR scheduler changes the learning rate without a recompile. On CPU
the step is lowered by Inductor to one generated kernel per tensor; on GPU the 8-bit step is one
launch of the hand-written kernel per tensor, called in place on the states.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ..code_tables import dynamic_map
from ..lowerings import register_lowerings
from ..reference.optim import OPTIMIZER_8BIT_BLOCKSIZE, OPTIMIZERS_8BIT, OPTIMIZERS_32BIT, TWO_STATE_OPTIMIZERS

__all__ = ["Optimizer8bit", "QUANT_STATE_KEY", "QUANT_STATE_KEYS"]

# bitsandbytes wraps the quantization tensors of each parameter's state under this key in
# ``state_dict()`` (it hides them from FSDP's gather); we read and write the same layout.
QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"
QUANT_STATE_KEYS = ("state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2", "unorm_vec")

_SETTINGS = ("optim_bits", "min_8bit_size", "max_unorm", "skip_zeros")


def _as_float(value: float | torch.Tensor) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def ademamix_schedule(alpha: float, beta1: float, beta3: float, t_alpha: int | None, t_beta3: int | None, step: int) -> tuple[float, float]:
    """AdEMAMix's warm-up schedules at ``step`` (1-based): ``(alpha_t, beta3_t)``.

    ``alpha_t = min(step * alpha / t_alpha, alpha)`` and
    ``beta3_t = min(exp(ln b1 * ln b3 / ((1 - s) ln b3 + s ln b1)), b3)`` with ``s = step / t_beta3``;
    without a horizon the value is constant."""
    alpha_t = min(step * alpha / t_alpha, alpha) if t_alpha else alpha
    beta3_t = beta3
    if t_beta3:
        ln_beta1, ln_beta3 = math.log(beta1), math.log(beta3)
        scale = step / t_beta3
        beta3_t = min(math.exp(ln_beta1 * ln_beta3 / ((1 - scale) * ln_beta3 + scale * ln_beta1)), beta3)
    return alpha_t, beta3_t


class Optimizer8bit(torch.optim.Optimizer):
    """An optimizer whose states are fp32 or blockwise 8-bit, updated by ``inductor_quant`` ops.

    Args:
        optimizer_name: the kernel name (see the module docstring).
        params: parameters or param-group dicts, as for any ``torch.optim.Optimizer``.
        lr: learning rate, a float or a 0-dim tensor (a tensor keeps a compiled ``step()`` from
            recompiling when a scheduler changes it).
        betas: bitsandbytes' betas tuple (``(beta1, beta2)``, or 3 values for AdEMAMix).
        eps, weight_decay: as in bitsandbytes (Adam's decay is decoupled, 1-state optimizers add
            ``weight_decay * p`` to the gradient, Lion decays ``p`` before the update).
        optim_bits: 8 or 32 (state width).
        min_8bit_size: parameters with fewer elements keep fp32 states even when ``optim_bits=8``.
        max_unorm: clip the update norm to ``max_unorm * ||p||`` (32-bit states only; LAMB/LARS).
        skip_zeros: leave elements whose gradient is exactly 0 untouched (states and ``p``).
        alpha, t_alpha, t_beta3: AdEMAMix's mixing weight and warm-up horizons.
    """

    def __init__(
        self,
        optimizer_name: str,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, ...] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        optim_bits: int = 32,
        min_8bit_size: int = 4096,
        max_unorm: float = 0.0,
        skip_zeros: bool = False,
        alpha: float = 0.0,
        t_alpha: int | None = None,
        t_beta3: int | None = None,
    ) -> None:
        if optimizer_name not in OPTIMIZERS_32BIT:
            raise ValueError(f"optimizer_name must be one of {OPTIMIZERS_32BIT}, got {optimizer_name!r}")
        self.optimizer_name = optimizer_name
        self.num_states = 2 if optimizer_name in TWO_STATE_OPTIMIZERS else 1
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        defaults: dict[str, Any] = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            optim_bits=optim_bits, min_8bit_size=min_8bit_size, max_unorm=max_unorm, skip_zeros=skip_zeros,
        )
        if optimizer_name == "ademamix":
            defaults.update(alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3)
        super().__init__(params, defaults)
        # A compiled step() is only fused into one kernel per tensor if Inductor knows how to
        # lower the functional step ops; registering is idempotent and touches no config.
        register_lowerings()

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (missing settings come from the defaults) and validate its hyperparameters."""
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _check_group(self, group: dict[str, Any]) -> None:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError(f"lr must be a float or a 1-element tensor, got shape {tuple(lr.shape)}")
        if not _as_float(lr) >= 0.0:
            raise ValueError(f"Invalid learning rate: lr={_as_float(lr)} (must be >= 0)")
        if not group["eps"] >= 0.0:
            raise ValueError(f"Invalid epsilon value: eps={group['eps']} (must be >= 0)")
        if not group["weight_decay"] >= 0.0:
            raise ValueError(f"Invalid weight_decay value: weight_decay={group['weight_decay']} (must be >= 0)")
        betas = group["betas"]
        expected = 3 if self.optimizer_name == "ademamix" else 2
        if len(betas) != expected:
            raise ValueError(f"betas must hold {expected} values for {self.optimizer_name}, got {tuple(betas)}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: betas[{i}]={beta} (must be in [0, 1))")
        if group["optim_bits"] not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {group['optim_bits']!r}")
        if group["optim_bits"] == 8 and self.optimizer_name not in OPTIMIZERS_8BIT:
            raise ValueError(
                f"optim_bits=8 is not supported for {self.optimizer_name}: it needs the update norm, which "
                "only the 32-bit update computes (use optim_bits=32)"
            )
        if not (isinstance(group["min_8bit_size"], int) and group["min_8bit_size"] >= 0):
            raise ValueError(f"min_8bit_size must be an int >= 0, got {group['min_8bit_size']!r}")
        if not group["max_unorm"] >= 0.0:
            raise ValueError(f"max_unorm must be >= 0, got {group['max_unorm']}")
        if group["max_unorm"] > 0.0 and group["optim_bits"] == 8:
            raise ValueError("max_unorm > 0 needs 32-bit states (optim_bits=32): the 8-bit update has no update-norm clipping")
        if self.optimizer_name == "ademamix":
            for name in ("t_alpha", "t_beta3"):
                horizon = group[name]
                if horizon is not None and not (isinstance(horizon, int) and horizon > 0):
                    raise ValueError(f"{name} must be None or a positive int, got {horizon!r}")

    # ------------------------------------------------------------------ state
    def _qmap_pair(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The signed/unsigned dynamic maps on ``device``, shared by every 8-bit state there."""
        if device not in self._qmaps:
            self._qmaps[device] = (dynamic_map(signed=True, device=device), dynamic_map(signed=False, device=device))
        return self._qmaps[device]

    def uses_8bit_state(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        """Whether ``p`` gets 8-bit states in ``group`` (``optim_bits == 8`` and big enough)."""
        return group["optim_bits"] == 8 and p.numel() >= group["min_8bit_size"]

    @torch.no_grad()
    def _init_state(self, group: dict[str, Any], p: torch.Tensor) -> None:
        state = self.state[p]
        stacked = (2, *p.shape) if self.optimizer_name == "ademamix" else p.shape
        state["step"] = torch.zeros((), dtype=torch.float32)
        if self.uses_8bit_state(group, p):
            blocks = (p.numel() + OPTIMIZER_8BIT_BLOCKSIZE - 1) // OPTIMIZER_8BIT_BLOCKSIZE
            qmap_signed, qmap_unsigned = self._qmap_pair(p.device)
            state["state1"] = torch.zeros(stacked, dtype=torch.uint8, device=p.device)
            state["qmap1"] = qmap_signed
            absmax_shape = (2, blocks) if self.optimizer_name == "ademamix" else (blocks,)
            state["absmax1"] = torch.zeros(absmax_shape, dtype=torch.float32, device=p.device)
            if self.num_states == 2:
                state["state2"] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
                state["qmap2"] = qmap_unsigned
                state["absmax2"] = torch.zeros((blocks,), dtype=torch.float32, device=p.device)
        else:
            state["state1"] = torch.zeros(stacked, dtype=torch.float32, device=p.device)
            if self.num_states == 2:
                state["state2"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        if group["max_unorm"] > 0.0:
            state["unorm_vec"] = torch.zeros((1,), dtype=torch.float32, device=p.device)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        steps: list[torch.Tensor],
        state1s: list[torch.Tensor],
        state2s: list[torch.Tensor | None],
        qmap1s: list[torch.Tensor | None],
        qmap2s: list[torch.Tensor | None],
        absmax1s: list[torch.Tensor | None],
        absmax2s: list[torch.Tensor | None],
        unorm_vecs: list[torch.Tensor | None],
    ) -> None:
        """Create missing states and collect, per parameter with a gradient, the tensors of its update.

        Named like torch's own optimizers' hook: under ``torch.compile`` Dynamo runs this method
        eagerly (state creation never enters the graph) and treats the states as static inputs.
        It also sets ``_opt_called``, the flag an LR scheduler checks (see ``step``): a Python
        side effect, so it belongs here, where it runs eagerly under compile too.
        """
        self._opt_called = True
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                self._init_state(group, p)
            params.append(p)
            grads.append(p.grad)
            steps.append(state["step"])
            state1s.append(state["state1"])
            state2s.append(state.get("state2"))
            qmap1s.append(state.get("qmap1"))
            qmap2s.append(state.get("qmap2"))
            absmax1s.append(state.get("absmax1"))
            absmax2s.append(state.get("absmax2"))
            unorm_vecs.append(state.get("unorm_vec"))

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step (``closure`` re-evaluates the loss, as in torch)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            steps: list[torch.Tensor] = []
            state1s: list[torch.Tensor] = []
            state2s: list[torch.Tensor | None] = []
            qmap1s: list[torch.Tensor | None] = []
            qmap2s: list[torch.Tensor | None] = []
            absmax1s: list[torch.Tensor | None] = []
            absmax2s: list[torch.Tensor | None] = []
            unorm_vecs: list[torch.Tensor | None] = []
            self._init_group(group, params, grads, steps, state1s, state2s, qmap1s, qmap2s, absmax1s, absmax2s, unorm_vecs)
            lists = (params, grads, steps, state1s, state2s, qmap1s, qmap2s, absmax1s, absmax2s, unorm_vecs)
            if torch.compiler.is_compiling():
                self._compiled_group_step(group, *lists)
            else:
                self._eager_group_step(group, *lists)
        return loss

    # torch's LR schedulers replace ``optimizer.step`` by a wrapper that sets ``_opt_called``; the
    # wrapper lives in a module Dynamo refuses to trace, so ``torch.compile(fullgraph=True)`` of a
    # function calling ``opt.step()`` would fail. ``_init_group`` sets the flag itself, and this
    # marker tells the scheduler not to wrap ``step``.
    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]

    def _hyperparameters(self, group: dict[str, Any], step: int) -> tuple[float, float, float, float]:
        """``(beta1, beta2, beta3, alpha)`` for the kernels at ``step`` (AdEMAMix schedules applied)."""
        betas = group["betas"]
        beta1, beta2 = betas[0], betas[1]
        if self.optimizer_name != "ademamix":
            return beta1, beta2, 0.0, 0.0
        alpha, beta3 = ademamix_schedule(group["alpha"], beta1, betas[2], group["t_alpha"], group["t_beta3"], step)
        return beta1, beta2, beta3, alpha

    def _eager_group_step(self, group, params, grads, steps, state1s, state2s, qmap1s, qmap2s, absmax1s, absmax2s, unorm_vecs) -> None:
        """Eager update: contiguous CUDA tensors go through the multi-tensor Triton launcher (one
        launch per state width, dtype and step), everything else through the per-tensor ops."""
        lr = _as_float(group["lr"])
        eps, weight_decay, skip_zeros = group["eps"], group["weight_decay"], group["skip_zeros"]
        batches: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            steps[i] += 1
            step = int(steps[i].item())
            eight_bit = state1s[i].dtype == torch.uint8
            if p.is_cuda and p.is_contiguous() and grads[i].is_contiguous() and (eight_bit or group["max_unorm"] == 0.0):
                key = (eight_bit, p.device, p.dtype, step, id(qmap1s[i]), id(qmap2s[i]))
                batches.setdefault(key, []).append(i)
                continue
            beta1, beta2, beta3, alpha = self._hyperparameters(group, step)
            target = p if p.is_contiguous() else p.contiguous()
            grad = grads[i].contiguous()
            if eight_bit:
                torch.ops.inductor_quant.optimizer_update_8bit_blockwise(
                    self.optimizer_name, grad, target, state1s[i], state2s[i], beta1, beta2, beta3, alpha, eps,
                    step, lr, qmap1s[i], qmap2s[i], absmax1s[i], absmax2s[i], weight_decay, 1.0, skip_zeros,
                )
            else:
                param_norm = target.float().norm().item() if group["max_unorm"] > 0.0 else 0.0
                torch.ops.inductor_quant.optimizer_update_32bit(
                    self.optimizer_name, grad, target, state1s[i], state2s[i], unorm_vecs[i], group["max_unorm"],
                    param_norm, beta1, beta2, beta3, alpha, eps, weight_decay, step, lr, 1.0, skip_zeros,
                )
            if target is not p:
                p.copy_(target)
        for (eight_bit, _, _, step, _, _), index in batches.items():
            self._multi_tensor_step(group, eight_bit, step, lr, [params[i] for i in index], [grads[i] for i in index],
                                    [state1s[i] for i in index], [state2s[i] for i in index], qmap1s[index[0]],
                                    qmap2s[index[0]], [absmax1s[i] for i in index], [absmax2s[i] for i in index])

    def _multi_tensor_step(self, group, eight_bit, step, lr, params, grads, state1s, state2s, qmap1, qmap2, absmax1s, absmax2s) -> None:
        """One Triton launch for CUDA tensors of one dtype and step (shapes checked as the ops do)."""
        from ..kernels import optim as kernels
        from ..ops.optim import check_optimizer_update_8bit_blockwise, check_optimizer_update_32bit

        name = self.optimizer_name
        beta1, beta2, beta3, alpha = self._hyperparameters(group, step)
        two_state = self.num_states == 2
        for i, p in enumerate(params):
            if eight_bit:
                check_optimizer_update_8bit_blockwise(name, grads[i], p, state1s[i], state2s[i], step, qmap1, qmap2, absmax1s[i], absmax2s[i])
            else:
                check_optimizer_update_32bit(name, grads[i], p, state1s[i], state2s[i], None, 0.0, 0.0, step)
        if eight_bit:
            kernels.multi_update_8bit_blockwise(
                name, grads, params, state1s, state2s if two_state else None, absmax1s, absmax2s if two_state else None,
                qmap1, qmap2, beta1, beta2, beta3, alpha, group["eps"], step, lr, group["weight_decay"], 1.0, group["skip_zeros"],
            )
        else:
            kernels.multi_update_32bit(
                name, grads, params, state1s, state2s if two_state else None, beta1, beta2, beta3, alpha,
                group["eps"], step, lr, group["weight_decay"], 1.0, group["skip_zeros"],
            )

    def _compiled_group_step(self, group, params, grads, steps, state1s, state2s, qmap1s, qmap2s, absmax1s, absmax2s, unorm_vecs) -> None:
        """Traced update: the step ops with ``lr``, ``step`` (and AdEMAMix's scheduled
        ``alpha``/``beta3``) as tensors, so a tensor ``lr`` changed by a scheduler and the growing
        step count are graph inputs, not constants that would force a recompile."""
        from ..ops.optim_functional import as_scalar_tensor, step_8bit_blockwise, step_32bit

        lr = group["lr"]
        betas = group["betas"]
        # Python-number scalars become one device tensor per device and value for the whole group,
        # not a fill per parameter.
        constants: dict[tuple[torch.device, float], torch.Tensor] = {}

        def on_device(value: float | torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            if isinstance(value, torch.Tensor):
                return value if value.device == p.device else value.to(p.device)
            key = (p.device, float(value))
            if key not in constants:
                constants[key] = as_scalar_tensor(value, p)
            return constants[key]

        for i, p in enumerate(params):
            steps[i] += 1
            step = on_device(steps[i], p)
            beta3, alpha = self._scheduled_tensors(group, step)
            common = dict(lr=on_device(lr, p), step=step, beta1=betas[0], beta2=betas[1], beta3=on_device(beta3, p),
                          alpha=on_device(alpha, p), eps=group["eps"], weight_decay=group["weight_decay"],
                          skip_zeros=group["skip_zeros"])
            grad = grads[i].contiguous()
            if state1s[i].dtype == torch.uint8:
                step_8bit_blockwise(self.optimizer_name, grad, p, state1s[i], state2s[i], qmap1s[i], qmap2s[i],
                                    absmax1s[i], absmax2s[i], **common)
            else:
                max_unorm = group["max_unorm"]
                param_norm = p.float().norm() if max_unorm > 0.0 else None
                step_32bit(self.optimizer_name, grad, p, state1s[i], state2s[i], max_unorm=max_unorm,
                           param_norm=param_norm, unorm_vec=unorm_vecs[i], **common)

    def _scheduled_tensors(self, group: dict[str, Any], step: torch.Tensor) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """``(beta3, alpha)`` for the traced step: AdEMAMix's schedules as float64 tensor math
        (the formulas of :func:`ademamix_schedule`), constants otherwise."""
        if self.optimizer_name != "ademamix":
            return 0.0, 0.0
        beta1, beta3 = group["betas"][0], group["betas"][2]
        alpha, t_alpha, t_beta3 = group["alpha"], group["t_alpha"], group["t_beta3"]
        step64 = step.to(torch.float64)
        alpha_t: float | torch.Tensor = torch.clamp(step64 * alpha / t_alpha, max=alpha) if t_alpha else alpha
        beta3_t: float | torch.Tensor = beta3
        if t_beta3:
            ln_beta1, ln_beta3 = math.log(beta1), math.log(beta3)
            scale = step64 / t_beta3
            beta3_t = torch.clamp(torch.exp(ln_beta1 * ln_beta3 / ((1 - scale) * ln_beta3 + scale * ln_beta1)), max=beta3)
        return beta3_t, alpha_t

    # ------------------------------------------------------------------ state_dict
    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict`` in bitsandbytes' layout: ``step`` is an int and the quantization
        tensors of each parameter sit under ``"__bnb_optimizer_quant_state__"``.

        Tensors are not copied (as in torch); serialize or clone before mutating the optimizer."""
        state_dict = super().state_dict()
        packed = {}
        for index, param_state in state_dict["state"].items():
            entry = {}
            quant = {}
            for key, value in param_state.items():
                if key == "step":
                    entry[key] = int(_as_float(value))
                elif key in QUANT_STATE_KEYS:
                    quant[key] = value
                else:
                    entry[key] = value
            if quant:
                entry[QUANT_STATE_KEY] = quant
            packed[index] = entry
        state_dict["state"] = packed
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state written by :meth:`state_dict` here or by a bitsandbytes optimizer.

        States are copied (never aliased) to each parameter's device without changing their dtype
        (8-bit codes stay uint8, fp32 states stay fp32 for bf16 parameters). Hyperparameters come
        from the saved groups; settings missing there (bitsandbytes keeps them on the optimizer)
        come from this optimizer's defaults. A tensor ``lr`` is updated in place, so compiled
        steps keep their graph.
        """
        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer has {len(groups)}")
        for index, (group, saved) in enumerate(zip(groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"param_groups[{index}] has {len(group['params'])} parameters but the loaded group has {len(saved['params'])}"
                )
        id_map = {
            saved_id: p
            for group, saved in zip(groups, saved_groups)
            for saved_id, p in zip(saved["params"], group["params"])
        }
        new_state: dict[torch.Tensor, dict[str, Any]] = {}
        for key, saved_state in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(f"loaded state dict has state for parameter id {key!r}, which no param group lists")
            p = id_map[key]
            new_state[p] = self._load_param_state(p, key, saved_state)
        new_groups = []
        for group, saved in zip(groups, saved_groups):
            new_group = {**self.defaults, **{k: v for k, v in saved.items() if k != "params"}, "params": group["params"]}
            new_group["betas"] = tuple(new_group["betas"])
            new_group["lr"] = self._loaded_lr(group["lr"], saved.get("lr", group["lr"]))
            self._check_group(new_group)
            new_groups.append(new_group)
        self.state.clear()
        self.state.update(new_state)
        for group, new_group in zip(groups, new_groups):
            group.clear()
            group.update(new_group)

    @staticmethod
    def _loaded_lr(current: float | torch.Tensor, saved: float | torch.Tensor) -> float | torch.Tensor:
        if isinstance(current, torch.Tensor):
            current.fill_(_as_float(saved))
            return current
        return saved.detach().clone() if isinstance(saved, torch.Tensor) else saved

    def _load_param_state(self, p: torch.Tensor, key: Any, saved_state: dict[str, Any]) -> dict[str, Any]:
        flat = {k: v for k, v in saved_state.items() if k != QUANT_STATE_KEY}
        flat.update(saved_state.get(QUANT_STATE_KEY, {}))
        if "step" not in flat or "state1" not in flat:
            raise ValueError(f"loaded state for parameter {key!r} needs 'step' and 'state1', got keys {sorted(flat)}")
        state: dict[str, Any] = {}
        for name, value in flat.items():
            if name == "step":
                state[name] = torch.tensor(_as_float(value), dtype=torch.float32)
            elif isinstance(value, torch.Tensor):
                state[name] = value.detach().to(device=p.device, copy=True)
            else:
                state[name] = value
        self._check_loaded_state(p, key, state)
        if state["state1"].dtype == torch.uint8:  # share one qmap per device, as freshly made states do
            signed, unsigned = self._qmap_pair(p.device)
            if torch.equal(state["qmap1"], signed):
                state["qmap1"] = signed
            if "qmap2" in state and torch.equal(state["qmap2"], unsigned):
                state["qmap2"] = unsigned
        return state

    def _check_loaded_state(self, p: torch.Tensor, key: Any, state: dict[str, Any]) -> None:
        stacked = 2 if self.optimizer_name == "ademamix" else 1
        state1 = state["state1"]
        where = f"loaded state for parameter {key!r}"
        if state1.dtype not in (torch.uint8, torch.float32):
            raise ValueError(f"{where}: state1 must be uint8 (8-bit) or float32, got {state1.dtype}")
        if state1.numel() != stacked * p.numel():
            raise ValueError(f"{where}: state1 has {state1.numel()} elements, expected {stacked * p.numel()} for a parameter of shape {tuple(p.shape)}")
        if self.num_states == 2:
            state2 = state.get("state2")
            if state2 is None or state2.numel() != p.numel() or state2.dtype != state1.dtype:
                raise ValueError(f"{where}: state2 must be a {state1.dtype} tensor with {p.numel()} elements")
        if state1.dtype == torch.uint8:
            blocks = (p.numel() + OPTIMIZER_8BIT_BLOCKSIZE - 1) // OPTIMIZER_8BIT_BLOCKSIZE
            names = ("qmap1", "absmax1") + (("qmap2", "absmax2") if self.num_states == 2 else ())
            for name in names:
                if name not in state:
                    raise ValueError(f"{where}: 8-bit states need {name}")
            for name in names:
                expected = 256 if name.startswith("qmap") else blocks * (stacked if name == "absmax1" else 1)
                if state[name].numel() != expected or state[name].dtype != torch.float32:
                    raise ValueError(f"{where}: {name} must be float32 with {expected} elements, got {state[name].dtype} with {state[name].numel()}")
