"""Quant ops call their hand-written kernel where it beats generated code (``patterns/standalone.py``).

The pass marks ops only on devices with hand-written kernels (CUDA/XPU). These CPU tests widen
``standalone.KERNEL_DEVICES`` to "cpu", so the whole route (pass -> node mark -> lowering emits a
call of the op) runs with the CPU implementation standing in for the kernel; the GPU test in
test_inductor_gpu.py checks the real device.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from inductor_quant.code_tables import dynamic_map
from inductor_quant.compile import compile as iq_compile
from inductor_quant.patterns import records, standalone
from inductor_quant.patterns.pass_manager import QuantPassConfig
from conftest import kernel_count

iq = torch.ops.inductor_quant
pytestmark = pytest.mark.usefixtures("inductor_cpp")

CODE = dynamic_map()


@pytest.fixture
def cpu_has_kernels(monkeypatch):
    monkeypatch.setattr(standalone, "KERNEL_DEVICES", ("cpu",))


def run(fn, *args, config=None):
    """Eager and compiled results (compared exactly: both paths are bit-exact with the reference),
    the generated source and the standalone decisions."""
    torch._dynamo.reset()
    counters.clear()
    records.clear_fusion_decisions()
    expected = fn(*args)
    actual, source = run_and_get_code(iq_compile(fn, fullgraph=True, pass_config=config), *args)
    for a, e in zip(torch.utils._pytree.tree_leaves(actual), torch.utils._pytree.tree_leaves(expected)):
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)
    decisions = {d.node: d.action for d in records.fusion_decisions() if d.pattern == "standalone"}
    return "\n".join(source), decisions


def op_calls(source: str, op: str) -> int:
    return source.count(f"torch.ops.inductor_quant.{op}.default(")


def quant_inputs():
    x = torch.randn(64, 128)
    packed, absmax = iq.quantize_4bit(x, 64, "nf4", torch.uint8)
    codes, absmax8 = iq.quantize_blockwise(x, CODE, 256)
    return x, packed, absmax, codes, absmax8


def test_standalone_ops_call_their_kernel(cpu_has_kernels):
    x, packed, absmax, codes, absmax8 = quant_inputs()

    def fn(x, packed, absmax, codes, absmax8):
        return (
            iq.dequantize_4bit(packed, absmax, 64, "nf4", [64, 128], torch.bfloat16),
            iq.dequantize_blockwise(codes, absmax8, CODE, 256, torch.float32).t(),  # views do not fuse
            iq.quantize_4bit(x, 64, "fp4", torch.uint8),
            iq.quantize_blockwise(x.view(-1), CODE, 256),
        )

    source, decisions = run(fn, x, packed, absmax, codes, absmax8)
    for op in ("dequantize_blockwise", "quantize_4bit", "quantize_blockwise"):
        assert op_calls(source, op) == 1, op
    # dequantize_4bit's generated kernel is the faster one even alone: lowered, recorded as such
    assert op_calls(source, "dequantize_4bit") == 0 and "cpp_fused" in source
    assert counters["inductor_quant"]["quant_op_to_kernel"] == 3
    assert sorted(decisions.values()) == ["kernel"] * 3 + ["lowered"]


def test_dequantize_ops_with_a_fusible_neighbour_are_lowered(cpu_has_kernels):
    x, packed, absmax, codes, absmax8 = quant_inputs()

    def fn(packed, absmax, codes, absmax8):
        scaled = iq.dequantize_4bit(packed, absmax, 64, "nf4", [64, 128], torch.float32) * 2.0
        shifted = iq.dequantize_blockwise(codes, absmax8, CODE, 256, torch.float32) + 1.0
        return scaled, shifted

    source, decisions = run(fn, packed, absmax, codes, absmax8)
    assert "inductor_quant" not in source.replace("inductor_quant_", "")  # no op calls at all
    assert counters["inductor_quant"]["quant_op_to_kernel"] == 0
    assert sorted(decisions.values()) == ["lowered"] * 2


def test_quantize_calls_its_kernel_even_with_a_fusible_neighbour(cpu_has_kernels):
    """The generated quantizers are 3-6x slower than the kernels: a pointwise producer or
    consumer is left to its own kernel, and the decision names it."""
    x, *_ = quant_inputs()

    def fn(x):
        packed, absmax = iq.quantize_4bit(x * 2.0, 64, "nf4", torch.uint8)  # producer
        codes, _ = iq.quantize_blockwise(x, CODE, 256)
        return packed, absmax, codes.to(torch.int32) + 1  # consumer of one tuple output

    source, decisions = run(fn, x)
    assert op_calls(source, "quantize_4bit") == 1 and op_calls(source, "quantize_blockwise") == 1
    assert counters["inductor_quant"]["quant_op_to_kernel"] == 2
    assert sorted(decisions.values()) == ["kernel"] * 2
    reasons = [d.reason for d in records.fusion_decisions() if d.pattern == "standalone"]
    assert all("3-6x slower" in reason for reason in reasons), reasons


def test_a_requantization_chain_stays_one_generated_kernel(cpu_has_kernels):
    """dequantize -> pointwise -> quantize (an 8-bit state update written over the ops) is
    lowered whole, one kernel, even though the quantize alone would call its kernel; a
    dequantize reached only through a matmul does not make a chain."""
    _, _, _, codes, absmax8 = quant_inputs()
    grad = torch.randn(64, 128)

    def update(codes, absmax8, grad):
        state = 0.9 * iq.dequantize_blockwise(codes, absmax8, CODE, 256, torch.float32) + 0.1 * grad
        return iq.quantize_blockwise(state, CODE, 256)

    source, decisions = run(update, codes, absmax8, grad)
    assert "inductor_quant" not in source.replace("inductor_quant_", "")
    assert kernel_count(source) == 1, source
    assert sorted(decisions.values()) == ["lowered"] * 2

    def through_matmul(codes, absmax8, grad):
        weight = iq.dequantize_blockwise(codes, absmax8, CODE, 256, torch.float32).view(64, 128)
        return iq.quantize_blockwise(torch.relu(grad.T @ weight), CODE, 256)

    source, decisions = run(through_matmul, codes, absmax8, grad)
    assert op_calls(source, "quantize_blockwise") == 1
    assert decisions == {"dequantize_blockwise": "kernel", "quantize_blockwise": "kernel"}


def test_a_matmul_consumer_is_not_fusible(cpu_has_kernels):
    """A dequantize feeding a matmul the rewrite leaves alone (an untransposed weight) is written
    to memory for the extern mm either way: the kernel writes it."""
    _, _, _, codes, absmax8 = quant_inputs()
    activation = torch.randn(4, 64)

    def fn(activation, codes, absmax8):
        return activation @ iq.dequantize_blockwise(codes, absmax8, CODE, 256, torch.float32).view(64, 128)

    source, decisions = run(fn, activation, codes, absmax8)
    assert op_calls(source, "dequantize_blockwise") == 1
    assert list(decisions.values()) == ["kernel"]


def test_config_off_and_cpu_default_keep_the_lowering(cpu_has_kernels, monkeypatch):
    _, _, _, codes, absmax8 = quant_inputs()

    def fn(codes, absmax8):
        return iq.dequantize_blockwise(codes, absmax8, CODE, 256, torch.float32)

    source, decisions = run(fn, codes, absmax8, config=QuantPassConfig(standalone_kernels=False))
    assert op_calls(source, "dequantize_blockwise") == 0 and "cpp_fused" in source and not decisions
    monkeypatch.setattr(standalone, "KERNEL_DEVICES", ("cuda", "xpu"))
    source, decisions = run(fn, codes, absmax8)
    assert op_calls(source, "dequantize_blockwise") == 0 and "cpp_fused" in source and not decisions
