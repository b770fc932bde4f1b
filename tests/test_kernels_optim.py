"""Triton optimizer-update kernels (``inductor_quant.kernels.optim``), their op registrations
(``inductor_quant.ops.triton_optim``) and the multi-tensor entry points (``inductor_quant.optim_kernels``).

Every check compares with the pure-torch reference (``reference/optim.py``) run on CPU copies of
fresh random inputs (never zeros): 8-bit codes equal (at most a rare 1-code difference), absmax
equal, states equal, and ``p`` within a few ulp (the kernels' update direction uses the fast
``div``/``sqrt``; the states never do). In-place outputs are views into poisoned buffers with
guard bytes on both sides.

Without CUDA the kernels run on CPU tensors under the Triton interpreter (conftest sets
TRITON_INTERPRET; it truncates bf16 casts, so the kernels round by hand there). With CUDA the same
tests run on the GPU, plus: bitsandbytes' CUDA kernels within its own test tolerances, the
multi-tensor API, and updates of more than 2**31 elements (int64 offsets).
"""

from __future__ import annotations

import math

import pytest
import torch

import inductor_quant  # noqa: F401  (registers the ops)
from inductor_quant import optim_kernels
from inductor_quant.code_tables import dynamic_map
from inductor_quant.kernels import optim as kernels
from inductor_quant.ops import triton_optim
from inductor_quant.reference import optim as reference
from inductor_quant.reference.blockwise import dequantize_blockwise, quantize_blockwise

from conftest import HAS_CUDA, requires_cuda

DEVICE = "cuda" if HAS_CUDA else "cpu"
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
GUARD = 64
POISON = 0x5A


class Guarded:
    """A copy of ``values`` on DEVICE, placed inside a poisoned byte buffer with guard bytes."""

    def __init__(self, values: torch.Tensor):
        nbytes = values.numel() * values.element_size()
        self.buffer = torch.full((2 * GUARD + nbytes,), POISON, dtype=torch.uint8, device=DEVICE)
        self.view = self.buffer[GUARD : GUARD + nbytes].view(values.dtype).view(values.shape)
        self.view.copy_(values)

    def check_guards(self) -> None:
        assert (self.buffer[:GUARD] == POISON).all(), "kernel wrote before its tensor"
        assert (self.buffer[-GUARD:] == POISON).all(), "kernel wrote past its tensor"


def hyper(name: str, gen: torch.Generator, **overrides) -> dict:
    """Random hyperparameters in the ranges optimizers use."""
    rand = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=gen).item()  # noqa: E731
    h = dict(
        beta1=rand(0.8, 0.95), beta2=rand(0.98, 0.999), beta3=rand(0.999, 0.9999), alpha=rand(2.0, 8.0),
        eps=1e-10 if name == "adagrad" else 1e-8, step=int(torch.randint(1, 60, (), generator=gen)),
        lr=rand(1e-4, 3e-3), weight_decay=0.01, gnorm_scale=rand(0.5, 1.0), skip_zeros=False,
    )
    h.update(overrides)
    return h


def nonneg_state(name: str) -> bool:
    return name in ("rmsprop", "adagrad")


# ---------------------------------------------------------------------------------------------
# 8-bit
# ---------------------------------------------------------------------------------------------


def make_8bit(name: str, n: int, dtype: torch.dtype, gen: torch.Generator) -> dict:
    """Fresh CPU inputs: quantized momentum-like (signed) and second-moment-like (unsigned) states.

    Magnitudes spread over 8 decades, so blocks hold values near every code, down to the tiny
    ones where the sign fix of signed states acts."""
    qmap1, qmap2 = dynamic_map(True), dynamic_map(False)
    rows = 2 if name == "ademamix" else 1
    spread = lambda *shape: 10.0 ** -torch.randint(0, 8, shape, generator=gen).float()  # noqa: E731
    s1 = torch.randn(rows, n, generator=gen) * 0.01 * spread(rows, n)
    if nonneg_state(name):
        s1 = s1.abs() * 0.1
    quantized = [quantize_blockwise(s1[i], qmap1, 256) for i in range(rows)]
    case = dict(
        g=(torch.randn(n, generator=gen) * 0.1 * spread(n)).to(dtype),
        p=torch.randn(n, generator=gen).to(dtype),
        state1=torch.stack([q for q, _ in quantized]) if rows == 2 else quantized[0][0],
        absmax1=torch.stack([a for _, a in quantized]) if rows == 2 else quantized[0][1],
        state2=None, absmax2=None, qmap1=qmap1, qmap2=None,
    )
    if name in reference.TWO_STATE_OPTIMIZERS:
        case["state2"], case["absmax2"] = quantize_blockwise(torch.rand(n, generator=gen) * 1e-3 * spread(n), qmap2, 256)
        case["qmap2"] = qmap2
    return case


_IN_PLACE_8 = ("p", "state1", "state2", "absmax1", "absmax2")


def run_8bit(name: str, case: dict, h: dict, launch=None, **launch_options) -> dict:
    """Run a kernel on guarded DEVICE copies; returns the updated tensors on CPU."""
    guarded = {k: Guarded(case[k]) for k in _IN_PLACE_8 if case[k] is not None}
    t = {k: (guarded[k].view if k in guarded else case[k]) for k in case}
    t["g"] = case["g"].to(DEVICE)
    t["qmap1"] = case["qmap1"].to(DEVICE)
    t["qmap2"] = None if case["qmap2"] is None else case["qmap2"].to(DEVICE)
    args = (name, t["g"], t["p"], t["state1"], t["state2"], h["beta1"], h["beta2"], h["beta3"], h["alpha"], h["eps"],
            h["step"], h["lr"], t["qmap1"], t["qmap2"], t["absmax1"], t["absmax2"], h["weight_decay"],
            h["gnorm_scale"], h["skip_zeros"])
    (launch or kernels.update_8bit_blockwise)(*args, **launch_options)
    for gb in guarded.values():
        gb.check_guards()
    return {k: gb.view.cpu() for k, gb in guarded.items()}


def reference_8bit(name: str, case: dict, h: dict) -> reference.Update8bit:
    state1 = case["state1"]
    return reference.update_8bit_blockwise(
        name, case["g"], case["p"], state1, case["state2"], h["beta1"], h["beta2"], h["beta3"], h["alpha"],
        h["eps"], h["step"], h["lr"], case["qmap1"], case["qmap2"], case["absmax1"], case["absmax2"],
        h["weight_decay"], h["gnorm_scale"], h["skip_zeros"],
    )


def assert_codes(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal codes, except a rare 1-code step at an exact midpoint (fp32 rounding order)."""
    diff = (got.int() - want.int()).abs().reshape(-1)
    assert int(diff.max()) <= 1, f"codes differ by up to {int(diff.max())}"
    assert int((diff > 0).sum()) <= max(1, diff.numel() // 100_000), f"{int((diff > 0).sum())} codes differ"


def assert_param(got: torch.Tensor, want: torch.Tensor, old: torch.Tensor, update_rtol: float = 8 * 2**-23) -> None:
    """``p`` within a few ulp of its dtype, plus a few fp32 ulp of the update ``|want - old|``: the
    kernels' update direction uses the fast ``div``/``sqrt`` (and the reference's CPU ``sqrt`` is
    not correctly rounded), so its error scales with the step, not with ``p``."""
    ulp = torch.finfo(want.dtype).eps
    got, want, old = got.float().reshape(-1), want.float().reshape(-1), old.float().reshape(-1)
    tolerance = 4 * ulp * want.abs() + update_rtol * (want - old).abs() + 1e-30
    bad = ~((got - want).abs() <= tolerance) & (got != want) & ~(got.isnan() & want.isnan())
    assert not bad.any(), f"{int(bad.sum())} parameters differ, e.g. {got[bad][:4].tolist()} vs {want[bad][:4].tolist()}"


def assert_8bit(out: dict, ref: reference.Update8bit, old_p: torch.Tensor) -> None:
    assert_param(out["p"], ref.p, old_p)
    assert_codes(out["state1"], ref.state1)
    torch.testing.assert_close(out["absmax1"], ref.absmax1, rtol=1e-6, atol=0, equal_nan=True)
    if ref.state2 is not None:
        assert_codes(out["state2"], ref.state2)
        torch.testing.assert_close(out["absmax2"], ref.absmax2, rtol=1e-6, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("name", reference.OPTIMIZERS_8BIT)
def test_8bit_matches_reference(name, dtype):
    gen = torch.Generator().manual_seed(hash((name, str(dtype))) % 2**31)
    n = int(torch.randint(1000, 4000, (), generator=gen)) | 1  # odd: a partial last block
    case = make_8bit(name, n, dtype, gen)
    h = hyper(name, gen, weight_decay=0.0 if dtype == torch.float16 else 0.02)
    assert_8bit(run_8bit(name, case, h), reference_8bit(name, case, h), case["p"])


@pytest.mark.parametrize("name", ["momentum", "lion", "adam"])
def test_8bit_first_step_full_blocks(name):
    gen = torch.Generator().manual_seed(1)
    case = make_8bit(name, 3 * 2048, torch.float32, gen)  # whole chunks only: the unmasked path
    h = hyper(name, gen, step=1)
    assert_8bit(run_8bit(name, case, h), reference_8bit(name, case, h), case["p"])


@pytest.mark.parametrize("name", ["adam", "ademamix", "momentum", "rmsprop", "lion", "adagrad"])
def test_8bit_nonfinite_gradients(name):
    """2-state: states zeroed and p kept where g is NaN/Inf; 1-state: NaN flows into the block."""
    gen = torch.Generator().manual_seed(2)
    case = make_8bit(name, 2500, torch.float32, gen)
    case["g"][torch.randperm(2500, generator=gen)[:40]] = float("nan")
    case["g"][torch.randperm(2500, generator=gen)[:40]] = float("inf")
    h = hyper(name, gen)
    out, ref = run_8bit(name, case, h), reference_8bit(name, case, h)
    assert_8bit(out, ref, case["p"])
    if name in reference.TWO_STATE_OPTIMIZERS:
        bad = ~torch.isfinite(case["g"])
        assert torch.equal(out["p"][bad], case["p"][bad])
        zero = dequantize_blockwise(out["state2"], out["absmax2"], case["qmap2"], 256, torch.float32)
        assert (zero[bad] == 0).all()


@pytest.mark.parametrize("name", ["momentum", "rmsprop", "lion", "adagrad"])
def test_8bit_skip_zeros(name):
    gen = torch.Generator().manual_seed(3)
    case = make_8bit(name, 3333, torch.bfloat16, gen)
    case["g"][torch.rand(3333, generator=gen) < 0.3] = 0
    h = hyper(name, gen, skip_zeros=True)
    out, ref = run_8bit(name, case, h), reference_8bit(name, case, h)
    assert_8bit(out, ref, case["p"])
    skipped = case["g"] == 0
    assert torch.equal(out["p"][skipped], case["p"][skipped])


def test_search_tables_of_dynamic_maps():
    """Both dynamic maps need one compare after the bucket lookup; keys are monotone."""
    tables = kernels.search_tables(dynamic_map(True), dynamic_map(False))
    assert (tables.search, tables.k, tables.negatives) == (kernels.SEARCH_BUCKETS, 1, 127)
    x = torch.sort(torch.randn(4000) * 10.0 ** torch.randint(-12, 1, (4000,)))[0]  # |x| < 2 reach the kernel
    keys = kernels.bucket_keys(x[x.abs() < 2])
    assert (keys[1:] >= keys[:-1]).all()
    assert kernels.bucket_keys(torch.tensor([-1e-30, -0.0, 0.0, 1e-30])).tolist() == [kernels.LUT_SIDE.value - 1] * 2 + [kernels.LUT_SIDE.value] * 2


def crowded_map(gen: torch.Generator, crowd: int) -> torch.Tensor:
    """A sorted 256-entry map with ``crowd`` entries packed into one search bucket near 0.3."""
    rest = torch.rand(255 - crowd, generator=gen) * 2 - 1
    values = torch.cat([rest, 0.3 + torch.rand(crowd, generator=gen) * 1e-3, torch.zeros(1)])
    return torch.sort(values)[0]


@pytest.mark.parametrize("crowd,search,gather", [(40, 1, False), (40, 1, True), (4, 0, False)])
def test_8bit_crowded_maps(crowd, search, gather):
    """Maps whose buckets hold several midpoints: up to 4 compares after the bucket lookup, or
    the tree search beyond that. Momentum at step 1 without decay stores ``m = g`` exactly, and
    every block holds a 1.0, so the normalized values are ``g`` itself, half of them among the
    crowded codes."""
    gen = torch.Generator().manual_seed(4)
    case = make_8bit("momentum", 2048 + 700, torch.float32, gen)
    qmap1 = crowded_map(gen, crowd)
    case["qmap1"] = qmap1
    n = case["g"].numel()
    crowded = 0.3 + torch.rand(n, generator=gen) * 1e-3
    g = torch.where(torch.rand(n, generator=gen) < 0.5, crowded, torch.rand(n, generator=gen) * 2 - 1)
    g[::256] = 1.0
    case["g"] = g
    tables = kernels.search_tables(qmap1, None)
    assert tables.search == search and (search == kernels.SEARCH_TREE or 2 <= tables.k <= kernels.MAX_BUCKET_CODES)
    h = hyper("momentum", gen, step=1, weight_decay=0.0, gnorm_scale=1.0)
    out, ref = run_8bit("momentum", case, h, gather=gather), reference_8bit("momentum", case, h)
    assert torch.equal(out["state1"], ref.state1)
    assert_8bit(out, ref, case["p"])


@pytest.mark.parametrize("options", [dict(gather=True), dict(gather_lut=True), dict(blocks=4, num_warps=4)], ids=str)
def test_8bit_launch_variants_agree(options):
    """The benchmark's launch variants compute the same update as the default."""
    gen = torch.Generator().manual_seed(5)
    case = make_8bit("ademamix", 2600, torch.float16, gen)
    h = hyper("ademamix", gen)
    default = run_8bit("ademamix", case, h)
    variant = run_8bit("ademamix", case, h, **options)
    for k in default:
        assert torch.equal(default[k], variant[k]), k


def test_8bit_registered_kernel_checks_and_non_contiguous():
    """The GPU registration runs the op's checks and handles non-contiguous in-place tensors."""
    gen = torch.Generator().manual_seed(6)
    case = make_8bit("momentum", 64 * 48, torch.float32, gen)
    h = hyper("momentum", gen)
    ref = reference_8bit("momentum", case, h)
    p_t = case["p"].view(64, 48).t().contiguous().to(DEVICE).t()  # non-contiguous, same values
    g, s1, a1, q1 = (case[k].to(DEVICE) for k in ("g", "state1", "absmax1", "qmap1"))
    launch = triton_optim._optimizer_update_8bit_blockwise_triton
    launch("momentum", g.view(64, 48), p_t, s1.view(64, 48), None, h["beta1"], h["beta2"], 0.0, 0.0, h["eps"],
           h["step"], h["lr"], q1, None, a1, None, h["weight_decay"], h["gnorm_scale"])
    assert_param(p_t.cpu().reshape(-1), ref.p, case["p"])
    assert_codes(s1.cpu(), ref.state1)
    with pytest.raises(RuntimeError, match="state1"):
        launch("momentum", g, p_t, s1.float(), None, 0.9, 0.0, 0.0, 0.0, 1e-8, 1, 1e-3, q1, None, a1, None, 0.0, 1.0)
    with pytest.raises(ValueError, match="optimizer_name"):
        launch("lamb", g, p_t, s1, None, 0.9, 0.0, 0.0, 0.0, 1e-8, 1, 1e-3, q1, None, a1, None, 0.0, 1.0)


def as_device_scalars(h: dict) -> dict:
    """``h`` with ``lr``, ``step``, ``beta3``, ``alpha`` as 1-element DEVICE tensors of mixed dtypes
    (the form of the compiled step: the kernel reads them, the host never does)."""
    return dict(
        h, lr=torch.tensor([h["lr"]], dtype=torch.float64, device=DEVICE),
        step=torch.tensor(float(h["step"]), device=DEVICE), beta3=torch.tensor(h["beta3"], dtype=torch.float64, device=DEVICE),
        alpha=torch.tensor(h["alpha"], device=DEVICE),
    )


@pytest.mark.parametrize("step", [1, 2, 37, 100_000])
@pytest.mark.parametrize("name", reference.OPTIMIZERS_8BIT)
def test_8bit_device_scalars_equal_host_scalars(name, step):
    """Scalars read on the device (bias corrections by squaring in fp64 there) give the same bits
    as the host's Python-double constants, and match the reference."""
    gen = torch.Generator().manual_seed(hash((name, step)) % 2**31)
    case = make_8bit(name, 2 * 2048 + 300, torch.float32, gen)
    h = hyper(name, gen, step=step)
    host = run_8bit(name, case, h)
    device = run_8bit(name, case, as_device_scalars(h))
    for key, value in host.items():
        torch.testing.assert_close(device[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    assert_8bit(device, reference_8bit(name, case, h), case["p"])


def test_8bit_inplace_step_op_kernel():
    """``optimizer_step_8bit_blockwise_``'s GPU registration (tensor scalars) on a non-contiguous
    parameter equals the CPU op (the reference), and runs the op's checks."""
    gen = torch.Generator().manual_seed(7)
    case = make_8bit("adam", 64 * 48, torch.float32, gen)
    h = as_device_scalars(hyper("adam", gen))
    cpu = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    scalars_cpu = {k: h[k].cpu() for k in ("lr", "step", "beta3", "alpha")}
    torch.ops.inductor_quant.optimizer_step_8bit_blockwise_(
        "adam", cpu["g"], cpu["p"], cpu["state1"], cpu["state2"], cpu["qmap1"], cpu["qmap2"], cpu["absmax1"],
        cpu["absmax2"], scalars_cpu["lr"], scalars_cpu["step"], h["beta1"], h["beta2"], scalars_cpu["beta3"],
        scalars_cpu["alpha"], h["eps"], h["weight_decay"], h["gnorm_scale"],
    )
    p_t = case["p"].view(64, 48).t().contiguous().to(DEVICE).t()
    g, s1, s2, a1, a2, q1, q2 = (case[k].to(DEVICE) for k in ("g", "state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2"))
    launch = triton_optim._optimizer_step_8bit_blockwise_inplace_triton
    args = ["adam", g.view(64, 48), p_t, s1.view(64, 48), s2.view(64, 48), q1, q2, a1, a2, h["lr"], h["step"],
            h["beta1"], h["beta2"], h["beta3"], h["alpha"], h["eps"], h["weight_decay"], h["gnorm_scale"]]
    launch(*args)
    assert_param(p_t.cpu().reshape(-1), cpu["p"], case["p"])
    assert_codes(s1.cpu(), cpu["state1"])
    assert_codes(s2.cpu(), cpu["state2"])
    torch.testing.assert_close(a1.cpu(), cpu["absmax1"], rtol=1e-6, atol=0)
    args[9] = torch.tensor([1e-3, 1e-3], dtype=torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match="lr"):
        launch(*args)


# ---------------------------------------------------------------------------------------------
# 32-bit
# ---------------------------------------------------------------------------------------------


def make_32bit(name: str, n: int, dtype: torch.dtype, gen: torch.Generator) -> dict:
    rows = 2 if name == "ademamix" else 1
    s1 = (torch.randn(rows, n, generator=gen) * 0.01).squeeze(0)
    if nonneg_state(name):
        s1 = s1.abs() * 0.1
    case = dict(
        g=(torch.randn(n, generator=gen) * 0.1).to(dtype), p=torch.randn(n, generator=gen).to(dtype), state1=s1,
        state2=torch.rand(n, generator=gen) * 1e-3 if name in reference.TWO_STATE_OPTIMIZERS else None,
        unorm_vec=torch.rand(1, generator=gen),
    )
    return case


def run_32bit(name: str, case: dict, h: dict, max_unorm: float, launch=None) -> dict:
    guarded = {k: Guarded(case[k]) for k in ("p", "state1", "state2", "unorm_vec") if case[k] is not None}
    t = {k: gb.view for k, gb in guarded.items()}
    param_norm = float(case["p"].float().norm())
    (launch or kernels.update_32bit)(
        name, case["g"].to(DEVICE), t["p"], t["state1"], t.get("state2"), t["unorm_vec"], max_unorm, param_norm,
        h["beta1"], h["beta2"], h["beta3"], h["alpha"], h["eps"], h["weight_decay"], h["step"], h["lr"],
        h["gnorm_scale"], h["skip_zeros"],
    )
    for gb in guarded.values():
        gb.check_guards()
    return {k: gb.view.cpu() for k, gb in guarded.items()}


def assert_32bit(name: str, case: dict, h: dict, max_unorm: float, out: dict) -> None:
    ref = reference.update_32bit(
        name, case["g"], case["p"], case["state1"], case["state2"], case["unorm_vec"], max_unorm,
        float(case["p"].float().norm()), h["beta1"], h["beta2"], h["beta3"], h["alpha"], h["eps"],
        h["weight_decay"], h["step"], h["lr"], h["gnorm_scale"], h["skip_zeros"],
    )
    torch.testing.assert_close(out["state1"], ref.state1, rtol=1e-6, atol=0)
    if ref.state2 is not None:
        torch.testing.assert_close(out["state2"], ref.state2, rtol=1e-6, atol=0)
    # The update norm is a sum over the tensor: a different summation order, a scale within ~1e-6.
    torch.testing.assert_close(out["unorm_vec"], ref.unorm, rtol=1e-5, atol=0)
    # p: the reference's scale differs by ~1e-6 relative (its own summation order)
    assert_param(out["p"], ref.p, case["p"], 8 * 2**-23 if max_unorm == 0 else 1e-5)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("name", reference.OPTIMIZERS_32BIT)
def test_32bit_matches_reference(name, dtype):
    gen = torch.Generator().manual_seed(hash((name, str(dtype), 32)) % 2**31)
    n = int(torch.randint(3000, 9000, (), generator=gen)) | 1
    case = make_32bit(name, n, dtype, gen)
    max_unorm = {"lamb": 1.0, "lars": 0.02}.get(name, 0.0)
    h = hyper(name, gen, skip_zeros=dtype == torch.bfloat16)
    if h["skip_zeros"]:
        case["g"][torch.rand(n, generator=gen) < 0.2] = 0
    assert_32bit(name, case, h, max_unorm, run_32bit(name, case, h, max_unorm))


@pytest.mark.parametrize("name", ["adam", "momentum", "lion", "ademamix"])
def test_32bit_update_norm_clipping(name):
    """max_unorm > 0 on formulas other than lamb/lars, tight enough to clip (ademamix ignores it)."""
    gen = torch.Generator().manual_seed(7)
    case = make_32bit(name, 5000, torch.float32, gen)
    h = hyper(name, gen)
    assert_32bit(name, case, h, 1e-4, run_32bit(name, case, h, 1e-4))


def test_32bit_registered_kernel_checks():
    gen = torch.Generator().manual_seed(8)
    case = make_32bit("lamb", 4000, torch.float32, gen)
    h = hyper("lamb", gen)
    out = run_32bit("lamb", case, h, 1.0, launch=triton_optim._optimizer_update_32bit_triton)
    assert_32bit("lamb", case, h, 1.0, out)
    g = case["g"].to(DEVICE)
    with pytest.raises(RuntimeError, match="unorm_vec"):
        triton_optim._optimizer_update_32bit_triton(
            "lamb", g, g.clone(), g.clone(), g.clone(), None, 1.0, 1.0, 0.9, 0.99, 0.0, 0.0, 1e-8, 0.0, 1, 1e-3, 1.0)


# ---------------------------------------------------------------------------------------------
# Multi-tensor
# ---------------------------------------------------------------------------------------------

SIZES = (1, 255, 256, 2048, 3001, 300, 4097, 2048 * 2 + 5)


def multi_case_8bit(name: str, gen: torch.Generator, dtype: torch.dtype) -> list[dict]:
    return [make_8bit(name, n, dtype, gen) for n in SIZES]


def on_device(cases: list[dict], keys) -> list[dict]:
    """Fresh DEVICE copies (never aliases of the CPU originals, also when DEVICE is the CPU)."""
    return [{k: (c[k].to(DEVICE, copy=True) if isinstance(c[k], torch.Tensor) else c[k]) for k in keys} for c in cases]


@pytest.mark.parametrize("name,dtype", [("adam", torch.float32), ("ademamix", torch.bfloat16), ("lion", torch.float16)])
def test_multi_tensor_8bit_equals_per_tensor(name, dtype):
    gen = torch.Generator().manual_seed(9)
    cases = multi_case_8bit(name, gen, dtype)
    h = hyper(name, gen)
    keys = ("g", "p", "state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2")
    multi, single = on_device(cases, keys), on_device(cases, keys)
    pick = lambda k: [c[k] for c in multi]  # noqa: E731
    two = name in reference.TWO_STATE_OPTIMIZERS
    kernels.multi_update_8bit_blockwise(
        name, pick("g"), pick("p"), pick("state1"), pick("state2") if two else None, pick("absmax1"),
        pick("absmax2") if two else None, multi[0]["qmap1"], multi[0]["qmap2"], h["beta1"], h["beta2"], h["beta3"],
        h["alpha"], h["eps"], h["step"], h["lr"], h["weight_decay"], h["gnorm_scale"], h["skip_zeros"],
    )
    for c in single:
        kernels.update_8bit_blockwise(
            name, c["g"], c["p"], c["state1"], c["state2"], h["beta1"], h["beta2"], h["beta3"], h["alpha"], h["eps"],
            h["step"], h["lr"], c["qmap1"], c["qmap2"], c["absmax1"], c["absmax2"], h["weight_decay"],
            h["gnorm_scale"], h["skip_zeros"],
        )
    for m, s in zip(multi, single):
        for k in ("p", "state1", "state2", "absmax1", "absmax2"):
            if m[k] is not None:
                assert torch.equal(m[k], s[k]), (k, m["p"].numel())


@pytest.mark.parametrize("name,dtype", [("adam", torch.bfloat16), ("ademamix", torch.float32), ("rmsprop", torch.float16)])
def test_multi_tensor_32bit_equals_per_tensor(name, dtype):
    gen = torch.Generator().manual_seed(10)
    cases = [make_32bit(name, n, dtype, gen) for n in SIZES]
    h = hyper(name, gen)
    keys = ("g", "p", "state1", "state2")
    multi, single = on_device(cases, keys), on_device(cases, keys)
    pick = lambda k: [c[k] for c in multi]  # noqa: E731
    two = name in reference.TWO_STATE_OPTIMIZERS
    kernels.multi_update_32bit(
        name, pick("g"), pick("p"), pick("state1"), pick("state2") if two else None, h["beta1"], h["beta2"],
        h["beta3"], h["alpha"], h["eps"], h["step"], h["lr"], h["weight_decay"], h["gnorm_scale"], h["skip_zeros"],
    )
    for c in single:
        kernels.update_32bit(
            name, c["g"], c["p"], c["state1"], c["state2"], None, 0.0, 0.0, h["beta1"], h["beta2"], h["beta3"],
            h["alpha"], h["eps"], h["weight_decay"], h["step"], h["lr"], h["gnorm_scale"], h["skip_zeros"],
        )
    for m, s in zip(multi, single):
        for k in ("p", "state1", "state2"):
            if m[k] is not None:
                assert torch.equal(m[k], s[k]), (k, m["p"].numel())


def api_8bit(name: str, group: list[dict], h: dict, step) -> None:
    pick = lambda k: [c[k] for c in group]  # noqa: E731
    two = name in reference.TWO_STATE_OPTIMIZERS
    optim_kernels.multi_tensor_update_8bit_blockwise(
        name, pick("g"), pick("p"), pick("state1"), pick("state2") if two else None, pick("absmax1"),
        pick("absmax2") if two else None, group[0]["qmap1"], group[0]["qmap2"], beta1=h["beta1"], beta2=h["beta2"],
        beta3=h["beta3"], alpha=h["alpha"], eps=h["eps"], step=step, lr=h["lr"], weight_decay=h["weight_decay"],
        gnorm_scale=h["gnorm_scale"], skip_zeros=h["skip_zeros"],
    )


@pytest.mark.parametrize("launch", [False, True], ids=["device default", "launch path"])
def test_multi_tensor_api_equals_ops(launch, monkeypatch):
    """The public entry point equals per-tensor op calls, with per-tensor steps, two parameter
    dtypes and one non-contiguous parameter (which goes through the op). "launch path" makes the
    entry point take its one-launch path on whatever device the test runs (the interpreter on CPU)."""
    if launch:
        monkeypatch.setattr(optim_kernels, "TRITON_DEVICES", (torch.device(DEVICE).type,))
    gen = torch.Generator().manual_seed(11)
    cases = [make_8bit("adam", n, torch.bfloat16 if i == 1 else torch.float32, gen) for i, n in enumerate(SIZES[:6])]
    h = hyper("adam", gen)
    steps = [3, 3, 4, 3, 4, 3]
    keys = ("g", "p", "state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2")
    group, single = on_device(cases, keys), on_device(cases, keys)
    strided = torch.empty(2 * cases[3]["p"].numel(), device=DEVICE)[::2]  # non-contiguous: goes through the op
    group[3]["p"] = strided.copy_(cases[3]["p"])
    api_8bit("adam", group, h, steps)
    op = torch.ops.inductor_quant.optimizer_update_8bit_blockwise
    for c, step in zip(single, steps):
        op("adam", c["g"], c["p"], c["state1"], c["state2"], h["beta1"], h["beta2"], h["beta3"], h["alpha"], h["eps"],
           step, h["lr"], c["qmap1"], c["qmap2"], c["absmax1"], c["absmax2"], h["weight_decay"], h["gnorm_scale"])
    for m, s, c in zip(group, single, cases):
        assert_param(m["p"].cpu(), s["p"].cpu(), c["p"])
        for k in ("state1", "state2"):
            assert_codes(m[k].cpu(), s[k].cpu())
        for k in ("absmax1", "absmax2"):
            torch.testing.assert_close(m[k].cpu(), s[k].cpu(), rtol=1e-6, atol=0)


def test_multi_tensor_api_32bit_launch_path(monkeypatch):
    monkeypatch.setattr(optim_kernels, "TRITON_DEVICES", (torch.device(DEVICE).type,))
    gen = torch.Generator().manual_seed(19)
    cases = [make_32bit("ademamix", n, torch.float16 if i % 2 else torch.float32, gen) for i, n in enumerate(SIZES[:5])]
    h = hyper("ademamix", gen)
    group = on_device(cases, ("g", "p", "state1", "state2", "unorm_vec"))
    pick = lambda k: [c[k] for c in group]  # noqa: E731
    optim_kernels.multi_tensor_update_32bit(
        "ademamix", pick("g"), pick("p"), pick("state1"), pick("state2"), beta1=h["beta1"], beta2=h["beta2"],
        beta3=h["beta3"], alpha=h["alpha"], eps=h["eps"], step=h["step"], lr=h["lr"], weight_decay=h["weight_decay"],
        gnorm_scale=h["gnorm_scale"],
    )
    for c, m in zip(cases, group):
        assert_32bit("ademamix", c, h, 0.0, {k: m[k].cpu() for k in ("p", "state1", "state2", "unorm_vec")})


def test_multi_tensor_api_errors():
    gen = torch.Generator().manual_seed(12)
    c = on_device([make_8bit("adam", 600, torch.float32, gen)], ("g", "p", "state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2"))[0]
    common = dict(beta1=0.9, beta2=0.99, eps=1e-8, lr=1e-3)
    with pytest.raises(ValueError, match="grads"):
        optim_kernels.multi_tensor_update_8bit_blockwise(
            "adam", [], [c["p"]], [c["state1"]], [c["state2"]], [c["absmax1"]], [c["absmax2"]], c["qmap1"], c["qmap2"],
            step=1, **common)
    with pytest.raises(ValueError, match="states2"):
        optim_kernels.multi_tensor_update_8bit_blockwise(
            "adam", [c["g"]], [c["p"]], [c["state1"]], None, [c["absmax1"]], None, c["qmap1"], None, step=1, **common)
    with pytest.raises(ValueError, match="step"):
        optim_kernels.multi_tensor_update_8bit_blockwise(
            "adam", [c["g"]], [c["p"]], [c["state1"]], [c["state2"]], [c["absmax1"]], [c["absmax2"]], c["qmap1"],
            c["qmap2"], step=0, **common)
    with pytest.raises(RuntimeError, match="absmax1"):  # a bad tensor reaches the op's checks
        optim_kernels.multi_tensor_update_8bit_blockwise(
            "adam", [c["g"]], [c["p"]], [c["state1"]], [c["state2"]], [c["absmax1"][:-1]], [c["absmax2"]],
            c["qmap1"], c["qmap2"], step=1, **common)
    with pytest.raises(ValueError, match="unorm_vecs"):
        optim_kernels.multi_tensor_update_32bit(
            "lamb", [c["g"]], [c["p"]], [c["p"].clone()], [c["p"].clone()], step=1, max_unorm=1.0, **common)


def test_multi_tensor_api_32bit_with_update_norm():
    """lamb with max_unorm goes tensor by tensor through the op, each with its own norm."""
    gen = torch.Generator().manual_seed(13)
    cases = [make_32bit("lamb", n, torch.float32, gen) for n in (700, 1900)]
    h = hyper("lamb", gen)
    group = on_device(cases, ("g", "p", "state1", "state2", "unorm_vec"))
    pick = lambda k: [c[k] for c in group]  # noqa: E731
    optim_kernels.multi_tensor_update_32bit(
        "lamb", pick("g"), pick("p"), pick("state1"), pick("state2"), beta1=h["beta1"], beta2=h["beta2"], eps=h["eps"],
        step=h["step"], lr=h["lr"], weight_decay=h["weight_decay"], gnorm_scale=h["gnorm_scale"],
        unorm_vecs=pick("unorm_vec"), max_unorm=1.0,
    )
    for c, m in zip(cases, group):
        assert_32bit("lamb", c, h, 1.0, {k: m[k].cpu() for k in ("p", "state1", "state2", "unorm_vec")})


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------


def _bitsandbytes_ops():
    bnb = pytest.importorskip("bitsandbytes")
    if not hasattr(torch.ops.bitsandbytes, "optimizer_update_8bit_blockwise"):
        pytest.skip(f"bitsandbytes {bnb.__version__} has no optimizer ops")
    return torch.ops.bitsandbytes


@requires_cuda
@pytest.mark.parametrize("name", reference.OPTIMIZERS_8BIT)
def test_gpu_8bit_vs_bitsandbytes(name):
    """Same inputs through bitsandbytes' CUDA kernel: bnb's test_optim tolerances (dequantized
    states beyond atol 3e-3 / rtol 1e-3 in fewer than 20 elements per 4M, mean |p err| < 6e-5).
    Weight decay off for rmsprop/adagrad (bnb's numerator uses the raw gradient)."""
    ops = _bitsandbytes_ops()
    gen = torch.Generator().manual_seed(14)
    n = 1024 * 4096
    case = make_8bit(name, n, torch.float32, gen)
    h = hyper(name, gen, weight_decay=0.0 if nonneg_state(name) else 0.01, gnorm_scale=1.0)
    ours = run_8bit(name, case, h)
    theirs = {k: Guarded(case[k]).view for k in _IN_PLACE_8 if case[k] is not None}
    q1, q2 = case["qmap1"].cuda(), None if case["qmap2"] is None else case["qmap2"].cuda()
    ops.optimizer_update_8bit_blockwise(
        name, case["g"].cuda(), theirs["p"], theirs["state1"], theirs.get("state2"), h["beta1"], h["beta2"],
        h["beta3"], h["alpha"], h["eps"], h["step"], h["lr"], q1, q2, theirs["absmax1"], theirs.get("absmax2"),
        h["weight_decay"], h["gnorm_scale"], False,
    )
    rows = 2 if name == "ademamix" else 1
    for key, amax, qmap in (("state1", "absmax1", case["qmap1"]), ("state2", "absmax2", case["qmap2"])):
        if key not in theirs:
            continue
        r = rows if key == "state1" else 1
        deq = lambda codes, absmax: dequantize_blockwise(codes.cpu().view(r, n).reshape(-1), absmax.cpu().reshape(-1), qmap, 256, torch.float32)  # noqa: E731
        a, b = deq(ours[key], ours[amax]), deq(theirs[key], theirs[amax])
        assert int((~torch.isclose(a, b, rtol=1e-3, atol=3e-3)).sum()) < 20 * r
    err = (ours["p"] - theirs["p"].cpu()).abs()
    assert float(err.mean()) < 6e-5
    assert float((err / (theirs["p"].cpu().abs() + 1e-10)).mean()) < 6e-4


@requires_cuda
@pytest.mark.parametrize("name", ["adam", "ademamix", "momentum", "rmsprop", "lion", "adagrad"])
def test_gpu_32bit_vs_bitsandbytes(name):
    """bnb's 32-bit tolerances: states atol/rtol 1e-6/1e-5, at most 15 parameter mismatches."""
    ops = _bitsandbytes_ops()
    gen = torch.Generator().manual_seed(15)
    n = 1024 * 4097
    case = make_32bit(name, n, torch.float32, gen)
    h = hyper(name, gen, weight_decay=0.0, gnorm_scale=1.0)
    ours = run_32bit(name, case, h, 0.0)
    theirs = {k: Guarded(case[k]).view for k in ("p", "state1", "state2") if case[k] is not None}
    ops.optimizer_update_32bit(
        name, case["g"].cuda(), theirs["p"], theirs["state1"], theirs.get("state2"), None, 0.0, 0.0, h["beta1"],
        h["beta2"], h["beta3"], h["alpha"], h["eps"], 0.0, h["step"], h["lr"], 1.0, False,
    )
    for key in theirs:
        if key != "p":
            torch.testing.assert_close(ours[key], theirs[key].cpu(), rtol=1e-5, atol=1e-6)
    assert int((~torch.isclose(ours["p"], theirs["p"].cpu(), rtol=1e-5, atol=1e-6)).sum()) <= 15


@requires_cuda
def test_gpu_capture_with_unseen_maps_raises_naming_the_fix():
    """Inside a CUDA-graph capture the search tables of a map seen for the first time cannot be
    built (host copy): a clear error, not CUDA's 'cannot copy during capture'."""
    n = 4096
    p, g = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    state1, state2 = torch.zeros(n, dtype=torch.uint8, device="cuda"), torch.zeros(n, dtype=torch.uint8, device="cuda")
    absmax1, absmax2 = torch.zeros(n // 256, device="cuda"), torch.zeros(n // 256, device="cuda")
    scalars = [torch.full((1,), v, device="cuda") for v in (1e-3, 1.0, 0.0, 0.0)]

    def update(qmap1, qmap2):
        kernels.update_8bit_blockwise("adam", g, p, state1, state2, 0.9, 0.999, scalars[2], scalars[3], 1e-8,
                                      scalars[1], scalars[0], qmap1, qmap2, absmax1, absmax2, 0.0, 1.0)

    update(dynamic_map(True, "cuda"), dynamic_map(False, "cuda"))  # everything else cached eagerly
    unseen = (dynamic_map(True, "cuda"), dynamic_map(False, "cuda"))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="mark the maps static"):
        with torch.cuda.graph(graph):
            update(*unseen)


@requires_cuda
def test_gpu_multi_tensor_group():
    """A realistic group (mixed sizes, 2 dtypes, 2 steps) through the public API equals the ops."""
    gen = torch.Generator().manual_seed(16)
    sizes = [int(s) for s in torch.randint(1, 300_000, (60,), generator=gen)]
    cases = [make_8bit("adam", n, torch.float32 if i % 3 else torch.bfloat16, gen) for i, n in enumerate(sizes)]
    h = hyper("adam", gen)
    keys = ("g", "p", "state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2")
    group, single = on_device(cases, keys), on_device(cases, keys)
    steps = [5 if i % 4 else 6 for i in range(len(sizes))]
    api_8bit("adam", group, h, steps)
    for c, step in zip(single, steps):
        torch.ops.inductor_quant.optimizer_update_8bit_blockwise(
            "adam", c["g"], c["p"], c["state1"], c["state2"], h["beta1"], h["beta2"], 0.0, 0.0, h["eps"], step, h["lr"],
            c["qmap1"], c["qmap2"], c["absmax1"], c["absmax2"], h["weight_decay"], h["gnorm_scale"])
    for m, s in zip(group, single):
        for k in ("p", "state1", "state2", "absmax1", "absmax2"):
            assert torch.equal(m[k], s[k]), k


@requires_cuda
def test_gpu_8bit_more_than_2_31_elements():
    """8-bit adam over 2**31 + 1000 fp32 parameters (about 22 GB): int64 offsets and the last
    partial block, checked on the first and last blocks."""
    n = 2**31 + 1000
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs about 22 GB of GPU memory")
    torch.manual_seed(17)
    qmap1, qmap2 = dynamic_map(True, "cuda"), dynamic_map(False, "cuda")
    p = torch.randn(n, device="cuda")
    g = torch.randn(n, device="cuda") * 0.1
    s1 = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
    s2 = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
    blocks = math.ceil(n / 256)
    a1 = torch.rand(blocks, device="cuda") * 0.01
    a2 = torch.rand(blocks, device="cuda") * 1e-3
    h = hyper("adam", torch.Generator().manual_seed(17))
    lo, hi = slice(0, 4096), slice((blocks - 16) * 256, n)
    before = {k: (t[lo].cpu(), t[hi].cpu()) for k, t in dict(p=p, g=g, s1=s1, s2=s2).items()}
    absmax_before = {k: (t[:16].cpu(), t[blocks - 16:].cpu()) for k, t in dict(a1=a1, a2=a2).items()}
    torch.ops.inductor_quant.optimizer_update_8bit_blockwise(
        "adam", g, p, s1, s2, h["beta1"], h["beta2"], 0.0, 0.0, h["eps"], h["step"], h["lr"], qmap1, qmap2, a1, a2,
        h["weight_decay"], h["gnorm_scale"])
    for side, (sl, asl) in enumerate(((lo, slice(0, 16)), (hi, slice(blocks - 16, blocks)))):
        ref = reference.update_8bit_blockwise(
            "adam", before["g"][side], before["p"][side], before["s1"][side], before["s2"][side], h["beta1"],
            h["beta2"], 0.0, 0.0, h["eps"], h["step"], h["lr"], qmap1.cpu(), qmap2.cpu(), absmax_before["a1"][side],
            absmax_before["a2"][side], h["weight_decay"], h["gnorm_scale"],
        )
        assert_param(p[sl].cpu(), ref.p, before["p"][side])
        assert_codes(s1[sl].cpu(), ref.state1)
        assert_codes(s2[sl].cpu(), ref.state2)
        torch.testing.assert_close(a1[asl].cpu(), ref.absmax1, rtol=1e-6, atol=0)


@requires_cuda
def test_gpu_32bit_more_than_2_31_elements():
    """32-bit momentum over 2**31 + 1000 fp32 parameters (about 26 GB), first and last elements."""
    n = 2**31 + 1000
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs about 26 GB of GPU memory")
    torch.manual_seed(18)
    p = torch.randn(n, device="cuda")
    g = torch.randn(n, device="cuda")
    s1 = torch.randn(n, device="cuda") * 0.01
    h = hyper("momentum", torch.Generator().manual_seed(18))
    sides = (slice(0, 5000), slice(n - 5000, n))
    before = [(g[s].cpu(), p[s].cpu(), s1[s].cpu()) for s in sides]
    torch.ops.inductor_quant.optimizer_update_32bit(
        "momentum", g, p, s1, None, None, 0.0, 0.0, h["beta1"], 0.0, 0.0, 0.0, h["eps"], h["weight_decay"], h["step"],
        h["lr"], h["gnorm_scale"])
    for s, (g0, p0, s0) in zip(sides, before):
        ref = reference.update_32bit("momentum", g0, p0, s0, None, None, 0.0, 0.0, h["beta1"], 0.0, 0.0, 0.0, h["eps"],
                                     h["weight_decay"], h["step"], h["lr"], h["gnorm_scale"])
        torch.testing.assert_close(s1[s].cpu(), ref.state1, rtol=1e-6, atol=0)
        assert_param(p[s].cpu(), ref.p, p0)
