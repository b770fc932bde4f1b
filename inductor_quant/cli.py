"""The ``inductor-quant`` command line.

Subcommands::

    inductor-quant demo                      # quantize + compile the built-in TinyLlama, generate, report
    inductor-quant quantize IN.safetensors OUT.safetensors --quant-type nf4 --blocksize 64
    inductor-quant bench                     # the GPU benchmarks of tools/ (needs a CUDA GPU)
    inductor-quant inspect ...               # what torch.compile fused (inductor_quant.inspect_cli)

Every subcommand lives in a module exposing ``add_parser(subparsers) -> ArgumentParser``, which
registers the subcommand and sets ``func`` (``func(args) -> exit code``) as its default. The
built-in ones are below; :data:`SUBCOMMAND_MODULES` lists the modules registered after them, so
a new subcommand is one module plus one entry there. ``main(argv)`` returns the exit code (0 ok,
2 bad usage or input, 3 nothing to do on this machine), which makes it testable in-process.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["SUBCOMMAND_MODULES", "build_parser", "main", "find_tools_dir"]

SUBCOMMAND_MODULES: tuple[str, ...] = ("inductor_quant.inspect_cli",)

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BENCH_SCRIPTS = {"kernels": "bench_kernels.py", "e2e": "bench_e2e.py"}


def _error(command: str, message: str, code: int = EXIT_USAGE) -> int:
    print(f"inductor-quant {command}: {message}", file=sys.stderr)
    return code


# ---------------------------------------------------------------------------------------- demo
def _add_demo_parser(subparsers: Any) -> argparse.ArgumentParser:
    from .demo import VARIANTS

    parser = subparsers.add_parser(
        "demo",
        help="quantize the built-in TinyLlama to NF4 and 8-bit, compile it, generate, and report memory/error/speed",
        description=(
            "Build the built-in seeded Llama-style model (no downloads), quantize its linear weights "
            "(lm_head stays full precision), compile with the inductor_quant passes, decode a few tokens "
            "and print weight bytes, output error against the unquantized model, tokens/s and a fusion summary."
        ),
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when a GPU is present, else cpu)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="model dtype (default float32)")
    parser.add_argument("--no-compile", action="store_true", help="run eagerly (no torch.compile)")
    parser.add_argument(
        "--mode", default=None,
        help="torch.compile mode (default: reduce-overhead, i.e. CUDA graphs, on a GPU; Inductor's default on CPU; 'default' forces it)",
    )
    parser.add_argument(
        "--variants", default="nf4,int8",
        help=f"comma-separated quantized variants among {', '.join(v for v in VARIANTS if v != 'unquantized')} (default nf4,int8)",
    )
    parser.add_argument("--dim", type=int, default=256, help="model width (default 256)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary size (default 1024)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences decoded together (default 1)")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens to generate (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="weights and prompt seed (default 0)")
    parser.add_argument("--json", metavar="PATH", help="also write the measurements as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(func=_run_demo)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .models import TinyLlamaConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        return _error("demo", f"--device {device}: no CUDA GPU is available (use --device cpu)")
    variants = ["unquantized"] + [v.strip() for v in args.variants.split(",") if v.strip()]
    # single-token decoding is launch-bound: CUDA graphs remove the per-kernel host overhead
    mode = args.mode or ("reduce-overhead" if device.startswith("cuda") else None)
    start = time.perf_counter()
    try:
        config = TinyLlamaConfig(
            dim=args.dim, n_layers=args.layers, n_heads=args.heads, vocab_size=args.vocab,
            max_seq_len=max(256, args.prompt_len + args.new_tokens),
        )
        log = None if args.quiet else (lambda line: print(f"[{time.perf_counter() - start:5.1f} s] {line}", file=sys.stderr, flush=True))
        report = run_demo(
            config, variants=variants, device=device, dtype=_DTYPES[args.dtype], batch_size=args.batch_size,
            prompt_len=args.prompt_len, new_tokens=args.new_tokens, compile=not args.no_compile, compile_mode=mode,
            seed=args.seed, log=log,
        )
    except ValueError as error:
        return _error("demo", str(error))
    print(report.format_table())
    print(f"total time: {time.perf_counter() - start:.1f} s")
    if args.json:
        rows = [vars(row) for row in report.rows]
        payload = {
            "device": report.device, "dtype": args.dtype, "compiled": report.compiled, "compile_mode": report.compile_mode,
            "config": vars(report.config), "rows": rows,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


# ------------------------------------------------------------------------------------ quantize
def _add_quantize_parser(subparsers: Any) -> argparse.ArgumentParser:
    from .checkpoint import DEFAULT_FILE_SKIP

    parser = subparsers.add_parser(
        "quantize",
        help="quantize the linear weights of a safetensors checkpoint (bitsandbytes-compatible output)",
        description=(
            "Quantize every 2-D linear weight of IN (a full-precision safetensors file) and write OUT. "
            "4-bit output uses bitsandbytes' Linear4bit keys (weight, weight.absmax, weight.quant_map, "
            "weight.nested_*, weight.quant_state.bitsandbytes__nf4|fp4), so it loads with load_state_dict "
            "into inductor_quant.nn.Linear4bit layers and into bitsandbytes."
        ),
    )
    parser.add_argument("input", metavar="IN.safetensors", help="full-precision checkpoint")
    parser.add_argument("output", metavar="OUT.safetensors", help="where to write the quantized checkpoint")
    parser.add_argument("--quant-type", choices=("nf4", "fp4", "int8"), default="nf4",
                        help="nf4/fp4: 4-bit (Linear4bit); int8: blockwise 8-bit with the dynamic map (Linear8bit). Default nf4")
    parser.add_argument("--blocksize", type=int, default=None, help="weights per absmax (default 64 for 4-bit, 256 for int8)")
    parser.add_argument("--no-double-quant", action="store_true", help="keep the 4-bit absmax in fp32 (no nested quantization)")
    parser.add_argument("--quant-storage", choices=sorted(_DTYPES) + ["uint8"], default="uint8", help="dtype of the packed 4-bit bytes")
    parser.add_argument("--skip", action="append", metavar="PATTERN",
                        help=f"module-name glob to keep in full precision; repeatable (default: {' '.join(DEFAULT_FILE_SKIP)})")
    parser.add_argument("--no-skip", action="store_true", help="quantize every linear weight (lm_head and embeddings too)")
    parser.add_argument("--include", action="append", metavar="PATTERN", help="only quantize modules matching a glob; repeatable")
    parser.add_argument("--device", default="cpu", help="where to quantize (cpu or cuda; output is written from CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run_quantize)
    return parser


def _run_quantize(args: argparse.Namespace) -> int:
    from .checkpoint import DEFAULT_FILE_SKIP, CheckpointFormatError, quantize_safetensors

    if not os.path.isfile(args.input):
        return _error("quantize", f"input file {args.input!r} does not exist")
    if args.no_skip and args.skip:
        return _error("quantize", "--skip and --no-skip are mutually exclusive")
    skip: tuple[str, ...] = () if args.no_skip else tuple(args.skip or DEFAULT_FILE_SKIP)
    bits = 8 if args.quant_type == "int8" else 4
    storage = torch.uint8 if args.quant_storage == "uint8" else _DTYPES[args.quant_storage]
    if bits == 8 and (args.no_double_quant or args.quant_storage != "uint8"):
        return _error("quantize", "--no-double-quant and --quant-storage apply to 4-bit quant types (nf4, fp4) only")
    start = time.perf_counter()
    try:
        report = quantize_safetensors(
            args.input, args.output, "nf4" if bits == 8 else args.quant_type, args.blocksize,
            compress_statistics=not args.no_double_quant, skip=skip, bits=bits, quant_storage=storage,
            include=args.include, device=args.device, progress=not args.no_progress,
        )
    except (ValueError, CheckpointFormatError) as error:
        return _error("quantize", str(error))
    print(f"{report}")
    print(f"wrote {args.output} in {time.perf_counter() - start:.1f} s")
    return 0


# --------------------------------------------------------------------------------------- bench
def find_tools_dir() -> Path | None:
    """The repository's ``tools/`` directory (next to the package in a source checkout or an
    editable install), or None for an installed wheel, which does not ship it."""
    candidate = Path(__file__).resolve().parent.parent / "tools"
    return candidate if (candidate / _BENCH_SCRIPTS["kernels"]).is_file() else None


def _add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench",
        help="run the GPU benchmarks in tools/ (bench_kernels.py, bench_e2e.py); needs a CUDA GPU",
        description=(
            "Run tools/bench_kernels.py (every op family against bitsandbytes and torch, as % of copy "
            "bandwidth) and/or tools/bench_e2e.py (end-to-end model timings) from a source checkout. "
            "Exits with status 3 and a message when no CUDA GPU is present."
        ),
    )
    parser.add_argument("which", nargs="?", choices=("all", *_BENCH_SCRIPTS), default="all", help="which benchmark (default all)")
    parser.add_argument("--out", default=".", metavar="DIR", help="directory for the JSON results (default: current directory)")
    parser.add_argument("--tools-dir", default=None, help="the repository's tools/ directory (default: found next to the package)")
    parser.add_argument("--script-args", default="", metavar="ARGS",
                        help="extra arguments for the scripts, as one string (e.g. --script-args='--only quant')")
    parser.set_defaults(func=_run_bench)
    return parser


def _run_bench(args: argparse.Namespace) -> int:
    tools = Path(args.tools_dir) if args.tools_dir else find_tools_dir()
    if not torch.cuda.is_available():
        where = f" ({tools})" if tools else ""
        return _error(
            "bench",
            f"no CUDA GPU found: the benchmarks in tools/{where} time GPU kernels against bitsandbytes' CUDA kernels. "
            "Run this on a machine with an NVIDIA GPU (CPU correctness is covered by the test suite: python -m pytest).",
            EXIT_UNAVAILABLE,
        )
    if tools is None or not tools.is_dir():
        return _error("bench", "tools/ not found: the benchmarks ship with the source checkout, not the wheel (pass --tools-dir)")
    names = list(_BENCH_SCRIPTS) if args.which == "all" else [args.which]
    extra = shlex.split(args.script_args)
    os.makedirs(args.out, exist_ok=True)
    status = 0
    for name in names:
        script = tools / _BENCH_SCRIPTS[name]
        if not script.is_file():
            print(f"inductor-quant bench: {script} does not exist; skipping {name}", file=sys.stderr)
            status = status or EXIT_UNAVAILABLE
            continue
        command = [sys.executable, str(script), "--json", str(Path(args.out) / f"bench_{name}.json"), *extra]
        print(f"$ {' '.join(command)}", flush=True)
        result = subprocess.run(command, cwd=str(tools.parent), check=False)
        status = status or result.returncode
    return status


# ---------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The full parser: built-in subcommands, then those of :data:`SUBCOMMAND_MODULES`."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="inductor-quant",
        description="Low-bit quantization (NF4/FP4, blockwise 8-bit, 8-bit optimizers) as torch.compile ops.",
    )
    parser.add_argument("--version", action="version", version=f"inductor-quant {__version__} (torch {torch.__version__})")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add_parser in (_add_demo_parser, _add_quantize_parser, _add_bench_parser):
        add_parser(subparsers)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``inductor-quant`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
