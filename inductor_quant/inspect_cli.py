"""``inductor-quant inspect``: what torch.compile did with a program's quantized ops.

Usage::

    inductor-quant inspect path/to/script.py:build      # text report on the terminal
    inductor-quant inspect my_package.module:build --html report.html
    inductor-quant inspect --demo --json > report.json
    inductor-quant inspect --demo mlp --no-passes      # what stock Inductor does

The target names a function (in a ``.py`` file or an importable module) that takes no arguments
and returns ``(fn_or_module, example_inputs)`` or ``(fn_or_module, example_inputs,
compile_kwargs)``; ``example_inputs`` is a tuple of positional arguments. The script is imported
(its ``if __name__ == "__main__":`` block does not run). ``--demo`` inspects the built-in
TinyLlama (``inductor_quant.models``) with NF4 linears; ``--demo mlp`` a 2-layer NF4 MLP.

The subcommand is registered by ``inductor_quant.cli`` through ``add_parser``/``run``; this module
also runs on its own: ``python -m inductor_quant.inspect_cli ...``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["add_parser", "run", "load_target", "main"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DESCRIPTION = (
    "Compile a program with Inductor and the inductor_quant passes, run it once, and show what happened "
    "to its quantized ops: graph breaks, recompiles, pattern matches, every generated kernel (with the "
    "quantized ops it contains and the bytes it moves), and each quantized op that did not fuse, with the reason."
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``inspect`` subcommand on an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "inspect",
        help="show what torch.compile did with a program's quantized ops (matches, kernels, what did not fuse)",
        description=_DESCRIPTION,
        epilog=(
            "TARGET is FILE.py:FUNCTION or MODULE:FUNCTION; FUNCTION takes no arguments and returns "
            "(fn_or_module, example_inputs) or (fn_or_module, example_inputs, compile_kwargs)."
        ),
    )
    _add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("target", nargs="?", help="FILE.py:FUNCTION or MODULE:FUNCTION")
    source.add_argument(
        "--demo",
        nargs="?",
        const="llama",
        choices=("llama", "mlp"),
        help="inspect a built-in model: the TinyLlama of inductor_quant.models quantized to NF4 (default) "
        "or a 2-layer NF4 MLP",
    )
    parser.add_argument("--html", metavar="PATH", help="also write a self-contained HTML report (graph drawn as SVG)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    parser.add_argument("--no-passes", action="store_true", help="compile without the inductor_quant pattern passes")
    parser.add_argument("--mode", help="torch.compile mode (e.g. max-autotune-no-cudagraphs)")
    parser.add_argument("--dynamic", action="store_true", default=None, help="torch.compile(dynamic=True)")
    parser.add_argument("--fullgraph", action="store_true", help="torch.compile(fullgraph=True)")
    parser.add_argument("--device", default=None, help="device for --demo (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="activation dtype for --demo")


def load_target(spec: str) -> Callable[[], Any]:
    """The function named by ``FILE.py:FUNCTION`` or ``MODULE:FUNCTION``."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise ValueError(f"target must be FILE.py:FUNCTION or MODULE:FUNCTION, got {spec!r}")
    if path.endswith(".py") or os.path.sep in path:
        if not os.path.isfile(path):
            raise ValueError(f"target file {path!r} does not exist")
        module_name = "_inductor_quant_inspect_" + os.path.splitext(os.path.basename(path))[0]
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"target file {path!r} cannot be imported")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        directory = os.path.dirname(os.path.abspath(path))
        sys.path.insert(0, directory)
        try:
            module_spec.loader.exec_module(module)
        finally:
            sys.path.remove(directory)
    else:
        module = importlib.import_module(path)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"target {spec!r}: {path} has no function {name!r}")
    return fn


def _unpack(spec: str, built: Any) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    if not isinstance(built, tuple) or len(built) not in (2, 3):
        raise ValueError(
            f"target {spec!r} must return (fn_or_module, example_inputs) or "
            f"(fn_or_module, example_inputs, compile_kwargs), got {type(built).__name__}"
        )
    fn, inputs = built[0], built[1]
    kwargs = built[2] if len(built) == 3 else {}
    if not callable(fn):
        raise ValueError(f"target {spec!r} returned a non-callable fn_or_module: {type(fn).__name__}")
    if not isinstance(inputs, (tuple, list)):
        raise ValueError(f"target {spec!r}: example_inputs must be a tuple of positional arguments, got {type(inputs).__name__}")
    if not isinstance(kwargs, dict):
        raise ValueError(f"target {spec!r}: compile_kwargs must be a dict, got {type(kwargs).__name__}")
    return fn, tuple(inputs), dict(kwargs)


def run(args: argparse.Namespace) -> int:
    """Run the ``inspect`` subcommand; returns the process exit code."""
    from .inspection import inspect as inspect_fn
    from .inspection.html import render_html

    if args.demo:
        from .inspection.examples import tiny_llama_nf4, two_layer_mlp

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"inductor-quant inspect: --device {device}: no CUDA GPU is available (use --device cpu)", file=sys.stderr)
            return 2
        build = tiny_llama_nf4 if args.demo == "llama" else two_layer_mlp
        fn, inputs = build(device=device, dtype=_DTYPES[args.dtype])
        compile_kwargs: dict[str, Any] = {}
        label = f"demo {args.demo}"
    else:
        try:
            fn, inputs, compile_kwargs = _unpack(args.target, load_target(args.target)())
        except ValueError as error:
            print(f"inductor-quant inspect: {error}", file=sys.stderr)
            return 2
        label = args.target
    if args.mode:
        compile_kwargs["mode"] = args.mode
    if args.dynamic is not None:
        compile_kwargs["dynamic"] = args.dynamic
    if args.fullgraph:
        compile_kwargs["fullgraph"] = True
    report = inspect_fn(fn, *inputs, passes=not args.no_passes, **compile_kwargs)
    if args.html:
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(render_html(report))
    if args.json:
        print(report.to_json())
    else:
        print(report.to_text(), end="")
        if args.html:
            print(f"HTML report ({label}): {args.html}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m inductor_quant.inspect_cli``)."""
    parser = argparse.ArgumentParser(prog="inductor-quant inspect", description=_DESCRIPTION)
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
