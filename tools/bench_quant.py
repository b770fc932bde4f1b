"""GPU benchmark of the quantize / dequantize kernels, side by side with bitsandbytes CUDA.

``run(copy_bw)`` (used by ``tools/bench_kernels.py``) times ``torch.ops.inductor_quant``'s
quantize_4bit / dequantize_4bit (NF4, blocksize 64) and quantize_blockwise / dequantize_blockwise
(dynamic map, blocksize 256) on bf16 weights of the four benchmark shapes, and the same ops of
``torch.ops.bitsandbytes`` when its CUDA kernels are importable. Bytes moved = every input read once
plus every output written once (the 1 KB code tables included).

Run alone::

    python tools/bench_quant.py [--check] [--sweep] [--json bench_quant.json]
    python tools/bench_quant.py --producer [--json bench_quant_producer.json]

``--check`` compares every op, eager and compiled, with the pure-torch reference (bit-exact) and
with bitsandbytes on each shape before timing; ``--sweep`` also times launch-configuration variants of each kernel
(tile, warps, code-lookup path, 8-bit search) through the launchers and prints the fastest.
``--producer`` only times a quantize of a pointwise product (``op(A * 2)``) compiled both ways: the
hand-written kernel after a generated kernel for the product (what ``patterns/standalone.py``
chooses) and one generated kernel for both (the lowering fused with its producer); both are
checked bit-exact against the reference first.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192))
SWEEP_SHAPES = ((4096, 4096), (28672, 8192))
BS4 = 64
BS8 = 256
DTYPE = torch.bfloat16


def _bnb_ops():
    """``torch.ops.bitsandbytes`` with its CUDA kernels, or None."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return None
    ops = getattr(torch.ops, "bitsandbytes", None)
    if ops is None or not hasattr(ops, "quantize_4bit"):
        return None
    return ops


class Case:
    """Inputs and outputs of every op for one weight shape (fresh random data, never zeros)."""

    def __init__(self, shape: tuple[int, int]) -> None:
        import inductor_quant  # noqa: F401  (registers the ops)
        from inductor_quant.code_tables import dynamic_map

        self.shape = shape
        self.label = f"{shape[0]}x{shape[1]}"
        self.n = shape[0] * shape[1]
        self.A = torch.randn(shape, device="cuda", dtype=DTYPE)
        self.code8 = dynamic_map(device="cuda")
        ops = torch.ops.inductor_quant
        self.packed, self.absmax4 = ops.quantize_4bit(self.A, BS4, "nf4", torch.uint8)
        self.q8, self.absmax8 = ops.quantize_blockwise(self.A, self.code8, BS8)
        self.out = torch.empty(shape, device="cuda", dtype=DTYPE)
        n = self.n
        self.bytes = {
            "quantize_4bit": benchlib.tensor_bytes(self.A, self.packed, self.absmax4),
            "dequantize_4bit": benchlib.tensor_bytes(self.packed, self.absmax4, self.out),
            "quantize_blockwise": benchlib.tensor_bytes(self.A, self.code8, self.q8, self.absmax8),
            "dequantize_blockwise": benchlib.tensor_bytes(self.q8, self.absmax8, self.code8, self.out),
        }
        assert self.bytes["dequantize_4bit"] == n // 2 + 4 * (n // BS4) + 2 * n

    def op_calls(self, ops) -> dict:
        """The four op calls of ``ops`` (``torch.ops.inductor_quant`` or ``torch.ops.bitsandbytes``)."""
        A, shape = self.A, list(self.shape)
        return {
            "quantize_4bit": lambda: ops.quantize_4bit(A, BS4, "nf4", torch.uint8),
            "dequantize_4bit": lambda: ops.dequantize_4bit.out(
                self.packed, self.absmax4, BS4, "nf4", shape, DTYPE, out=self.out
            ),
            "quantize_blockwise": lambda: ops.quantize_blockwise(A, self.code8, BS8),
            "dequantize_blockwise": lambda: ops.dequantize_blockwise.out(
                self.q8, self.absmax8, self.code8, BS8, DTYPE, out=self.out
            ),
        }

    def compiled_calls(self, generated: bool = False) -> dict:
        """The four functional ops compiled alone by ``inductor_quant.compile``: by default what the
        pass makes of a standalone op (a call of its hand-written kernel); with ``generated`` the
        kernels Inductor generates from our lowerings (what an op fused with pointwise neighbours
        is built from)."""
        from inductor_quant.compile import compile as iq_compile
        from inductor_quant.patterns.pass_manager import QuantPassConfig

        config = QuantPassConfig(standalone_kernels=not generated)

        ops, A, shape = torch.ops.inductor_quant, self.A, list(self.shape)
        calls = {
            "quantize_4bit": lambda: ops.quantize_4bit(A, BS4, "nf4", torch.uint8),
            "dequantize_4bit": lambda: ops.dequantize_4bit(self.packed, self.absmax4, BS4, "nf4", shape, DTYPE),
            "quantize_blockwise": lambda: ops.quantize_blockwise(A, self.code8, BS8),
            "dequantize_blockwise": lambda: ops.dequantize_blockwise(self.q8, self.absmax8, self.code8, BS8, DTYPE),
        }
        # The lambdas share code objects across shapes and configs: start each case with an empty
        # Dynamo cache so that no shape hits the recompile limit (which would silently run eagerly).
        return {op: iq_compile(fn, fullgraph=True, dynamic=False, pass_config=config) for op, fn in calls.items()}

    def copy_calls(self) -> dict:
        """Per op, a copy of the bytes the op moves (:func:`_copy_of`)."""
        return {op: _copy_of(nbytes) for op, nbytes in self.bytes.items()}

    def kernel_calls(self) -> dict:
        """The four launchers with preallocated outputs: the kernels without the op's Python
        dispatch, argument checks and allocation."""
        from inductor_quant.kernels import blockwise as k8
        from inductor_quant.kernels import fourbit as k4

        code4 = k4.code_table("nf4", self.A.device)
        return {
            "quantize_4bit": lambda: k4.quantize_4bit(self.A, BS4, "nf4", self.packed, self.absmax4),
            "dequantize_4bit": lambda: k4.dequantize_4bit(self.packed, self.absmax4, BS4, code4, self.out),
            "quantize_blockwise": lambda: k8.quantize_blockwise(self.A, self.code8, BS8, self.q8, self.absmax8),
            "dequantize_blockwise": lambda: k8.dequantize_blockwise(self.q8, self.absmax8, self.code8, BS8, self.out),
        }


def _copy_of(nbytes: int):
    """A device copy that reads and writes ``nbytes`` in all (half each): the bandwidth a kernel of
    this size can reach with the same timer, launch and ramp-up included."""
    src = torch.randint(-(2**31), 2**31 - 1, (nbytes // 8,), dtype=torch.int32, device="cuda")
    dst = torch.empty_like(src)
    # An element-wise kernel, not ``dst.copy_(src)``: a same-dtype copy is a cudaMemcpy, which as a
    # CUDA-graph node ran 295 µs instead of 240 µs for the 708 MB of the 28672x8192 8-bit ops
    # (H100; 236 µs for 705 MB; tools/notes_quant.md Run 10).
    return lambda: torch.bitwise_not(src, out=dst)


def bench_graph(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of ``fn``'s GPU work: ``fn`` is captured once in a CUDA graph and the replays
    are timed (L2 flushed between them as in ``benchlib.bench``), so no host overhead is counted."""
    fn()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return benchlib.bench(graph.replay, warmup_ms, rep_ms)


def run(copy_bw: float, shapes=SHAPES) -> list[benchlib.Row]:
    """Time every op on every shape: ``torch.ops.inductor_quant`` called eagerly (impl
    "inductor_quant"), its launchers replayed from a CUDA graph ("inductor_quant.kernel": the GPU
    time alone; eager op calls spend ~50-100 µs of host time in dispatch, argument checks and
    launches, more than do_bench's L2 flush hides, so small shapes measure the host there), the
    op compiled alone by ``inductor_quant.compile`` and replayed from a CUDA graph
    ("inductor_quant.compiled": the pass leaves a standalone op to its kernel;
    "inductor_quant.generated": the code Inductor generates from our lowering), and bitsandbytes
    CUDA called eagerly ("bnb"), and a copy of the bytes each op moves replayed the same way
    ("copy (same bytes)": what the device's bandwidth is at that size with this timer)."""
    rows: list[benchlib.Row] = []
    bnb = _bnb_ops()
    for shape in shapes:
        torch._dynamo.reset()  # see Case.compiled_calls
        case = Case(shape)
        impls = {
            "inductor_quant": case.op_calls(torch.ops.inductor_quant),
            "inductor_quant.kernel": case.kernel_calls(),
            "inductor_quant.compiled": case.compiled_calls(),
            "inductor_quant.generated": case.compiled_calls(generated=True),
        }
        if bnb is not None:
            impls["bnb"] = case.op_calls(bnb)
        impls["copy (same bytes)"] = case.copy_calls()
        for impl, calls in impls.items():
            timer = benchlib.bench if impl in ("inductor_quant", "bnb") else bench_graph
            for op, fn in calls.items():
                t = timer(fn)
                rows.append(benchlib.make_row(op, case.label, impl, t, case.bytes[op], copy_bw))
                print(f"  {op:22s} {case.label:12s} {impl:15s} {t:9.1f} us  {rows[-1].copy_pct:5.1f} %", flush=True)
        del case
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# --check: bit-exact against the reference, compared with bitsandbytes
# ----------------------------------------------------------------------------------------------


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def check(shapes=SHAPES) -> bool:
    """Compare every op with the reference (must be bit-exact) and with bitsandbytes (reported)."""
    from inductor_quant.reference import blockwise as ref8
    from inductor_quant.reference import fourbit as ref4

    ok = True
    bnb = _bnb_ops()
    for shape in shapes:
        torch._dynamo.reset()  # see Case.compiled_calls
        case = Case(shape)
        A, ops = case.A, torch.ops.inductor_quant
        ref_packed, ref_absmax4 = ref4.quantize_4bit(A, BS4, "nf4", torch.uint8)
        ref_q8, ref_absmax8 = ref8.quantize_blockwise(A, case.code8, BS8)
        ops.dequantize_4bit.out(case.packed, case.absmax4, BS4, "nf4", list(shape), DTYPE, out=case.out)
        deq4 = case.out.clone()
        ops.dequantize_blockwise.out(case.q8, case.absmax8, case.code8, BS8, DTYPE, out=case.out)
        results = {
            "quantize_4bit": _same(case.packed, ref_packed) and _same(case.absmax4, ref_absmax4),
            "dequantize_4bit": _same(deq4, ref4.dequantize_4bit(ref_packed, ref_absmax4, BS4, "nf4", shape, DTYPE)),
            "quantize_blockwise": _same(case.q8, ref_q8) and _same(case.absmax8, ref_absmax8),
            "dequantize_blockwise": _same(case.out, ref8.dequantize_blockwise(ref_q8, ref_absmax8, case.code8, BS8, DTYPE)),
        }
        compiled = {op: fn() for op, fn in case.compiled_calls(generated=True).items()}
        results["compiled quantize_4bit"] = all(map(_same, compiled["quantize_4bit"], (ref_packed, ref_absmax4)))
        results["compiled dequantize_4bit"] = _same(compiled["dequantize_4bit"], deq4)
        results["compiled quantize_blockwise"] = all(map(_same, compiled["quantize_blockwise"], (ref_q8, ref_absmax8)))
        results["compiled dequantize_blockwise"] = _same(compiled["dequantize_blockwise"], case.out)
        line = " ".join(f"{op}={'ok' if r else 'MISMATCH'}" for op, r in results.items())
        ok &= all(results.values())
        if bnb is not None:
            b_packed, b_absmax4 = bnb.quantize_4bit(A, BS4, "nf4", torch.uint8)
            b_q8, b_absmax8 = bnb.quantize_blockwise(A, case.code8, BS8)
            b_deq4 = bnb.dequantize_4bit(case.packed, case.absmax4, BS4, "nf4", list(shape), DTYPE)
            b_deq8 = bnb.dequantize_blockwise(case.q8, case.absmax8, case.code8, BS8, DTYPE)
            line += (
                f" | vs bnb: 4-bit bytes differ {(b_packed != case.packed).sum().item()}, "
                f"absmax4 equal {_same(b_absmax4, case.absmax4)}, 8-bit codes differ {(b_q8 != case.q8).sum().item()}, "
                f"absmax8 equal {_same(b_absmax8, case.absmax8)}, dequant4 equal {_same(b_deq4, deq4)}, "
                f"dequant8 equal {_same(b_deq8, case.out)}"
            )
        print(f"check {case.label}: {line}", flush=True)
        del case
        torch.cuda.empty_cache()
    return ok


# ----------------------------------------------------------------------------------------------
# --sweep: launch configurations through the launchers
# ----------------------------------------------------------------------------------------------


def sweep_variants():
    """(op, label, launcher call factory) for every configuration variant worth comparing."""
    from inductor_quant.kernels import blockwise as k8
    from inductor_quant.kernels import fourbit as k4

    variants = []
    code4 = k4.code_table("nf4", "cuda")
    for tile, warps, smem in ((4096, 4, True), (4096, 8, True), (1024, 2, False), (16384, 8, False)):
        cfg = k4.Dequantize4bitConfig(tile=tile, num_warps=warps, smem_lut=smem)
        variants.append(
            ("dequantize_4bit", repr(cfg), lambda c, cfg=cfg: lambda: k4.dequantize_4bit(
                c.packed, c.absmax4, BS4, code4, c.out, cfg))
        )
    for kw in (
        dict(tile=4096, num_warps=4),
        dict(tile=8192, num_warps=8),
        dict(tile=2048, num_warps=2),
        dict(tile=4096, num_warps=4, smem_table=False),
        *(dict(tile=2048, num_warps=2, prefetch_ahead=ahead) for ahead in (0, 1024, 4096)),
    ):
        cfg = k4.Quantize4bitConfig(**kw)
        variants.append(
            ("quantize_4bit", repr(cfg), lambda c, cfg=cfg: lambda: k4.quantize_4bit(
                c.A, BS4, "nf4", c.packed, c.absmax4, cfg))
        )
    for kw in (
        dict(tile=512, num_warps=1),
        dict(tile=1024, num_warps=2),
        dict(tile=2048, num_warps=4),
        dict(tile=512, num_warps=1, key_shift=18, buckets=8192, probes=2),
        dict(tile=512, num_warps=1, key_shift=16, buckets=32768),
        dict(tile=2048, num_warps=4, search="bsearch"),
        *(dict(tile=512, num_warps=1, prefetch_ahead=ahead) for ahead in (0, 2048, 8192)),
    ):
        cfg = k8.QuantizeBlockwiseConfig(**kw)
        variants.append(
            ("quantize_blockwise", repr(cfg), lambda c, cfg=cfg: lambda: k8.quantize_blockwise(
                c.A, c.code8, BS8, c.q8, c.absmax8, cfg))
        )
    for tile, warps, smem in ((1024, 4, True), (2048, 8, True), (8192, 4, True), (1024, 4, False)):
        cfg = k8.DequantizeBlockwiseConfig(tile=tile, num_warps=warps, smem_lut=smem)
        variants.append(
            ("dequantize_blockwise", repr(cfg), lambda c, cfg=cfg: lambda: k8.dequantize_blockwise(
                c.q8, c.absmax8, c.code8, BS8, c.out, cfg))
        )
    return variants


def sweep(copy_bw: float, shapes=SWEEP_SHAPES) -> list[benchlib.Row]:
    """Time each configuration variant; print the fastest per op and shape."""
    rows = []
    variants = sweep_variants()
    for shape in shapes:
        case = Case(shape)
        for op, label, factory in variants:
            t = bench_graph(factory(case), warmup_ms=10, rep_ms=50)
            rows.append(benchlib.make_row(op, case.label, "sweep", t, case.bytes[op], copy_bw, note=label))
            print(f"  sweep {op:22s} {case.label:12s} {t:9.1f} us {rows[-1].copy_pct:5.1f} %  {label}", flush=True)
        del case
        torch.cuda.empty_cache()
    for shape in shapes:
        label = f"{shape[0]}x{shape[1]}"
        for op in dict.fromkeys(r.op for r in rows):
            best = min((r for r in rows if r.op == op and r.shape == label), key=lambda r: r.time_us)
            print(f"best {op:22s} {label:12s} {best.time_us:8.1f} us {best.copy_pct:5.1f} %  {best.note}")
    return rows


def producer_rows(copy_bw: float, shapes=SHAPES) -> list[benchlib.Row]:
    """``quantize(A * 2)`` compiled with the standalone pass (impl "kernel after product") and
    without it (impl "fused generated"), replayed from a CUDA graph. Bytes: ``A`` read once and the
    quantized outputs written once (what a fused kernel must move)."""
    from inductor_quant.compile import compile as iq_compile
    from inductor_quant.patterns.pass_manager import QuantPassConfig
    from inductor_quant.reference import blockwise as ref8
    from inductor_quant.reference import fourbit as ref4

    ops = torch.ops.inductor_quant
    rows: list[benchlib.Row] = []
    for shape in shapes:
        case = Case(shape)
        doubled = case.A * 2
        references = {
            "quantize_4bit": ref4.quantize_4bit(doubled, BS4, "nf4", torch.uint8),
            "quantize_blockwise": ref8.quantize_blockwise(doubled, case.code8, BS8),
        }
        del doubled
        calls = {
            "quantize_4bit": lambda a: ops.quantize_4bit(a * 2, BS4, "nf4", torch.uint8),
            "quantize_blockwise": lambda a: ops.quantize_blockwise(a * 2, case.code8, BS8),
        }
        for impl, standalone in (("kernel after product", True), ("fused generated", False)):
            config = QuantPassConfig(standalone_kernels=standalone)
            for op, fn in calls.items():
                torch._dynamo.reset()
                compiled = iq_compile(fn, fullgraph=True, dynamic=False, pass_config=config)
                exact = all(map(_same, compiled(case.A), references[op]))
                t = bench_graph(lambda: compiled(case.A))
                rows.append(benchlib.make_row(f"{op}(A * 2)", case.label, impl, t, case.bytes[op], copy_bw,
                                              note="" if exact else "MISMATCH"))
                print(f"  {op + '(A * 2)':26s} {case.label:12s} {impl:22s} {t:9.1f} us  {rows[-1].copy_pct:5.1f} %  "
                      f"exact={exact}", flush=True)
        del case, references
        torch.cuda.empty_cache()
    return rows


def profile(op: str) -> None:
    """Launch one quantize kernel a few times on 28672x8192 with its default configuration, tables
    cached (for ``ncu -k regex:_<op>_kernel``)."""
    case = Case((28672, 8192))
    launch = case.kernel_calls()[op]
    for _ in range(3):
        launch()
    torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = benchlib.cli_parser(__doc__, "bench_quant.json")
    parser.add_argument("--check", action="store_true", help="compare with the reference and bitsandbytes first")
    parser.add_argument("--sweep", action="store_true", help="also time launch-configuration variants")
    parser.add_argument("--producer", action="store_true", help="only time a quantize fused with its producer or not")
    parser.add_argument(
        "--profile", choices=("quantize_4bit", "quantize_blockwise"), help="only launch one kernel (for ncu)"
    )
    args = parser.parse_args(argv)
    if benchlib.cuda_missing("bench_quant"):
        return 2
    if args.profile:
        profile(args.profile)
        return 0
    if args.producer:
        copy_bw, meta = benchlib.device_setup()
        rows = producer_rows(copy_bw)
        benchlib.write_json(args.json, rows, meta)
        print(benchlib.format_table(rows))
        if any(r.note == "MISMATCH" for r in rows):
            print("bench_quant: a compiled quantize differs from the reference (exact=False above)", file=sys.stderr)
            return 1
        return 0
    ok = check() if args.check else True
    copy_bw, meta = benchlib.device_setup()
    rows = sweep(copy_bw) if args.sweep else []
    rows += run(copy_bw)
    benchlib.write_json(args.json, rows, meta)
    print(benchlib.format_table([r for r in rows if r.impl != "sweep"]))
    if not ok:
        print("bench_quant: CHECK FAILED (see the check lines above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
