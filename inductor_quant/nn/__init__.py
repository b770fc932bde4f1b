"""Quantized ``nn`` modules and whole-model quantization.

* :class:`Linear4bit` (+ :class:`LinearNF4`, :class:`LinearFP4`): bitsandbytes-compatible 4-bit
  linear (state dicts exchangeable with bitsandbytes), QLoRA-ready.
* :class:`Linear8bit`: blockwise 8-bit weight-only linear (dynamic map).
* :func:`quantize_model`: replace a model's ``nn.Linear`` layers in place (meta-device aware).
* :func:`register_lora_modules`: make PEFT's LoRA wrap these layers (needs ``peft``).
"""

from __future__ import annotations

from typing import Any

from ._base import QuantizedLinear
from .linear_4bit import Linear4bit, LinearFP4, LinearNF4
from .linear_8bit import Linear8bit
from .quantize_model import QuantizationReport, module_bytes, name_matches, quantize_model

__all__ = [
    "QuantizedLinear",
    "Linear4bit",
    "LinearNF4",
    "LinearFP4",
    "Linear8bit",
    "QuantizationReport",
    "quantize_model",
    "module_bytes",
    "name_matches",
    "register_lora_modules",
]


def register_lora_modules(config: Any) -> Any:
    """Register LoRA layers for :class:`Linear4bit`/:class:`Linear8bit` on a ``peft.LoraConfig``
    and return it: ``get_peft_model(model, register_lora_modules(LoraConfig(...)))``.

    Imports ``peft`` (an optional dependency) only when called."""
    from .lora import register_lora_modules as register

    return register(config)
