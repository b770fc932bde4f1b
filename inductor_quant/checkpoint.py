"""Checkpoints of quantized models: safetensors files in bitsandbytes' format.

A quantized layer's entries are those of its ``state_dict`` (for ``Linear4bit`` exactly
bitsandbytes' / HF's: ``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_*``,
``weight.quant_state.bitsandbytes__nf4``), so a file written here loads in bitsandbytes and a
file written by bitsandbytes loads here.

* :func:`save_state_dict` / :func:`save_model`: write safetensors (tied tensors are written once
  per key; safetensors refuses shared storage).
* :func:`load_state_dict_file`: read safetensors, or a torch file with ``weights_only=True``
  (never an arbitrary unpickle).
* :func:`load_quantized`: load a (partly) quantized checkpoint into a model, first swapping the
  ``nn.Linear`` layers that the file stores quantized for matching quantized layers.
* :func:`quantize_state_dict` / :func:`quantize_safetensors`: quantize a full-precision
  checkpoint without building the model (the ``inductor-quant quantize`` CLI).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .nn import Linear4bit, Linear8bit
from .nn.quantize_model import DEFAULT_BLOCKSIZE, QuantizationReport, name_matches, progress_bar
from .nn.linear_4bit import check_4bit_config
from .ops._checks import FLOAT_DTYPES
from .quant_state import BLOB_PREFIX, BLOCKWISE8_BLOB_KEY, CheckpointFormatError, quantize_4bit, quantize_blockwise

__all__ = [
    "DEFAULT_FILE_SKIP",
    "CheckpointFormatError",
    "save_state_dict",
    "save_model",
    "load_state_dict_file",
    "load_quantized",
    "quantize_state_dict",
    "quantize_safetensors",
]

# Weights a file-level quantizer leaves alone by default: the output head (as quantize_model) and
# embedding tables (2-D ``.weight`` tensors that are not linear layers).
DEFAULT_FILE_SKIP = ("lm_head", "*embed*")

PathLike = str | os.PathLike


def _is_safetensors(path: PathLike) -> bool:
    return os.fspath(path).endswith(".safetensors")


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``state_dict`` to a safetensors file (tensors made contiguous on CPU; a tensor that
    shares storage with an earlier one, such as a tied embedding, is written as its own copy)."""
    from safetensors.torch import save_file

    if not _is_safetensors(path):
        raise ValueError(f"path must end in .safetensors, got {os.fspath(path)!r}")
    tensors: dict[str, torch.Tensor] = {}
    storages: set[tuple[int, int]] = set()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{key}: expected a tensor, got {type(value).__name__}")
        if value.is_meta:
            raise ValueError(f"{key}: is on the meta device and holds no data (load or quantize the model first)")
        tensor = value.detach().to("cpu").contiguous()
        storage = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if tensor.numel() and storage in storages:
            tensor = tensor.clone()
        storages.add((tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()))
        tensors[key] = tensor
    save_file(tensors, os.fspath(path), metadata={"format": "pt", **(metadata or {})})


def save_model(model: nn.Module, path: PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """``save_state_dict(model.state_dict(), path, metadata)``."""
    save_state_dict(model.state_dict(), path, metadata)


def load_state_dict_file(path: PathLike, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Read a checkpoint: safetensors (``.safetensors``), else ``torch.load(weights_only=True)``.

    A damaged file raises ValueError naming it; no file is ever unpickled without
    ``weights_only``."""
    path = os.fspath(path)
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device=str(device))
        except SafetensorError as error:
            raise ValueError(f"{path}: not a valid safetensors file ({error})") from None
    try:
        state_dict = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: cannot be read as a weights-only torch checkpoint ({error})") from None
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path}: expected a mapping of names to tensors")
    return dict(state_dict)


def _quantized_format(state_dict: Mapping[str, torch.Tensor], weight_key: str) -> int | None:
    """4 or 8 when ``state_dict`` stores ``weight_key`` quantized (by its quant_state blob), else None."""
    if any(f"{weight_key}.{BLOB_PREFIX}{quant_type}" in state_dict for quant_type in ("nf4", "fp4")):
        return 4
    if f"{weight_key}.{BLOCKWISE8_BLOB_KEY}" in state_dict:
        return 8
    return None


def load_quantized(
    model: nn.Module,
    source: PathLike | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    assign: bool = False,
    device: torch.device | str = "cpu",
) -> torch.nn.modules.module._IncompatibleKeys:
    """Load a checkpoint (a file path or a state dict) into ``model``.

    Every ``nn.Linear`` whose weight the checkpoint stores quantized (it has a
    ``weight.quant_state.*`` entry) is first replaced by an empty :class:`Linear4bit` /
    :class:`Linear8bit`, which adopts the stored quant_type, blocksize and storage. Then this is
    ``model.load_state_dict(state_dict, strict=strict, assign=assign)`` (use ``assign=True`` for
    a model built on the meta device); its result is returned. ``device`` is where a file's
    tensors are read to."""
    state_dict = load_state_dict_file(source, device) if isinstance(source, (str, os.PathLike)) else dict(source)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        weight_key = f"{name}.weight" if name else "weight"
        bits = _quantized_format(state_dict, weight_key)
        if bits is None:
            continue
        if not name:
            raise ValueError("model is itself an nn.Linear; build a Linear4bit/Linear8bit and load into it")
        dtype = module.weight.dtype if module.weight.dtype in FLOAT_DTYPES else None
        layer_class = Linear4bit if bits == 4 else Linear8bit
        layer = layer_class(module.in_features, module.out_features, bias=module.bias is not None, device="meta", dtype=dtype)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer)
    return model.load_state_dict(state_dict, strict=strict, assign=assign)


def _should_quantize(key: str, tensor: torch.Tensor, skip: tuple[str, ...], include: tuple[str, ...] | None) -> bool | None:
    """True to quantize, False to skip a linear-like weight (reported), None for other tensors."""
    if not (key == "weight" or key.endswith(".weight")) or tensor.dim() != 2 or tensor.dtype not in FLOAT_DTYPES:
        return None
    name = key.removesuffix("weight").removesuffix(".")
    if name and name_matches(name, skip):
        return False
    if include is not None and not (name and name_matches(name, include)):
        return False
    return True


def _quantized_entries(
    key: str, weight: torch.Tensor, bits: int, quant_type: str, blocksize: int, compress_statistics: bool, quant_storage: torch.dtype
) -> dict[str, torch.Tensor]:
    if bits == 4:
        out_features, in_features = weight.shape
        try:
            check_4bit_config(in_features, out_features, quant_type, blocksize, quant_storage)
        except ValueError as error:
            raise ValueError(f"{key}: {error}") from None
        packed, state = quantize_4bit(
            weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=compress_statistics, quant_storage=quant_storage
        )
    else:
        packed, state = quantize_blockwise(weight, blocksize=blocksize)
    entries = {key: packed}
    for name, value in state.as_dict(packed=True).items():
        entries[f"{key}.{name}"] = value
    return entries


def quantize_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    quant_type: str = "nf4",
    blocksize: int | None = None,
    compress_statistics: bool = True,
    skip: Iterable[str] = DEFAULT_FILE_SKIP,
    *,
    bits: int = 4,
    quant_storage: torch.dtype = torch.uint8,
    include: Iterable[str] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], QuantizationReport]:
    """Quantize the linear weights of a full-precision state dict.

    A tensor is quantized when its key ends in ``weight``, it is 2-D fp16/bf16/fp32, its module
    name matches no ``skip`` pattern (and some ``include`` pattern, when given; see
    ``nn.name_matches``) and it is not already quantized. Quantization runs on ``device``;
    results are returned on CPU. Other tensors pass through unchanged. The output loads with
    :func:`load_quantized` (or ``load_state_dict`` after ``quantize_model`` with the same skip
    list) here and in bitsandbytes (``bits=4``).

    Returns ``(state_dict, report)``."""
    if bits not in DEFAULT_BLOCKSIZE:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    blocksize = DEFAULT_BLOCKSIZE[bits] if blocksize is None else blocksize
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    include = None if include is None else ((include,) if isinstance(include, str) else tuple(include))
    already = {key for key in state_dict if _quantized_format(state_dict, key) is not None}
    quantized: list[str] = []
    skipped: list[str] = []
    out: dict[str, torch.Tensor] = {}
    bytes_before = bytes_after = 0
    for key in progress_bar(list(state_dict), "quantizing", progress, unit="tensor"):
        tensor = state_dict[key]
        bytes_before += tensor.numel() * tensor.element_size()
        decision = None if key in already else _should_quantize(key, tensor, skip, include)
        if decision:
            entries = _quantized_entries(
                key, tensor.to(device), bits, quant_type, blocksize, compress_statistics, quant_storage
            )
            entries = {name: value.cpu() for name, value in entries.items()}
            quantized.append(key.removesuffix("weight").removesuffix("."))
        else:
            if decision is False:
                skipped.append(key.removesuffix("weight").removesuffix("."))
            entries = {key: tensor}
        for name, value in entries.items():
            if name in out or (name != key and name in state_dict):
                raise CheckpointFormatError(f"{name}: produced twice (the input already has this key)")
            out[name] = value
            bytes_after += value.numel() * value.element_size()
    return out, QuantizationReport(quantized, skipped, bytes_before, bytes_after)


def quantize_safetensors(
    in_path: PathLike,
    out_path: PathLike,
    quant_type: str = "nf4",
    blocksize: int | None = None,
    compress_statistics: bool = True,
    skip: Iterable[str] = DEFAULT_FILE_SKIP,
    *,
    bits: int = 4,
    quant_storage: torch.dtype = torch.uint8,
    include: Iterable[str] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> QuantizationReport:
    """Quantize a full-precision safetensors checkpoint into a new safetensors file
    (:func:`quantize_state_dict` on its tensors; the input's metadata is kept).

    ``blocksize=None`` means 64 for 4-bit and 256 for 8-bit. Returns the report (layers, bytes)."""
    from safetensors import SafetensorError, safe_open

    if os.path.abspath(os.fspath(in_path)) == os.path.abspath(os.fspath(out_path)):
        raise ValueError(f"out_path must differ from in_path ({os.fspath(in_path)!r})")
    if not _is_safetensors(in_path) or not _is_safetensors(out_path):
        raise ValueError(f"in_path and out_path must end in .safetensors, got {os.fspath(in_path)!r}, {os.fspath(out_path)!r}")
    try:
        with safe_open(os.fspath(in_path), framework="pt", device="cpu") as reader:
            metadata = reader.metadata() or {}
            out, report = quantize_state_dict(
                _LazyTensors(reader),
                quant_type,
                blocksize,
                compress_statistics,
                skip,
                bits=bits,
                quant_storage=quant_storage,
                include=include,
                device=device,
                progress=progress,
            )
    except SafetensorError as error:
        raise ValueError(f"{os.fspath(in_path)}: not a valid safetensors file ({error})") from None
    save_state_dict(out, out_path, metadata)
    return report


class _LazyTensors(Mapping):
    """The tensors of an open safetensors file, read one at a time (so quantizing a file holds
    one full-precision tensor in memory, not all of them)."""

    def __init__(self, reader) -> None:
        self._reader = reader
        self._keys = list(reader.keys())
        self._key_set = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        return self._reader.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
