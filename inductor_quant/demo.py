"""The main job of ``inductor-quant demo``: quantize a small Llama, compile it, generate, report.

:func:`run_demo` builds the built-in seeded :class:`~inductor_quant.models.TinyLlama` (no
downloads), then for each variant — the unquantized model, NF4 and blockwise 8-bit linear weights
(``lm_head`` stays full precision, as usual) — it

1. quantizes a copy with :func:`inductor_quant.nn.quantize_model`,
2. optionally compiles it (static shapes: one prefill graph, one decode graph),
3. greedily decodes ``new_tokens`` tokens after a seeded random prompt through the KV cache
   (eager prefill, then the possibly compiled single-token decode step: one static-shape graph),
4. measures the logits' error against the unquantized model at every position (the quantized
   variants are fed the unquantized model's tokens, so positions line up), how often their top-1
   prediction equals the unquantized model's token, and decode throughput (tokens/s, after a
   warm-up; on CPU the eager prefill runs the ops' pure-torch reference and the compiled decode
   step Inductor's generated C++ for the quantized matmuls).

:class:`DemoReport` holds the rows and renders the table the CLI prints.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence

import torch

from .models import TinyLlama, TinyLlamaConfig, build_model
from .nn import quantize_model

__all__ = ["VARIANTS", "DemoRow", "DemoReport", "run_demo", "default_device"]

# name -> quantize_model arguments (None: keep the weights in full precision)
VARIANTS: dict[str, dict | None] = {
    "unquantized": None,
    "nf4": dict(bits=4, quant_type="nf4", blocksize=64),
    "fp4": dict(bits=4, quant_type="fp4", blocksize=64),
    "int8": dict(bits=8, blocksize=256),
}


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass
class DemoRow:
    """One variant's measurements."""

    variant: str
    weight_bytes: int
    max_abs_error: float
    mean_abs_error: float
    relative_error: float
    token_agreement: float
    tokens_per_s: float
    compile_s: float | None
    fusion: str | None


@dataclasses.dataclass
class DemoReport:
    """Everything :func:`run_demo` measured, plus the settings it ran with."""

    config: TinyLlamaConfig
    device: str
    dtype: torch.dtype
    compiled: bool
    compile_mode: str | None
    batch_size: int
    prompt_len: int
    new_tokens: int
    rows: list[DemoRow]
    sample: list[int]

    def row(self, variant: str) -> DemoRow:
        for row in self.rows:
            if row.variant == variant:
                return row
        raise KeyError(variant)

    def _how(self) -> str:
        if not self.compiled:
            return "eager"
        return f"compiled ({self.compile_mode} mode)" if self.compile_mode else "compiled"

    def format_table(self) -> str:
        """The table the CLI prints (markdown-compatible)."""
        c = self.config
        baseline = self.rows[0].weight_bytes
        lines = [
            f"TinyLlama dim={c.dim} layers={c.n_layers} heads={c.n_heads} vocab={c.vocab_size} "
            f"on {self.device} ({str(self.dtype).removeprefix('torch.')}), "
            f"{self._how()}; batch {self.batch_size}, prompt {self.prompt_len}, "
            f"{self.new_tokens} new tokens",
            "",
            "| variant | weight bytes | vs unquantized | max abs err | mean abs err | rel err | same tokens | tokens/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.variant} | {_format_bytes(r.weight_bytes)} | {r.weight_bytes / baseline:.1%} | "
                f"{r.max_abs_error:.4f} | {r.mean_abs_error:.4f} | {r.relative_error:.2%} | "
                f"{r.token_agreement:.0%} | {r.tokens_per_s:.1f} |"
            )
        lines.append("")
        lines.append("errors: logits vs the unquantized model at every position; same tokens: top-1 equal to the unquantized model's token")
        for r in self.rows:
            if r.fusion is not None:
                lines.append(f"fusion ({r.variant}, compiled in {r.compile_s:.1f} s): {r.fusion}")
        lines.append(f"sample (unquantized, first sequence): {self.sample}")
        return "\n".join(lines)


def _format_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024**2:.2f} MiB"


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and persistent buffer (the checkpoint's size), tensors counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in model.state_dict(keep_vars=True).values():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _compile(model: TinyLlama, mode: str | None) -> Callable:
    """The model compiled with the inductor_quant passes (static shapes)."""
    from .compile import compile as compile_with_passes

    return compile_with_passes(model, dynamic=False, mode=mode)


def _fusion_summary(counter_delta: dict[str, int], kernels: int, graphs: int) -> str:
    matched = ", ".join(f"{name} x{count}" for name, count in sorted(counter_delta.items()) if count) or "no pattern rewrites"
    return f"{matched}; {kernels} generated kernels; {graphs} graph{'s' if graphs != 1 else ''} compiled"


@torch.no_grad()
def _decode(
    model: TinyLlama, step: Callable, prompt: torch.Tensor, new_tokens: int, forced: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding through the KV cache: an eager prefill of ``prompt``, then ``new_tokens - 1``
    single-token steps through ``step(tokens, input_pos)`` (the model, or its compiled form).

    With ``forced`` (``(B, new_tokens)`` tokens, the unquantized model's), each step is fed the
    forced token instead of its own prediction (teacher forcing), so every position's logits
    can be compared with the reference. Returns ``(logits (B, T + new_tokens - 1, V),
    predicted tokens (B, new_tokens))``."""
    model.setup_caches(prompt.shape[0])
    prompt_len = prompt.shape[1]
    # fresh canonical-stride copies: a strided view would fail the compiled step's stride guard
    forced_steps = None if forced is None else [column.clone(memory_format=torch.contiguous_format) for column in forced.unbind(1)]
    logits = model(prompt, torch.arange(prompt_len, device=prompt.device))
    all_logits = [logits]
    predicted = [logits[:, -1].argmax(dim=-1)]
    for i in range(new_tokens - 1):
        token = predicted[-1] if forced_steps is None else forced_steps[i]
        logits = step(token[:, None], torch.tensor([prompt_len + i], device=prompt.device)).clone()  # CUDA graphs reuse outputs
        all_logits.append(logits)
        predicted.append(logits[:, -1].argmax(dim=-1))
    return torch.cat(all_logits, dim=1), torch.stack(predicted, dim=1)


def run_demo(
    config: TinyLlamaConfig | None = None,
    *,
    variants: Sequence[str] = ("unquantized", "nf4", "int8"),
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 1,
    prompt_len: int = 16,
    new_tokens: int = 16,
    compile: bool = True,
    compile_mode: str | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> DemoReport:
    """Run the demo (module docstring) and return its :class:`DemoReport`.

    Args:
        config: model sizes (default :class:`TinyLlamaConfig`: dim 256, 2 layers, vocab 1024).
        variants: names from :data:`VARIANTS`; the first row is the error baseline and is always
            ``"unquantized"`` (added when missing).
        device: "cpu", "cuda", ... (default: the GPU when present).
        compile: compile each variant's decode step with ``inductor_quant.compile`` (else eager).
        compile_mode: ``torch.compile`` mode, e.g. ``"reduce-overhead"`` (CUDA graphs) on a GPU.
        log: called with a progress line per stage (e.g. ``print``).
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"variants must be among {tuple(VARIANTS)}, got {unknown}")
    for name, value in (("batch_size", batch_size), ("prompt_len", prompt_len), ("new_tokens", new_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    config = TinyLlamaConfig() if config is None else config
    if prompt_len + new_tokens > config.max_seq_len:
        raise ValueError(f"prompt_len + new_tokens ({prompt_len + new_tokens}) exceeds max_seq_len ({config.max_seq_len})")
    device = default_device() if device is None else str(device)
    variants = ["unquantized"] + [v for v in variants if v != "unquantized"]
    say = log or (lambda line: None)

    reference = build_model(config, seed=seed, dtype=dtype, device=device)
    prompt = torch.randint(0, config.vocab_size, (batch_size, prompt_len), generator=torch.Generator().manual_seed(seed + 1)).to(device)

    rows: list[DemoRow] = []
    ref_logits = ref_tokens = None
    for variant in variants:
        model = copy.deepcopy(reference)
        settings = VARIANTS[variant]
        if settings is not None:
            say(f"quantizing linear weights: {variant}")
            quantize_model(model, skip=("lm_head",), **settings)
        weight_bytes = _weight_bytes(model)
        step: Callable = model
        compile_s = fusion = None
        if compile:
            from torch._dynamo.utils import counters
            from torch._inductor import metrics

            say(f"compiling the decode step: {variant}")
            torch._dynamo.reset()
            metrics.reset()
            before = dict(counters["inductor_quant"])
            graphs_before = counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            step = _compile(model, compile_mode)
            # the first call compiles; caches off so the passes run and count their rewrites
            # (a cache hit would skip them and the fusion summary would read 0)
            with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
                _decode(model, step, prompt, 2)
            _synchronize(device)
            compile_s = time.perf_counter() - start
            delta = {k: v - before.get(k, 0) for k, v in counters["inductor_quant"].items()}
            kernels = metrics.generated_kernel_count
        say(f"decoding: {variant}")
        _decode(model, step, prompt, 4)  # warm-up (caches, allocator, CUDA graph recording)
        _synchronize(device)
        start = time.perf_counter()
        logits, tokens = _decode(model, step, prompt, new_tokens, forced=ref_tokens)
        _synchronize(device)
        elapsed = time.perf_counter() - start
        if compile:
            fusion = _fusion_summary(delta, kernels, counters["stats"]["unique_graphs"] - graphs_before)
        if ref_logits is None:
            ref_logits, ref_tokens = logits.float(), tokens
        err = (logits.float() - ref_logits).abs()
        rows.append(
            DemoRow(
                variant=variant,
                weight_bytes=weight_bytes,
                max_abs_error=err.max().item(),
                mean_abs_error=err.mean().item(),
                relative_error=(err.mean() / ref_logits.abs().mean()).item(),
                token_agreement=(tokens == ref_tokens).float().mean().item(),
                tokens_per_s=batch_size * new_tokens / elapsed,
                compile_s=compile_s,
                fusion=fusion,
            )
        )
    sample = torch.cat([prompt[0], ref_tokens[0]]).tolist()
    return DemoReport(config, device, dtype, compile, compile_mode if compile else None, batch_size, prompt_len, new_tokens, rows, sample)
