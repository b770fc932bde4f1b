"""``Linear8bit``: a weight-only linear layer with a blockwise 8-bit weight (dynamic map).

The weight is stored as one uint8 index per element into the 256-entry signed dynamic map
(bitsandbytes' 8-bit code), with one fp32 absmax per ``blocksize`` weights (256 by default), i.e.
``8 + 32 / blocksize`` bits per weight. This is not bitsandbytes' ``Linear8bitLt`` (LLM.int8:
row-wise int8 with outlier decomposition); it is the blockwise scheme of its 8-bit optimizers
applied to a weight: about twice the memory of 4-bit, with a much smaller error.

``forward`` is ``F.linear(x, dequantize_blockwise(weight), bias)`` eagerly and compiled (the
pattern an Inductor pass can fuse); gradients reach the input and the bias, the weight is frozen.

Checkpoint entries: ``weight`` (uint8 ``[out, in]``), ``bias``, ``weight.absmax``,
``weight.quant_map`` and ``weight.quant_state.inductor_quant__blockwise8`` (JSON: blocksize,
dtype, shape), in the style of bitsandbytes' 4-bit entries.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..quant_state import BlockwiseState, CheckpointFormatError, quantize_blockwise
from ..quant_state import dequantize_blockwise as _dequantize_blockwise
from ._base import QuantizedLinear, check_blocksize

__all__ = ["Linear8bit"]


class Linear8bit(QuantizedLinear):
    """``y = x @ W.T + b`` with ``W`` quantized blockwise to 8 bits with the dynamic map.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        compute_dtype: dtype of the matmul (None: the input's dtype).
        blocksize: weights per absmax (power of two in [32, 4096]; default 256).
        device: where the layer lives (``"meta"``: empty, to be filled by ``load_state_dict``).
        dtype: dtype of the full-precision weight and of the bias.
    """

    quant_tensor_names = ("weight", "absmax", "quant_map")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        blocksize: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype, device, dtype)
        check_blocksize(blocksize)
        self.blocksize = blocksize
        self.set_weight(self.init_weight(device))

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, *, compute_dtype: torch.dtype | None = None, blocksize: int = 256) -> Linear8bit:
        """Quantize an ``nn.Linear`` (on its device); the bias parameter is shared, not copied."""
        return Linear8bit._from_linear(linear, compute_dtype=compute_dtype, blocksize=blocksize)

    @property
    def quant_state(self) -> BlockwiseState:
        """The weight's quantization state (a view of the layer's tensors)."""
        return BlockwiseState(
            absmax=self.absmax,
            code=self.quant_map,
            blocksize=self.blocksize,
            dtype=self.weight_dtype,
            shape=torch.Size(self.weight_shape),
        )

    def _adopt(self, codes: torch.Tensor, state: BlockwiseState) -> None:
        self.weight = torch.nn.Parameter(codes, requires_grad=False)
        self.absmax = state.absmax
        self.quant_map = state.code
        self.blocksize = state.blocksize
        self.weight_dtype = state.dtype

    def _quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, BlockwiseState]:
        return quantize_blockwise(weight, blocksize=self.blocksize)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``[out_features, in_features]`` weight the layer computes with."""
        return _dequantize_blockwise(self.weight, self.quant_state, dtype=dtype)

    def load_quantized(self, weight: torch.Tensor, entries: Mapping[str, torch.Tensor], prefix: str, device: torch.device) -> None:
        state = BlockwiseState.from_dict(entries, device=device, prefix=prefix + "weight.")
        self._check_checkpoint_shape(state.shape, f"{prefix}weight.quant_state.inductor_quant__blockwise8")
        if weight.dtype != torch.uint8 or tuple(weight.shape) != tuple(self.weight_shape):
            raise CheckpointFormatError(
                f"{prefix}weight: expected uint8 codes of shape {tuple(self.weight_shape)}, got "
                f"{tuple(weight.shape)} {weight.dtype}"
            )
        self._adopt(weight.detach().to(device), state)

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weight = torch.ops.inductor_quant.dequantize_blockwise(self.weight, self.absmax, self.quant_map, self.blocksize, x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, blocksize={self.blocksize}"
