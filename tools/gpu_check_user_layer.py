"""GPU check of the user layer (run on the device machine; prints one table).

* every optimizer class, fp32 and bf16 parameters: the eager CUDA multi-tensor path against the
  CPU op path (20 steps; states compared code for code);
* ``torch.compile(fullgraph=True)`` of ``opt.step()`` on CUDA with a CPU tensor lr and a scheduler:
  one graph for 20 steps, equal to eager;
* step time of AdamW8bit / AdamW32bit against torch's fused and foreach AdamW (112M parameters);
* ``inductor-quant demo`` on the GPU (default reduce-overhead mode, and Inductor's default mode).

    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD python tools/gpu_check_user_layer.py
"""

from __future__ import annotations

import time

import torch

import inductor_quant  # noqa: F401
from inductor_quant import cli, optim

CASES = [
    (optim.Adam8bit, {}), (optim.AdamW8bit, {}), (optim.Lion8bit, {}), (optim.SGD8bit, {"lr": 1e-2, "momentum": 0.9}),
    (optim.RMSprop8bit, {}), (optim.Adagrad8bit, {}), (optim.AdEMAMix8bit, {"t_alpha": 10, "t_beta3": 10}),
    (optim.AdamW32bit, {}), (optim.SGD32bit, {"lr": 1e-2, "momentum": 0.9}), (optim.LAMB32bit, {}),
    (optim.LARS32bit, {"lr": 1e-2, "momentum": 0.9}),
]
SHAPES = [(512, 384), (33, 129), (7, 9), (4096,)]


def state_difference(a: dict, b: dict) -> float:
    """Largest code difference (8-bit) or relative difference (fp32) over the state tensors."""
    worst = 0.0
    for key in ("state1", "state2", "absmax1", "absmax2"):
        if key in a:
            x, y = a[key].cpu(), b[key].cpu()
            if x.dtype == torch.uint8:
                worst = max(worst, (x.int() - y.int()).abs().max().item())
            else:
                worst = max(worst, ((x - y).abs().max() / (y.abs().max() + 1e-12)).item())
    return worst


def check_eager(results: list[tuple[str, str]]) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        for cls, kwargs in CASES:
            cpu_p = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES]
            gpu_p = [torch.nn.Parameter(p.detach().cuda()) for p in cpu_p]
            cpu_o, gpu_o = cls(cpu_p, **kwargs), cls(gpu_p, **kwargs)
            for _ in range(20):
                for a, b in zip(cpu_p, gpu_p):
                    g = (torch.randn(a.shape) * 0.01).to(dtype)
                    a.grad, b.grad = g, g.cuda()
                cpu_o.step()
                gpu_o.step()
            p_err = max(((a.float() - b.cpu().float()).abs().max() / a.float().abs().max()).item() for a, b in zip(cpu_p, gpu_p))
            s_err = max(state_difference(gpu_o.state[b], cpu_o.state[a]) for a, b in zip(cpu_p, gpu_p))
            results.append((f"eager cuda vs cpu {cls.__name__} {str(dtype)[6:]}", f"param rel {p_err:.2e}, state {s_err:.2e}"))


def check_compiled(results: list[tuple[str, str]]) -> None:
    for cls, kwargs in [(optim.AdamW8bit, {}), (optim.AdEMAMix8bit, {"t_alpha": 8, "t_beta3": 8}), (optim.LAMB32bit, {})]:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        cp = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in SHAPES]
        ep = [torch.nn.Parameter(p.detach().clone()) for p in cp]
        co, eo = cls(cp, lr=torch.tensor(1e-2), **kwargs), cls(ep, lr=torch.tensor(1e-2), **kwargs)
        schedulers = [torch.optim.lr_scheduler.StepLR(o, 3, 0.5) for o in (co, eo)]

        @torch.compile(fullgraph=True)
        def compiled_step():
            co.step()

        for i in range(20):
            for a, b in zip(cp, ep):
                g = torch.randn_like(a) * 0.01
                a.grad, b.grad = g, g.clone()
            if i < 2:
                compiled_step()
            else:
                with torch.compiler.set_stance("fail_on_recompile"):
                    compiled_step()
            eo.step()
            for s in schedulers:
                s.step()
        p_err = max((a - b).abs().max().item() for a, b in zip(cp, ep))
        s_err = max(state_difference(co.state[a], eo.state[b]) for a, b in zip(cp, ep))
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        results.append((f"compiled cuda {cls.__name__}", f"graphs {graphs}, param abs {p_err:.2e}, state {s_err:.2e}"))


def time_steps(results: list[tuple[str, str]]) -> None:
    def bench(fn, iters=10):
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / iters * 1e3

    shapes = [(4096, 4096)] * 4 + [(11008, 4096)] + [(4096,)] * 20
    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 0.01
        n = sum(p.numel() for p in params)
        for name, opt in [
            ("AdamW8bit", optim.AdamW8bit(params)),
            ("AdamW32bit", optim.AdamW32bit(params)),
            ("torch AdamW fused", torch.optim.AdamW(params, fused=True)),
            ("torch AdamW foreach", torch.optim.AdamW(params, foreach=True)),
        ]:
            results.append((f"step {name} {str(dtype)[6:]} {n / 1e6:.0f}M params", f"{bench(opt.step):.2f} ms"))


def main() -> None:
    assert torch.cuda.is_available()
    torch.manual_seed(0)
    results: list[tuple[str, str]] = []
    check_eager(results)
    check_compiled(results)
    time_steps(results)
    for extra in ([], ["--mode", "default"]):
        print(f"\n=== demo cuda fp32 {extra} ===", flush=True)
        cli.main(["demo", "--device", "cuda", "--quiet", *extra])
        print(f"\n=== demo cuda bf16, batch 4, 64 tokens {extra} ===", flush=True)
        cli.main(["demo", "--device", "cuda", "--dtype", "bfloat16", "--batch-size", "4", "--new-tokens", "64", "--quiet", *extra])
    print("\n| check | result |\n|---|---|")
    for name, value in results:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
