"""Machinery shared by the weight-only quantized linears (``Linear4bit``, ``Linear8bit``).

A quantized linear keeps its packed weight as a frozen ``nn.Parameter`` named ``weight`` (so
``model.parameters()``, ``.to(device)`` and PEFT see it) and its quantization state as
non-persistent buffers; ``state_dict`` writes the state under ``weight.<key>`` in the checkpoint
format of the subclass, and ``load_state_dict`` accepts either that format or a full-precision
``[out_features, in_features]`` weight, which it quantizes.

Loading replaces the quantized tensors (their shapes follow the checkpoint: a checkpoint written
with another blocksize, quant_type or storage dtype is adopted), so it also fills layers created
on the ``meta`` device; the bias of a meta layer is assigned too (other modules of a meta model,
embeddings or norms, still need ``load_state_dict(..., assign=True)`` or ``to_empty`` first).

Dtype casts of the module (``model.half()``, ``model.to(torch.bfloat16)``) convert the bias only:
the packed bytes and the fp32 scales are kept bit for bit (see ``_apply``).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from ..ops._checks import FLOAT_DTYPES, MAX_BLOCKSIZE, MIN_BLOCKSIZE
from ..quant_state import BlockwiseState, CheckpointFormatError, QuantState

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

_Layer = TypeVar("_Layer", bound="QuantizedLinear")


def check_float_dtype(dtype: torch.dtype | None, name: str) -> None:
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be None or one of {FLOAT_DTYPES}, got {dtype}")


def check_blocksize(blocksize: int) -> None:
    """Raise ValueError unless ``blocksize`` is a power of two in [32, 4096]."""
    ok = isinstance(blocksize, int) and not isinstance(blocksize, bool) and MIN_BLOCKSIZE <= blocksize <= MAX_BLOCKSIZE
    if not ok or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two in [{MIN_BLOCKSIZE}, {MAX_BLOCKSIZE}], got {blocksize!r}")


class QuantizedLinear(nn.Module, abc.ABC):
    """Base class: ``y = x @ dequantize(weight).T + bias``, computed in ``compute_dtype``.

    ``compute_dtype=None`` computes in the input's dtype (bitsandbytes latches the first input's
    dtype into the module instead; this module never changes its attributes in ``forward``).
    The output is returned in the input's dtype.

    Subclasses set ``quant_tensor_names`` (the weight and every state tensor) and implement
    ``quant_state``, ``_quantize``, ``_adopt``, ``_linear``, ``dequantize_weight`` and ``load_quantized``.
    """

    quant_tensor_names: tuple[str, ...] = ("weight",)
    in_features: int
    out_features: int

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        compute_dtype: torch.dtype | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_float_dtype(compute_dtype, "compute_dtype")
        check_float_dtype(dtype, "dtype")
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        # The dtype of the full-precision weight (bitsandbytes' QuantState.dtype).
        self.weight_dtype = dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(0, device=device), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=self.weight_dtype))
        else:
            self.register_parameter("bias", None)
        for name in self.quant_tensor_names:
            if name != "weight":
                self.register_buffer(name, None, persistent=False)

    def init_weight(self, device: torch.device | str | None) -> torch.Tensor:
        """A freshly initialized full-precision weight (``nn.Linear``'s init; also resets the bias)."""
        weight = torch.empty(self.out_features, self.in_features, device=device, dtype=self.weight_dtype)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            with torch.no_grad():
                nn.init.uniform_(self.bias, -bound, bound)
        return weight

    @classmethod
    def _from_linear(cls: type[_Layer], linear: nn.Linear, **config: Any) -> _Layer:
        """A ``cls`` layer built with ``config`` holding ``linear``'s weight, quantized on its device
        (a meta linear gives an empty meta layer); the bias parameter is shared, not copied."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=False,
            device="meta",
            dtype=linear.weight.dtype if linear.weight.dtype.is_floating_point else None,
            **config,
        )
        with torch.no_grad():
            layer.set_weight(linear.weight)
        layer.bias = linear.bias
        return layer

    @property
    @abc.abstractmethod
    def quant_state(self) -> QuantState | BlockwiseState:
        """The weight's quantization state (a view of the layer's tensors)."""

    @abc.abstractmethod
    def _quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, QuantState | BlockwiseState]:
        """Quantize a detached full-precision weight with the layer's configuration: ``(packed, state)``."""

    @abc.abstractmethod
    def _adopt(self, packed: torch.Tensor, state: QuantState | BlockwiseState) -> None:
        """Install packed data and its state, taking the configuration from them."""

    @abc.abstractmethod
    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ dequantize(weight).T + bias`` with ``x`` and ``bias`` already in the compute dtype."""

    @abc.abstractmethod
    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full-precision ``[out_features, in_features]`` weight the layer computes with."""

    @abc.abstractmethod
    def load_quantized(self, weight: torch.Tensor, entries: Mapping[str, torch.Tensor], prefix: str, device: torch.device) -> None:
        """Validate and adopt a packed ``weight`` and its ``weight.*`` ``entries`` (keys without
        the ``weight.`` prefix) on ``device``; raise :class:`CheckpointFormatError` naming ``prefix + key``."""

    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a full-precision ``[out_features, in_features]`` weight (on its device) into the layer."""
        if tuple(weight.shape) != tuple(self.weight_shape):
            raise ValueError(f"weight must have shape {tuple(self.weight_shape)}, got {tuple(weight.shape)}")
        self._adopt(*self._quantize(weight.detach()))

    def quantized_state_dict(self) -> dict[str, torch.Tensor]:
        """The weight entries of the checkpoint, keys relative to the module (``weight``, ``weight.absmax``, ...)."""
        entries = {"weight": self.weight}
        for key, value in self.quant_state.as_dict(packed=True).items():
            entries["weight." + key] = value
        return entries

    def _check_checkpoint_shape(self, shape: torch.Size, key: str) -> None:
        """Raise :class:`CheckpointFormatError` naming ``key`` unless a checkpoint's weight ``shape`` is this layer's."""
        if tuple(shape) != tuple(self.weight_shape):
            raise CheckpointFormatError(
                f"{key}: the checkpoint's weight has shape {tuple(shape)}, this layer is {tuple(self.weight_shape)} "
                "(out_features, in_features)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype if self.compute_dtype is not None else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return self._linear(x.to(dtype), bias).to(x.dtype)

    @property
    def weight_shape(self) -> list[int]:
        return [self.out_features, self.in_features]

    def _apply(self, fn, recurse=True):
        # nn.Module casts every floating-point tensor on .half()/.to(dtype): that would corrupt the
        # packed bytes of a float quant_storage and the fp32 scales. Present them as same-size
        # integers during the cast (device moves still apply) and view them back afterwards.
        float_dtypes = {}
        for name in self.quant_tensor_names:
            tensor = getattr(self, name)
            if tensor is not None and tensor.is_floating_point():
                float_dtypes[name] = tensor.dtype
                tensor.data = tensor.data.view(_SAME_SIZE_INT[tensor.element_size()])
        try:
            result = super()._apply(fn, recurse)
        finally:
            for name, dtype in float_dtypes.items():
                tensor = getattr(self, name)
                tensor.data = tensor.data.view(dtype)
        return result

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # bitsandbytes' order: weight, bias, then the weight's quantization state.
        entries = self.quantized_state_dict()
        if self.bias is not None:
            entries = {"weight": entries.pop("weight"), "bias": self.bias, **entries}
        for key, value in entries.items():
            destination[prefix + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        weight_key = prefix + "weight"
        own = [key for key in state_dict if key.startswith(prefix)]
        weight_family = [key for key in own if key == weight_key or key.startswith(weight_key + ".")]
        # nn.Module's loader handles the bias (and reports unexpected keys); the weight is ours.
        # A layer on meta is filled by assignment (copying into meta tensors would be a no-op).
        rest = {key: state_dict[key] for key in own if key not in weight_family}
        if self.weight.is_meta:
            local_metadata = {**local_metadata, "assign_to_params_buffers": True}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if weight_key not in state_dict:
            return
        if weight_key in missing_keys:
            missing_keys.remove(weight_key)
        weight = state_dict[weight_key]
        entries = {key[len(weight_key) + 1 :]: state_dict[key] for key in weight_family if key != weight_key}
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        device = weight.device if assign or self.weight.is_meta else self.weight.device
        try:
            if not isinstance(weight, torch.Tensor):
                raise CheckpointFormatError(f"{weight_key}: expected a tensor, got {type(weight).__name__}")
            if entries:
                self.load_quantized(weight, entries, prefix, device)
            elif weight.is_floating_point() and tuple(weight.shape) == tuple(self.weight_shape):
                # As nn.Module: copying casts to the layer's dtype, assigning keeps the checkpoint's
                # (unless the quantizer cannot take it, e.g. float64).
                keep = assign and weight.dtype in FLOAT_DTYPES
                with torch.no_grad():
                    self.set_weight(weight.to(device=device, dtype=weight.dtype if keep else self.weight_dtype))
            else:
                raise CheckpointFormatError(
                    f"{weight_key}: expected a floating-point weight of shape {tuple(self.weight_shape)} or a packed "
                    f"weight with its '{weight_key}.*' quantization state entries, got shape {tuple(weight.shape)} "
                    f"{weight.dtype} and no quantization state"
                )
        except CheckpointFormatError as error:
            error_msgs.append(str(error))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"compute_dtype={self.compute_dtype}"
        )
