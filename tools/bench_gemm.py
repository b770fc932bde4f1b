"""4-bit GEMV / small-M matmul on the GPU: inductor_quant's fused kernels, bitsandbytes CUDA, bf16 F.linear.

Bytes counted for the 4-bit rows: packed weight + fp32 absmax + A + out (bf16); for bf16 F.linear:
the bf16 weight + A + out. NF4, blocksize 64, bf16 activations, weights N x K (out x in).

    python tools/bench_gemm.py [--json bench_gemm.json]      # the table (also run by bench_kernels.py)
    python tools/bench_gemm.py --sweep [--json sweep.json]   # every tile config, and the M crossover
    python tools/bench_gemm.py --prologue [--json prologue.json]  # large M compiled under max-autotune

``run(copy_bw)`` returns the rows for ``tools/bench_kernels.py``, including the sibling groups of a
Llama-3-8B layer at M = 1 (q/k/v, gate/up): ``gemm_4bit_grouped`` (one launch) against the same
weights as separate ``gemm_4bit`` / bitsandbytes gemv calls and bf16 ``F.linear`` on the
concatenated weight, and for gate/up ``gemm_4bit_swiglu`` (SiLU·up in the GEMV's epilogue)
against the grouped op followed by the SiLU and the product. ``--sweep`` times each tile
configuration of the fused kernels per shape and M, prints the best, and times the fused kernel
against dequantize + F.linear for growing M (the ``FUSED_MAX_M`` threshold). ``--prologue`` compiles
``F.linear(x, dequantize_4bit(W))`` at M above that threshold under max-autotune twice — with the
``template_prologue`` pass (the dequantize offered to Inductor's Triton matmul templates as a
prologue) and without it (the fused op: dequantize kernel + cuBLAS) — and times both next to the
eager op, bitsandbytes and bf16 ``F.linear``; each compiled row notes the kernels it runs.
"""

from __future__ import annotations

import os
import sys

import re
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

import inductor_quant  # noqa: E402,F401  (registers the ops)
from inductor_quant.code_tables import get_4bit_code  # noqa: E402
from inductor_quant.kernels import gemm as kernels  # noqa: E402
from inductor_quant.ops import triton_gemm  # noqa: E402
from inductor_quant.reference import fourbit as reference  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
MS = [1, 4, 16, 64]
GROUPS = {"q/k/v": [(4096, 4096), (1024, 4096), (1024, 4096)], "gate/up": [(14336, 4096), (14336, 4096)]}
SWEEP_MS = [1, 16, 64]  # M = 4 runs the M = 16 kernel (BLOCK_M = 16) on the same weight bytes
BLOCKSIZE = 64
ops = torch.ops.inductor_quant


def _bnb():
    try:
        import bitsandbytes

        return bitsandbytes
    except ImportError:
        return None


class Problem:
    """One NF4 weight (and its bf16 original) on the GPU."""

    def __init__(self, N: int, K: int):
        self.N, self.K = N, K
        self.W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        bnb = _bnb()
        if bnb is not None:
            self.B, self.state = bnb.functional.quantize_4bit(self.W, blocksize=BLOCKSIZE, quant_type="nf4")
            self.absmax = self.state.absmax
        else:
            self.state = None
            self.B, self.absmax = reference.quantize_4bit(self.W, BLOCKSIZE, "nf4", torch.uint8)
        self.code = get_4bit_code("nf4", "cuda")
        self._weight64 = None

    def exact(self, A: torch.Tensor) -> torch.Tensor:
        """float64 ``A @ W_q.T`` with the dequantized (fp32-exact) weight."""
        if self._weight64 is None:
            weight = reference.dequantize_4bit(self.B, self.absmax, BLOCKSIZE, "nf4", [self.N, self.K], torch.float32)
            self._weight64 = weight.double()
        return A.double() @ self._weight64.T

    def quant_bytes(self, M: int) -> int:
        return benchlib.tensor_bytes(self.B, self.absmax) + 2 * M * (self.K + self.N)

    def bf16_bytes(self, M: int) -> int:
        return benchlib.tensor_bytes(self.W) + 2 * M * (self.K + self.N)


def _op_name(M: int) -> str:
    return "gemv_4bit M=1" if M == 1 else f"gemm_4bit M={M}"


def _ours(p: Problem, A: torch.Tensor):
    if A.shape[0] == 1:
        return lambda: ops.gemv_4bit(A, p.B, [p.N, p.K], p.absmax, p.code, BLOCKSIZE)
    return lambda: ops.gemm_4bit(A, p.B, [p.N, p.K], p.absmax, BLOCKSIZE, "nf4")


def _theirs(p: Problem, A: torch.Tensor):
    bnb = _bnb()
    if bnb is None or p.state is None:
        return None
    if A.shape[0] == 1:
        return lambda: torch.ops.bitsandbytes.gemv_4bit(A, p.B, [p.N, p.K], p.absmax, p.state.code, BLOCKSIZE)
    if hasattr(torch.ops.bitsandbytes, "gemm_4bit"):
        return lambda: torch.ops.bitsandbytes.gemm_4bit(A, p.B, [p.N, p.K], p.absmax, BLOCKSIZE, "nf4")
    return lambda: bnb.matmul_4bit(A, p.B, p.state)


def _check(p: Problem, A: torch.Tensor, out: torch.Tensor) -> float:
    """Relative error of ``out`` against the float64 product with the dequantized weight."""
    exact = p.exact(A)
    return ((out.double() - exact).norm() / exact.norm()).item()


def _graph_bench(fn) -> tuple[float, str]:
    """Median GPU time of ``fn`` replayed from a CUDA graph (host launch overhead excluded; it is
    reported separately), or eagerly if ``fn`` cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return benchlib.bench(graph.replay), "graph"
    except Exception as error:  # noqa: BLE001  (report and time eagerly instead)
        torch.cuda.synchronize()
        return benchlib.bench(fn), f"eager ({type(error).__name__})"


def _cases(shapes, ms) -> Iterator[tuple[Problem, str, int, torch.Tensor]]:
    """``(weight, "NxK", M, bf16 activations [M, K])`` for every shape and M, one weight at a time."""
    for N, K in shapes:
        p = Problem(N, K)
        for M in ms:
            yield p, f"{N}x{K}", M, torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        del p
        torch.cuda.empty_cache()


def _baseline_rows(op: str, shape: str, p: Problem, A: torch.Tensor, copy_bw: float) -> list[benchlib.Row]:
    """bitsandbytes (when installed) and bf16 ``F.linear`` on the same weight and activations."""
    M = A.shape[0]
    rows = []
    theirs = _theirs(p, A)
    if theirs is not None:
        t, how = _graph_bench(theirs)
        rows.append(benchlib.make_row(op, shape, "bnb", t, p.quant_bytes(M), copy_bw,
                                      f"{how}, host {_cpu_us_per_call(theirs):.0f} us/call"))
    t, how = _graph_bench(lambda: F.linear(A, p.W))
    rows.append(benchlib.make_row(op, shape, "torch bf16 linear", t, p.bf16_bytes(M), copy_bw, how))
    return rows


def run(copy_bw: float, shapes=SHAPES, ms=MS) -> list[benchlib.Row]:
    """Time ours, bitsandbytes and bf16 F.linear on every shape and M; check ours first."""
    rows: list[benchlib.Row] = []
    for p, shape, M, A in _cases(shapes, ms):
        ours = _ours(p, A)
        err = _check(p, A, ours())
        if not err < 4e-3:
            raise AssertionError(f"inductor_quant {_op_name(M)} {shape}: relative error {err:.2e}")
        path = kernels.fused_path(M, p.B, p.K, BLOCKSIZE) if M <= kernels.FUSED_MAX_M else "dequant+linear"
        t, how = _graph_bench(ours)
        rows.append(benchlib.make_row(_op_name(M), shape, "inductor_quant", t, p.quant_bytes(M), copy_bw,
                                      f"{path}, {how}, rel err {err:.1e}, host {_cpu_us_per_call(ours):.0f} us/call"))
        rows += _baseline_rows(_op_name(M), shape, p, A, copy_bw)
    return rows + run_groups(copy_bw)


def run_groups(copy_bw: float) -> list[benchlib.Row]:
    """Each of ``GROUPS`` at M = 1: grouped op, separate ops, bitsandbytes, bf16 concatenated (and
    for gate/up the SwiGLU epilogue against grouped + SiLU·up)."""
    rows: list[benchlib.Row] = []
    for name, shapes in GROUPS.items():
        problems = [Problem(N, K) for N, K in shapes]
        K = shapes[0][1]
        sizes = [p.N for p in problems]
        A = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        B, absmax = [p.B for p in problems], [p.absmax for p in problems]
        shape = f"{'+'.join(map(str, sizes))}x{K}"
        nbytes = sum(p.quant_bytes(1) for p in problems)

        def grouped():
            return ops.gemm_4bit_grouped(A, B, sizes, absmax, BLOCKSIZE, "nf4")

        def separate():
            return [ops.gemm_4bit(A, p.B, [p.N, K], p.absmax, BLOCKSIZE, "nf4") for p in problems]

        # a lone weight's GEMV may use other tiles (another summation order): equal to bf16's last bit
        torch.testing.assert_close(grouped(), torch.cat(separate(), dim=1), rtol=2**-7, atol=1e-3)
        variants = [("inductor_quant grouped", grouped), ("inductor_quant separate", separate)]
        if name == "gate/up":  # the SwiGLU of the two: in the GEMV's epilogue, or as two more ops
            variants += [
                ("inductor_quant swiglu epilogue", lambda: ops.gemm_4bit_swiglu(A, B, sizes, absmax, BLOCKSIZE, "nf4")),
                ("inductor_quant grouped + silu*up", lambda: reference.swiglu(*grouped().split(sizes[0], dim=1))),
            ]
            torch.testing.assert_close(variants[-2][1](), variants[-1][1](), rtol=2**-7, atol=1e-3)
        for impl, fn in variants:
            t, how = _graph_bench(fn)
            rows.append(benchlib.make_row(f"{name} M=1", shape, impl, t, nbytes, copy_bw,
                                          f"{how}, host {_cpu_us_per_call(fn):.0f} us/call"))
        theirs = [_theirs(p, A) for p in problems]
        if all(fn is not None for fn in theirs):
            t, how = _graph_bench(lambda: [fn() for fn in theirs])
            rows.append(benchlib.make_row(f"{name} M=1", shape, "bnb separate", t, nbytes, copy_bw, how))
        weight = torch.cat([p.W for p in problems])
        t, how = _graph_bench(lambda: F.linear(A, weight))
        rows.append(benchlib.make_row(f"{name} M=1", shape, "torch bf16 linear (concatenated)", t,
                                      benchlib.tensor_bytes(weight) + 2 * (K + sum(sizes)), copy_bw, how))
        del problems, weight
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------
# --sweep: tile configurations and the M crossover
# ------------------------------------------------------------------------------------------------


def gemv_configs() -> list[kernels.KernelConfig]:
    return [
        # BLOCK_K = 1024 per warp: one 4-word chunk per thread and row (kernels._gemv_rows)
        kernels.KernelConfig(block_n=bn, block_k=1024 * nw, num_warps=nw)
        for bn in (2, 4, 8)
        for nw in (1, 2, 4)
    ]


def dot_configs(block_m: int) -> list[kernels.KernelConfig]:
    configs = [
        kernels.KernelConfig(block_n=bn, block_k=bk, num_warps=nw, block_m=block_m)
        for bn in (64, 128)
        for bk in (64, 128, 256)
        for nw in (4, 8)
        if bn * bk // (32 * nw) <= 128 and bn * bk // 8 >= 32 * nw
    ]
    configs += [
        kernels.KernelConfig(block_n=64, block_k=128, num_warps=4, block_m=block_m, split_k=split)
        for split in (1, 2, 4, 8, 16)
    ]
    return configs


def _time_config(p: Problem, A, path: str, cfg: kernels.KernelConfig, out, rep_ms: int = 25) -> float:
    def fn():
        return kernels.gemm_4bit_fused(A, p.B, p.N, p.K, p.absmax, p.code, BLOCKSIZE, out=out, path=path, config=cfg)

    out.fill_(float("nan"))
    fn()
    err = _check(p, A, out)
    if not err < 4e-3:
        raise AssertionError(f"{path} {cfg} on {p.N}x{p.K} M={A.shape[0]}: relative error {err:.2e}")
    return benchlib.bench(fn, warmup_ms=5, rep_ms=rep_ms)


def quick_candidates(M: int) -> list[tuple[str, kernels.KernelConfig]]:
    """The dot-kernel configurations the full sweep left in contention (and the ``act_left``
    variant), timed with longer repeats."""
    KC = kernels.KernelConfig
    bm = 16 if M <= 16 else 64
    return [
        ("dot", KC(64, 128, 4, block_m=bm)),
        ("dot", KC(64, 128, 4, block_m=64, act_left=True)),
        ("dot", KC(128, 128, 4, block_m=64, act_left=True)),
        ("dot", KC(64, 256, 4, block_m=bm)),
        ("dot", KC(128, 128, 8, block_m=bm)),
    ]


def sweep(copy_bw: float, shapes=SHAPES, quick: bool = False) -> dict:
    results = []
    best_lines = []
    if quick:
        shapes = [(4096, 14336), (28672, 8192)]
    for N, K in shapes:
        p = Problem(N, K)
        for M in ([16, 64] if quick else SWEEP_MS):
            A = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            if quick:
                candidates = quick_candidates(M)
            else:
                candidates = [("gemv", cfg) for cfg in gemv_configs()] if M == 1 else []
                candidates += [("dot", cfg) for cfg in dot_configs(16 if M <= 16 else 64)]
            timed = []
            for path, cfg in candidates:
                t = _time_config(p, A, path, cfg, out, rep_ms=60 if quick else 25)
                pct = 100 * p.quant_bytes(M) / (t * 1e-6) / copy_bw
                timed.append((t, path, cfg))
                results.append(dict(N=N, K=K, M=M, path=path, cfg=cfg.__dict__, time_us=t, copy_pct=pct))
            timed.sort(key=lambda x: x[0])
            for t, path, cfg in timed[:3]:
                pct = 100 * p.quant_bytes(M) / (t * 1e-6) / copy_bw
                best_lines.append(f"{N}x{K} M={M:<3} {path:5} {t:8.1f} us {pct:5.1f} %  {cfg}")
                print(best_lines[-1], flush=True)
            if M == 1 and not quick:
                gemv_best = min((x for x in timed if x[1] == "gemv"), key=lambda x: x[0])
                dot_best = min((x for x in timed if x[1] == "dot"), key=lambda x: x[0])
                best_lines.append(f"  M=1 best gemv {gemv_best[0]:.1f} us vs best dot {dot_best[0]:.1f} us")
                print(best_lines[-1], flush=True)
        del p
        torch.cuda.empty_cache()
    crossover = [] if quick else _crossover(copy_bw)
    return {"configs": results, "best": best_lines, "crossover": crossover}


def _crossover(copy_bw: float) -> list[str]:
    """Fused dot kernel vs dequantize + F.linear for growing M (FUSED_MAX_M)."""
    lines = []
    bnb = _bnb()
    for N, K in ((4096, 4096), (28672, 8192)):
        p = Problem(N, K)
        t_ref_deq = benchlib.bench(lambda: triton_gemm._dequantized_weight(
            p.B, [N, K], p.absmax, BLOCKSIZE, "nf4", torch.bfloat16, None, None, None))
        t_bnb_deq = benchlib.bench(lambda: bnb.functional.dequantize_4bit(p.B, p.state)) if bnb else float("nan")
        ideal_deq = (benchlib.tensor_bytes(p.B, p.absmax) + 2 * N * K) / (0.9 * copy_bw) * 1e6
        lines.append(f"{N}x{K}: dequant op-path {t_ref_deq:.1f} us, bnb dequant {t_bnb_deq:.1f} us, "
                     f"90%-copy dequant {ideal_deq:.1f} us")
        for M in (64, 96, 128, 192, 256, 384):
            A = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            fused = []
            for bm in (64, 128):
                for bn, bk, nw in ((64, 128, 4), (128, 128, 8), (128, 64, 8), (64, 64, 4)):
                    cfg = kernels.KernelConfig(block_n=bn, block_k=bk, num_warps=nw, block_m=bm)
                    fused.append((_time_config(p, A, "dot", cfg, out), cfg))
            t_fused, cfg = min(fused, key=lambda x: x[0])
            t_linear = benchlib.bench(lambda: F.linear(A, p.W))
            lines.append(f"{N}x{K} M={M:<4} fused {t_fused:8.1f} us ({cfg.block_m},{cfg.block_n},{cfg.block_k},"
                         f"{cfg.num_warps})  linear {t_linear:7.1f} us  + dequant: bnb {t_bnb_deq + t_linear:7.1f}"
                         f"  ideal {ideal_deq + t_linear:7.1f}  op-path {t_ref_deq + t_linear:7.1f}")
            print(lines[-1], flush=True)
        del p
        torch.cuda.empty_cache()
    return lines


def profile(path: str) -> None:
    """Launch one kernel a few times on 28672x8192 (for ``ncu -k regex:<kernel>``)."""
    p = Problem(28672, 8192)
    M = 1 if path == "gemv" else 16
    A = torch.randn(M, p.K, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        kernels.gemm_4bit_fused(A, p.B, p.N, p.K, p.absmax, p.code, BLOCKSIZE, path=path)
    torch.cuda.synchronize()


def host_profile() -> None:
    """cProfile of the eager host path of the ops (what an un-graphed decode step pays per layer)."""
    import cProfile
    import pstats

    p = Problem(4096, 4096)
    for M in (1, 16):
        A = torch.randn(M, p.K, device="cuda", dtype=torch.bfloat16)
        fn = _ours(p, A)
        print(f"M={M}: ours {_cpu_us_per_call(fn):.0f} us/call, direct launcher "
              f"{_cpu_us_per_call(lambda: kernels.gemm_4bit_fused(A, p.B, p.N, p.K, p.absmax, p.code, BLOCKSIZE)):.0f}"
              f" us/call, bnb {_cpu_us_per_call(_theirs(p, A)):.0f} us/call")
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(300):
            fn()
        profiler.disable()
        torch.cuda.synchronize()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(14)


def _cpu_us_per_call(fn, calls: int = 200) -> float:
    """Host time per call, launches queued back to back (the eager overhead of an op)."""
    import time

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


PROLOGUE_SHAPES = [(4096, 4096), (14336, 4096)]
PROLOGUE_MS = [256, 1024, 4096]


def _compiled_linear(p: Problem, A: torch.Tensor, template_prologues: bool) -> tuple[object, str, float]:
    """``F.linear(A, dequantize_4bit(W))`` compiled under max-autotune, the template prologue pass
    on or off: ``(compiled, the kernels its generated code runs, compile seconds)``."""
    from torch._inductor.utils import run_and_get_code

    from inductor_quant.compile import compile as iq_compile
    from inductor_quant.patterns.pass_manager import QuantPassConfig

    def linear(x):
        return F.linear(x, ops.dequantize_4bit(p.B, p.absmax, BLOCKSIZE, "nf4", [p.N, p.K], x.dtype))

    torch._dynamo.reset()
    config = QuantPassConfig(template_prologues=template_prologues)
    compiled = iq_compile(linear, fullgraph=True, options={"max_autotune": True}, pass_config=config)
    start = time.perf_counter()
    _, source = run_and_get_code(compiled, A)
    seconds = time.perf_counter() - start
    code = "\n".join(source)
    launched = re.findall(r"^\s+(\w+)\.run\(", code, re.M)
    launched += re.findall(r"^\s+(?:buf\d+ = )?((?:extern_kernels|torch\.ops\.inductor_quant)\.\w+)", code, re.M)
    return (lambda: compiled(A)), " + ".join(launched), seconds


def run_prologue(copy_bw: float, shapes=PROLOGUE_SHAPES, ms=PROLOGUE_MS) -> list[benchlib.Row]:
    """Large M: the compiled dequantize + linear with and without the template prologue pass, the
    eager op, bitsandbytes and bf16 F.linear (bytes: as the 4-bit rows, the bf16 weight for bf16)."""
    rows: list[benchlib.Row] = []
    for p, shape, M, A in _cases(shapes, ms):
        op = f"compiled linear M={M}"
        t, how = _graph_bench(_ours(p, A))
        rows.append(benchlib.make_row(op, shape, "inductor_quant op (eager)", t, p.quant_bytes(M), copy_bw, how))
        for impl, prologues in (("compiled, template prologue", True), ("compiled, fused op", False)):
            fn, kernels_run, seconds = _compiled_linear(p, A, prologues)
            err = _check(p, A, fn())
            if not err < 4e-3:
                raise AssertionError(f"{impl} {shape} M={M}: relative error {err:.2e}")
            t, how = _graph_bench(fn)
            note = f"{how}, rel err {err:.1e}, compile {seconds:.0f} s, runs {kernels_run}"
            rows.append(benchlib.make_row(op, shape, impl, t, p.quant_bytes(M), copy_bw, note))
        rows += _baseline_rows(op, shape, p, A, copy_bw)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = benchlib.cli_parser(__doc__, "bench_gemm.json", "where to write the results")
    parser.add_argument("--sweep", action="store_true", help="time every tile config and the M crossover")
    parser.add_argument("--profile", choices=("gemv", "dot"), help="only launch one kernel (for ncu)")
    parser.add_argument("--quick", action="store_true", help="with --sweep: only the configs still in contention")
    parser.add_argument("--prologue", action="store_true", help="large M compiled under max-autotune, template prologue on/off")
    parser.add_argument("--host-profile", action="store_true", help="cProfile the ops' eager host path")
    args = parser.parse_args(argv)
    if benchlib.cuda_missing("bench_gemm"):
        return 2
    if args.profile:
        profile(args.profile)
        return 0
    if args.host_profile:
        host_profile()
        return 0
    copy_bw, meta = benchlib.device_setup()
    if args.sweep:
        import json

        result = sweep(copy_bw, quick=args.quick)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, **result}, f, indent=1)
        print("\n".join(result["best"]))
        print("\n".join(result["crossover"]))
        return 0
    rows = run_prologue(copy_bw) if args.prologue else run(copy_bw)
    benchlib.write_json(args.json, rows, meta)
    print(benchlib.format_table(rows))
    for row in rows:
        if row.note:
            print(f"{row.op} {row.shape} {row.impl}: {row.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
