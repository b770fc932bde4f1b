"""Shared helpers for the GPU benchmarks in tools/: copy bandwidth, timing, rows, table, JSON.

Every number is reported as a median time and as "% copy": the bytes an op must move (each input
read once, each output written once) over its time, relative to the device-to-device copy
bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Callable

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass
class Row:
    """One timed variant of one op on one shape."""

    op: str
    shape: str
    impl: str  # "inductor_quant", "bnb", "torch", ...
    time_us: float
    bytes_moved: int
    copy_pct: float
    note: str = ""


def measure_copy_bandwidth(device: str = "cuda", nbytes: int = 2 * 1024**3) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = bench(lambda: dst.copy_(src)) * 1e-6
    return 2 * nbytes / seconds


def bench(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of ``fn`` in microseconds (``triton.testing.do_bench``, L2 flushed between runs)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def make_row(op: str, shape: str, impl: str, time_us: float, bytes_moved: int, copy_bw: float, note: str = "") -> Row:
    pct = 100.0 * bytes_moved / (time_us * 1e-6) / copy_bw
    return Row(op, shape, impl, time_us, bytes_moved, pct, note)


def format_table(rows: list[Row]) -> str:
    """Markdown table: one line per (op, shape), one column per implementation."""
    impls = list(dict.fromkeys(r.impl for r in rows))
    keys = list(dict.fromkeys((r.op, r.shape) for r in rows))
    cells = {(r.op, r.shape, r.impl): r for r in rows}
    lines = ["| op | shape | " + " | ".join(impls) + " |", "|---|---|" + "---|" * len(impls)]
    for op, shape in keys:
        entries = []
        for impl in impls:
            row = cells.get((op, shape, impl))
            entries.append(f"{row.time_us:.1f} µs ({row.copy_pct:.0f} %)" if row else "")
        lines.append(f"| {op} | {shape} | " + " | ".join(entries) + " |")
    return "\n".join(lines)


def write_json(path: str, rows: list[Row], meta: dict) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)


def environment() -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    return info


def cli_parser(doc: str | None, json_default: str, json_help: str = "where to write the rows") -> argparse.ArgumentParser:
    """The argument parser every benchmark script starts from: its docstring as the description
    and ``--json``, the path the results are written to."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=json_default, help=json_help)
    return parser


def cuda_missing(prog: str, needs: str = "this benchmark needs a GPU") -> bool:
    """True (after saying so on stderr) when there is no CUDA device; the scripts then exit with 2."""
    if torch.cuda.is_available():
        return False
    print(f"{prog}: no CUDA device; {needs}", file=sys.stderr)
    return True


def device_setup() -> tuple[float, dict]:
    """Measure the copy bandwidth, print it, and return it with the run's metadata for the JSON."""
    copy_bw = measure_copy_bandwidth()
    print(f"device copy bandwidth: {copy_bw / 1e12:.2f} TB/s (read + write)", flush=True)
    return copy_bw, {**environment(), "copy_bandwidth_TBps": copy_bw / 1e12}
