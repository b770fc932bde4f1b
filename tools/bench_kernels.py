"""GPU kernel benchmarks: every op family, side by side with bitsandbytes CUDA and torch.

Measures the device copy bandwidth once, then runs each family's ``run(copy_bw)``
(``bench_quant``, ``bench_gemm``, ``bench_optim``), prints one markdown table (median time and %
of copy bandwidth) and writes the rows as JSON.

    python tools/bench_kernels.py --json bench_kernels.json [--only quant,gemm,optim]
"""

from __future__ import annotations

import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

FAMILIES = ("quant", "gemm", "optim")


def main(argv: list[str] | None = None) -> int:
    parser = benchlib.cli_parser(__doc__, "bench_kernels.json")
    parser.add_argument("--only", default=",".join(FAMILIES), help=f"comma-separated subset of {FAMILIES}")
    args = parser.parse_args(argv)
    if benchlib.cuda_missing("bench_kernels", "these benchmarks need a GPU"):
        return 2
    copy_bw, meta = benchlib.device_setup()
    rows: list[benchlib.Row] = []
    for family in args.only.split(","):
        module = importlib.import_module(f"bench_{family}")
        rows += module.run(copy_bw)
        benchlib.write_json(args.json, rows, meta)
    print(benchlib.format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
