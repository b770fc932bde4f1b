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


def compile_and_run(fn, *args, **options):
    """Fresh Dynamo state and counters; ``iq.compile(fn, fullgraph=True, options=options)``, one call
    without autograd: ``(compiled, output, generated source)``."""
    torch._dynamo.reset()
    counters.clear()
    compiled = iq_compile(fn, fullgraph=True, options=options)
    with torch.no_grad():
        out, source = run_and_get_code(compiled, *args)
    return compiled, out, "\n".join(source)


def triton_kernel_count(source: str) -> int:
    return source.count("@triton.jit")


@pytest.mark.parametrize("coordinate_descent", [False, True], ids=["default", "coordinate_descent_tuning"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_linear_m1_is_one_kernel(dtype, coordinate_descent):
    """Batch-1 decode shape: dequantize_4bit + F.linear compiles to one gemm_4bit call (no
    Inductor kernel, no cuBLAS call) and launches exactly one CUDA kernel; also with
    ``coordinate_descent_tuning``, under which Inductor decomposes the one-row mm into mul + sum
    before our pass runs (matched as ``gemm_4bit_mv``)."""
    N, K = 4096, 4096
    packed, absmax = iq.quantize_4bit(torch.randn(N, K, device="cuda"), 64, "nf4", torch.uint8)
    x = torch.randn(1, 1, K, device="cuda", dtype=dtype)

    def fn(x, packed, absmax):
        return F.linear(x, iq.dequantize_4bit(packed, absmax, 64, "nf4", [N, K], x.dtype))

    compiled, out, source = compile_and_run(fn, x, packed, absmax, coordinate_descent_tuning=coordinate_descent)
    FileCheck().check_count("torch.ops.inductor_quant.gemm_4bit.default(", 1, exactly=True).run(source)
    FileCheck().check_not("extern_kernels.mm").check_not("extern_kernels.addmm").run(source)
    assert triton_kernel_count(source) == 0
    assert counters["inductor_quant"]["gemm_4bit_mv" if coordinate_descent else "gemm_4bit_mm"] == 1
    launched = cuda_kernels_launched(compiled, x, packed, absmax)
    assert len(launched) == 1, launched
    expected = F.linear(x.float(), ref_fourbit.dequantize_4bit(packed, absmax, 64, "nf4", [N, K], dtype).float())
    # K = 4096 terms of size ~1 cancel to outputs near 0, so compare norms (bf16/fp16 operands: < 1e-2).
    assert ((out.float() - expected).norm() / expected.norm()).item() < 1e-2



@pytest.mark.parametrize("kind", ["4bit_nested", "8bit"])
def test_large_m_dequantize_becomes_a_triton_template_prologue(kind):
    """M above FUSED_MAX_M under max-autotune, the matmul restricted to Triton templates: no fused
    op and no cuBLAS call, the product matches the float64 one, and from torch 2.12 on the
    dequantize (with its nested absmax) is fused into the template as its prologue (one Triton
    kernel). Inductor before 2.12 never tries that fusion (``patterns.template_prologue``): there
    the dequantize is its own generated kernel in front of the template (two)."""
    N, K, M = 2048, 2048, 512
    weight = torch.randn(N, K, device="cuda")
    code = dynamic_map(device="cuda")
    if kind == "8bit":
        codes, absmax = iq.quantize_blockwise(weight, code, 256)
        tensors = (codes, absmax)

        def dequantize(dtype, codes, absmax):
            return iq.dequantize_blockwise(codes, absmax, code, 256, dtype)

    else:
        packed, absmax = iq.quantize_4bit(weight, 64, "nf4", torch.uint8)
        offset = absmax.mean()
        absmax_8bit, nested = iq.quantize_blockwise(absmax - offset, code, 256)
        tensors = (packed, absmax_8bit, nested, offset)

        def dequantize(dtype, packed, absmax_8bit, nested, offset):
            scales = iq.dequantize_blockwise(absmax_8bit, nested, code, 256, torch.float32) + offset
            return iq.dequantize_4bit(packed, scales, 64, "nf4", [N, K], dtype)

    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)

    def fn(x, *tensors):
        return F.linear(x, dequantize(x.dtype, *tensors))

    compiled, out, source = compile_and_run(fn, x, *tensors, max_autotune=True, max_autotune_gemm_backends="TRITON")
    assert counters["inductor_quant"]["template_prologue"] == 1
    FileCheck().check_not("torch.ops.inductor_quant.").check_not("extern_kernels.mm").run(source)
    kernels = 1 if torch.torch_version.TorchVersion(torch.__version__) >= (2, 12) else 2
    assert triton_kernel_count(source) == kernels, source
    assert len(cuda_kernels_launched(compiled, x, *tensors)) == kernels
    expected = x.double() @ dequantize(torch.float32, *tensors).double().T
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-2


@pytest.mark.parametrize("coordinate_descent", [False, True], ids=["default", "coordinate_descent_tuning"])
def test_qkv_projections_at_m1_are_one_kernel(coordinate_descent):
    """q/k/v of one activation (Llama-3-8B shapes, NF4, double-quantized absmax as quantize_model
    makes them) compile to one gemm_4bit_grouped that launches one CUDA kernel; the outputs equal
    three separate gemm_4bit calls up to bf16's last bit (a lone projection's GEMV may use other
    tiles, which sum each row in another order; on the same tiles they are equal bit for bit,
    ``test_gpu_grouped_gemv_equals_separate_gemms``)."""
    from inductor_quant.nn import quantize_model

    projections = torch.nn.ModuleList(
        [torch.nn.Linear(4096, n, bias=False, device="cuda", dtype=torch.bfloat16) for n in (4096, 1024, 1024)]
    )
    quantize_model(projections, quant_type="nf4", blocksize=64, compress_statistics=True)
    x = torch.randn(1, 1, 4096, device="cuda", dtype=torch.bfloat16)

    def fn(x):
        return [projection(x) for projection in projections]

    compiled, out, source = compile_and_run(fn, x, coordinate_descent_tuning=coordinate_descent)
    with torch.no_grad():
        FileCheck().check_count("torch.ops.inductor_quant.gemm_4bit_grouped.default(", 1, exactly=True).run(source)
        FileCheck().check_not("torch.ops.inductor_quant.gemm_4bit.default(").run(source)
        assert counters["inductor_quant"]["gemm_4bit_grouped_members"] == 3
        launched = cuda_kernels_launched(compiled, x)
        assert len(launched) == 1, launched
        for got, projection in zip(out, projections):
            torch.testing.assert_close(got, projection(x), rtol=2**-7, atol=1e-3)


def test_swiglu_mlp_at_m1_is_two_kernels():
    """A quantized SwiGLU MLP at one token: gate/up + SiLU * up compile to one gemm_4bit_swiglu
    (one kernel), the down projection to one gemm_4bit (one kernel); close to eager."""
    from inductor_quant.nn import quantize_model

    dim, hidden = 1024, 2816
    mlp = torch.nn.ModuleDict({
        name: torch.nn.Linear(n_in, n_out, bias=False, device="cuda", dtype=torch.bfloat16)
        for name, n_in, n_out in (("gate", dim, hidden), ("up", dim, hidden), ("down", hidden, dim))
    })
    quantize_model(mlp, quant_type="nf4", blocksize=64, compress_statistics=True)
    x = torch.randn(1, 1, dim, device="cuda", dtype=torch.bfloat16)

    def fn(x):
        return mlp["down"](F.silu(mlp["gate"](x)) * mlp["up"](x))

    compiled, out, source = compile_and_run(fn, x)
    with torch.no_grad():
        FileCheck().check_count("torch.ops.inductor_quant.gemm_4bit_swiglu.default(", 1, exactly=True).run(source)
        FileCheck().check_not("torch.ops.inductor_quant.gemm_4bit_grouped.default(").run(source)
        assert counters["inductor_quant"]["gemm_4bit_swiglu"] == 1
        launched = cuda_kernels_launched(compiled, x)
        assert len(launched) == 2, launched
        expected = fn(x).float()
    assert ((out.float() - expected).norm() / expected.norm()).item() < 2e-2


def _adam_states(shapes):
    qmap1, qmap2 = dynamic_map(True, "cuda"), dynamic_map(False, "cuda")

    def state(shape):
        codes1, absmax1 = iq.quantize_blockwise(torch.randn(shape, device="cuda") * 1e-3, qmap1, 256)
        codes2, absmax2 = iq.quantize_blockwise(torch.rand(shape, device="cuda") * 1e-5, qmap2, 256)
        return [torch.randn(shape, device="cuda"), codes1, codes2, absmax1, absmax2]

    return qmap1, qmap2, [state(s) for s in shapes]


def _eager_adamw(states, grads, qmap1, qmap2, lr, step):
    for (p, s1, s2, a1, a2), g in zip(states, grads):
        iq.optimizer_update_8bit_blockwise("adam", g, p, s1, s2, 0.9, 0.999, 0.0, 0.0, 1e-8, step, lr, qmap1, qmap2, a1, a2, 0.01, 1.0)


def _assert_states_match(got_states, want_states):
    """p within a few ulp of the update; codes equal but for a rare 1-code step; absmax equal."""
    for got, want in zip(got_states, want_states):
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        for codes_got, codes_want in ((got[1], want[1]), (got[2], want[2])):
            off = (codes_got.int() - codes_want.int()).abs()
            assert off.max() <= 1 and (off > 0).float().mean() < 1e-3
        torch.testing.assert_close(got[3], want[3], rtol=1e-6, atol=0)
        torch.testing.assert_close(got[4], want[4], rtol=1e-6, atol=0)


def test_adamw_8bit_step_is_one_kernel_per_tensor():
    """The compiled 8-bit AdamW step over three parameters (``step_8bit_blockwise``, tensor lr,
    step, beta3 and alpha): Inductor calls the in-place op on the state buffers, no generated kernel and no copy,
    so each tensor is one launch of the hand-written fused kernel (after a one-program launch that
    derives the step's scalars from lr and step); results equal the eager op."""
    shapes = [(4096, 1024), (1024,), (256, 4096)]
    qmap1, qmap2, states = _adam_states(shapes)
    eager = [[t.clone() for t in s] for s in states]
    grads = [torch.randn(s, device="cuda") * 0.01 for s in shapes]
    lr = torch.tensor(1e-3, dtype=torch.float64, device="cuda")
    step = torch.tensor(1.0, device="cuda")

    zero = torch.zeros((), dtype=torch.float64, device="cuda")  # beta3, alpha: unused by adam

    def adamw_step(states, grads, lr, step):
        for (p, s1, s2, a1, a2), g in zip(states, grads):
            step_8bit_blockwise("adam", g, p, s1, s2, qmap1, qmap2, a1, a2, lr=lr, step=step,
                                beta1=0.9, beta2=0.999, beta3=zero, alpha=zero, eps=1e-8, weight_decay=0.01)

    torch._dynamo.reset()
    compiled = torch.compile(adamw_step, fullgraph=True)
    _, source = run_and_get_code(compiled, states, grads, lr, step)
    source = "\n".join(source)
    FileCheck().check_count("torch.ops.inductor_quant.optimizer_step_8bit_blockwise_.default(", len(shapes), exactly=True).run(source)
    assert triton_kernel_count(source) == 0, source
    _eager_adamw(eager, grads, qmap1, qmap2, 1e-3, 1)
    _assert_states_match(states, eager)
    launched = cuda_kernels_launched(compiled, states, grads, lr, step)
    updates = [name for name in launched if "update_8bit" in name]
    prologues = [name for name in launched if "derive_scalars" in name]  # one program: lr/step -> scalars
    assert len(updates) == len(prologues) == len(shapes) and len(launched) == 2 * len(shapes), launched


def test_adamw_8bit_step_replays_in_a_cuda_graph_with_new_lr_and_step():
    """The in-place step reads lr and step on the device: captured once in a CUDA graph, every
    replay with new values equals the eager op with those values (no host sync, no recapture)."""
    shapes = [(3000,), (64, 256)]
    qmap1, qmap2, states = _adam_states(shapes)
    eager = [[t.clone() for t in s] for s in states]
    grads = [torch.randn(s, device="cuda") * 0.01 for s in shapes]
    lr = torch.tensor(1e-3, dtype=torch.float64, device="cuda")
    step = torch.tensor(1.0, device="cuda")

    def adamw_step():
        for (p, s1, s2, a1, a2), g in zip(states, grads):
            step_8bit_blockwise("adam", g, p, s1, s2, qmap1, qmap2, a1, a2, lr=lr, step=step,
                                beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)

    warm = [[t.clone() for t in s] for s in states]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        adamw_step()  # first call builds the cached tables outside the capture
    torch.cuda.current_stream().wait_stream(side)
    for state, saved in zip(states, warm):
        for t, v in zip(state, saved):
            t.copy_(v)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        adamw_step()
    for i, value in enumerate([1e-3, 3e-4, 2e-3]):
        lr.fill_(value)
        step.fill_(i + 1)
        graph.replay()
        _eager_adamw(eager, grads, qmap1, qmap2, value, i + 1)
        torch.cuda.synchronize()
        _assert_states_match(states, eager)
        for state, want in zip(states, eager):
            state[0].copy_(want[0])  # keep both on one trajectory


def test_mutating_8bit_update_is_left_to_the_handwritten_kernel_on_gpu():
    """Under inductor_quant.compile on GPU the optimizer-chain pass leaves the mutating 8-bit op
    (Inductor calls it in place) and records why; the 32-bit one is still rewritten and lowered."""
    from inductor_quant.patterns import records

    qmap1, qmap2, [(p, s1, s2, a1, a2)] = _adam_states([(64, 256)])
    g = torch.randn(64, 256, device="cuda") * 0.01
    p32, g32, m32 = (torch.randn(1000, device="cuda") for _ in range(3))

    def step(g, p, s1, s2, a1, a2, g32, p32, m32):
        iq.optimizer_update_8bit_blockwise("adam", g, p, s1, s2, 0.9, 0.999, 0.0, 0.0, 1e-8, 3, 1e-3, qmap1, qmap2, a1, a2, 0.01, 1.0)
        iq.optimizer_update_32bit("momentum", g32, p32, m32, None, None, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 1e-8, 0.0, 3, 1e-3, 1.0)

    inputs = [g, p, s1, s2, a1, a2, g32, p32, m32]
    eager, compiled_inputs = [t.clone() for t in inputs], [t.clone() for t in inputs]
    step(*eager)
    torch._dynamo.reset()
    counters.clear()
    records.clear_fusion_decisions()
    _, source = run_and_get_code(iq_compile(step, fullgraph=True), *compiled_inputs)
    source = "\n".join(source)
    assert dict(counters["inductor_quant"]) == {"functional_optimizer_32bit": 1}
    assert source.count("torch.ops.inductor_quant.optimizer_update_8bit_blockwise.default(") == 1
    assert "optimizer_update_32bit.default(" not in source
    kept = [d for d in records.fusion_decisions() if d.action == "not rewritten"]
    assert len(kept) == 1 and "hand-written kernel" in kept[0].reason
    for got, want in zip(compiled_inputs, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lowered_quant_ops_match_the_reference_on_gpu(dtype):
    """Inductor-generated Triton for the lowered ops: dequantize bit-exact with the reference,
    quantize codes bit-exact (no fp contraction in the normalize step: one multiply, and an IEEE
    reciprocal: bf16 inputs land exactly on 8-bit midpoints often enough that an approximate one
    moves ~0.1 % of the codes)."""
    register_lowerings()
    code = dynamic_map(device="cuda")
    x = torch.randn(1000, 300, device="cuda").to(dtype)
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


def test_standalone_quant_ops_call_the_kernel_and_fused_ones_are_generated():
    """Compiled with the passes: a quantize calls the hand-written kernel, alone (no generated
    kernel) or with a pointwise producer (the product being quantized: one generated kernel for
    the product, then the call), except at the end of a requantization chain (dequantize ->
    pointwise -> quantize: generated code, no call). A 4-bit dequantize is generated code either
    way (its generated kernel is the faster one, ``patterns/standalone.py``)."""
    N, K = 256, 512
    x = torch.randn(N, K, device="cuda")
    packed, absmax = iq.quantize_4bit(x, 64, "nf4", torch.uint8)
    want = ref_fourbit.dequantize_4bit(packed.cpu(), absmax.cpu(), 64, "nf4", [N, K], torch.bfloat16).cuda()

    def quantize(x):
        return iq.quantize_4bit(x, 64, "nf4", torch.uint8)

    def quantize_doubled(x):
        return quantize(x * 2)

    def dequantize(packed, absmax):
        return iq.dequantize_4bit(packed, absmax, 64, "nf4", [N, K], torch.bfloat16)

    def dequantize_doubled(packed, absmax):
        return dequantize(packed, absmax) * 2

    code8 = dynamic_map(device="cuda")
    codes8, absmax8 = iq.quantize_blockwise(x, code8, 256)
    grad = torch.randn(N, K, device="cuda")

    def requantize(codes8, absmax8, grad):
        # * 2 is exact, so a contracted multiply-add rounds as eager's two ops do
        return iq.quantize_blockwise(iq.dequantize_blockwise(codes8, absmax8, code8, 256, torch.float32) * 2 + grad,
                                     code8, 256)

    # (fn, args, expected, op, op calls, generated Triton kernels); the generated quantize is a
    # block reduction and a pointwise encode, which Inductor may emit as two kernels
    cases = (
        (quantize, (x,), quantize(x), "quantize_4bit", 1, {0}),
        (quantize_doubled, (x,), quantize(x * 2), "quantize_4bit", 1, {1}),
        (dequantize, (packed, absmax), want, "dequantize_4bit", 0, {1}),
        (dequantize_doubled, (packed, absmax), want * 2, "dequantize_4bit", 0, {1}),
        (requantize, (codes8, absmax8, grad), requantize(codes8, absmax8, grad), "quantize_blockwise", 0, {1, 2}),
    )
    for fn, args, expected, op, calls, kernels in cases:
        torch._dynamo.reset()
        out, source = run_and_get_code(iq_compile(fn, fullgraph=True), *args)
        source = "\n".join(source)
        assert source.count(f"torch.ops.inductor_quant.{op}.default(") == calls, fn.__name__
        assert triton_kernel_count(source) in kernels, fn.__name__
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
