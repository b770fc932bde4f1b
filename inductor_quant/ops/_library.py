"""The ``inductor_quant`` operator namespace (``torch.ops.inductor_quant``)."""

from __future__ import annotations

import torch

NAMESPACE = "inductor_quant"

# Devices whose kernels are the Triton ones (``ops/triton_*.py``); every other device runs the
# CPU reference.
TRITON_DEVICES = ("cuda", "xpu")

lib = torch.library.Library(NAMESPACE, "DEF")


def define(schema: str) -> str:
    """Define ``inductor_quant::<schema>`` and return its qualified name (without overload)."""
    lib.define(schema)
    return f"{NAMESPACE}::{schema.split('(', 1)[0].split('.', 1)[0]}"
