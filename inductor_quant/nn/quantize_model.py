"""``quantize_model``: replace a model's ``nn.Linear`` layers by quantized ones, in place.

Typical uses::

    report = quantize_model(model, quant_type="nf4")            # quantize a loaded model
    print(report)                                                # layers, bytes before/after

    with torch.device("meta"):                                   # big model, no memory for fp weights
        model = LlamaForCausalLM(config)
    quantize_model(model, quant_type="nf4")                      # empty quantized layers on meta
    model.load_state_dict(checkpoint, assign=True)               # fp or quantized checkpoint fills them

Loading a full-precision checkpoint quantizes each weight as it arrives (one layer's fp weight in
memory at a time); a quantized checkpoint (ours or bitsandbytes') is adopted as stored, including
its quant_type/blocksize. ``assign=True`` is what places the non-quantized tensors (embeddings,
norms, biases) of a meta model, as for any PyTorch module.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import torch
from torch import nn

from ..ops._checks import FLOAT_DTYPES
from ._base import check_blocksize, check_float_dtype
from .linear_4bit import Linear4bit, check_4bit_config
from .linear_8bit import Linear8bit

__all__ = ["QuantizationReport", "quantize_model", "module_bytes", "name_matches", "progress_bar", "DEFAULT_BLOCKSIZE"]

DEFAULT_BLOCKSIZE = {4: 64, 8: 256}

T = TypeVar("T")


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """True when a pattern (``fnmatch`` glob) matches the dotted ``name`` or one of its dotted
    suffixes: ``"lm_head"`` matches ``lm_head``, ``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``,
    ``"layers.0.*"`` matches every module under ``model.layers.0``."""
    parts = name.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(suffix, pattern) for pattern in patterns for suffix in suffixes)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each tensor counted once (tied weights too).

    Meta tensors count their nominal size."""
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def progress_bar(iterable: Sequence[T], desc: str, enabled: bool, unit: str = "layer") -> Iterator[T]:
    """Iterate with a progress bar on stderr when ``enabled``: tqdm's if installed, else a
    one-line counter."""
    if not enabled:
        yield from iterable
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        total = len(iterable)
        for index, item in enumerate(iterable):
            print(f"\r{desc}: {index}/{total}", end="", file=sys.stderr, flush=True)
            yield item
        print(f"\r{desc}: {total}/{total}", file=sys.stderr, flush=True)
        return
    yield from tqdm(iterable, desc=desc, unit=unit, file=sys.stderr)


def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


@dataclasses.dataclass
class QuantizationReport:
    """What :func:`quantize_model` (or ``checkpoint.quantize_safetensors``) did.

    ``bytes_before``/``bytes_after`` cover every parameter and buffer (or every tensor of the
    file), not only the quantized layers."""

    quantized: list[str]
    skipped: list[str]
    bytes_before: int
    bytes_after: int

    @property
    def ratio(self) -> float:
        """``bytes_before / bytes_after``."""
        return self.bytes_before / self.bytes_after if self.bytes_after else float("inf")

    def __str__(self) -> str:
        skipped = f" (skipped {len(self.skipped)}: {', '.join(self.skipped[:4])}{', ...' if len(self.skipped) > 4 else ''})"
        return (
            f"quantized {len(self.quantized)} linear layers{skipped if self.skipped else ''}: "
            f"{_format_bytes(self.bytes_before)} -> {_format_bytes(self.bytes_after)} ({self.ratio:.2f}x smaller)"
        )


def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    blocksize: int | None = None,
    compress_statistics: bool = True,
    quant_storage: torch.dtype = torch.uint8,
    compute_dtype: torch.dtype | None = None,
    skip: Iterable[str] = ("lm_head",),
    bits: int = 4,
    progress: bool = False,
) -> QuantizationReport:
    """Replace every ``nn.Linear`` of ``model`` (exact type; subclasses such as
    ``MultiheadAttention``'s ``out_proj`` are left alone) by a quantized layer, in place.

    Args:
        quant_type: "nf4" or "fp4" (``bits=4``).
        blocksize: weights per absmax; default 64 for 4-bit, 256 for 8-bit.
        compress_statistics: double-quantize the 4-bit absmax.
        quant_storage: dtype of the packed 4-bit bytes (uint8, or a float dtype for FSDP).
        compute_dtype: matmul dtype of the new layers (None: the input's dtype).
        skip: ``fnmatch`` patterns of module names to keep in full precision (see :func:`name_matches`).
        bits: 4 (:class:`Linear4bit`) or 8 (:class:`Linear8bit`, blockwise dynamic map).
        progress: show a progress bar (tqdm if installed).

    Layers on the ``meta`` device become empty quantized layers, to be filled by
    ``load_state_dict`` (see the module docstring). A layer shared under several names is
    quantized once and stays shared.

    Returns a :class:`QuantizationReport` (names, bytes before/after).
    """
    if bits not in DEFAULT_BLOCKSIZE:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if isinstance(model, nn.Linear) and type(model) is nn.Linear:
        raise ValueError("model is itself an nn.Linear; use Linear4bit.from_linear / Linear8bit.from_linear")
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    blocksize = DEFAULT_BLOCKSIZE[bits] if blocksize is None else blocksize
    if bits == 4:
        check_4bit_config(2, quant_storage.itemsize, quant_type, blocksize, quant_storage)
    else:
        check_blocksize(blocksize)
    check_float_dtype(compute_dtype, "compute_dtype")

    bytes_before = module_bytes(model)
    targets: list[tuple[str, nn.Module, str, nn.Linear]] = []
    skipped: list[str] = []
    for name, child in model.named_modules(remove_duplicate=False):
        if type(child) is not nn.Linear:
            continue
        if name_matches(name, skip):
            skipped.append(name)
            continue
        if child.weight.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: weight dtype {child.weight.dtype} cannot be quantized (expected one of {FLOAT_DTYPES})")
        if bits == 4:
            try:
                check_4bit_config(child.in_features, child.out_features, quant_type, blocksize, quant_storage)
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
        parent_name, _, child_name = name.rpartition(".")
        targets.append((name, model.get_submodule(parent_name), child_name, child))

    replacements: dict[int, nn.Module] = {}
    quantized: list[str] = []
    for name, parent, child_name, linear in progress_bar(targets, "quantizing", progress):
        new = replacements.get(id(linear))
        if new is None:
            if bits == 4:
                new = Linear4bit.from_linear(
                    linear,
                    compute_dtype=compute_dtype,
                    compress_statistics=compress_statistics,
                    quant_type=quant_type,
                    quant_storage=quant_storage,
                    blocksize=blocksize,
                )
            else:
                new = Linear8bit.from_linear(linear, compute_dtype=compute_dtype, blocksize=blocksize)
            new.train(linear.training)
            replacements[id(linear)] = new
            quantized.append(name)
        setattr(parent, child_name, new)
    return QuantizationReport(quantized, skipped, bytes_before, module_bytes(model))
