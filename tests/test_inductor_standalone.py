"""Standalone quant ops call their hand-written kernel; ops with a fusible neighbour are lowered.

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


def test_ops_with_a_fusible_neighbour_are_lowered(cpu_has_kernels):
    x, packed, absmax, codes, absmax8 = quant_inputs()

    def fn(x, packed, absmax, codes, absmax8):
        scaled = iq.dequantize_4bit(packed, absmax, 64, "nf4", [64, 128], torch.float32) * 2.0  # consumer
        packed2, absmax2 = iq.quantize_4bit(x * 2.0, 64, "nf4", torch.uint8)  # producer
        codes2, _ = iq.quantize_blockwise(x, CODE, 256)
        return scaled, packed2, absmax2, codes2.to(torch.int32) + 1  # consumer of one tuple output

    source, decisions = run(fn, x, packed, absmax, codes, absmax8)
    assert "inductor_quant" not in source.replace("inductor_quant_", "")  # no op calls at all
    assert counters["inductor_quant"]["quant_op_to_kernel"] == 0
    assert sorted(decisions.values()) == ["lowered"] * 3


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
