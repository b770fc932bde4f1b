"""Lowerings of the quantized-weight matmuls for the C++ backend: ``gemm_4bit``,
``gemm_4bit_grouped``, ``gemm_4bit_swiglu`` and ``linear_8bit``.

The dequantize+linear passes put these ops in place of a dequantize feeding a matmul. On devices
with the fused Triton kernels (CUDA, XPU) they stay calls of those kernels. On CPU their
implementation is the pure-torch reference, which builds the dequantized weight out of several
full-size temporaries on every call (a 704x256 NF4 weight at one row of activations: 620 µs per
call on a 2-core machine, against 150 µs for the code below; a 4096x4096 one: 108 ms against
8 ms). So on CPU each op becomes Inductor IR around the weight's own dequantize lowering:

* one row of activations (decode): ``out[n] = sum_k a[k] * w[n, k]`` as one reduction over ``K``
  in fp32, with the dequantized weight computed inside it (never written to memory), the bias
  added and the sum rounded to the activations' dtype once. Inside the reduction Inductor keeps
  the weight in fp32 (``code * absmax`` unrounded, as the GPU GEMV kernel uses it), where the
  reference rounds it to a 16-bit activation dtype first;
* more rows: the dequantized weight in the activations' dtype (one generated kernel, exactly the
  reference's weight) and ``mm`` / ``addmm``.

A group (``gemm_4bit_grouped``, ``gemm_4bit_swiglu``) is one product per weight, concatenated:
stacking the dequantized weights with ``cat`` first would make Inductor write them to a buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import sympy
import torch
from torch._inductor import ir
from torch._inductor.lowering import add_layout_constraint, lowerings, tag_to_layout_constraint
from torch._inductor.virtualized import V, ops
from torch._library.utils import get_layout_constraint_tag

from ..ops.gemm import NESTED_BLOCKSIZE, grouped_weights
from . import _ir, blockwise, fourbit

aten = torch.ops.aten
ops_ns = torch.ops.inductor_quant


GENERATED_DEVICES = ("cpu",)
"""Device types where the ops become generated code; elsewhere they stay calls of their kernels."""


def _generated(A: ir.TensorBox) -> bool:
    return A.get_device().type in GENERATED_DEVICES  # read at lowering time: tests narrow it


def _row_times_weight(A: ir.TensorBox, weight: ir.TensorBox, bias: ir.TensorBox | None) -> ir.TensorBox:
    """``F.linear`` of the single row of ``A [..., K]`` with ``weight [N, K]`` as one fp32
    reduction over ``K`` that reads the weight through its loader: ``[1, N]``."""
    device, dtype = A.get_device(), A.get_dtype()
    N, K = weight.get_size()
    load_a = _ir.flat_loader(A)
    load_w = weight.make_loader()

    def product(index: _ir.Index, rindex: _ir.Index):
        return ops.mul(_ir.load_f32(load_a, rindex[0]), ops.to_dtype(load_w([index[0], rindex[0]]), torch.float32))

    sums = ir.Reduction.create(
        device=device, dst_dtype=torch.float32, src_dtype=torch.float32, inner_fn=product, ranges=[N],
        reduction_ranges=[K], reduction_type="sum",
    )
    sums.realize()
    load_sum = sums.make_loader()
    load_bias = bias.make_loader() if bias is not None else None

    def finish(index: _ir.Index):
        total = load_sum([index[1]])
        if load_bias is not None:
            total = ops.add(total, ops.to_dtype(load_bias([index[1]]), torch.float32))
        return ops.to_dtype(total, dtype)

    return _ir.pointwise(device, dtype, finish, [sympy.S.One, N])


def _linear(A: ir.TensorBox, weight: ir.TensorBox, bias: ir.TensorBox | None) -> ir.TensorBox:
    """``F.linear(A, weight, bias)`` for ``A [..., K]`` and ``weight [N, K]`` in A's dtype."""
    sizes = A.get_size()
    K, N = sizes[-1], weight.get_size()[0]
    rows = _ir.numel(sizes[:-1])
    if V.graph.sizevars.statically_known_equals(rows, 1):
        out = _row_times_weight(A, weight, bias)
    else:
        A2 = _ir.reshape(A, [rows, K])
        weight_t = lowerings[aten.permute.default](weight, [1, 0])
        if bias is None:
            out = lowerings[aten.mm.default](A2, weight_t)
        else:
            out = lowerings[aten.addmm.default](bias, A2, weight_t)
    return _ir.reshape(out, [*sizes[:-1], N])


def _scales(absmax: ir.TensorBox, absmax_8bit, absmax_code, absmax_offset) -> ir.TensorBox:
    """fp32 per-block scales, double quantization undone (``reference.fourbit.resolve_absmax``)."""
    if absmax_8bit is None:
        return absmax
    inner = blockwise.dequantize_blockwise(absmax_8bit, absmax, absmax_code, NESTED_BLOCKSIZE, torch.float32)
    load_inner = inner.make_loader()
    load_offset = _ir.scalar_loader(absmax_offset)
    return _ir.pointwise(
        inner.get_device(), torch.float32,
        lambda index: ops.add(load_inner(index), ops.to_dtype(load_offset(), torch.float32)), inner.get_size(),
    )


def _product_4bit(A, B, N, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset) -> ir.TensorBox:
    K = A.get_size()[-1]
    scales = _scales(absmax, absmax_8bit, absmax_code, absmax_offset)
    weight = fourbit.dequantize_4bit(B, scales, blocksize, quant_type, [N, K], A.get_dtype())
    return _linear(A, weight, bias)


def gemm_4bit(A, B, shapeB: Sequence, absmax, blocksize: int, quant_type: str, bias=None, absmax_8bit=None,
              absmax_code=None, absmax_offset=None) -> ir.TensorBox:
    if not _generated(A):
        return _ir.fallback(ops_ns.gemm_4bit.default, A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit,
                            absmax_code, absmax_offset)
    return _product_4bit(A, B, shapeB[0], absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
                         absmax_offset)


def _products(A, B, out_features, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
              absmax_offset) -> list[ir.TensorBox]:
    """The product of ``A`` with each weight of a group (``ops.gemm.grouped_weights``)."""
    return [
        _product_4bit(A, B_g, N, absmax_g, blocksize, quant_type, bias_g, absmax_8bit_g, absmax_code_g, absmax_offset_g)
        for B_g, N, absmax_g, bias_g, absmax_8bit_g, absmax_code_g, absmax_offset_g
        in grouped_weights(B, out_features, absmax, bias, absmax_8bit, absmax_code, absmax_offset)
    ]


def gemm_4bit_grouped(A, B, out_features: Sequence, absmax, blocksize: int, quant_type: str, bias=None,
                      absmax_8bit=None, absmax_code=None, absmax_offset=None) -> ir.TensorBox:
    if not _generated(A):
        return _ir.fallback(ops_ns.gemm_4bit_grouped.default, A, B, out_features, absmax, blocksize, quant_type, bias,
                            absmax_8bit, absmax_code, absmax_offset)
    products = _products(A, B, out_features, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
                         absmax_offset)
    return lowerings[aten.cat.default](products, -1)


def gemm_4bit_swiglu(A, B, out_features: Sequence, absmax, blocksize: int, quant_type: str, bias=None,
                     absmax_8bit=None, absmax_code=None, absmax_offset=None) -> ir.TensorBox:
    """``silu(gate) * up`` of the two products with ``reference.fourbit.swiglu``'s ops (fp32, each
    rounded to the dtype; inside the fused kernel Inductor may keep those intermediates in fp32)."""
    if not _generated(A):
        return _ir.fallback(ops_ns.gemm_4bit_swiglu.default, A, B, out_features, absmax, blocksize, quant_type, bias,
                            absmax_8bit, absmax_code, absmax_offset)
    gate, up = _products(A, B, out_features, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
                         absmax_offset)
    dtype = A.get_dtype()
    load_gate, load_up = gate.make_loader(), up.make_loader()

    def swiglu(index: _ir.Index):
        g = ops.to_dtype(load_gate(index), torch.float32)
        activated = ops.to_dtype(ops.to_dtype(ops.mul(g, ops.sigmoid(g)), dtype), torch.float32)
        return ops.to_dtype(ops.mul(activated, ops.to_dtype(load_up(index), torch.float32)), dtype)

    return _ir.pointwise(A.get_device(), dtype, swiglu, gate.get_size())


def linear_8bit(A, B, absmax, code, blocksize: int, bias=None) -> ir.TensorBox:
    if not _generated(A):
        return _ir.fallback(ops_ns.linear_8bit.default, A, B, absmax, code, blocksize, bias)
    weight = blockwise.dequantize_blockwise(B, absmax, code, blocksize, A.get_dtype())
    return _linear(A, weight, bias)


def register() -> None:
    for op, lowering in (
        (ops_ns.gemm_4bit.default, gemm_4bit),
        (ops_ns.gemm_4bit_grouped.default, gemm_4bit_grouped),
        (ops_ns.gemm_4bit_swiglu.default, gemm_4bit_swiglu),
        (ops_ns.linear_8bit.default, linear_8bit),
    ):
        _ir.register(op, lowering)
        # the inputs' layout rule Inductor gives an op it calls without a lowering (the default
        # tag: eager strides), so the calls on GPU see what they saw before these lowerings
        add_layout_constraint(op, tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True)))
