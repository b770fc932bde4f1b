"""Small quantized programs to inspect: a 2-layer NF4 MLP, two variants that exercise the
"several consumers" and "not fused" paths, and the built-in TinyLlama quantized to NF4 (the
model of ``inductor-quant inspect --demo``).

The MLPs' layers are ``nn.Linear`` weights quantized once with ``quantize_4bit`` (NF4); their
forward writes ``dequantize_4bit`` + ``F.linear``, the graph the dequantize+linear pattern pass
looks for. Weights are seeded, so every run (and every snapshot) sees the same graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import inductor_quant.ops  # noqa: F401  (registers torch.ops.inductor_quant)

__all__ = [
    "NF4Linear",
    "TwoLayerMLP",
    "SharedWeightMLP",
    "WidenedWeightMLP",
    "two_layer_mlp",
    "shared_weight_mlp",
    "widened_weight_mlp",
    "tiny_llama_nf4",
]

BLOCKSIZE = 64


class NF4Linear(nn.Module):
    """``F.linear(x, dequantize_4bit(W), bias)`` with ``W`` taken from an ``nn.Linear`` and stored as NF4."""

    def __init__(self, linear: nn.Linear, blocksize: int = BLOCKSIZE) -> None:
        super().__init__()
        packed, absmax = torch.ops.inductor_quant.quantize_4bit(linear.weight.detach(), blocksize, "nf4", torch.uint8)
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.blocksize = blocksize
        self.shape = [linear.out_features, linear.in_features]

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.ops.inductor_quant.dequantize_4bit(self.packed, self.absmax, self.blocksize, "nf4", self.shape, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight(x.dtype), bias)


class TwoLayerMLP(nn.Module):
    """``fc2(relu(fc1(x)))`` with both layers NF4."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = NF4Linear(nn.Linear(dim, hidden))
        self.fc2 = NF4Linear(nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class SharedWeightMLP(nn.Module):
    """One NF4 weight used twice: by a linear and by a weight-norm penalty.

    The dequantized weight has two consumers, so it is materialized once rather than fused into
    the matmul: the case the report must flag as "not fused" with that reason.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = NF4Linear(nn.Linear(dim, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc.weight(x.dtype)
        return F.linear(x, w) + w.square().mean()


class WidenedWeightMLP(nn.Module):
    """An NF4 weight dequantized to bf16, then widened to fp32 for an fp32 matmul.

    The dequantize+linear pass refuses it (the fused op would skip the rounding to bf16), so the
    dequantized weight is materialized and read by the matmul: the case the report must flag as
    "not fused", with the pass's reason.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = NF4Linear(nn.Linear(dim, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fc.weight(torch.bfloat16).float())


def two_layer_mlp(
    dim: int = 64, hidden: int = 128, batch: int = 2, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """``(TwoLayerMLP, (x,))``, seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TwoLayerMLP(dim, hidden).to(device)
        x = torch.randn(batch, dim, device=device, dtype=dtype)
    return model, (x,)


def shared_weight_mlp(
    dim: int = 64, batch: int = 2, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """``(SharedWeightMLP, (x,))``, seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SharedWeightMLP(dim).to(device)
        x = torch.randn(batch, dim, device=device, dtype=dtype)
    return model, (x,)


def widened_weight_mlp(dim: int = 64, batch: int = 2, device: str = "cpu") -> tuple[nn.Module, tuple[torch.Tensor]]:
    """``(WidenedWeightMLP, (x,))`` with fp32 ``x``, seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WidenedWeightMLP(dim).to(device)
        x = torch.randn(batch, dim, device=device)
    return model, (x,)

def tiny_llama_nf4(
    device: str = "cpu", dtype: torch.dtype = torch.float32, seq_len: int = 8
) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """``(TinyLlama with NF4 linears, (tokens,))``: the built-in model (``inductor_quant.models``),
    small enough to compile in about a minute on a CPU, quantized by ``inductor_quant.nn.quantize_model``
    (``lm_head`` stays full precision)."""
    from ..models import TinyLlamaConfig, build_model
    from ..nn import quantize_model

    config = TinyLlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=256, max_seq_len=max(32, seq_len))
    model = build_model(config, seed=0, dtype=dtype, device=device)
    quantize_model(model, quant_type="nf4")
    model.requires_grad_(False)  # an inference graph, as when serving
    tokens = torch.arange(seq_len, device=device).remainder(config.vocab_size).unsqueeze(0)
    return model, (tokens,)
