"""``Linear4bit``: a linear layer with an NF4/FP4 weight (bitsandbytes' ``Linear4bit``, QLoRA).

The weight is stored packed (two 4-bit codes per byte, as ``quant_storage``) with one absmax per
``blocksize`` weights, optionally double-quantized (``compress_statistics``). Its ``state_dict``
is bitsandbytes' ``Linear4bit`` format (``weight``, ``bias``, ``weight.absmax``,
``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__<nf4|fp4>``), so checkpoints are exchangeable with
bitsandbytes and HF ``transformers``.

``forward`` goes through the ops:

* eagerly it calls ``torch.ops.inductor_quant.gemm_4bit`` (the fused kernel on GPU; its
  autograd gives the input and bias gradients, so LoRA adapters train on top: QLoRA);
* under ``torch.compile`` it emits ``dequantize_4bit`` (after ``dequantize_blockwise`` + offset
  for a double-quantized absmax) followed by ``F.linear``, the graph the Inductor pattern pass
  rewrites into a fused kernel.

Both compute ``F.linear(x, dequantize(W), bias)`` in the compute dtype.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..code_tables import QUANT_TYPES
from ..ops._checks import STORAGE_DTYPES
from ..quant_state import NESTED_BLOCKSIZE, BlockwiseState, CheckpointFormatError, QuantState, quantize_4bit
from ..quant_state import dequantize_4bit as _dequantize_4bit
from ._base import QuantizedLinear, check_blocksize

__all__ = ["Linear4bit", "LinearNF4", "LinearFP4", "check_4bit_config"]


def check_4bit_config(
    in_features: int, out_features: int, quant_type: str, blocksize: int, quant_storage: torch.dtype
) -> None:
    """Raise ValueError (naming the argument) for a configuration the 4-bit ops cannot hold."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    check_blocksize(blocksize)
    if quant_storage not in STORAGE_DTYPES:
        raise ValueError(f"quant_storage must be one of {STORAGE_DTYPES}, got {quant_storage}")
    n = in_features * out_features
    if n % (2 * quant_storage.itemsize):
        raise ValueError(
            f"quant_storage={quant_storage} needs in_features * out_features ({n}) to be a multiple of "
            f"{2 * quant_storage.itemsize} (two 4-bit codes per byte); use quant_storage=torch.uint8"
        )


class Linear4bit(QuantizedLinear):
    """``y = x @ W.T + b`` with ``W`` quantized to 4 bits (NF4 or FP4), bitsandbytes-compatible.

    Args (bitsandbytes' order, plus ``blocksize`` and ``dtype``):
        in_features, out_features, bias: as ``nn.Linear``.
        compute_dtype: dtype of the matmul (None: the input's dtype).
        compress_statistics: double-quantize the absmax (8-bit, blocks of 256; saves ~0.4 bit/weight).
        quant_type: "fp4" (bitsandbytes' default) or "nf4".
        quant_storage: dtype the packed bytes are viewed as (uint8; bf16/fp16/fp32 for FSDP).
        blocksize: weights per absmax (power of two in [32, 4096]).
        device: where the layer lives; ``"meta"`` creates an empty layer to be filled by
            ``load_state_dict`` (a full-precision or a quantized checkpoint).
        dtype: dtype of the full-precision weight and of the bias (default: torch's default).

    The layer is usable at once: the weight is initialized as ``nn.Linear``'s and quantized. The
    packed weight is a frozen parameter (``requires_grad=False``); the bias is trainable.
    """

    quant_tensor_names = ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        blocksize: int = 64,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype, device, dtype)
        check_4bit_config(in_features, out_features, quant_type, blocksize, quant_storage)
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.compress_statistics = bool(compress_statistics)
        self.quant_storage = quant_storage
        self.set_weight(self.init_weight(device))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        compute_dtype: torch.dtype | None = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        blocksize: int = 64,
    ) -> Linear4bit:
        """Quantize an ``nn.Linear`` (on its device; a meta linear gives an empty meta layer).

        The bias parameter is shared with ``linear``, not copied."""
        return Linear4bit._from_linear(
            linear,
            compute_dtype=compute_dtype,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            quant_storage=quant_storage,
            blocksize=blocksize,
        )

    @property
    def nested(self) -> bool:
        """True when the absmax is double-quantized."""
        return self.nested_absmax is not None

    @property
    def quant_state(self) -> QuantState:
        """The weight's quantization state (a view of the layer's tensors, bitsandbytes' ``QuantState``)."""
        state2 = None
        if self.nested_absmax is not None:
            state2 = BlockwiseState(absmax=self.nested_absmax, code=self.nested_quant_map, blocksize=NESTED_BLOCKSIZE)
        return QuantState(
            absmax=self.absmax,
            shape=torch.Size(self.weight_shape),
            code=self.quant_map,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=self.weight_dtype,
            offset=self.offset,
            state2=state2,
        )

    def _adopt(self, packed: torch.Tensor, state: QuantState) -> None:
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.absmax = state.absmax
        self.quant_map = state.code
        self.offset = state.offset
        self.nested_absmax = None if state.state2 is None else state.state2.absmax
        self.nested_quant_map = None if state.state2 is None else state.state2.code
        self.quant_type = state.quant_type
        self.blocksize = state.blocksize
        self.compress_statistics = state.nested
        self.quant_storage = packed.dtype
        self.weight_dtype = state.dtype

    def _quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, QuantState]:
        return quantize_4bit(
            weight,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            compress_statistics=self.compress_statistics,
            quant_storage=self.quant_storage,
        )

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``[out_features, in_features]`` weight the layer computes with, in ``dtype``
        (default: the original weight dtype)."""
        return _dequantize_4bit(self.weight, self.quant_state, dtype=dtype)

    def load_quantized(self, weight: torch.Tensor, entries: Mapping[str, torch.Tensor], prefix: str, device: torch.device) -> None:
        state = QuantState.from_dict(entries, device=device, prefix=prefix + "weight.")
        blob = next((key for key in entries if key.startswith("quant_state.")), "quant_state")
        self._check_checkpoint_shape(state.shape, f"{prefix}weight.{blob}")
        n = state.shape.numel()
        nbytes = weight.numel() * weight.element_size()
        if weight.dtype not in STORAGE_DTYPES or nbytes != (n + 1) // 2:
            raise CheckpointFormatError(
                f"{prefix}weight: expected the packed 4-bit weight ((n + 1) // 2 = {(n + 1) // 2} bytes as one of "
                f"{STORAGE_DTYPES}), got shape {tuple(weight.shape)} {weight.dtype} ({nbytes} bytes)"
            )
        self._adopt(weight.detach().reshape(-1, 1).to(device), state)

    def _absmax_fp32(self) -> torch.Tensor:
        """Per-block fp32 absmax, reconstructed from the double-quantized one when nested."""
        if self.nested_absmax is None:
            return self.absmax
        inner = torch.ops.inductor_quant.dequantize_blockwise(
            self.absmax, self.nested_absmax, self.nested_quant_map, NESTED_BLOCKSIZE, torch.float32
        )
        return inner + self.offset

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if torch.compiler.is_compiling():
            weight = torch.ops.inductor_quant.dequantize_4bit(
                self.weight, self._absmax_fp32(), self.blocksize, self.quant_type, self.weight_shape, x.dtype
            )
            return F.linear(x, weight, bias)
        if self.nested_absmax is None:
            return torch.ops.inductor_quant.gemm_4bit(
                x, self.weight, self.weight_shape, self.absmax, self.blocksize, self.quant_type, bias
            )
        return torch.ops.inductor_quant.gemm_4bit(
            x,
            self.weight,
            self.weight_shape,
            self.nested_absmax,
            self.blocksize,
            self.quant_type,
            bias,
            self.absmax,
            self.nested_quant_map,
            self.offset,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, quant_type={self.quant_type!r}, blocksize={self.blocksize}, "
            f"compress_statistics={self.compress_statistics}, quant_storage={self.quant_storage}"
        )


class _FixedQuantType4bit(Linear4bit):
    """``Linear4bit`` whose ``quant_type`` is the class attribute ``fixed_quant_type``."""

    fixed_quant_type: str

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        compress_statistics: bool = True,
        quant_storage: torch.dtype = torch.uint8,
        blocksize: int = 64,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            bias,
            compute_dtype,
            compress_statistics,
            self.fixed_quant_type,
            quant_storage,
            blocksize,
            device,
            dtype,
        )


class LinearNF4(_FixedQuantType4bit):
    """``Linear4bit`` with ``quant_type="nf4"`` (bitsandbytes' ``LinearNF4``)."""

    fixed_quant_type = "nf4"


class LinearFP4(_FixedQuantType4bit):
    """``Linear4bit`` with ``quant_type="fp4"`` (bitsandbytes' ``LinearFP4``)."""

    fixed_quant_type = "fp4"
