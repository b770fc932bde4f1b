"""End-to-end GPU benchmark: batch-1 decode of a Llama-3-8B-shaped stack, and a compiled 8-bit AdamW step.

    python tools/bench_e2e.py [--layers 4] [--steps 64] [--json bench_e2e.json] [--variants A,B]
                              [--skip-decode] [--skip-optim] [--opt-numel 67108864] [--kernels]

Decode: the built-in Llama-style model (``inductor_quant.models``) with Llama-3-8B's shapes (dim
4096, 32 heads, 8 KV heads, FFN 14336, vocab 128256), ``--layers`` layers, random bf16 weights
drawn on the GPU, static KV cache: a greedy loop of ``--steps`` single-token steps from position
128, timed with CUDA events after three warm-up steps (the median of five such loops). Variants:

* ``bf16 compiled``: ``torch.compile(mode="reduce-overhead", fullgraph=True)``;
* ``nf4 compiled (ours)``: every linear but ``lm_head`` quantized by ``quantize_model`` (NF4,
  blocksize 64, double-quantized absmax), ``inductor_quant.compile`` with the same mode;
* ``nf4 compiled (ours) + nf4 lm_head``: the same with ``lm_head`` quantized as well (what
  gpt-fast / torchao int4 do; bitsandbytes users usually keep it in bf16);
* ``nf4 compiled (ours) without grouping``: ``QuantPassConfig(group_sibling_matmuls=False)``,
  one GEMV launch per projection (what the grouping pass saves);
* ``nf4 compiled (ours) + nf4 lm_head without swiglu epilogue``:
  ``QuantPassConfig(fuse_swiglu_epilogues=False)``, SiLU·up as a kernel of its own (what
  ``gemm_4bit_swiglu`` saves);
* ``nf4 eager (ours)``: the same model uncompiled (our gemm_4bit kernel per linear);
* ``bnb nf4 eager``: the same layers as ``bitsandbytes.nn.Linear4bit`` (skipped without bnb);
* ``bnb nf4 compiled``: that model under ``torch.compile`` with the same mode (skipped on error).

Reported per variant: ms per token, tokens/s, and GB/s = bytes read per token x tokens/s, where
the bytes are every parameter and buffer of the model except the KV caches, the rotary tables
and the embedding table (of which one row is read). The speed-up column is against bf16
compiled.

Optimizer: one AdamW step (lr 1e-3, wd 0.01) on fp32 parameters with 8-bit blockwise states, as
one tensor of ``--opt-numel`` elements and as 8 tensors of an eighth each: the compiled step
through ``step_8bit_blockwise`` (on GPU the in-place op: Inductor calls the hand-written kernel
on the state buffers, one launch per tensor), the same with the functional op + ``copy_`` (the
kernel Inductor generates from our lowering), the hand-written Triton kernel through
``torch.ops.inductor_quant.optimizer_update_8bit_blockwise`` (tensor by tensor, Python-number
hyperparameters), the in-place op the compiled step calls, called eagerly (device-tensor lr, step,
beta3, alpha: the kernel variant the compiled step runs), the multi-tensor launcher, and
bitsandbytes' op. Bytes: 16 per parameter (p and g
fp32 read, p written, two uint8 states read and written) plus absmax.

Every variant runs in its own ``try``: a failure is reported in the table and the rest still run.
The tables are printed at the end; ``--json`` writes rows + environment.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

import inductor_quant  # noqa: E402,F401  (registers the ops)
from inductor_quant.code_tables import dynamic_map  # noqa: E402
from inductor_quant.compile import compile as iq_compile  # noqa: E402
from inductor_quant.models import TinyLlama, TinyLlamaConfig  # noqa: E402
from inductor_quant.nn import quantize_model  # noqa: E402
from inductor_quant.patterns.pass_manager import QuantPassConfig  # noqa: E402
from inductor_quant.ops.optim_functional import step_8bit_blockwise  # noqa: E402

ops = torch.ops.inductor_quant
POSITION = 128
LR, WD, BETA1, BETA2, EPS = 1e-3, 0.01, 0.9, 0.999, 1e-8


@dataclass
class Result:
    """One timed variant (or the error that stopped it)."""

    section: str
    name: str
    time_us: float | None = None
    bytes_moved: int = 0
    note: str = ""
    error: str | None = None


# --------------------------------------------------------------------------------------------
# decode


def llama3_8b_config(layers: int, max_seq_len: int) -> TinyLlamaConfig:
    return TinyLlamaConfig(
        dim=4096, n_layers=layers, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
        max_seq_len=max_seq_len, rope_theta=500000.0,
    )


def build_bf16_model(layers: int, max_seq_len: int) -> TinyLlama:
    """Random bf16 weights drawn on the GPU (N(0, 1/fan_in) linears, N(0, 1) embedding)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.device("cuda"):
        model = TinyLlama(llama3_8b_config(layers, max_seq_len))
    model = model.to(torch.bfloat16).eval()
    model.rope_cos, model.rope_sin = model.rope_cos.float(), model.rope_sin.float()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, module.in_features**-0.5, generator=generator)
            elif isinstance(module, torch.nn.Embedding):
                module.weight.normal_(0.0, 1.0, generator=generator)
    model.setup_caches(1)
    return model


def bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: all parameters and buffers but the KV caches, the rotary tables
    and the embedding table (one row of it)."""
    total = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if "kv_cache" in name or "rope_" in name:
            continue
        if name.startswith("embed_tokens"):
            total += tensor.shape[1] * tensor.element_size()
            continue
        total += tensor.numel() * tensor.element_size()
    return total


def to_bitsandbytes(model: TinyLlama) -> TinyLlama:
    """A copy with every linear but lm_head as ``bitsandbytes.nn.Linear4bit`` (NF4, double quant)."""
    import bitsandbytes as bnb

    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if type(module) is not torch.nn.Linear or name == "lm_head":
            continue
        layer = bnb.nn.Linear4bit(
            module.in_features, module.out_features, bias=False, compute_dtype=torch.bfloat16,
            compress_statistics=True, quant_type="nf4",
        )
        # Params4bit quantizes when it is moved to the GPU (the bf16 data is already there)
        layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True)
        layer = layer.to("cuda")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    model.setup_caches(1)
    return model


def time_decode(forward: Callable, steps: int, repeats: int = 5) -> tuple[float, torch.Tensor]:
    """µs per token of a greedy decode of ``steps`` tokens from position ``POSITION`` (each step
    feeds the previous argmax back), after 3 warm-up steps (compile, CUDA-graph capture): the
    median of ``repeats`` such loops over the same positions. Also returns the logits of the first
    timed step."""
    with torch.no_grad():
        token = torch.tensor([[1234]], device="cuda")
        for i in range(3):
            forward(token, torch.tensor([POSITION - 3 + i], device="cuda"))
        positions = [torch.tensor([POSITION + i], device="cuda") for i in range(steps)]
        first = forward(token, positions[0]).float().clone()
        times = []
        for _ in range(repeats):
            token = torch.tensor([[1234]], device="cuda")
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for position in positions:
                token = forward(token, position)[:, -1].argmax(dim=-1, keepdim=True)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / steps)
    return statistics.median(times), first


def kernel_breakdown(forward: Callable, steps: int = 4, top: int = 15) -> str:
    """The ``top`` GPU kernels of ``steps`` more decode steps by total time, per token (Kineto
    records the kernels of CUDA-graph replays too): where a variant's time goes."""
    from torch.profiler import ProfilerActivity, profile

    token = torch.tensor([[1234]], device="cuda")
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            forward(token, torch.tensor([POSITION + i], device="cuda"))
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    kernels.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in kernels) / steps
    lines = [f"  GPU time per token {total:.1f} µs in {sum(e.count for e in kernels) // steps} kernels"]
    for e in kernels[:top]:
        lines.append(f"  {e.device_time_total / steps:8.1f} µs  {e.count // steps:3d}x  {e.key[:110]}")
    return "\n".join(lines)


def decode_results(layers: int, steps: int, only: list[str] | None = None, breakdown: bool = False) -> list[Result]:
    results: list[Result] = []
    bf16 = build_bf16_model(layers, POSITION + steps + 8)

    def nf4_model(skip: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
        model = copy.deepcopy(bf16)
        quantize_model(model, quant_type="nf4", blocksize=64, compress_statistics=True, skip=skip)
        model.setup_caches(1)
        return model

    def compiled(model):
        return torch.compile(model, mode="reduce-overhead", fullgraph=True)

    def ours_compiled(model, pass_config: QuantPassConfig | None = None):
        return iq_compile(model, mode="reduce-overhead", fullgraph=True, pass_config=pass_config)

    def ungrouped(model):
        return ours_compiled(model, QuantPassConfig(group_sibling_matmuls=False))

    def without_swiglu_epilogue(model):
        return ours_compiled(model, QuantPassConfig(fuse_swiglu_epilogues=False))

    variants = [
        ("bf16 compiled", lambda: bf16, compiled),
        ("nf4 compiled (ours)", nf4_model, ours_compiled),
        ("nf4 compiled (ours) + nf4 lm_head", lambda: nf4_model(skip=()), ours_compiled),
        ("nf4 compiled (ours) without grouping", nf4_model, ungrouped),
        ("nf4 compiled (ours) + nf4 lm_head without swiglu epilogue", lambda: nf4_model(skip=()), without_swiglu_epilogue),
        ("nf4 eager (ours)", nf4_model, lambda model: model),
        ("bnb nf4 eager", lambda: to_bitsandbytes(bf16), lambda model: model),
        ("bnb nf4 compiled", lambda: to_bitsandbytes(bf16), compiled),
    ]
    if only:
        variants = [v for v in variants if v[0] in only or v[0] == "nf4 eager (ours)"]
    logits = {}
    for name, make_model, wrap in variants:
        torch._dynamo.reset()
        try:
            model = make_model()
            forward = wrap(model)
            time_us, logits[name] = time_decode(forward, steps)
            results.append(Result("decode", name, time_us, bytes_per_token(model)))
            print(f"decode {name}: {time_us / 1e3:.3f} ms/token", flush=True)
            if breakdown:
                print(kernel_breakdown(forward), flush=True)
        except ImportError as error:
            results.append(Result("decode", name, error=f"skipped: {error}"))
        except Exception as error:  # a variant failing must not hide the others
            traceback.print_exc()
            results.append(Result("decode", name, error=f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"))
        finally:
            model = forward = None
            torch.cuda.empty_cache()
    reference = logits.get("nf4 eager (ours)")
    for result in results:
        if reference is not None and result.name in logits and result.name != "bf16 compiled":
            result.note = f"max |logits - nf4 eager (ours)| = {(logits[result.name] - reference).abs().max().item():.3g}"
    return results


# --------------------------------------------------------------------------------------------
# optimizer


class AdamState:
    """fp32 parameters with 8-bit AdamW states (fresh random data; states from one eager step)."""

    def __init__(self, sizes: list[int]) -> None:
        self.qmap1, self.qmap2 = dynamic_map(True, "cuda"), dynamic_map(False, "cuda")
        self.params = [torch.randn(n, device="cuda") for n in sizes]
        self.grads = [torch.randn(n, device="cuda") * 1e-2 for n in sizes]
        self.state1, self.state2, self.absmax1, self.absmax2 = [], [], [], []
        for n in sizes:
            codes1, absmax1 = ops.quantize_blockwise(torch.randn(n, device="cuda") * 1e-3, self.qmap1, 256)
            codes2, absmax2 = ops.quantize_blockwise(torch.rand(n, device="cuda") * 1e-5, self.qmap2, 256)
            self.state1.append(codes1)
            self.state2.append(codes2)
            self.absmax1.append(absmax1)
            self.absmax2.append(absmax2)

    def tensors(self):
        return zip(self.params, self.grads, self.state1, self.state2, self.absmax1, self.absmax2)

    def mark_static(self, *scalars: torch.Tensor) -> None:
        """Fixed addresses for Dynamo (as torch's compiled optimizers mark their state), so the
        reduce-overhead variant may CUDA-graph a step that mutates these tensors (and reads the
        code maps whose search tables the warm-up step cached)."""
        for group in (self.params, self.grads, self.state1, self.state2, self.absmax1, self.absmax2,
                      (self.qmap1, self.qmap2), scalars):
            for tensor in group:
                torch._dynamo.mark_static_address(tensor)

    def nbytes(self) -> int:
        n = sum(p.numel() for p in self.params)
        return 16 * n + 2 * 2 * sum(a.numel() * 4 for a in self.absmax1)


def optimizer_results(numel: int) -> list[Result]:
    results: list[Result] = []
    for label, sizes in (("1 tensor", [numel]), ("8 tensors", [numel // 8] * 8)):
        state = AdamState(sizes)
        lr = torch.tensor(LR, dtype=torch.float64, device="cuda")
        step = torch.tensor(10.0, device="cuda")
        zero = torch.zeros((), device="cuda")
        state.mark_static(lr, step, zero)

        def compiled_step(state=state):
            for p, g, s1, s2, a1, a2 in state.tensors():
                step_8bit_blockwise("adam", g, p, s1, s2, state.qmap1, state.qmap2, a1, a2, lr=lr, step=step,
                                    beta1=BETA1, beta2=BETA2, beta3=zero, alpha=zero, eps=EPS, weight_decay=WD)

        def generated_step(state=state):
            for p, g, s1, s2, a1, a2 in state.tensors():
                new = ops.optimizer_step_8bit_blockwise("adam", g, p, s1, s2, state.qmap1, state.qmap2, a1, a2, lr, step,
                                                        BETA1, BETA2, zero, zero, EPS, WD, 1.0)
                for target, value in zip((p, s1, a1, s2, a2), new):
                    target.copy_(value)

        def op_step(state=state):
            for p, g, s1, s2, a1, a2 in state.tensors():
                ops.optimizer_update_8bit_blockwise("adam", g, p, s1, s2, BETA1, BETA2, 0.0, 0.0, EPS, 10, LR,
                                                    state.qmap1, state.qmap2, a1, a2, WD, 1.0)

        def inplace_op_step(state=state):
            for p, g, s1, s2, a1, a2 in state.tensors():
                ops.optimizer_step_8bit_blockwise_("adam", g, p, s1, s2, state.qmap1, state.qmap2, a1, a2, lr, step,
                                                   BETA1, BETA2, zero, zero, EPS, WD, 1.0)

        def multi_tensor_step(state=state):
            from inductor_quant.kernels import optim as kernels

            kernels.multi_update_8bit_blockwise("adam", state.grads, state.params, state.state1, state.state2,
                                                state.absmax1, state.absmax2, state.qmap1, state.qmap2, BETA1, BETA2,
                                                0.0, 0.0, EPS, 10, LR, WD, 1.0, False)

        def bnb_step(state=state):
            for p, g, s1, s2, a1, a2 in state.tensors():
                torch.ops.bitsandbytes.optimizer_update_8bit_blockwise("adam", g, p, s1, s2, BETA1, BETA2, 0.0, 0.0, EPS, 10,
                                                                       LR, state.qmap1, state.qmap2, a1, a2, WD, 1.0, False)

        def with_bnb():
            import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

            return bnb_step

        torch._dynamo.reset()
        variants = [
            ("compiled step_8bit_blockwise", lambda: torch.compile(compiled_step, fullgraph=True)),
            ("compiled step_8bit_blockwise (reduce-overhead)", lambda: torch.compile(compiled_step, fullgraph=True, mode="reduce-overhead")),
            ("compiled functional step (generated kernel)", lambda: torch.compile(generated_step, fullgraph=True)),
            ("hand-written kernel (op per tensor)", lambda: op_step),
            ("hand-written kernel, device scalars (the compiled step's op, eager)", lambda: inplace_op_step),
            ("hand-written kernel (multi-tensor)", lambda: multi_tensor_step),
            ("bnb op", with_bnb),
        ]
        for name, make in variants:
            try:
                fn = make()
                fn()
                torch.cuda.synchronize()
                results.append(Result(f"adamw8bit {label}", name, benchlib.bench(fn), state.nbytes()))
                print(f"adamw8bit {label} {name}: {results[-1].time_us:.1f} us", flush=True)
            except ImportError as error:
                results.append(Result(f"adamw8bit {label}", name, error=f"skipped: {error}"))
            except Exception as error:
                traceback.print_exc()
                results.append(Result(f"adamw8bit {label}", name, error=f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"))
        del state
        torch.cuda.empty_cache()
    return results


# --------------------------------------------------------------------------------------------
# report


def decode_table(results: list[Result], copy_bw: float) -> str:
    base = next((r.time_us for r in results if r.name == "bf16 compiled" and r.time_us), None)
    lines = ["| variant | ms/token | tokens/s | GB/s | % copy | speed-up vs bf16 compiled | note |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if r.time_us is None:
            lines.append(f"| {r.name} | | | | | | {r.error} |")
            continue
        tok_s = 1e6 / r.time_us
        gbps = r.bytes_moved * tok_s / 1e9
        speedup = f"{base / r.time_us:.2f}x" if base else ""
        lines.append(f"| {r.name} | {r.time_us / 1e3:.3f} | {tok_s:.1f} | {gbps:.0f} | {100 * gbps * 1e9 / copy_bw:.0f} % | {speedup} | {r.note} |")
    return "\n".join(lines)


def optimizer_table(results: list[Result], copy_bw: float) -> str:
    lines = ["| case | variant | time | GB/s | % copy | vs hand-written (op) | vs bnb |", "|---|---|---|---|---|---|---|"]
    for section in dict.fromkeys(r.section for r in results):
        rows = [r for r in results if r.section == section]
        hand = next((r.time_us for r in rows if r.name.startswith("hand-written kernel (op") and r.time_us), None)
        bnb = next((r.time_us for r in rows if r.name == "bnb op" and r.time_us), None)
        for r in rows:
            if r.time_us is None:
                lines.append(f"| {section} | {r.name} | | | | | {r.error} |")
                continue
            gbps = r.bytes_moved / (r.time_us * 1e-6) / 1e9
            vs_hand = f"{hand / r.time_us:.2f}x" if hand else ""
            vs_bnb = f"{bnb / r.time_us:.2f}x" if bnb else ""
            lines.append(f"| {section} | {r.name} | {r.time_us:.0f} µs | {gbps:.0f} | {100 * gbps * 1e9 / copy_bw:.0f} % | {vs_hand} | {vs_bnb} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the Llama-3-8B-shaped stack (32 = full)")
    parser.add_argument("--steps", type=int, default=64, help="tokens decoded in the timed greedy loop")
    parser.add_argument("--opt-numel", type=int, default=64 * 2**20, help="parameters in the AdamW benchmark")
    parser.add_argument("--variants", default=None,
                        help="comma-separated decode variants to run (default: all; 'nf4 eager (ours)', the logits "
                             "reference, always runs)")
    parser.add_argument("--kernels", action="store_true",
                        help="after timing each decode variant, print its top GPU kernels per token (torch.profiler)")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-optim", action="store_true")
    parser.add_argument("--json", default=None, help="write the rows and the environment to this path")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_e2e.py needs a CUDA GPU")
    if args.layers < 1 or args.steps < 1 or args.opt_numel < 8 * 256 or args.opt_numel % (8 * 256):
        sys.exit("--layers and --steps must be >= 1, --opt-numel a positive multiple of 2048")

    copy_bw = benchlib.measure_copy_bandwidth()
    only = None if args.variants is None else [v.strip() for v in args.variants.split(",")]
    decode = [] if args.skip_decode else decode_results(args.layers, args.steps, only, args.kernels)
    optim = [] if args.skip_optim else optimizer_results(args.opt_numel)
    print(f"\ncopy bandwidth {copy_bw / 1e12:.2f} TB/s; {benchlib.environment()}")
    if decode:
        print(f"\n## batch-1 decode, Llama-3-8B shapes, {args.layers} layers, bf16 activations\n")
        print(decode_table(decode, copy_bw))
    if optim:
        print(f"\n## AdamW 8-bit step, {args.opt_numel} fp32 parameters\n")
        print(optimizer_table(optim, copy_bw))
    if args.json:
        rows = [
            benchlib.make_row(r.section, f"{args.layers} layers" if r.section == "decode" else str(args.opt_numel), r.name,
                              r.time_us, r.bytes_moved, copy_bw, r.note)
            if r.time_us is not None
            else benchlib.Row(r.section, "", r.name, float("nan"), 0, float("nan"), r.error or "")
            for r in decode + optim
        ]
        benchlib.write_json(args.json, rows, {**benchlib.environment(), "copy_bw": copy_bw, "args": vars(args)})


if __name__ == "__main__":
    main()
