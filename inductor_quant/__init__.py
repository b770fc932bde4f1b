"""inductor_quant: low-bit quantization as first-class ``torch.compile`` ops.

Importing the package registers the ``torch.ops.inductor_quant`` operators (bitsandbytes-compatible
schemas and numerics, CPU reference kernels, Triton GPU kernels). It changes no global Inductor
setting: the passes and lowerings are installed by :func:`compile` (or by putting a
:class:`QuantPassManager` into your own ``torch.compile`` options).

Public API:

* ops: ``torch.ops.inductor_quant.*``; code tables: :func:`nf4_code`, :func:`fp4_code`,
  :func:`get_4bit_code`, :func:`dynamic_map`, :func:`create_dynamic_map`;
* functional helpers with bitsandbytes' ``QuantState``: :func:`quantize_4bit`,
  :func:`dequantize_4bit`, :func:`quantize_blockwise`, :func:`dequantize_blockwise`;
* modules and model quantization: :mod:`inductor_quant.nn` (``Linear4bit``, ``Linear8bit``,
  ``quantize_model``); optimizers: :mod:`inductor_quant.optim`; checkpoints:
  :mod:`inductor_quant.checkpoint`;
* compiler: :func:`compile`, :class:`QuantPassManager`, :class:`QuantPassConfig`;
* inspection: :func:`inspect` returns an :class:`InspectionReport` of what was fused and why.
"""

from __future__ import annotations

from . import ops  # noqa: F401  (registers torch.ops.inductor_quant)
from . import checkpoint, nn, optim
from .code_tables import (
    QUANT_TYPES,
    create_dynamic_map,
    dynamic_map,
    fp4_code,
    get_4bit_code,
    nf4_code,
)
from .compile import QuantPassConfig, QuantPassManager, compile
from .inspection import InspectionReport, inspect
from .nn import Linear4bit, Linear8bit, LinearFP4, LinearNF4, quantize_model
from .quant_state import (
    CheckpointFormatError,
    QuantState,
    dequantize_4bit,
    dequantize_blockwise,
    quantize_4bit,
    quantize_blockwise,
)

__version__ = "0.1.0"

__all__ = [
    "QUANT_TYPES",
    "CheckpointFormatError",
    "InspectionReport",
    "Linear4bit",
    "Linear8bit",
    "LinearFP4",
    "LinearNF4",
    "QuantPassConfig",
    "QuantPassManager",
    "QuantState",
    "checkpoint",
    "compile",
    "create_dynamic_map",
    "dequantize_4bit",
    "dequantize_blockwise",
    "dynamic_map",
    "fp4_code",
    "get_4bit_code",
    "inspect",
    "nf4_code",
    "nn",
    "optim",
    "quantize_4bit",
    "quantize_blockwise",
    "quantize_model",
]
