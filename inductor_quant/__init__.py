"""inductor_quant: low-bit quantization as first-class ``torch.compile`` ops.

Importing the package registers the ``torch.ops.inductor_quant`` operators (bitsandbytes-compatible
schemas and numerics). It changes no global Inductor setting.
"""

from __future__ import annotations

from . import ops  # noqa: F401  (registers torch.ops.inductor_quant)
from .code_tables import (
    QUANT_TYPES,
    create_dynamic_map,
    dynamic_map,
    fp4_code,
    get_4bit_code,
    nf4_code,
)

__version__ = "0.1.0"

__all__ = [
    "QUANT_TYPES",
    "create_dynamic_map",
    "dynamic_map",
    "fp4_code",
    "get_4bit_code",
    "nf4_code",
]
