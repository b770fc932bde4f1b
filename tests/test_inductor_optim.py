"""Functional optimizer ops, their lowerings, and compiled optimizer steps (CPU, C++ backend).

Tolerances: new 8-bit states (codes and absmax) are compared bit for bit. The parameter of the
optimizers whose update divides by ``sqrt(state)`` (adam, ademamix, rmsprop, adagrad) is compared
with ``rtol = 2 ulp, atol = 1e-8`` (= lr * 1e-6 for the lr of these tests): eager CPU
``torch.sqrt`` (MKL VML) is not correctly rounded for about 20 % of inputs while the compiled
kernel's is, and the one-ulp difference of the update shows up in ``p - lr * u``. momentum, lion
and lars parameters are bit-identical.
"""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from conftest import compiled, kernel_count
from inductor_quant.code_tables import dynamic_map
from inductor_quant.lowerings import register_lowerings
from inductor_quant.ops.optim_functional import step_8bit_blockwise
from inductor_quant.reference.optim import TWO_STATE_OPTIMIZERS

iq = torch.ops.inductor_quant

HYPER = {  # optimizer -> (beta1, beta2), bitsandbytes-style defaults
    "adam": (0.9, 0.999),
    "ademamix": (0.9, 0.999),
    "momentum": (0.9, 0.0),
    "rmsprop": (0.99, 0.0),
    "lion": (0.9, 0.99),
    "adagrad": (0.0, 0.0),
    "lamb": (0.9, 0.999),
    "lars": (0.9, 0.0),
}
SQRT_FREE = ("momentum", "lion", "lars")
NONNEGATIVE_STATE1 = ("rmsprop", "adagrad")  # state1 holds a second moment


@pytest.fixture(scope="module", autouse=True)
def _inductor(inductor_cpp):
    """Lowerings on, in conftest's Inductor setup (private cache, in-process scalar C++ builds)."""
    register_lowerings()


def scalars(lr=1e-2, step=3, beta3=0.9999, alpha=5.0):
    f64 = torch.float64
    return torch.tensor(lr, dtype=f64), torch.tensor(step), torch.tensor(beta3, dtype=f64), torch.tensor(alpha, dtype=f64)


def state_8bit(name, shape, dtype):
    """Fresh random 8-bit state for ``name`` (NaN and zero gradients included)."""
    n = torch.Size(shape).numel()
    blocks = -(-n // 256)
    p = torch.randn(shape, dtype=dtype)
    g = (torch.randn(shape) * 0.1).to(dtype)
    g.view(-1)[7] = 0.0
    if name in TWO_STATE_OPTIMIZERS:
        g.view(-1)[3] = float("nan")
    rows = 2 if name == "ademamix" else 1
    low = 127 if name in NONNEGATIVE_STATE1 else 0  # codes >= 127 are >= 0 in the signed map
    state1 = torch.randint(low, 256, (rows, *shape) if rows == 2 else shape, dtype=torch.uint8)
    absmax1 = torch.rand((2, blocks) if rows == 2 else (blocks,))
    two = name in TWO_STATE_OPTIMIZERS
    state2 = torch.randint(0, 256, shape, dtype=torch.uint8) if two else None
    absmax2 = torch.rand(blocks) if two else None
    return g, p, state1, state2, absmax1, absmax2


def assert_param_close(name, actual, expected, before):
    """Bit-equal for sqrt-free updates; else within 2 ulp of the value plus 4 ulp of the largest
    update (the one-ulp sqrt difference, scaled by lr * u)."""
    if name in SQRT_FREE:
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    else:
        eps = torch.finfo(expected.dtype).eps
        update = (expected.float() - before.float()).nan_to_num().abs().max().item()
        torch.testing.assert_close(actual, expected, rtol=2 * eps, atol=4 * eps * update, equal_nan=True)


def assert_bit_equal(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------------------------
# opcheck


@pytest.mark.parametrize("name", ["adam", "ademamix", "lion"])
def test_opcheck_optimizer_step_8bit_blockwise(name):
    g, p, s1, s2, a1, a2 = state_8bit(name, (16, 32), torch.float32)
    qmap2 = dynamic_map(signed=False) if s2 is not None else None
    b1, b2 = HYPER[name]
    args = (name, g, p, s1, s2, dynamic_map(), qmap2, a1, a2, *scalars()[:2], b1, b2, *scalars()[2:], 1e-8, 0.01, 1.0, False)
    torch.library.opcheck(iq.optimizer_step_8bit_blockwise.default, args)


@pytest.mark.parametrize("name", ["adam", "ademamix", "lion"])
def test_opcheck_optimizer_step_8bit_blockwise_inplace(name):
    g, p, s1, s2, a1, a2 = state_8bit(name, (16, 32), torch.float32)
    qmap2 = dynamic_map(signed=False) if s2 is not None else None
    b1, b2 = HYPER[name]
    args = (name, g, p, s1, s2, dynamic_map(), qmap2, a1, a2, *scalars()[:2], b1, b2, *scalars()[2:], 1e-8, 0.01, 1.0, False)
    torch.library.opcheck(iq.optimizer_step_8bit_blockwise_.default, args)


@pytest.mark.parametrize("name, max_unorm", [("adam", 0.0), ("lamb", 1.0), ("momentum", 0.0)])
def test_opcheck_optimizer_step_32bit(name, max_unorm):
    p, g = torch.randn(16, 8), torch.randn(16, 8) * 0.1
    s1 = torch.rand(16, 8)
    s2 = torch.rand(16, 8) if name in TWO_STATE_OPTIMIZERS else None
    b1, b2 = HYPER[name]
    param_norm = p.norm().reshape(1) if max_unorm > 0 else None
    lr, step, beta3, alpha = scalars()
    args = (name, g, p, s1, s2, lr, step, b1, b2, beta3, alpha, 1e-8, 0.01, 1.0, False, max_unorm, param_norm)
    torch.library.opcheck(iq.optimizer_step_32bit.default, args)


# --------------------------------------------------------------------------------------------
# lowerings


NAMES_8BIT = ("adam", "ademamix", "momentum", "rmsprop", "lion", "adagrad")
CASES_8BIT = [  # shape, dtype, weight_decay, skip_zeros
    ((64, 64), torch.float32, 0.01, False),  # whole 256-blocks
    ((1000,), torch.bfloat16, 0.1, True),  # partial last block, bf16 parameter
]


@pytest.mark.parametrize("shape, dtype, weight_decay, skip_zeros", CASES_8BIT)
def test_optimizer_step_8bit_lowering_matches_eager(shape, dtype, weight_decay, skip_zeros):
    """All six 8-bit optimizers in one compiled graph: lowered (no call of the op), new states
    bit-identical to the eager op. (Kernels per parameter are counted on GPU: the C++ backend
    merges independent loop nests into one kernel function.)"""
    qmap1, qmap2 = dynamic_map(signed=True), dynamic_map(signed=False)
    states = {name: state_8bit(name, shape, dtype) for name in NAMES_8BIT}
    lr, step, beta3, alpha = scalars()

    def fn(states, lr, step, beta3, alpha):
        out = {}
        for name, (g, p, s1, s2, a1, a2) in states.items():
            b1, b2 = HYPER[name]
            out[name] = iq.optimizer_step_8bit_blockwise(
                name, g, p, s1, s2, qmap1, qmap2 if s2 is not None else None, a1, a2, lr, step,
                b1, b2, beta3, alpha, 1e-8, weight_decay, 1.0, skip_zeros,
            )
        return out

    actual, source = compiled(fn, states, lr, step, beta3, alpha)
    expected = fn(states, lr, step, beta3, alpha)
    assert "torch.ops.inductor_quant.optimizer_step_8bit_blockwise.default(" not in source
    for name in NAMES_8BIT:
        assert_param_close(name, actual[name][0], expected[name][0], states[name][1])
        for a, e in zip(actual[name][1:], expected[name][1:]):
            assert_bit_equal(a, e)


@pytest.mark.parametrize("dtype, weight_decay, skip_zeros, step", [(torch.float32, 0.01, False, 1), (torch.bfloat16, 0.1, True, 4)])
def test_optimizer_step_32bit_lowering_matches_eager(dtype, weight_decay, skip_zeros, step):
    """All eight 32-bit optimizers (lamb/lars without norm clipping) in one graph: lowered,
    states bit-identical."""
    shape = (33, 17)
    states = {}
    for name in HYPER:
        p, g = torch.randn(shape, dtype=dtype), (torch.randn(shape) * 0.1).to(dtype)
        g.view(-1)[5] = 0.0
        s1 = torch.rand((2, *shape) if name == "ademamix" else shape)
        s2 = torch.rand(shape) if name in TWO_STATE_OPTIMIZERS else None
        states[name] = (g, p, s1, s2)
    lr, step_t, beta3, alpha = scalars(step=step)

    def fn(states, lr, step, beta3, alpha):
        out = {}
        for name, (g, p, s1, s2) in states.items():
            b1, b2 = HYPER[name]
            out[name] = iq.optimizer_step_32bit(
                name, g, p, s1, s2, lr, step, b1, b2, beta3, alpha, 1e-8, weight_decay, 1.0, skip_zeros, 0.0, None
            )
        return out

    actual, source = compiled(fn, states, lr, step_t, beta3, alpha)
    expected = fn(states, lr, step_t, beta3, alpha)
    assert "torch.ops.inductor_quant.optimizer_step_32bit.default(" not in source
    for name in HYPER:
        assert_param_close(name, actual[name][0], expected[name][0], states[name][1])
        for a, e in zip(actual[name][1:], expected[name][1:]):
            assert_bit_equal(a, e)


def test_update_norm_clipping_falls_back_to_the_kernel():
    """max_unorm > 0 needs a whole-tensor norm before the update: the op's kernel runs (a call
    in the generated code) and the result is the eager one."""
    p, g, s1, s2 = torch.randn(40, 8), torch.randn(40, 8) * 0.1, torch.rand(40, 8), torch.rand(40, 8)
    lr, step, beta3, alpha = scalars()

    def fn(g, p, s1, s2, lr, step, param_norm):
        return iq.optimizer_step_32bit("lamb", g, p, s1, s2, lr, step, 0.9, 0.999, beta3, alpha, 1e-8, 0.0, 1.0, False, 1.0, param_norm)

    param_norm = p.norm().reshape(1)
    actual, source = compiled(fn, g, p, s1, s2, lr, step, param_norm)
    assert "torch.ops.inductor_quant.optimizer_step_32bit.default(" in source
    for a, e in zip(actual, fn(g, p, s1, s2, lr, step, param_norm)):
        assert_bit_equal(a, e)


# --------------------------------------------------------------------------------------------
# compiled steps: the Python API and a hand-written optimizer


def test_step_api_fullgraph_20_steps_changing_lr_no_recompiles():
    """AdamW 8-bit over two parameters through ``step_8bit_blockwise`` (what the optimizer
    classes call when compiling): lowered, states updated in place, and 20 steps
    with a new learning rate and step count each time run without recompiling. Every step is
    compared with the eager mutating op."""
    qmap1, qmap2 = dynamic_map(signed=True), dynamic_map(signed=False)
    shapes = [(64, 64), (16, 128)]

    def new_state(shape):
        blocks = torch.Size(shape).numel() // 256
        zeros = torch.zeros(shape)
        codes1, absmax1 = iq.quantize_blockwise(zeros, qmap1, 256)
        codes2, absmax2 = iq.quantize_blockwise(zeros, qmap2, 256)
        assert absmax1.numel() == blocks
        return [torch.randn(shape), codes1, codes2, absmax1, absmax2]

    compiled_states = [new_state(s) for s in shapes]
    eager_states = [[t.clone() for t in state] for state in compiled_states]

    def step_fn(states, grads, lr, step):
        for (p, s1, s2, a1, a2), g in zip(states, grads):
            step_8bit_blockwise("adam", g, p, s1, s2, qmap1, qmap2, a1, a2, lr=lr, step=step, beta1=0.9,
                                beta2=0.999, eps=1e-8, weight_decay=0.01)

    def run_step(i, compiled_step):
        grads = [torch.randn(s) * 0.1 for s in shapes]
        lr = 1e-3 * (1 + i % 4)
        before = [state[0].clone() for state in eager_states]
        out = compiled_step(compiled_states, grads, torch.tensor(lr, dtype=torch.float64), torch.tensor(i + 1))
        for (p, s1, s2, a1, a2), g in zip(eager_states, grads):
            iq.optimizer_update_8bit_blockwise("adam", g, p, s1, s2, 0.9, 0.999, 0.0, 0.0, 1e-8, i + 1, lr, qmap1, qmap2, a1, a2, 0.01, 1.0)
        for compiled_state, eager_state, p_before in zip(compiled_states, eager_states, before):
            assert_param_close("adam", compiled_state[0], eager_state[0], p_before)
            compiled_state[0].copy_(eager_state[0])  # keep the two runs on the same trajectory
            for a, e in zip(compiled_state[1:], eager_state[1:]):
                assert_bit_equal(a, e)
        return out

    torch._dynamo.reset()
    compiled_step = torch.compile(step_fn, fullgraph=True)
    _, source = run_and_get_code(lambda *args: run_step(0, compiled_step), None)
    source = "\n".join(source)
    assert "optimizer_step_8bit_blockwise.default(" not in source
    with torch.compiler.set_stance("fail_on_recompile"):
        for i in range(1, 21):
            run_step(i, compiled_step)


def test_handwritten_8bit_adam_chain_fuses():
    """An 8-bit Adam step written in plain PyTorch over dequantize_blockwise / quantize_blockwise
    (no optimizer op): every quant op is lowered and the step is one kernel; results equal eager
    (states exactly, the parameter within the sqrt tolerance)."""
    qmap1, qmap2 = dynamic_map(signed=True), dynamic_map(signed=False)

    def adam8bit(p, g, q1, q2, a1, a2, lr, step):
        m = iq.dequantize_blockwise(q1, a1, qmap1, 256, torch.float32)
        v = iq.dequantize_blockwise(q2, a2, qmap2, 256, torch.float32)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        p.sub_(lr * (m / (1 - 0.9**step)) / (v.sqrt() / (1 - 0.999**step) ** 0.5 + 1e-8))
        new_q1, new_a1 = iq.quantize_blockwise(m, qmap1, 256)
        new_q2, new_a2 = iq.quantize_blockwise(v, qmap2, 256)
        q1.copy_(new_q1)
        a1.copy_(new_a1)
        q2.copy_(new_q2)
        a2.copy_(new_a2)

    p, g = torch.randn(32, 256), torch.randn(32, 256) * 0.1
    q1, a1 = iq.quantize_blockwise(torch.randn(32, 256) * 0.01, qmap1, 256)
    q2, a2 = iq.quantize_blockwise(torch.rand(32, 256) * 1e-4, qmap2, 256)
    compiled_args = [t.clone() for t in (p, g, q1, q2, a1, a2)]
    eager_args = [t.clone() for t in (p, g, q1, q2, a1, a2)]
    lr, step = torch.tensor(1e-3), torch.tensor(5.0)
    _, source = compiled(adam8bit, *compiled_args, lr, step)
    adam8bit(*eager_args, lr, step)
    for op in ("dequantize_blockwise", "quantize_blockwise"):
        assert f"torch.ops.inductor_quant.{op}.default(" not in source
    assert kernel_count(source) == 1, source
    assert_param_close("adam", compiled_args[0], eager_args[0], p)
    for a, e in zip(compiled_args[2:], eager_args[2:]):
        assert_bit_equal(a, e)


@pytest.mark.parametrize("name", ["adam", "ademamix"])
def test_inplace_step_op_compiles_in_place_or_fused(name):
    """``optimizer_step_8bit_blockwise_`` (what ``step_8bit_blockwise`` calls on GPU) under plain
    ``torch.compile``: Inductor calls it once, in place on the inputs (no copy kernels; on GPU
    the hand-written kernel). Under ``inductor_quant.compile`` on CPU the optimizer-chain pass
    turns it into the functional step, lowered to one kernel. Both equal the eager op."""
    from inductor_quant.compile import compile as iq_compile
    from torch._dynamo.utils import counters

    qmap1, qmap2 = dynamic_map(signed=True), dynamic_map(signed=False)
    b1, b2 = HYPER[name]
    g, p, s1, s2, a1, a2 = state_8bit(name, (64, 64), torch.float32)
    lr, step, beta3, alpha = scalars()

    def fn(g, p, s1, s2, a1, a2, lr, step):
        iq.optimizer_step_8bit_blockwise_(name, g, p, s1, s2, qmap1, qmap2, a1, a2, lr, step, b1, b2, beta3, alpha, 1e-8, 0.01, 1.0)

    eager = [t.clone() for t in (g, p, s1, s2, a1, a2)]
    fn(*eager, lr, step)
    for compile_fn, calls, kernels in ((torch.compile, 1, 0), (iq_compile, 0, 1)):
        torch._dynamo.reset()
        counters.clear()
        inputs = [t.clone() for t in (g, p, s1, s2, a1, a2)]
        _, source = run_and_get_code(compile_fn(fn, fullgraph=True), *inputs, lr, step)
        source = "\n".join(source)
        assert source.count("torch.ops.inductor_quant.optimizer_step_8bit_blockwise_.default(") == calls
        assert kernel_count(source) == kernels, source
        assert counters["inductor_quant"]["functional_optimizer_8bit"] == 1 - calls
        assert_param_close(name, inputs[1], eager[1], p)
        for got, want in zip(inputs[2:], eager[2:]):
            assert_bit_equal(got, want)


def test_mutating_updates_are_rewritten_to_functional_steps():
    """The mutating ops under inductor_quant.compile: the optimizer-chain pass replaces the
    auto-functionalized calls by the functional steps (lowered: no call left), updates the inputs
    in place like eager, and records why a call on a view of a graph input is left alone."""
    from inductor_quant.compile import compile as iq_compile
    from inductor_quant.patterns import records
    from torch._dynamo.utils import counters

    qmap1, qmap2 = dynamic_map(signed=True), dynamic_map(signed=False)
    g, p, s1, s2, a1, a2 = state_8bit("adam", (64, 64), torch.float32)
    g = torch.randn(64, 64) * 0.1
    p32, g32, m32 = torch.randn(100), torch.randn(100), torch.rand(100)
    lion_p, lion_g, lion_s1, _, lion_a1, _ = state_8bit("lion", (16, 32), torch.float32)

    def step(g, p, s1, s2, a1, a2, g32, p32, m32, lion_g, lion_p, lion_s1, lion_a1):
        iq.optimizer_update_8bit_blockwise("adam", g, p, s1, s2, 0.9, 0.999, 0.0, 0.0, 1e-8, 3, 1e-3, qmap1, qmap2, a1, a2, 0.01, 1.0)
        iq.optimizer_update_32bit("momentum", g32, p32, m32, None, None, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 1e-8, 0.0, 3, 1e-3, 1.0)
        iq.optimizer_update_8bit_blockwise("lion", lion_g, lion_p.view(-1), lion_s1, None, 0.9, 0.99, 0.0, 0.0, 0.0, 3, 1e-4, qmap1, None, lion_a1, None, 0.0, 1.0)

    inputs = [g, p, s1, s2, a1, a2, g32, p32, m32, lion_g, lion_p, lion_s1, lion_a1]
    eager, compiled_inputs = [t.clone() for t in inputs], [t.clone() for t in inputs]
    step(*eager)
    torch._dynamo.reset()
    counters.clear()
    records.clear_fusion_decisions()
    _, source = run_and_get_code(iq_compile(step, fullgraph=True), *compiled_inputs)
    source = "\n".join(source)
    assert dict(counters["inductor_quant"]) == {"functional_optimizer_8bit": 1, "functional_optimizer_32bit": 1}
    assert "torch.ops.inductor_quant.optimizer_update_32bit.default(" not in source
    assert source.count("torch.ops.inductor_quant.optimizer_update_8bit_blockwise.default(") == 1  # the view case
    assert_param_close("adam", compiled_inputs[1], eager[1], p)
    for i in (2, 3, 4, 5, 7, 8, 10, 11, 12):
        assert_bit_equal(compiled_inputs[i], eager[i])
    kept = [d for d in records.fusion_decisions() if d.action == "not rewritten"]
    assert len(kept) == 1 and "p is a view" in kept[0].reason
