"""Lowerings of the functional optimizer steps (``ops/optim_functional.py``).

``optimizer_step_32bit`` becomes pointwise nodes (one kernel per parameter once fused).
``optimizer_step_8bit_blockwise`` becomes, per state, a ``max |s_new|`` reduction over
256-element blocks plus pointwise nodes for the new codes and the new parameter, all recomputing
the same per-element update from the inputs. When ``p.numel() % 256 == 0`` every node runs over
``(blocks, 256)`` ranges, which is the shape Inductor fuses into a single persistent-reduction
kernel (dequantize -> update -> absmax -> requantize -> store) per parameter.

The per-element math is a transcription of ``reference/optim.py`` in Inductor ``ops``, operation
by operation and with the same fp32 roundings. Where the reference combines Python numbers in
double (``1 - beta1 ** step``, ``eps * c2``, ``1 - lr * weight_decay``) the lowering computes in
float64 from the scalar tensors and rounds to fp32 once, as the reference's scalar-to-tensor
promotion does. Explicit roundings of intermediate values to the parameter dtype (Lion, decoupled
weight decay) are real conversions (``use_compute_types=False``), not elided by the fp32 compute
type. Cases left to the op's kernel (an opaque call): ``max_unorm > 0`` (the update norm needs
a whole-tensor reduction before the update), and empty tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch._inductor import ir
from torch._inductor.virtualized import ops
from torch.utils._sympy.functions import FloorDiv

from ..reference.optim import OPTIMIZER_8BIT_BLOCKSIZE, TWO_STATE_OPTIMIZERS
from . import _ir

ops_ns = torch.ops.inductor_quant
BLOCK = OPTIMIZER_8BIT_BLOCKSIZE

# lamb and lars are adam and momentum plus update-norm clipping (reference._FORMULA).
_FORMULA = {"lamb": "adam", "lars": "momentum"}


def _f32(value: float) -> Any:
    return ops.constant(value, torch.float32)


def _to_f32(x: Any) -> Any:
    return ops.to_dtype(x, torch.float32)


def _round_to(x: Any, dtype: torch.dtype) -> Any:
    """fp32 ``x`` rounded to ``dtype`` and back (a no-op for fp32), never elided."""
    if dtype == torch.float32:
        return x
    return ops.to_dtype(ops.to_dtype(x, dtype, use_compute_types=False), torch.float32)


@dataclass
class _Scalars:
    """Loaders of the 1-element tensor arguments, as float64 values."""

    lr: Callable[[], Any]
    step: Callable[[], Any]
    beta3: Callable[[], Any]
    alpha: Callable[[], Any]

    @classmethod
    def create(cls, lr: ir.TensorBox, step: ir.TensorBox, beta3: ir.TensorBox, alpha: ir.TensorBox) -> _Scalars:
        def as_f64(x: ir.TensorBox) -> Callable[[], Any]:
            load = _ir.scalar_loader(x)
            return lambda: ops.to_dtype(load(), torch.float64)

        return cls(as_f64(lr), as_f64(step), as_f64(beta3), as_f64(alpha))

    def one_minus_lr_times(self, weight_decay: float) -> Any:
        """fp32 of the double ``1 - lr * weight_decay``."""
        one = ops.constant(1.0, torch.float64)
        return _to_f32(ops.sub(one, ops.mul(self.lr(), ops.constant(weight_decay, torch.float64))))

    def bias_corrections(self, beta1: float, beta2: float) -> tuple[Any, Any]:
        """Doubles ``c1 = 1 - beta1**step`` and ``c2 = sqrt(1 - beta2**step)``."""
        one = ops.constant(1.0, torch.float64)
        step = self.step()
        c1 = ops.sub(one, ops.pow(ops.constant(beta1, torch.float64), step))
        c2 = ops.sqrt(ops.sub(one, ops.pow(ops.constant(beta2, torch.float64), step)))
        return c1, c2


@dataclass
class _Hyper:
    formula: str
    beta1: float
    beta2: float
    eps: float
    scalars: _Scalars


def _new_states_and_direction(h: _Hyper, g: Any, s1: Callable[[int], Any], s2: Any) -> tuple[list[Any], Any, Any]:
    """``reference._new_states_and_direction``: fp32 new state-1 rows, new state 2 (or None) and
    the update direction. ``s1(row)`` gives the old state-1 value of a row."""
    b1, b2, eps = h.beta1, h.beta2, h.eps
    if h.formula == "adam":
        c1, c2 = h.scalars.bias_corrections(b1, b2)
        m = ops.add(ops.mul(_f32(b1), s1(0)), ops.mul(_f32(1 - b1), g))
        v = ops.add(ops.mul(_f32(b2), s2), ops.mul(ops.mul(_f32(1 - b2), g), g))
        eps_c2 = _to_f32(ops.mul(ops.constant(eps, torch.float64), c2))
        step_scale = _to_f32(ops.truediv(c2, c1))
        return [m], v, ops.mul(ops.truediv(m, ops.add(ops.sqrt(v), eps_c2)), step_scale)
    if h.formula == "ademamix":
        c1, c2 = h.scalars.bias_corrections(b1, b2)
        beta3 = h.scalars.beta3()
        m1 = ops.add(ops.mul(_f32(b1), s1(0)), ops.mul(_f32(1 - b1), g))
        one_minus_b3 = _to_f32(ops.sub(ops.constant(1.0, torch.float64), beta3))
        m2 = ops.add(ops.mul(_to_f32(beta3), s1(1)), ops.mul(one_minus_b3, g))
        nu = ops.add(ops.mul(_f32(b2), s2), ops.mul(ops.mul(_f32(1 - b2), g), g))
        numerator = ops.add(ops.truediv(m1, _to_f32(c1)), ops.mul(_to_f32(h.scalars.alpha()), m2))
        denominator = ops.add(ops.truediv(ops.sqrt(nu), _to_f32(c2)), _f32(eps))
        return [m1, m2], nu, ops.truediv(numerator, denominator)
    if h.formula == "momentum":
        first = ops.eq(h.scalars.step(), ops.constant(1.0, torch.float64))
        m = ops.where(first, g, ops.add(ops.mul(_f32(b1), s1(0)), g))
        return [m], None, m
    if h.formula == "lion":
        direction = ops.sign(ops.add(ops.mul(_f32(b1), s1(0)), ops.mul(_f32(1 - b1), g)))
        return [ops.add(ops.mul(_f32(b2), s1(0)), ops.mul(_f32(1 - b2), g))], None, direction
    if h.formula == "rmsprop":
        v = ops.add(ops.mul(_f32(b1), s1(0)), ops.mul(ops.mul(_f32(1 - b1), g), g))
        return [v], None, ops.truediv(g, ops.add(ops.sqrt(v), _f32(eps)))
    if h.formula == "adagrad":
        v = ops.add(s1(0), ops.mul(g, g))
        return [v], None, ops.truediv(g, ops.add(ops.sqrt(v), _f32(eps)))
    raise AssertionError(h.formula)


def _is_finite(x: Any) -> Any:
    return ops.logical_not(ops.logical_or(ops.isnan(x), ops.isinf(x)))


# --------------------------------------------------------------------------------------------
# 8-bit blockwise


@dataclass
class _Update:
    """The per-element results of one step at a flat index: new p (fp32, already rounded to
    p's dtype), the new fp32 state-1 rows and the new fp32 state 2 (or None)."""

    p: Any
    state1: list[Any]
    state2: Any


def _sign_fixed_code(value: Any, normalized: Any, load_qmap: _ir.Loader, signed: bool) -> Any:
    """``reference.requantize_state``'s code choice for one fp32 state value."""
    code = _ir.nearest_code_256(normalized, load_qmap)
    if signed:
        code_value = _ir.gather(load_qmap, code, 256)
        zero = _f32(0.0)
        down = ops.logical_and(ops.lt(value, zero), ops.ge(code_value, zero))
        up = ops.logical_and(ops.gt(value, zero), ops.lt(code_value, zero))
        code = ops.add(ops.sub(code, ops.to_dtype(down, torch.int32)), ops.to_dtype(up, torch.int32))
    return ops.to_dtype(code, torch.uint8)


def _select_row(row: sympy.Expr, values: list[Any]) -> Any:
    """``values[row]`` for a row index that is a constant or a loop variable."""
    if len(values) == 1:
        return values[0]
    if isinstance(row, (int, sympy.Integer)):
        return values[int(row)]
    return ops.where(ops.eq(_ir.index_value(row), ops.constant(0, torch.int64)), values[0], values[1])


def optimizer_step_8bit_blockwise(
    optimizer_name, g, p, state1, state2, qmap1, qmap2, absmax1, absmax2, lr, step,
    beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale, skip_zeros=False,
):
    n = _ir.numel(p.get_size())
    if _ir.is_zero(n):
        return _ir.fallback(
            ops_ns.optimizer_step_8bit_blockwise.default, optimizer_name, g, p, state1, state2, qmap1, qmap2,
            absmax1, absmax2, lr, step, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale, skip_zeros,
        )
    device = p.get_device()
    p_dtype = p.get_dtype()
    formula = optimizer_name
    two_state = optimizer_name in TWO_STATE_OPTIMIZERS
    rows = 2 if formula == "ademamix" else 1
    blocks = _ir.CeilDiv(n, BLOCK)
    h = _Hyper(formula, beta1, beta2, eps, _Scalars.create(lr, step, beta3, alpha))

    load_g, load_p = _ir.flat_loader(g), _ir.flat_loader(p)
    load_q1, load_qmap1 = _ir.flat_loader(state1), _ir.flat_loader(qmap1)
    old_absmax1 = _ir.block_loader(absmax1, n, BLOCK)
    if two_state:
        load_q2, load_qmap2 = _ir.flat_loader(state2), _ir.flat_loader(qmap2)
        old_absmax2 = _ir.block_loader(absmax2, n, BLOCK)

    def update(i: sympy.Expr) -> _Update:
        """``reference.update_8bit_blockwise`` for flat element ``i``."""
        raw_g = _ir.load_f32(load_g, i)
        p_old = _ir.load_f32(load_p, i)
        p32 = p_old
        grad = ops.mul(raw_g, _f32(gnorm_scale))

        def s1(row: int) -> Any:
            code = ops.to_dtype(load_q1(row * n + i), torch.int32)
            return ops.mul(_ir.gather(load_qmap1, code, 256), old_absmax1(i, row * blocks))

        s2 = None
        if two_state:
            code2 = ops.to_dtype(load_q2(i), torch.int32)
            s2 = ops.mul(_ir.gather(load_qmap2, code2, 256), old_absmax2(i))
        if not two_state and formula != "lion" and weight_decay > 0:
            grad = ops.add(grad, ops.mul(_f32(weight_decay), p32))
        if formula == "lion" and weight_decay > 0:
            p32 = _round_to(ops.mul(p32, h.scalars.one_minus_lr_times(weight_decay)), p_dtype)
        new1, new2, direction = _new_states_and_direction(h, grad, s1, s2)
        lr32 = _to_f32(h.scalars.lr())
        if formula == "lion":
            new_p = _round_to(ops.sub(p32, _round_to(ops.mul(lr32, direction), p_dtype)), p_dtype)
        else:
            new_p = _round_to(ops.sub(p32, ops.mul(lr32, direction)), p_dtype)
        if two_state and weight_decay > 0:
            new_p = _round_to(ops.mul(new_p, h.scalars.one_minus_lr_times(weight_decay)), p_dtype)
        if two_state:
            finite = _is_finite(raw_g)
            new_p = ops.where(finite, new_p, p_old)
            new1 = [ops.where(finite, s, _f32(0.0)) for s in new1]
            new2 = ops.where(finite, new2, _f32(0.0))
        elif skip_zeros:
            keep = ops.ne(raw_g, _f32(0.0))
            new_p = ops.where(keep, new_p, p_old)
            new1 = [ops.where(keep, new1[0], s1(0))]
        return _Update(new_p, new1, new2)

    whole = _ir.statically_multiple_of(n, BLOCK)

    def elementwise(fn: Callable[[sympy.Expr, sympy.Expr], Any], dtype: torch.dtype, nrows: int = 1) -> ir.TensorBox:
        """Pointwise node computing ``fn(row, i)`` over ``([nrows,] blocks, 256)`` ranges (or
        ``([nrows,] n)`` for a partial last block)."""
        lead = [sympy.Integer(nrows)] if nrows > 1 else []

        def inner_fn(idx: _ir.Index) -> Any:
            row, rest = (idx[0], idx[1:]) if nrows > 1 else (sympy.S.Zero, idx)
            return fn(row, rest[0] * BLOCK + rest[1] if whole else rest[0])

        return _ir.pointwise(device, dtype, inner_fn, [*lead, *([FloorDiv(n, BLOCK), BLOCK] if whole else [n])])

    def requantized(values: Callable[[sympy.Expr, sympy.Expr], Any], qmap: _ir.Loader, nrows: int, signed: bool):
        """``reference.requantize_state`` of new fp32 state rows: (codes, absmax)."""
        absmax = _ir.block_absmax(device, values, n, BLOCK, rows=nrows)
        new_absmax = _ir.block_loader(absmax, n, BLOCK)

        def code(row: sympy.Expr, i: sympy.Expr) -> Any:
            value = values(row, i)
            normalized = _ir.normalize(value, new_absmax(i, row * blocks))
            return _sign_fixed_code(value, normalized, qmap, signed)

        return elementwise(code, torch.uint8, nrows), absmax

    codes1, new_absmax1 = requantized(lambda row, i: _select_row(row, update(i).state1), load_qmap1, rows, signed=True)
    new_p = elementwise(lambda row, i: ops.to_dtype(update(i).p, p_dtype), p_dtype)
    outputs = [
        _ir.reshape(new_p, p.get_size()),
        _ir.reshape(codes1, state1.get_size()),
        _ir.reshape(new_absmax1, absmax1.get_size()),
    ]
    if two_state:
        codes2, new_absmax2 = requantized(lambda row, i: update(i).state2, load_qmap2, 1, signed=False)
        outputs += [_ir.reshape(codes2, state2.get_size()), _ir.reshape(new_absmax2, absmax2.get_size())]
    return outputs


# --------------------------------------------------------------------------------------------
# 32-bit


def optimizer_step_32bit(
    optimizer_name, g, p, state1, state2, lr, step, beta1, beta2, beta3, alpha, eps, weight_decay,
    gnorm_scale, skip_zeros=False, max_unorm=0.0, param_norm=None,
):
    args = (
        optimizer_name, g, p, state1, state2, lr, step, beta1, beta2, beta3, alpha, eps, weight_decay,
        gnorm_scale, skip_zeros, max_unorm, param_norm,
    )
    n = _ir.numel(p.get_size())
    if max_unorm > 0 or _ir.is_zero(n):
        return _ir.fallback(ops_ns.optimizer_step_32bit.default, *args)
    device = p.get_device()
    p_dtype = p.get_dtype()
    formula = _FORMULA.get(optimizer_name, optimizer_name)
    two_state = optimizer_name in TWO_STATE_OPTIMIZERS
    rows = 2 if formula == "ademamix" else 1
    h = _Hyper(formula, beta1, beta2, eps, _Scalars.create(lr, step, beta3, alpha))
    load_g, load_p, load_s1 = _ir.flat_loader(g), _ir.flat_loader(p), _ir.flat_loader(state1)
    load_s2 = _ir.flat_loader(state2) if two_state else None

    def update(i: sympy.Expr) -> _Update:
        raw_g = _ir.load_f32(load_g, i)
        p_old = _ir.load_f32(load_p, i)
        p32 = p_old
        grad = ops.mul(raw_g, _f32(gnorm_scale))
        if not two_state and formula != "lion" and weight_decay > 0:
            grad = ops.add(grad, ops.mul(_f32(weight_decay), p32))

        def s1(row: int) -> Any:
            return _ir.load_f32(load_s1, row * n + i)

        s2 = _ir.load_f32(load_s2, i) if two_state else None
        new1, new2, direction = _new_states_and_direction(h, grad, s1, s2)
        keep = ops.ne(raw_g, _f32(0.0)) if skip_zeros and formula != "ademamix" else None
        if keep is not None:
            direction = ops.where(keep, direction, _f32(0.0))
        if formula == "lion" and weight_decay > 0:
            p32 = ops.mul(p32, h.scalars.one_minus_lr_times(weight_decay))
        new_p = _round_to(ops.sub(p32, ops.mul(_to_f32(h.scalars.lr()), direction)), p_dtype)
        if two_state and weight_decay > 0:
            new_p = _round_to(ops.mul(new_p, h.scalars.one_minus_lr_times(weight_decay)), p_dtype)
        if keep is not None:
            new_p = ops.where(keep, new_p, p_old)
            new1 = [ops.where(keep, s, s1(r)) for r, s in enumerate(new1)]
            new2 = None if new2 is None else ops.where(keep, new2, s2)
        return _Update(new_p, new1, new2)

    new_p = _ir.pointwise(device, p_dtype, lambda idx: ops.to_dtype(update(idx[0]).p, p_dtype), [n])
    if rows == 1:
        new1 = _ir.pointwise(device, torch.float32, lambda idx: update(idx[0]).state1[0], [n])
    else:

        def row_value(idx: _ir.Index) -> Any:
            values = update(idx[1]).state1
            return ops.where(ops.eq(_ir.index_value(idx[0]), ops.constant(0, torch.int64)), values[0], values[1])

        new1 = _ir.pointwise(device, torch.float32, row_value, [sympy.Integer(rows), n])
    outputs = [_ir.reshape(new_p, p.get_size()), _ir.reshape(new1, state1.get_size())]
    if two_state:
        new2 = _ir.pointwise(device, torch.float32, lambda idx: update(idx[0]).state2, [n])
        outputs.append(_ir.reshape(new2, state2.get_size()))
    return outputs


def register() -> None:
    _ir.register(ops_ns.optimizer_step_8bit_blockwise.default, optimizer_step_8bit_blockwise)
    _ir.register(ops_ns.optimizer_step_32bit.default, optimizer_step_32bit)
