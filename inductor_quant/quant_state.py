"""Quantization state of a 4-bit (or blockwise 8-bit) weight, bitsandbytes-compatible.

``QuantState`` holds what is needed to undo ``quantize_4bit``: the per-block absmax (fp32, or
uint8 when the absmax itself is double-quantized), the 16-entry code table, the original shape,
dtype and blocksize. Its fields and its serialized form are bitsandbytes' (reference
bitsandbytes.md §2.6-2.7), so ``QuantState.as_dict(packed=True)`` produces exactly the
``weight.*`` entries bitsandbytes writes next to a ``Linear4bit`` weight::

    absmax, quant_map, [nested_absmax, nested_quant_map,]
    quant_state.bitsandbytes__{nf4|fp4}   (uint8 tensor of UTF-8 JSON: quant_type, blocksize,
                                           dtype, shape[, nested_blocksize, nested_dtype, nested_offset])

Double quantization (``compress_statistics=True``): ``offset = absmax.mean()``, then
``absmax - offset`` is quantized blockwise (256 per block) with the signed dynamic map; the
reconstruction is ``nested_code[qabsmax[i]] * nested_absmax[i // 256] + offset`` in fp32.

Every class here is a plain dataclass (no ``__getattr__``), so ``torch.compile`` traces
attribute access. The quantizers call the ``torch.ops.inductor_quant`` ops, so they run on any
device that has kernels (and on ``meta``, where they only produce shapes).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import torch

from .code_tables import QUANT_TYPES, dynamic_map, get_4bit_code
from .ops import _checks

__all__ = [
    "NESTED_BLOCKSIZE",
    "BLOCKWISE8_BLOB_KEY",
    "CheckpointFormatError",
    "BlockwiseState",
    "QuantState",
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_blockwise",
    "dequantize_blockwise",
    "double_quantize_absmax",
    "dequantize_absmax",
    "pack_dict_to_tensor",
    "unpack_tensor_to_dict",
    "dtype_to_str",
    "str_to_dtype",
]

NESTED_BLOCKSIZE = 256
BLOB_PREFIX = "quant_state.bitsandbytes__"
BLOCKWISE8_BLOB_KEY = "quant_state.inductor_quant__blockwise8"
_FLOAT_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CheckpointFormatError(ValueError):
    """A serialized quantization state is malformed or does not match what it is loaded into.

    The message starts with the offending state-dict key."""


def dtype_to_str(dtype: torch.dtype) -> str:
    """bitsandbytes' spelling of a dtype in the JSON blob: ``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def str_to_dtype(name: Any, key: str = "dtype") -> torch.dtype:
    """Inverse of :func:`dtype_to_str` for the float dtypes a quantized weight may have.

    Only an allow-list is accepted (the string comes from a file; it is never used with getattr)."""
    if not isinstance(name, str) or name not in _FLOAT_DTYPE_NAMES:
        raise CheckpointFormatError(f"{key}: expected one of {sorted(_FLOAT_DTYPE_NAMES)}, got {name!r}")
    return _FLOAT_DTYPE_NAMES[name]


def pack_dict_to_tensor(source: Mapping[str, Any]) -> torch.Tensor:
    """JSON-encode a dict of plain values into a uint8 tensor (bitsandbytes' ``pack_dict_to_tensor``
    format: ``json.dumps`` with default separators, UTF-8), so it can live in a safetensors file."""
    return torch.tensor(list(json.dumps(dict(source)).encode("utf-8")), dtype=torch.uint8)


def unpack_tensor_to_dict(tensor: torch.Tensor, key: str = "quant_state") -> dict[str, Any]:
    """Decode a tensor written by :func:`pack_dict_to_tensor`; ``key`` names it in errors."""
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tensor.dim() != 1:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        dtype = tensor.dtype if isinstance(tensor, torch.Tensor) else None
        raise CheckpointFormatError(f"{key}: expected a 1-D uint8 tensor of UTF-8 JSON, got {shape} {dtype}")
    if tensor.is_meta:
        raise CheckpointFormatError(f"{key}: is on the meta device and holds no data")
    try:
        value = json.loads(bytes(tensor.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointFormatError(f"{key}: not a valid JSON quantization state ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointFormatError(f"{key}: expected a JSON object, got {type(value).__name__}")
    return value


def _expect_tensor(value: Any, key: str, dtype: torch.dtype, numel: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise CheckpointFormatError(f"{key}: expected a tensor, got {type(value).__name__}")
    if value.dtype != dtype:
        raise CheckpointFormatError(f"{key}: expected dtype {dtype}, got {value.dtype}")
    if numel is not None and value.numel() != numel:
        raise CheckpointFormatError(f"{key}: expected {numel} elements, got {value.numel()} (shape {tuple(value.shape)})")
    return value


def _expect_blocksize(value: Any, key: str) -> int:
    ok = (
        isinstance(value, int)
        and not isinstance(value, bool)
        and _checks.MIN_BLOCKSIZE <= value <= _checks.MAX_BLOCKSIZE
        and value & (value - 1) == 0
    )
    if not ok:
        raise CheckpointFormatError(
            f"{key}: expected a power of two in [{_checks.MIN_BLOCKSIZE}, {_checks.MAX_BLOCKSIZE}], got {value!r}"
        )
    return value


def _expect_shape(value: Any, key: str) -> torch.Size:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value
    ):
        raise CheckpointFormatError(f"{key}: expected a list of non-negative ints, got {value!r}")
    return torch.Size(value)


def _num_blocks(n: int, blocksize: int) -> int:
    return (n + blocksize - 1) // blocksize


@dataclasses.dataclass
class BlockwiseState:
    """State of a blockwise 8-bit quantization: fp32 ``absmax`` (one per ``blocksize`` run of the
    flattened tensor) and the 256-entry ``code``. It is bitsandbytes' ``state2`` of a
    double-quantized 4-bit state, and the state of :class:`~inductor_quant.nn.Linear8bit`
    weights (there ``shape`` is the weight shape)."""

    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    dtype: torch.dtype = torch.float32
    shape: torch.Size | None = None

    def to(self, device: torch.device | str) -> BlockwiseState:
        """A copy with the tensors on ``device``."""
        return dataclasses.replace(self, absmax=self.absmax.to(device), code=self.code.to(device))

    def as_dict(self, packed: bool = True) -> dict[str, Any]:
        """Serialized form of an 8-bit weight state: ``absmax``, ``quant_map`` and, packed, the JSON
        blob ``quant_state.inductor_quant__blockwise8`` (blocksize, dtype, shape)."""
        plain = {"blocksize": self.blocksize, "dtype": dtype_to_str(self.dtype), "shape": list(self.shape or ())}
        tensors = {"absmax": self.absmax, "quant_map": self.code}
        if not packed:
            return {**tensors, **plain}
        return {**tensors, BLOCKWISE8_BLOB_KEY: pack_dict_to_tensor(plain)}

    @classmethod
    def from_dict(cls, qs_dict: Mapping[str, Any], device: torch.device | str | None = None, prefix: str = "") -> BlockwiseState:
        """Inverse of :meth:`as_dict` (packed), validating every entry; ``prefix`` names keys in errors."""
        allowed = {"absmax", "quant_map", BLOCKWISE8_BLOB_KEY}
        unknown = sorted(set(qs_dict) - allowed)
        if unknown:
            raise CheckpointFormatError(f"{prefix}{unknown[0]}: unexpected entry in an 8-bit blockwise weight state")
        for name in sorted(allowed):
            if name not in qs_dict:
                raise CheckpointFormatError(f"{prefix}{name}: missing from the 8-bit blockwise weight state")
        meta = unpack_tensor_to_dict(qs_dict[BLOCKWISE8_BLOB_KEY], prefix + BLOCKWISE8_BLOB_KEY)
        blob = prefix + BLOCKWISE8_BLOB_KEY
        extra = sorted(set(meta) - {"blocksize", "dtype", "shape"})
        if extra or not {"blocksize", "dtype", "shape"} <= set(meta):
            raise CheckpointFormatError(f"{blob}: expected the fields blocksize, dtype, shape; got {sorted(meta)}")
        blocksize = _expect_blocksize(meta["blocksize"], f"{blob}.blocksize")
        shape = _expect_shape(meta["shape"], f"{blob}.shape")
        absmax = _expect_tensor(qs_dict["absmax"], prefix + "absmax", torch.float32, _num_blocks(shape.numel(), blocksize))
        code = _expect_tensor(qs_dict["quant_map"], prefix + "quant_map", torch.float32, 256)
        return cls(
            absmax=absmax.reshape(-1).to(device),
            code=code.reshape(-1).to(device),
            blocksize=blocksize,
            dtype=str_to_dtype(meta["dtype"], f"{blob}.dtype"),
            shape=shape,
        )


@dataclasses.dataclass
class QuantState:
    """How a 4-bit packed tensor was quantized (bitsandbytes' ``QuantState``, same field names).

    ``absmax`` is fp32 ``(ceil(n / blocksize),)``, or uint8 when ``state2`` is set (double
    quantization; ``offset`` is then the 0-dim fp32 mean that was subtracted). ``code`` is the
    16-entry table of ``quant_type``; ``dtype`` and ``shape`` describe the original tensor."""

    absmax: torch.Tensor
    shape: torch.Size
    code: torch.Tensor
    blocksize: int
    quant_type: str
    dtype: torch.dtype
    offset: torch.Tensor | None = None
    state2: BlockwiseState | None = None

    @property
    def nested(self) -> bool:
        """True when the absmax is double-quantized."""
        return self.state2 is not None

    def to(self, device: torch.device | str) -> QuantState:
        """A copy with every tensor on ``device``."""
        return dataclasses.replace(
            self,
            absmax=self.absmax.to(device),
            code=self.code.to(device),
            offset=None if self.offset is None else self.offset.to(device),
            state2=None if self.state2 is None else self.state2.to(device),
        )

    def as_dict(self, packed: bool = True) -> dict[str, Any]:
        """bitsandbytes' serialized form (``QuantState.as_dict``): with ``packed=True`` a dict of
        tensors only, the plain fields JSON-encoded under ``quant_state.bitsandbytes__<type>``."""
        plain: dict[str, Any] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": dtype_to_str(self.dtype),
            "shape": list(self.shape),
        }
        tensors = {"absmax": self.absmax, "quant_map": self.code}
        if self.state2 is not None:
            assert self.offset is not None
            # The nested map is cloned so no two modules' entries share storage (safetensors refuses that).
            tensors.update(nested_absmax=self.state2.absmax, nested_quant_map=self.state2.code.clone())
            plain.update(
                nested_blocksize=self.state2.blocksize,
                nested_dtype=dtype_to_str(self.state2.dtype),
                nested_offset=float(self.offset.item()),
            )
        if not packed:
            return {**tensors, **plain}
        return {**tensors, BLOB_PREFIX + self.quant_type: pack_dict_to_tensor(plain)}

    @classmethod
    def from_dict(cls, qs_dict: Mapping[str, Any], device: torch.device | str | None = None, prefix: str = "") -> QuantState:
        """Rebuild a state from :meth:`as_dict` output, packed or not, with keys relative to the
        weight (``absmax``, ``quant_state.bitsandbytes__nf4``, ...).

        Every entry is validated (dtype, element count against the shape and blocksize, JSON
        fields, code table); a bad one raises :class:`CheckpointFormatError` whose message starts
        with ``prefix + key``."""
        entries = dict(qs_dict)
        blob_keys = [k for k in entries if k.startswith("quant_state.")]
        if len(blob_keys) > 1:
            raise CheckpointFormatError(f"{prefix}{blob_keys[1]}: more than one quant_state entry ({blob_keys})")
        if blob_keys:
            blob_key = blob_keys[0]
            suffix = blob_key.removeprefix(BLOB_PREFIX)
            if not blob_key.startswith(BLOB_PREFIX) or suffix not in QUANT_TYPES:
                raise CheckpointFormatError(
                    f"{prefix}{blob_key}: expected {BLOB_PREFIX}<type> with type in {QUANT_TYPES}"
                )
            meta = unpack_tensor_to_dict(entries.pop(blob_key), prefix + blob_key)
            overlap = sorted(set(meta) & set(entries))
            if overlap:
                raise CheckpointFormatError(f"{prefix}{overlap[0]}: given both as an entry and inside {blob_key}")
            entries.update(meta)
            if entries.get("quant_type") != suffix:
                raise CheckpointFormatError(
                    f"{prefix}{blob_key}: its quant_type {entries.get('quant_type')!r} does not match the key suffix {suffix!r}"
                )
            where = prefix + blob_key
        else:
            where = prefix + "quant_state"

        nested_fields = ("nested_absmax", "nested_quant_map", "nested_blocksize", "nested_dtype", "nested_offset")
        required = ("absmax", "quant_map", "quant_type", "blocksize", "dtype", "shape")
        unknown = sorted(set(entries) - set(required) - set(nested_fields))
        if unknown:
            raise CheckpointFormatError(f"{prefix}{unknown[0]}: unexpected entry in a 4-bit quantization state")
        for name in required:
            if name not in entries:
                raise CheckpointFormatError(f"{prefix}{name}: missing from the 4-bit quantization state ({where})")
        nested = [name for name in nested_fields if name in entries]
        if nested and len(nested) != len(nested_fields):
            missing = [name for name in nested_fields if name not in entries]
            raise CheckpointFormatError(f"{prefix}{missing[0]}: missing; a double-quantized state needs all of {nested_fields}")

        quant_type = entries["quant_type"]
        if quant_type not in QUANT_TYPES:
            raise CheckpointFormatError(f"{where}.quant_type: expected one of {QUANT_TYPES}, got {quant_type!r}")
        blocksize = _expect_blocksize(entries["blocksize"], f"{where}.blocksize")
        shape = _expect_shape(entries["shape"], f"{where}.shape")
        dtype = str_to_dtype(entries["dtype"], f"{where}.dtype")
        blocks = _num_blocks(shape.numel(), blocksize)
        code = _expect_tensor(entries["quant_map"], prefix + "quant_map", torch.float32, 16).reshape(-1)
        expected_code = get_4bit_code(quant_type)
        if not code.is_meta and not torch.equal(code.cpu(), expected_code):
            raise CheckpointFormatError(
                f"{prefix}quant_map: is not the {quant_type} table (custom 4-bit code tables are not supported)"
            )

        offset = state2 = None
        if nested:
            absmax = _expect_tensor(entries["absmax"], prefix + "absmax", torch.uint8, blocks)
            nested_blocksize = entries["nested_blocksize"]
            if nested_blocksize != NESTED_BLOCKSIZE or isinstance(nested_blocksize, bool):
                raise CheckpointFormatError(
                    f"{where}.nested_blocksize: expected {NESTED_BLOCKSIZE} (bitsandbytes' value), got {nested_blocksize!r}"
                )
            nested_offset = entries["nested_offset"]
            if isinstance(nested_offset, torch.Tensor):
                nested_offset = nested_offset.item()
            if not isinstance(nested_offset, (int, float)) or isinstance(nested_offset, bool):
                raise CheckpointFormatError(f"{where}.nested_offset: expected a number, got {nested_offset!r}")
            nested_absmax = _expect_tensor(
                entries["nested_absmax"], prefix + "nested_absmax", torch.float32, _num_blocks(blocks, NESTED_BLOCKSIZE)
            )
            nested_code = _expect_tensor(entries["nested_quant_map"], prefix + "nested_quant_map", torch.float32, 256)
            state2 = BlockwiseState(
                absmax=nested_absmax.reshape(-1).to(device),
                code=nested_code.reshape(-1).to(device),
                blocksize=NESTED_BLOCKSIZE,
                dtype=str_to_dtype(entries["nested_dtype"], f"{where}.nested_dtype"),
            )
            offset = torch.tensor(float(nested_offset), dtype=torch.float32, device=device)
        else:
            absmax = _expect_tensor(entries["absmax"], prefix + "absmax", torch.float32, blocks)
        return cls(
            absmax=absmax.reshape(-1).to(device),
            shape=shape,
            code=code.to(device),
            blocksize=blocksize,
            quant_type=quant_type,
            dtype=dtype,
            offset=offset,
            state2=state2,
        )


def double_quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, BlockwiseState]:
    """Quantize fp32 per-block absmax to 8 bits (bitsandbytes' ``compress_statistics``).

    Returns ``(qabsmax uint8, offset 0-dim fp32, state2)`` with ``offset = absmax.mean()`` and
    ``absmax - offset`` quantized in blocks of 256 with the signed dynamic map."""
    offset = absmax.mean()
    code = dynamic_map(signed=True, device=absmax.device)
    qabsmax, nested_absmax = torch.ops.inductor_quant.quantize_blockwise(absmax - offset, code, NESTED_BLOCKSIZE)
    return qabsmax, offset, BlockwiseState(absmax=nested_absmax, code=code, blocksize=NESTED_BLOCKSIZE)


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """The fp32 per-block absmax of ``state``: ``state.absmax`` itself, or its double-quantized
    reconstruction ``nested_code[q] * nested_absmax[i // 256] + offset``."""
    if state.state2 is None:
        return state.absmax
    assert state.offset is not None
    inner = torch.ops.inductor_quant.dequantize_blockwise(
        state.absmax, state.state2.absmax, state.state2.code, state.state2.blocksize, torch.float32
    )
    return inner + state.offset.float()


def quantize_4bit(
    A: torch.Tensor,
    *,
    blocksize: int = 64,
    quant_type: str = "fp4",
    compress_statistics: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``A`` to packed 4-bit codes (bitsandbytes' ``functional.quantize_4bit``).

    Returns ``(packed, state)``: ``packed`` is ``((n + 1) // (2 * itemsize), 1)`` of
    ``quant_storage``; with ``compress_statistics`` the absmax is double-quantized."""
    packed, absmax = torch.ops.inductor_quant.quantize_4bit(A, blocksize, quant_type, quant_storage)
    code = get_4bit_code(quant_type, A.device)
    if compress_statistics:
        qabsmax, offset, state2 = double_quantize_absmax(absmax)
        state = QuantState(qabsmax, A.shape, code, blocksize, quant_type, A.dtype, offset=offset, state2=state2)
    else:
        state = QuantState(absmax, A.shape, code, blocksize, quant_type, A.dtype)
    return packed, state


def dequantize_4bit(A: torch.Tensor, quant_state: QuantState, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Undo :func:`quantize_4bit`: a tensor of ``quant_state.shape`` in ``dtype`` (default: the
    original dtype), ``code[q] * absmax[block]`` rounded once."""
    absmax = dequantize_absmax(quant_state)
    return torch.ops.inductor_quant.dequantize_4bit(
        A, absmax, quant_state.blocksize, quant_state.quant_type, list(quant_state.shape), dtype or quant_state.dtype
    )


def quantize_blockwise(
    A: torch.Tensor, *, blocksize: int = 256, code: torch.Tensor | None = None
) -> tuple[torch.Tensor, BlockwiseState]:
    """Quantize ``A`` to uint8 indices into ``code`` (default: the signed dynamic map), one fp32
    absmax per ``blocksize`` run of the flattened tensor. Returns ``(codes shaped like A, state)``."""
    if code is None:
        code = dynamic_map(signed=True, device=A.device)
    codes, absmax = torch.ops.inductor_quant.quantize_blockwise(A, code, blocksize)
    return codes, BlockwiseState(absmax=absmax, code=code, blocksize=blocksize, dtype=A.dtype, shape=A.shape)


def dequantize_blockwise(A: torch.Tensor, state: BlockwiseState, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Undo :func:`quantize_blockwise`: ``code[A] * absmax[block]`` in ``dtype`` (default: the
    original dtype), shaped like ``A``."""
    return torch.ops.inductor_quant.dequantize_blockwise(A, state.absmax, state.code, state.blocksize, dtype or state.dtype)
