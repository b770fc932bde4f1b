"""Argument checks shared by the fake (meta) implementations and every device kernel.

They look only at metadata (dtype, shape, device, plain ints/strings), so they run under fake
tensors and symbolic shapes as well as eagerly. Every message names the argument and says what
was expected, so a bad call fails before any kernel runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..code_tables import QUANT_TYPES

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
STORAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
MIN_BLOCKSIZE = 32
MAX_BLOCKSIZE = 4096


Message = str | Callable[[], str]


def _lazy(message: Message) -> Callable[[], str]:
    return message if callable(message) else lambda: message


def check(cond: bool, message: Message) -> None:
    """``torch._check`` (works on SymBools too). Pass the message as a lambda on hot paths: it is
    only formatted when the check fails."""
    if cond is True:
        return
    torch._check(cond, _lazy(message))


def check_value(cond: bool, message: Message) -> None:
    """``torch._check_value``: raises ValueError for a bad non-tensor argument."""
    if cond is True:
        return
    torch._check_value(cond, _lazy(message))


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d) for d in dtypes)


def check_dtype(tensor: torch.Tensor, name: str, dtypes: Sequence[torch.dtype]) -> None:
    check(tensor.dtype in dtypes, lambda: f"{name} must have dtype in ({_names(dtypes)}), got {tensor.dtype}")


def check_float_dtype_arg(dtype: torch.dtype, name: str = "dtype") -> None:
    check_value(dtype in FLOAT_DTYPES, lambda: f"{name} must be one of ({_names(FLOAT_DTYPES)}), got {dtype}")


def check_storage_dtype_arg(dtype: torch.dtype, name: str = "quant_storage") -> None:
    check_value(dtype in STORAGE_DTYPES, lambda: f"{name} must be one of ({_names(STORAGE_DTYPES)}), got {dtype}")


def check_blocksize(blocksize: int, name: str = "blocksize") -> None:
    check_value(
        isinstance(blocksize, int)
        and MIN_BLOCKSIZE <= blocksize <= MAX_BLOCKSIZE
        and blocksize & (blocksize - 1) == 0,
        lambda: f"{name} must be a power of two in [{MIN_BLOCKSIZE}, {MAX_BLOCKSIZE}], got {blocksize}",
    )


def check_quant_type(quant_type: str) -> None:
    check_value(quant_type in QUANT_TYPES, lambda: f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def check_numel(tensor: torch.Tensor, name: str, expected, what: str) -> None:
    check(tensor.numel() == expected, lambda: f"{name} must have {expected} elements ({what}), got {tensor.numel()}")


def check_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, tensor in others.items():
        if tensor is not None:
            check(
                tensor.device == reference.device,
                lambda: f"{name} must be on the same device as {reference_name} ({reference.device}), got {tensor.device}",
            )


def check_shape_arg(shape: Sequence[int], name: str = "shape") -> None:
    check_value(all(s >= 0 for s in shape), lambda: f"{name} must hold non-negative sizes, got {list(shape)}")


def num_blocks(n, blocksize: int):
    """``ceil(n / blocksize)`` (works on SymInts)."""
    return (n + blocksize - 1) // blocksize


def prod(sizes: Sequence[int]):
    total = 1
    for size in sizes:
        total = total * size
    return total


def check_packed_4bit(B: torch.Tensor, name: str, n) -> None:
    """``B`` holds the packed bytes of ``n`` 4-bit codes in any storage dtype."""
    check_dtype(B, name, STORAGE_DTYPES)
    expected = (n + 1) // 2
    check(
        B.numel() * B.element_size() == expected,
        lambda: f"{name} must hold (n + 1) // 2 = {expected} bytes for n = {n} 4-bit values, "
        f"got {B.numel()} x {B.dtype} = {B.numel() * B.element_size()} bytes",
    )


def check_code_table(code: torch.Tensor, name: str, entries: int) -> None:
    check_dtype(code, name, (torch.float32,))
    check(code.dim() == 1 and code.numel() == entries, lambda: f"{name} must be a 1-D table of {entries} entries, got shape {tuple(code.shape)}")


def check_out(out: torch.Tensor, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> None:
    check(out.dtype == dtype, lambda: f"out must have dtype {dtype}, got {out.dtype}")
    check(list(out.shape) == list(shape), lambda: f"out must have shape {list(shape)}, got {list(out.shape)}")
    check(out.device == device, lambda: f"out must be on {device}, got {out.device}")
