"""dequantize + linear -> one quantized matmul (``gemm_4bit`` / ``linear_8bit``).

After AOT autograd, ``F.linear(x, dequantize(W), bias)`` reaches the post-grad graph as
``mm(x2d, permute(dequantize(...), [1, 0]))`` or ``addmm(bias, x2d, permute(...))``, with 3-D
inputs flattened by views around the matmul. This pass rewrites those matmuls:

* ``dequantize_4bit`` (plain fp32 absmax, or a double-quantized absmax
  ``dequantize_blockwise(absmax_8bit, absmax, code, 256, fp32) + offset``) ->
  ``gemm_4bit(x2d, B, shape, absmax, blocksize, quant_type, bias[, absmax_8bit, code, offset])``,
  whose GPU kernel picks the fused GEMV/GEMM for small M and dequantize + cuBLAS for large M;
* ``dequantize_blockwise`` of a 2-D ``[N, K]`` code tensor -> ``linear_8bit(x2d, B, absmax, code,
  blocksize, bias)``.

Variants matched: ``mm``/``addmm`` (default ``beta``/``alpha``), with an optional dtype
conversion before or after the transpose, and the matrix-vector form that Inductor decomposes a
one-row ``mm`` into on GPU under ``coordinate_descent_tuning`` (gpt-fast's setting):
``sum(x.unsqueeze(2) * W.t().unsqueeze(0), [1])``, with both factors widened to fp32 and the sum
rounded back for 16-bit inputs (``mv`` below). A conversion is accepted only from an fp32 dequantize
(``dequantize(fp32).to(bf16)`` rounds the same fp32 product once, as the fused op does); a weight
dequantized to a narrower dtype and widened for the matmul is left alone, because the fused op
would skip that rounding. Views on the activation side stay where they are (the pass matches
the 2-D matmul).

Several consumers: every matmul consumer of a dequantize is rewritten on its own (each fused op
reads the packed weight itself), and the dequantize stays for any other consumer; the decision
is recorded once per dequantize (``records.fusion_decisions()``, counter
``dequant_multi_consumer``). Rejected candidates are recorded with the reason.

Counters (``counters["inductor_quant"]``): ``gemm_4bit_mm``, ``gemm_4bit_addmm``, ``gemm_4bit_mv``,
``gemm_4bit_nested_mm``/``_addmm``/``_mv``, ``linear_8bit_mm``/``_addmm``/``_mv`` (one per rewrite)
and ``dequant_linear_nodes`` (FX nodes matched by those rewrites).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch._inductor.pattern_matcher import (
    MULTIPLE,
    CallFunction,
    KeywordArg,
    Match,
    PatternExpr,
    PatternMatcherPass,
    register_graph_pattern,
)

from ..ops._checks import FLOAT_DTYPES
from ..ops.gemm import NESTED_BLOCKSIZE
from . import records

__all__ = ["register_dequant_linear_patterns", "FUSED_TARGETS"]

aten = torch.ops.aten
prims = torch.ops.prims
iq = torch.ops.inductor_quant

FUSED_TARGETS = (iq.gemm_4bit.default, iq.linear_8bit.default)
"""Ops this pass inserts (the pass manager gives them eager-stride metadata)."""


def _dequantize_4bit(absmax: PatternExpr | KeywordArg) -> PatternExpr:
    return CallFunction(
        iq.dequantize_4bit.default,
        KeywordArg("B"),
        absmax,
        KeywordArg("blocksize"),
        KeywordArg("quant_type"),
        KeywordArg("shape"),
        KeywordArg("dq_dtype"),
        _users=MULTIPLE,
    )


_NESTED_ABSMAX = CallFunction(
    aten.add.Tensor,
    CallFunction(
        iq.dequantize_blockwise.default,
        KeywordArg("absmax_8bit"),
        KeywordArg("absmax"),
        KeywordArg("absmax_code"),
        KeywordArg("nested_blocksize"),
        KeywordArg("nested_dtype"),
    ),
    KeywordArg("absmax_offset"),
)

_DEQUANTIZE_BLOCKWISE = CallFunction(
    iq.dequantize_blockwise.default,
    KeywordArg("B"),
    KeywordArg("absmax"),
    KeywordArg("code"),
    KeywordArg("blocksize"),
    KeywordArg("dq_dtype"),
    _users=MULTIPLE,
)

# name -> (weight producer pattern, fused op kind)
_WEIGHTS: dict[str, tuple[PatternExpr, str]] = {
    "gemm_4bit_nested": (_dequantize_4bit(_NESTED_ABSMAX), "4bit"),
    "gemm_4bit": (_dequantize_4bit(KeywordArg("absmax")), "4bit"),
    "linear_8bit": (_DEQUANTIZE_BLOCKWISE, "8bit"),
}


def _transposed_weights(weight: PatternExpr) -> list[PatternExpr]:
    """``W.t()`` as the post-grad graph spells it, optionally with a dtype conversion on either side."""

    def permute(x: PatternExpr) -> PatternExpr:
        return CallFunction(aten.permute.default, x, KeywordArg("perm"), _users=MULTIPLE)

    def convert(x: PatternExpr) -> PatternExpr:
        return CallFunction(prims.convert_element_type.default, x, KeywordArg("to_dtype"), _users=MULTIPLE)

    return [permute(weight), convert(permute(weight)), permute(convert(weight))]


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _find(match: Match, target: Any) -> torch.fx.Node:
    return next(n for n in match.nodes if n.target == target)


def _reject(pattern: str, match: Match, reason: str) -> bool:
    records.record(pattern, match.output_node(), "not rewritten", reason)
    return False


def _check(pattern: str, kind: str, match: Match) -> bool:
    """Whether the fused op computes exactly what the matched subgraph does; records why not."""
    kw = match.kwargs
    matmul = match.output_node()
    scaling = {**dict(zip(("beta", "alpha"), matmul.args[3:])), **matmul.kwargs}
    if any(scaling.get(k, 1) != 1 for k in ("beta", "alpha")):
        return _reject(pattern, match, f"addmm scales its terms ({scaling}); the fused op computes bias + x @ W.t()")
    x = _val(kw["x"])
    if x is None or not isinstance(x, torch.Tensor):
        return _reject(pattern, match, "the activation has no tensor metadata")
    if list(kw["perm"]) != [1, 0]:
        return _reject(pattern, match, f"the weight is permuted by {list(kw['perm'])}, not transposed")
    if x.dtype not in FLOAT_DTYPES:
        return _reject(pattern, match, f"activation dtype {x.dtype} is not fp16/bf16/fp32")
    dq_dtype = kw["dq_dtype"]
    weight_dtype = kw.get("to_dtype", dq_dtype)
    if weight_dtype != x.dtype:
        return _reject(pattern, match, f"the weight reaches the matmul as {weight_dtype}, the activation is {x.dtype}")
    if "to_dtype" in kw and dq_dtype not in (torch.float32, weight_dtype):
        return _reject(
            pattern,
            match,
            f"the weight is dequantized to {dq_dtype} and converted to {weight_dtype}: the fused op would skip "
            f"the rounding to {dq_dtype}",
        )
    weight = _val(_find(match, iq.dequantize_4bit.default if kind == "4bit" else iq.dequantize_blockwise.default))
    if weight is None or weight.dim() != 2:
        return _reject(pattern, match, "the dequantized weight is not 2-D [N, K]")
    if kind == "4bit" and not all(isinstance(s, int) for s in kw["shape"]):
        return _reject(pattern, match, f"the weight shape {list(kw['shape'])} is symbolic")
    devices = {x.device, _val(kw["B"]).device}
    bias = _val(kw.get("bias"))
    if "bias" in kw:
        if bias is None or bias.dtype != x.dtype:
            return _reject(pattern, match, "the bias does not have the activation's dtype")
        devices.add(bias.device)
    if len(devices) != 1:
        return _reject(pattern, match, f"inputs live on several devices {sorted(map(str, devices))}")
    if pattern.startswith("gemm_4bit_nested"):
        offset = _val(kw["absmax_offset"])
        if kw["nested_blocksize"] != NESTED_BLOCKSIZE or kw["nested_dtype"] != torch.float32:
            return _reject(pattern, match, "the absmax is dequantized with a blocksize other than 256 or not to fp32")
        if offset is None or offset.numel() != 1 or offset.dtype != torch.float32:
            return _reject(pattern, match, "the absmax offset is not a 1-element fp32 tensor")
        if _val(kw["absmax_8bit"]).dim() != 1:
            return _reject(pattern, match, "the 8-bit absmax is not 1-D")
    return True


def _check_mv(pattern: str, kind: str, match: Match) -> bool:
    """:func:`_check` for the decomposed one-row matmul, plus: the product runs in fp32 (both
    factors widened, or already fp32) and the result is rounded to the activation's dtype, as
    ``mm`` would return it."""
    if not _check(pattern, kind, match):
        return False
    kw = match.kwargs
    x = _val(kw["x"])
    if x.dim() != 2:
        return _reject(pattern, match, f"the activation is {x.dim()}-D, not [M, K]")
    widened = "opmath_x" in kw
    if widened and not (kw["opmath_x"] == kw["opmath_w"] == torch.float32 and kw["out_dtype"] == x.dtype):
        return _reject(pattern, match, "the products are not taken in fp32 and rounded back to the activation's dtype")
    return True


def _record_consumers(pattern: str, match: Match, kind: str) -> None:
    """Record, once per dequantize, that a shared dequantize is handled consumer by consumer."""
    dequantize = _find(match, iq.dequantize_4bit.default if kind == "4bit" else iq.dequantize_blockwise.default)
    users = list(dequantize.users)
    if len(users) <= 1 or any(d["action"] == "per-consumer" for d in dequantize.meta.get(records.META_KEY, [])):
        return
    records.bump("dequant_multi_consumer")
    records.record(
        pattern,
        dequantize,
        "per-consumer",
        f"{len(users)} consumers ({', '.join(u.name for u in users)}): each matmul consumer is rewritten to its own "
        "fused op, which reads the packed weight itself; the dequantize stays for the other consumers",
    )


def _is_vector_bias(kw: dict[str, Any], out_features: int) -> bool:
    """A 1-D ``[N]`` bias goes into the fused op; any other addmm input (e.g. a broadcast
    ``[M, N]`` addend that Inductor folded into the matmul) is added to its result."""
    bias = _val(kw["bias"])
    return bias.dim() == 1 and bias.shape[0] == out_features


def _replacement(pattern: str, kind: str, kw: dict[str, Any], has_bias: bool) -> tuple[Callable[..., Any], list[Any]]:
    """The replacement function and its tensor arguments (non-tensor ones are baked in)."""
    out_features = kw["shape"][0] if kind == "4bit" else _val(kw["B"]).shape[0]
    if has_bias and not _is_vector_bias(kw, out_features):
        fused, tensors = _replacement(pattern, kind, kw, has_bias=False)

        def fused_plus_addend(*args):
            return aten.add.Tensor(fused(*args[:-1]), args[-1])

        return fused_plus_addend, [*tensors, kw["bias"]]
    if kind == "8bit":
        blocksize = kw["blocksize"]

        def linear_8bit(x, B, absmax, code, *bias):
            return iq.linear_8bit.default(x, B, absmax, code, blocksize, *bias)

        return linear_8bit, [kw["x"], kw["B"], kw["absmax"], kw["code"], *([kw["bias"]] if has_bias else [])]
    shape, blocksize, quant_type = list(kw["shape"]), kw["blocksize"], kw["quant_type"]
    if pattern.startswith("gemm_4bit_nested"):

        def gemm_4bit_nested(x, B, absmax, absmax_8bit, absmax_code, absmax_offset, *bias):
            return iq.gemm_4bit.default(
                x, B, shape, absmax, blocksize, quant_type, bias[0] if bias else None, absmax_8bit, absmax_code, absmax_offset
            )

        tensors = [kw["x"], kw["B"], kw["absmax"], kw["absmax_8bit"], kw["absmax_code"], kw["absmax_offset"]]
        return gemm_4bit_nested, tensors + ([kw["bias"]] if has_bias else [])

    def gemm_4bit(x, B, absmax, *bias):
        return iq.gemm_4bit.default(x, B, shape, absmax, blocksize, quant_type, *bias)

    return gemm_4bit, [kw["x"], kw["B"], kw["absmax"], *([kw["bias"]] if has_bias else [])]


def _matrix_vector(weight: PatternExpr) -> list[PatternExpr]:
    """Inductor's decomposition of a one-row ``mm(x, W.t())``: ``sum(x.unsqueeze(2) *
    W.t().unsqueeze(0), [1])``, for 16-bit inputs with both factors converted to fp32 first and the
    sum converted back."""

    def convert(x: PatternExpr, name: str) -> PatternExpr:
        return CallFunction(prims.convert_element_type.default, x, KeywordArg(name))

    def mv(x: PatternExpr, weight_t: PatternExpr) -> PatternExpr:
        product = CallFunction(
            aten.mul.Tensor, CallFunction(aten.unsqueeze.default, x, 2), CallFunction(aten.unsqueeze.default, weight_t, 0)
        )
        return CallFunction(aten.sum.dim_IntList, product, [1])

    weight_t = CallFunction(aten.permute.default, weight, KeywordArg("perm"), _users=MULTIPLE)
    widened = mv(convert(KeywordArg("x"), "opmath_x"), convert(weight_t, "opmath_w"))
    return [convert(widened, "out_dtype"), mv(KeywordArg("x"), weight_t)]


def _register(pass_: PatternMatcherPass, pattern: str, kind: str, weight_t: PatternExpr, matmul: str) -> None:
    name = f"{pattern}_{matmul}"
    check = _check
    if matmul == "mm":
        expr = CallFunction(aten.mm.default, KeywordArg("x"), weight_t)
    elif matmul == "addmm":
        expr = CallFunction(aten.addmm.default, KeywordArg("bias"), KeywordArg("x"), weight_t)
    else:
        expr, check = weight_t, _check_mv  # weight_t is already the whole decomposed product

    def handler(match: Match, *args: Any, **kwargs: Any) -> None:
        _record_consumers(pattern, match, kind)
        output = match.output_node()
        replace_fn, tensors = _replacement(pattern, kind, match.kwargs, matmul == "addmm")
        match.replace_by_example(replace_fn, tensors)
        records.bump(name)
        records.bump("dequant_linear_nodes", len(match.nodes))
        records.record(pattern, output, "rewritten", f"{output.target} of a dequantized weight -> {pattern.split('_nested')[0]}")

    register_graph_pattern(expr, extra_check=functools.partial(check, pattern, kind), pass_dict=pass_)(handler)


def register_dequant_linear_patterns(pass_: PatternMatcherPass, *, fourbit: bool = True, eightbit: bool = True) -> None:
    """Register the dequantize+linear rewrites into ``pass_`` (the nested-absmax 4-bit variants
    first, so they win over the plain variant that would treat the reconstructed absmax as input)."""
    for pattern, (weight, kind) in _WEIGHTS.items():
        if (kind == "4bit" and not fourbit) or (kind == "8bit" and not eightbit):
            continue
        for weight_t in _transposed_weights(weight):
            for matmul in ("addmm", "mm"):
                _register(pass_, pattern, kind, weight_t, matmul)
        for product in _matrix_vector(weight):
            _register(pass_, pattern, kind, product, "mv")
