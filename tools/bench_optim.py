"""GPU benchmark of the optimizer-update kernels, side by side with bitsandbytes CUDA and torch.

``run(copy_bw)`` (used by ``tools/bench_kernels.py``) times one AdamW step (lr 1e-3, wd 0.01):

* 64M fp32 parameters, 8-bit blockwise states: the Triton kernel through its launcher
  ("inductor_quant"), the same through ``torch.ops.inductor_quant`` (argument checks included,
  "inductor_quant op"), ``torch.ops.bitsandbytes.optimizer_update_8bit_blockwise`` ("bnb") and
  ``torch.optim.AdamW(fused=True)`` with fp32 states ("torch fused");
* the same with 32-bit states;
* a group of 200 fp32 tensors of mixed sizes (log-uniform, 4K to 2M elements, 64M in all): the
  multi-tensor entry point (one launch, "inductor_quant"), the op tensor by tensor, bnb's op tensor
  by tensor (as its optimizers step) and torch's fused AdamW over the list.

Bytes moved = each input read once plus each output written once: 8-bit AdamW moves 16 B per fp32
parameter (p read and written, g read, two uint8 states read and written) plus the absmax, 32-bit
AdamW and torch's fused AdamW 28 B.

Run alone::

    python tools/bench_optim.py [--check] [--sweep] [--json bench_optim.json]

``--check`` compares one step with bitsandbytes on the timed inputs first; ``--sweep`` also times
launch variants of the single-tensor kernels (tile, warps, table lookups through registers or L1,
bucket or tree search) and prints them.
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

N = 64 * 2**20
GROUP_TENSORS = 200
LR, WD, BETA1, BETA2, EPS = 1e-3, 0.01, 0.9, 0.999, 1e-8


def _bnb_ops():
    """``torch.ops.bitsandbytes`` with its CUDA optimizer kernels, or None."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return None
    ops = getattr(torch.ops, "bitsandbytes", None)
    return ops if ops is not None and hasattr(ops, "optimizer_update_8bit_blockwise") else None


class State8:
    """One parameter with 8-bit AdamW states (fresh random data, never zeros)."""

    def __init__(self, n: int) -> None:
        from inductor_quant.code_tables import dynamic_map

        self.n = n
        blocks = math.ceil(n / 256)
        self.p = torch.randn(n, device="cuda")
        self.g = torch.randn(n, device="cuda") * 0.01
        self.state1 = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
        self.state2 = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
        self.absmax1 = torch.rand(blocks, device="cuda") * 0.01
        self.absmax2 = torch.rand(blocks, device="cuda") * 1e-4
        self.qmap1 = dynamic_map(True, "cuda")
        self.qmap2 = dynamic_map(False, "cuda")

    def clone(self) -> "State8":
        other = object.__new__(State8)
        other.__dict__ = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return other

    def args(self, step: int = 10) -> tuple:
        return ("adam", self.g, self.p, self.state1, self.state2, BETA1, BETA2, 0.0, 0.0, EPS, step, LR,
                self.qmap1, self.qmap2, self.absmax1, self.absmax2, WD, 1.0, False)

    def bytes(self) -> int:
        return benchlib.tensor_bytes(self.g) + 2 * benchlib.tensor_bytes(self.p, self.state1, self.state2, self.absmax1, self.absmax2)


class State32:
    def __init__(self, n: int) -> None:
        self.p = torch.randn(n, device="cuda")
        self.g = torch.randn(n, device="cuda") * 0.01
        self.state1 = torch.randn(n, device="cuda") * 0.01
        self.state2 = torch.rand(n, device="cuda") * 1e-4

    def args(self, step: int = 10) -> tuple:
        return ("adam", self.g, self.p, self.state1, self.state2, None, 0.0, 0.0, BETA1, BETA2, 0.0, 0.0, EPS, WD,
                step, LR, 1.0, False)

    def bytes(self) -> int:
        return benchlib.tensor_bytes(self.g) + 2 * benchlib.tensor_bytes(self.p, self.state1, self.state2)


def _torch_fused(params: list[torch.Tensor], grads: list[torch.Tensor]):
    """A fused fp32 AdamW over ``params`` with states already allocated (one warm step)."""
    params = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    opt = torch.optim.AdamW(params, lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD, fused=True)
    opt.step()
    return opt.step, 28 * sum(p.numel() for p in params)


def _group_sizes() -> list[int]:
    gen = torch.Generator().manual_seed(0)
    sizes = torch.exp(torch.empty(GROUP_TENSORS).uniform_(math.log(4096), math.log(2 * 2**20), generator=gen))
    sizes = (sizes * (N / sizes.sum())).long().clamp(min=4096)
    return [int(s) for s in sizes]


def check(bnb) -> None:
    """One 8-bit and one 32-bit step against bitsandbytes on 64M parameters (max differences)."""
    from inductor_quant.reference.blockwise import dequantize_blockwise

    ours = State8(N)
    theirs = ours.clone()
    torch.ops.inductor_quant.optimizer_update_8bit_blockwise(*ours.args(1))
    bnb.optimizer_update_8bit_blockwise(*theirs.args(1))
    deq = lambda s, a, q: dequantize_blockwise(s, a, q, 256, torch.float32)  # noqa: E731
    d1 = (deq(ours.state1, ours.absmax1, ours.qmap1) - deq(theirs.state1, theirs.absmax1, theirs.qmap1)).abs()
    d2 = (deq(ours.state2, ours.absmax2, ours.qmap2) - deq(theirs.state2, theirs.absmax2, theirs.qmap2)).abs()
    dp = (ours.p - theirs.p).abs()
    print(f"check 8-bit vs bnb: codes equal {float((ours.state1 == theirs.state1).float().mean()):.6f} / "
          f"{float((ours.state2 == theirs.state2).float().mean()):.6f}, max |state diff| {float(d1.max()):.2e} / "
          f"{float(d2.max()):.2e}, mean |p diff| {float(dp.mean()):.2e}", flush=True)
    del ours, theirs
    a = State32(N)
    b = State32.__new__(State32)
    b.__dict__ = {k: v.clone() for k, v in a.__dict__.items()}
    torch.ops.inductor_quant.optimizer_update_32bit(*a.args(1))
    bnb.optimizer_update_32bit(*b.args(1))
    print(f"check 32-bit vs bnb: max |m diff| {float((a.state1 - b.state1).abs().max()):.2e}, max |v diff| "
          f"{float((a.state2 - b.state2).abs().max()):.2e}, max |p diff| {float((a.p - b.p).abs().max()):.2e}", flush=True)


def run(copy_bw: float) -> list[benchlib.Row]:
    """Time every variant listed in the module docstring; returns one row per (case, impl)."""
    import inductor_quant  # noqa: F401  (registers the ops)
    from inductor_quant import optim_kernels
    from inductor_quant.kernels import optim as kernels

    bnb = _bnb_ops()
    rows: list[benchlib.Row] = []
    label = "64M fp32"

    def add(op: str, shape: str, impl: str, fn, nbytes: int, note: str = "") -> None:
        fn()
        torch.cuda.synchronize()
        rows.append(benchlib.make_row(op, shape, impl, benchlib.bench(fn), nbytes, copy_bw, note))
        print(f"  {op:24s} {shape:22s} {impl:18s} {rows[-1].time_us:9.1f} us ({rows[-1].copy_pct:.0f} %)", flush=True)

    s8 = State8(N)
    add("adamw 8-bit", label, "inductor_quant", lambda: kernels.update_8bit_blockwise(*s8.args()), s8.bytes(), "launcher")
    add("adamw 8-bit", label, "inductor_quant op", lambda: torch.ops.inductor_quant.optimizer_update_8bit_blockwise(*s8.args()), s8.bytes())
    if bnb is not None:
        add("adamw 8-bit", label, "bnb", lambda: bnb.optimizer_update_8bit_blockwise(*s8.args()), s8.bytes())
    step, nbytes = _torch_fused([s8.p], [s8.g])
    add("adamw 8-bit", label, "torch fused", step, nbytes, "fp32 states, 28 B/param")
    del s8, step

    s32 = State32(N)
    add("adamw 32-bit", label, "inductor_quant", lambda: kernels.update_32bit(*s32.args()), s32.bytes(), "launcher")
    add("adamw 32-bit", label, "inductor_quant op", lambda: torch.ops.inductor_quant.optimizer_update_32bit(*s32.args()), s32.bytes())
    if bnb is not None:
        add("adamw 32-bit", label, "bnb", lambda: bnb.optimizer_update_32bit(*s32.args()), s32.bytes())
    step, nbytes = _torch_fused([s32.p], [s32.g])
    add("adamw 32-bit", label, "torch fused", step, nbytes)
    del s32, step

    sizes = _group_sizes()
    shape = f"{len(sizes)} tensors, {sum(sizes) / 2**20:.0f}M"
    group = [State8(n) for n in sizes]
    pick = lambda k: [getattr(s, k) for s in group]  # noqa: E731
    nbytes = sum(s.bytes() for s in group)
    q1, q2 = group[0].qmap1, group[0].qmap2

    def multi8() -> None:
        optim_kernels.multi_tensor_update_8bit_blockwise(
            "adam", pick("g"), pick("p"), pick("state1"), pick("state2"), pick("absmax1"), pick("absmax2"), q1, q2,
            beta1=BETA1, beta2=BETA2, eps=EPS, step=10, lr=LR, weight_decay=WD)

    def launcher8() -> None:
        kernels.multi_update_8bit_blockwise(
            "adam", pick("g"), pick("p"), pick("state1"), pick("state2"), pick("absmax1"), pick("absmax2"), q1, q2,
            BETA1, BETA2, 0.0, 0.0, EPS, 10, LR, WD, 1.0, False)

    def loop(op) -> None:
        for s in group:
            args = list(s.args())
            args[12], args[13] = q1, q2
            op(*args)

    add("adamw 8-bit group", shape, "inductor_quant", multi8, nbytes, "multi-tensor API, one launch")
    add("adamw 8-bit group", shape, "iq launcher", launcher8, nbytes, "multi-tensor launcher, no checks")
    add("adamw 8-bit group", shape, "inductor_quant op", lambda: loop(torch.ops.inductor_quant.optimizer_update_8bit_blockwise), nbytes, "op per tensor")
    if bnb is not None:
        add("adamw 8-bit group", shape, "bnb", lambda: loop(bnb.optimizer_update_8bit_blockwise), nbytes, "op per tensor")
    step, fused_bytes = _torch_fused(pick("p"), pick("g"))
    add("adamw 8-bit group", shape, "torch fused", step, fused_bytes, "fp32 states")
    del group, step

    group32 = [State32(n) for n in sizes]
    nbytes = sum(s.bytes() for s in group32)
    pick32 = lambda k: [getattr(s, k) for s in group32]  # noqa: E731

    def multi32() -> None:
        optim_kernels.multi_tensor_update_32bit(
            "adam", pick32("g"), pick32("p"), pick32("state1"), pick32("state2"), beta1=BETA1, beta2=BETA2, eps=EPS,
            step=10, lr=LR, weight_decay=WD)

    add("adamw 32-bit group", shape, "inductor_quant", multi32, nbytes, "multi-tensor API, one launch")
    if bnb is not None:
        add("adamw 32-bit group", shape, "bnb", lambda: [bnb.optimizer_update_32bit(*s.args()) for s in group32], nbytes, "op per tensor")
    return rows


def sweep(copy_bw: float) -> list[benchlib.Row]:
    """Launch variants of the kernels on 64M fp32 parameters: tile, warps, register cap, table
    lookups through registers/shared memory (gather) or L1, bucket or tree search; the
    multi-tensor launch with and without the register cap."""
    from inductor_quant.kernels import optim as kernels

    rows: list[benchlib.Row] = []

    def add(op: str, name: str, fn, nbytes: int) -> None:
        fn()
        torch.cuda.synchronize()
        rows.append(benchlib.make_row(op, "64M fp32", name, benchlib.bench(fn), nbytes, copy_bw))

    s8 = State8(N)
    tables = kernels.search_tables(s8.qmap1, s8.qmap2)
    tree = kernels.SearchTables(
        torch.stack([kernels._eytzinger((q[:-1] + q[1:]).cpu() * 0.5) for q in (s8.qmap1, s8.qmap2)]).cuda(),
        tables.lut, kernels.SEARCH_TREE, 1, tables.negatives)
    variants = [
        ("b8w8 g11 r80", dict(blocks=8, num_warps=8, maxnreg=80)),
        ("b8w8 g11", dict(blocks=8, num_warps=8, maxnreg=None)),
        ("b4w4 g11 r80", dict(blocks=4, num_warps=4, maxnreg=80)),
        ("b8w8 g00", dict(blocks=8, num_warps=8, gather=False, gather_lut=False, maxnreg=None)),
        ("tree b8w8 g1", dict(blocks=8, num_warps=8, tables=tree, maxnreg=None)),
    ]
    for name, options in variants:
        add("sweep 8-bit adamw", name, lambda: kernels.update_8bit_blockwise(*s8.args(), **options), s8.bytes())
    del s8
    group = [State8(n) for n in _group_sizes()]
    pick = lambda k: [getattr(s, k) for s in group]  # noqa: E731
    rows8 = kernels.rows_8bit("adam", pick("g"), pick("p"), pick("state1"), pick("state2"), pick("absmax1"), pick("absmax2"))
    for cap in (80, None):
        add("sweep 8-bit group", f"launch r{cap}", lambda: kernels.launch_multi_8bit(
            "adam", rows8, torch.float32, group[0].p.device, group[0].qmap1, group[0].qmap2, BETA1, BETA2, 0.0, 0.0,
            EPS, 10, LR, WD, 1.0, False, maxnreg=cap), sum(s.bytes() for s in group))
    del group
    s32 = State32(N)
    for block, warps in ((2048, 8), (4096, 16)):
        add("sweep 32-bit adamw", f"B{block}w{warps}", lambda: kernels.update_32bit(*s32.args(), block=block, num_warps=warps), s32.bytes())
    for r in sorted(rows, key=lambda r: (r.op, r.time_us)):
        print(f"  {r.op:20s} {r.impl:22s} {r.time_us:8.1f} us ({r.copy_pct:.0f} %)")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = benchlib.cli_parser(__doc__, "bench_optim.json")
    parser.add_argument("--check", action="store_true", help="compare one step with bitsandbytes first")
    parser.add_argument("--sweep", action="store_true", help="also time launch variants")
    args = parser.parse_args(argv)
    if benchlib.cuda_missing("bench_optim"):
        return 2
    import inductor_quant  # noqa: F401

    copy_bw, meta = benchlib.device_setup()
    bnb = _bnb_ops()
    if args.check and bnb is not None:
        check(bnb)
    rows = sweep(copy_bw) if args.sweep else []
    rows += run(copy_bw)
    benchlib.write_json(args.json, rows, meta)
    print(benchlib.format_table([r for r in rows if not r.op.startswith("sweep")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
