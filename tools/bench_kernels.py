"""GPU kernel benchmarks: every op family, side by side with bitsandbytes CUDA and torch.

Measures the device copy bandwidth once, then runs each family's ``run(copy_bw)``
(``bench_quant``, ``bench_gemm``, ``bench_optim``), prints one markdown table (median time and %
of copy bandwidth) and writes the rows as JSON.

    python tools/bench_kernels.py --json bench_kernels.json [--only quant,gemm,optim]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

FAMILIES = ("quant", "gemm", "optim")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="bench_kernels.json", help="where to write the rows")
    parser.add_argument("--only", default=",".join(FAMILIES), help=f"comma-separated subset of {FAMILIES}")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device; these benchmarks need a GPU", file=sys.stderr)
        return 2
    copy_bw = benchlib.measure_copy_bandwidth()
    meta = {**benchlib.environment(), "copy_bandwidth_TBps": copy_bw / 1e12}
    print(f"device copy bandwidth: {copy_bw / 1e12:.2f} TB/s (read + write)", flush=True)
    rows: list[benchlib.Row] = []
    for family in args.only.split(","):
        module = importlib.import_module(f"bench_{family}")
        rows += module.run(copy_bw)
        benchlib.write_json(args.json, rows, meta)
    print(benchlib.format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
