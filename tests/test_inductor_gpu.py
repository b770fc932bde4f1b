"""GPU-only Inductor checks: what the compiled programs launch, and that they compute the same.

"One kernel" is checked twice: in the generated code (FileCheck: Triton kernel definitions and
extern calls) and at run time (CUDA kernels launched during one call, counted by the profiler).
Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck

from inductor_quant.compile import compile as iq_compile
from inductor_quant.code_tables import dynamic_map
from inductor_quant.lowerings import register_lowerings
from inductor_quant.ops.optim_functional import step_8bit_blockwise
from inductor_quant.reference import blockwise as ref_blockwise
from inductor_quant.reference import fourbit as ref_fourbit

iq = torch.ops.inductor_quant
pytestmark = requires_cuda


def cuda_kernels_launched(fn, *args) -> list[str]:
    """Names of the CUDA kernels one call of ``fn`` launches (after a warm-up call)."""
    fn(*args)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]


def triton_kernel_count(source: str) -> int:
    return source.count("@triton.jit")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_linear_m1_is_one_kernel(dtype):
    """Batch-1 decode shape: dequantize_4bit + F.linear compiles to one gemm_4bit call (no
    Inductor kernel, no cuBLAS call) and launches exactly one CUDA kernel."""
    N, K = 4096, 4096
    packed, absmax = iq.quantize_4bit(torch.randn(N, K, device="cuda"), 64, "nf4", torch.uint8)
    x = torch.randn(1, 1, K, device="cuda", dtype=dtype)

    def fn(x, packed, absmax):
        return F.linear(x, iq.dequantize_4bit(packed, absmax, 64, "nf4", [N, K], x.dtype))

    torch._dynamo.reset()
    counters.clear()
    compiled = iq_compile(fn, fullgraph=True)
    out, source = run_and_get_code(compiled, x, packed, absmax)
    source = "\n".join(source)
    FileCheck().check_count("torch.ops.inductor_quant.gemm_4bit.default(", 1, exactly=True).run(source)
    FileCheck().check_not("extern_kernels.mm").check_not("extern_kernels.addmm").run(source)
    assert triton_kernel_count(source) == 0
    assert counters["inductor_quant"]["gemm_4bit_mm"] == 1
    launched = cuda_kernels_launched(compiled, x, packed, absmax)
    assert len(launched) == 1, launched
    expected = F.linear(x.float(), ref_fourbit.dequantize_4bit(packed, absmax, 64, "nf4", [N, K], dtype).float())
    # K = 4096 terms of size ~1 cancel to outputs near 0, so compare norms (bf16/fp16 operands: < 1e-2).
    assert ((out.float() - expected).norm() / expected.norm()).item() < 1e-2


def test_adamw_8bit_step_is_one_kernel_per_tensor():
    """The compiled 8-bit AdamW step over three parameters: three Inductor kernels (dequantize ->
    update -> absmax -> requantize -> store, per tensor), three CUDA launches, results close to
    the eager op (one code step where fp contraction moves a value across a boundary)."""
    register_lowerings()
    qmap1, qmap2 = dynamic_map(True, "cuda"), dynamic_map(False, "cuda")
    shapes = [(4096, 1024), (1024,), (256, 4096)]

    def state(shape):
        zeros = torch.zeros(shape, device="cuda")
        codes1, absmax1 = iq.quantize_blockwise(zeros, qmap1, 256)
        codes2, absmax2 = iq.quantize_blockwise(zeros, qmap2, 256)
        return [torch.randn(shape, device="cuda"), codes1, codes2, absmax1, absmax2]

    states = [state(s) for s in shapes]
    eager = [[t.clone() for t in s] for s in states]
    grads = [torch.randn(s, device="cuda") * 0.01 for s in shapes]
    lr = torch.tensor(1e-3, dtype=torch.float64, device="cuda")
    step = torch.tensor(1.0, device="cuda")

    def adamw_step(states, grads, lr, step):
        for (p, s1, s2, a1, a2), g in zip(states, grads):
            step_8bit_blockwise("adam", g, p, s1, s2, qmap1, qmap2, a1, a2, lr=lr, step=step,
                                beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)

    torch._dynamo.reset()
    compiled = torch.compile(adamw_step, fullgraph=True)
    _, source = run_and_get_code(compiled, states, grads, lr, step)
    source = "\n".join(source)
    FileCheck().check_not("torch.ops.inductor_quant.optimizer_step_8bit_blockwise.default(").run(source)
    assert triton_kernel_count(source) == len(shapes), source
    for (p, s1, s2, a1, a2), g in zip(eager, grads):
        iq.optimizer_update_8bit_blockwise("adam", g, p, s1, s2, 0.9, 0.999, 0.0, 0.0, 1e-8, 1, 1e-3, qmap1, qmap2, a1, a2, 0.01, 1.0)
    for got, want in zip(states, eager):
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        for codes_got, codes_want in ((got[1], want[1]), (got[2], want[2])):
            off = (codes_got.int() - codes_want.int()).abs()
            assert off.max() <= 1 and (off > 0).float().mean() < 1e-3
        torch.testing.assert_close(got[3], want[3], rtol=1e-6, atol=0)
        torch.testing.assert_close(got[4], want[4], rtol=1e-6, atol=0)
    assert len(cuda_kernels_launched(compiled, states, grads, lr, step)) == len(shapes)


def test_lowered_quant_ops_match_the_reference_on_gpu():
    """Inductor-generated Triton for the lowered ops: dequantize bit-exact with the reference,
    quantize codes bit-exact (no fp contraction in the normalize step: one multiply)."""
    register_lowerings()
    code = dynamic_map(device="cuda")
    x = torch.randn(1000, 300, device="cuda")
    x[3] = 0.0

    def fn(x):
        codes, absmax = iq.quantize_blockwise(x, code, 256)
        packed, absmax4 = iq.quantize_4bit(x, 64, "nf4", torch.uint8)
        return codes, absmax, packed, absmax4, iq.dequantize_4bit(packed, absmax4, 64, "nf4", list(x.shape), torch.bfloat16)

    torch._dynamo.reset()
    codes, absmax, packed, absmax4, weight = torch.compile(fn, fullgraph=True)(x)
    want_codes, want_absmax = ref_blockwise.quantize_blockwise(x, code, 256)
    want_packed, want_absmax4 = ref_fourbit.quantize_4bit(x, 64, "nf4", torch.uint8)
    for got, want in ((codes, want_codes), (absmax, want_absmax), (packed, want_packed), (absmax4, want_absmax4)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    want_weight = ref_fourbit.dequantize_4bit(want_packed, want_absmax4, 64, "nf4", list(x.shape), torch.bfloat16)
    torch.testing.assert_close(weight, want_weight, rtol=0, atol=0)


def test_first_use_inside_cudagraph_warmup():
    """A model whose first 4-bit matmul runs inside ``mode="reduce-overhead"`` (cudagraph trees):
    the kernels' cached device tables must not land in the graph's private pool."""
    from inductor_quant.kernels import fourbit as fourbit_kernels
    from inductor_quant.ops import triton_gemm

    fourbit_kernels._device_tables.cache_clear()
    triton_gemm._code_table.cache_clear()
    N, K = 512, 256
    packed, absmax = ref_fourbit.quantize_4bit(torch.randn(N, K), 64, "nf4", torch.uint8)
    packed, absmax = packed.cuda(), absmax.cuda()
    x = torch.randn(4, K, device="cuda", dtype=torch.bfloat16)

    def fn(x):
        return F.linear(x, iq.dequantize_4bit(packed, absmax, 64, "nf4", [N, K], x.dtype))

    torch._dynamo.reset()
    compiled = iq_compile(fn, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        out = compiled(x).clone()
    expected = fn(x).float()
    assert ((out.float() - expected).norm() / expected.norm()).item() < 1e-2
