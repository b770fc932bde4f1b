"""PEFT LoRA on top of the quantized linears (QLoRA). Needs ``peft``.

PEFT picks a LoRA layer class by the type of the layer it wraps; it knows ``nn.Linear`` and
bitsandbytes' classes, not ours. :func:`register_lora_modules` adds our layers to a
``LoraConfig`` through PEFT's custom-module mapping (``LoraConfig._register_custom_module``)::

    config = register_lora_modules(LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model = get_peft_model(model, config)

:class:`QuantizedLoraLinear` is PEFT's LoRA ``Linear`` (same forward: the frozen base layer's
output plus ``scaling * B(A(dropout(x)))``; the base layer's ``gemm_4bit`` autograd carries the
gradient to earlier layers) with merging redone for a quantized base: dequantize, add the delta,
quantize again (lossy, as in PEFT's bitsandbytes layers). LoRA variants that read the base weight
(DoRA, ...) are rejected by PEFT's variant check, since ``lora_variants`` offers plain LoRA only.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as _PeftLoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge

from .linear_4bit import Linear4bit
from .linear_8bit import Linear8bit

__all__ = ["QuantizedLoraLinear", "register_lora_modules"]


class QuantizedLoraLinear(_PeftLoraLinear):
    """PEFT LoRA ``Linear`` whose base layer is a :class:`Linear4bit` or :class:`Linear8bit`."""

    @property
    def lora_variants(self) -> dict[tuple[str, ...], Any]:
        return {(): None}

    def _get_in_out_features(self, module: torch.nn.Module) -> tuple[int, int]:
        # PEFT's generic lookup warns about unknown layer types; ours carry nn.Linear's attributes.
        if isinstance(module, (Linear4bit, Linear8bit)):
            return module.in_features, module.out_features
        return super()._get_in_out_features(module)

    def _merged_base_weight(self, adapter: str, sign: float) -> torch.Tensor:
        base = self.get_base_layer()
        delta = self.get_delta_weight(adapter).to(device=base.weight.device, dtype=torch.float32)
        return base.dequantize_weight(torch.float32) + sign * delta

    def _requantize(self, weight: torch.Tensor) -> None:
        base = self.get_base_layer()
        warnings.warn(
            f"merging LoRA into a quantized {type(base).__name__} re-quantizes its weight (lossy)", stacklevel=3
        )
        with torch.no_grad():
            base.set_weight(weight.to(base.weight_dtype))

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the active (or given) adapters into the base weight, re-quantizing it."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            base = self.get_base_layer()
            weight = self._merged_base_weight(adapter, 1.0)
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            new_bias = None
            if self.lora_bias[adapter]:
                if base.bias is None:
                    raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
                new_bias = base.bias + self.lora_B[adapter].bias * self.scaling[adapter]
            self._requantize(weight)
            if new_bias is not None:
                base.bias.data = new_bias.detach().to(base.bias.dtype)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract the merged adapters from the base weight again (re-quantizing it)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A:
                continue
            self._requantize(self._merged_base_weight(adapter, -1.0))
            if self.lora_bias[adapter]:
                base = self.get_base_layer()
                base.bias.data -= (self.lora_B[adapter].bias * self.scaling[adapter]).detach().to(base.bias.dtype)


def register_lora_modules(config: LoraConfig) -> LoraConfig:
    """Map :class:`Linear4bit` and :class:`Linear8bit` to :class:`QuantizedLoraLinear` in ``config``
    (PEFT's custom-module API) and return ``config``."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}")
    if not hasattr(config, "_register_custom_module"):
        raise RuntimeError("this peft version has no custom-module API (LoraConfig._register_custom_module); upgrade peft")
    config._register_custom_module({Linear4bit: QuantizedLoraLinear, Linear8bit: QuantizedLoraLinear})
    return config
