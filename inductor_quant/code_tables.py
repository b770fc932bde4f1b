"""Code tables shared by every quantizer: NF4, FP4 and the dynamic 8-bit maps.

The values are bitsandbytes' (so packed data is interchangeable), generated the same way:
NF4 and FP4 are fixed 16-entry tables; the dynamic 8-bit maps are built with fp32 ``linspace``
midpoints scaled in Python double, which is what makes them bit-identical to bitsandbytes'.

Quantizing picks the *nearest* code. For the 8-bit maps and NF4 the decision boundaries are the
fp32 midpoints of adjacent codes; FP4 uses bitsandbytes' literal thresholds, which are not exactly
midpoints (``FP4_THRESHOLDS``). A value exactly on a boundary takes the lower code (strict ``>``).
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "NF4_CODE",
    "FP4_CODE",
    "FP4_THRESHOLDS",
    "FP4_RANK_TO_CODE",
    "QUANT_TYPES",
    "nf4_code",
    "fp4_code",
    "get_4bit_code",
    "create_dynamic_map",
    "dynamic_map",
    "code_midpoints",
]

QUANT_TYPES = ("nf4", "fp4")

NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 (e2m1, bias 2, normalised by 12): bit 3 is the sign, bits 0-2 index the magnitudes
# (0, 0.0625, 8, 12, 4, 6, 2, 3) / 12.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
FP4_CODE = tuple(m / 12 for m in _FP4_MAGNITUDES) + tuple(-m / 12 for m in _FP4_MAGNITUDES)

# bitsandbytes' FP4 decision literals on |x|, ascending. They separate the magnitudes in rank
# order 0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1; FP4_RANK_TO_CODE maps a rank to its 3 code bits.
FP4_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)
FP4_RANK_TO_CODE = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)
FP4_SIGN_BIT = 0b1000


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 values (fp32, ascending; the index is the 4-bit code)."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def fp4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 FP4 values (fp32; index = sign bit << 3 | exponent/mantissa bits)."""
    return torch.tensor(FP4_CODE, dtype=torch.float32, device=device)


def get_4bit_code(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-entry table of ``quant_type`` ("nf4" or "fp4"), as bitsandbytes' ``QuantState.code``."""
    if quant_type == "nf4":
        return nf4_code(device)
    if quant_type == "fp4":
        return fp4_code(device)
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def create_dynamic_map(signed: bool = True) -> torch.Tensor:
    """Dynamic (tree) 8-bit quantization map, generated exactly as bitsandbytes does.

    For exponent ``i`` in 0..6 the magnitudes are the fp32 midpoints of
    ``linspace(0.1, 1, k)`` (``k = 2**i + 1`` signed, ``2**(i+1) + 1`` unsigned), scaled by
    ``10 ** (i - 6)`` in fp32 (scaling in double differs by an ulp for some unsigned entries).
    The signed map has 0.0 at index 127 and 1.0 at index 255 (there is no -1.0); the unsigned
    map runs from 0.0 to 1.0.
    """
    values: list[float] = [0.0, 1.0]
    for i in range(7):
        steps = 2**i + 1 if signed else 2 ** (i + 1) + 1
        boundaries = torch.linspace(0.1, 1, steps, dtype=torch.float32)
        midpoints = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (i - 6)
        values += (scale * midpoints).tolist()
        if signed:
            values += (-scale * midpoints).tolist()
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    return create_dynamic_map(signed=signed)


def dynamic_map(signed: bool = True, device: torch.device | str | None = None) -> torch.Tensor:
    """The 256-entry dynamic 8-bit map (signed: bitsandbytes' default ``code``/``qmap1``;
    unsigned: ``qmap2``). Returns a fresh tensor the caller may keep."""
    return _dynamic_map_cpu(signed).to(device=device, copy=True)


def code_midpoints(code: torch.Tensor) -> torch.Tensor:
    """fp32 decision boundaries of a sorted code table: ``(code[:-1] + code[1:]) / 2``."""
    code = code.float()
    return (code[:-1] + code[1:]) * 0.5
