"""Offline SASS statistics of the hot loops of our Triton kernels: no GPU needed.

Triton compiles a kernel for a named GPU target with the ``ptxas`` and ``nvdisasm`` its wheel ships,
so the machine code of a kernel can be read on a CPU-only machine. This tool compiles a preset
kernel configuration for sm_90 (H100), finds its main loop (the longest backward branch) and
reports the loop's instruction mix, per weight code where the preset says how many codes one
iteration handles per thread. It is how a layout change is judged before it reaches a GPU: the
4-bit GEMV is bound by instruction issue and the L1/shared-memory datapath (``tools/notes_gemm.md``),
so the loop's instructions per code and its shared-memory traffic (``LDS``/``STS``/``BAR``) predict
the kernel's speed. Kernels without a hot loop (the 8-bit quantize and its table build) are counted
whole; for every preset the report includes local-memory traffic (``LDL``/``STL``: register spills)
and the registers per thread (``cuobjdump``), which set how many warps an SM holds. ``--maxnreg`` and
``--constexpr NAME=VALUE`` compile a variant of the preset (a register cap, a constexpr such as
``PREFETCH_AHEAD=0``: the quantizers without their default L2 prefetch).

    python tools/kernel_sass.py [gemv|quantize_4bit[_l1]|quantize_blockwise|search_tables] [--arch 90] [--json]
        [--maxnreg N] [--constexpr NAME=VALUE ...]

Needs ``TRITON_INTERPRET`` unset (the interpreter replaces the compiled kernels).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


@dataclass(frozen=True)
class Preset:
    """One kernel configuration: argument types, constexpr values, warps, the region counted
    (``"loop"``: the main loop; ``"kernel"``: every instruction) and the weight codes or elements
    each thread handles in that region (0 when it is not over codes or elements)."""

    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    codes_per_iteration: int
    aligned: tuple[str, ...] = field(default=())
    scope: str = "loop"


def _gemv_preset() -> Preset:
    from inductor_quant.kernels import gemm

    block_n, num_warps = 4, 2
    config = gemm.KernelConfig(block_n=block_n, block_k=1024 * num_warps, num_warps=num_warps)
    pointers = dict(A="*bf16", B="*u8", code="*fp32", absmax="*fp32", absmax_8bit="*u8", absmax_code="*fp32",
                    absmax_offset="*fp32", bias="*bf16", out="*bf16")
    return Preset(
        kernel="inductor_quant.kernels.gemm._gemv_4bit_kernel",
        signature={**pointers, "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_om": "i32"},
        constexprs=dict(BLOCKSIZE=64, NESTED=True, HAS_BIAS=False, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                        USE_SHFL=True),
        num_warps=config.num_warps,
        # each thread holds one 4-word chunk (32 codes) of each of the block_n rows per K-tile
        codes_per_iteration=32 * config.block_n,
        # what Triton's launcher specializes for 16-byte aligned buffers and multiples of 16
        aligned=(*pointers, "K", "stride_am", "stride_om"),
    )


def _quantize_blockwise_preset() -> Preset:
    from inductor_quant.kernels import blockwise

    config = blockwise._DEFAULT_QUANTIZE
    blocksize = 256
    pointers = dict(x_ptr="*bf16", mid_ptr="*fp32", first_ptr="*u8", fullest_ptr="*i32", q_ptr="*u8",
                    absmax_ptr="*fp32")
    return Preset(
        kernel="inductor_quant.kernels.blockwise._quantize_blockwise_kernel",
        signature={**pointers, "n": "i64"},
        constexprs=dict(BLOCKSIZE=blocksize, ROWS=config.tile // blocksize, SEARCH=config.search,
                        KEY_SHIFT=config.key_shift, BUCKETS=config.buckets, PROBES=config.probes,
                        PREFETCH_AHEAD=config.prefetch_ahead),
        num_warps=config.num_warps,
        codes_per_iteration=config.tile // (32 * config.num_warps),  # elements per thread
        aligned=(*pointers, "n"),
        scope="kernel",
    )


def _quantize_4bit_preset(smem_table: bool = True) -> Preset:
    from inductor_quant.kernels import fourbit

    config = fourbit.Quantize4bitConfig(smem_table=smem_table)
    blocksize = 64
    pointers = dict(x_ptr="*bf16", table_ptr="*i64", packed_ptr="*u8", absmax_ptr="*fp32")
    signature = {**pointers, "n": "i64"}
    return Preset(
        kernel="inductor_quant.kernels.fourbit._quantize_4bit_kernel",
        signature=signature,
        constexprs=dict(BLOCKSIZE=blocksize, ROWS=config.tile // blocksize, FP4=False, SMEM_TABLE=config.smem_table,
                        PREFETCH_AHEAD=config.prefetch_ahead),
        num_warps=config.num_warps,
        codes_per_iteration=config.tile // (32 * config.num_warps),  # elements per thread
        aligned=tuple(signature),
        scope="kernel",
    )


def _search_tables_preset() -> Preset:
    from inductor_quant.kernels import blockwise

    config = blockwise._DEFAULT_QUANTIZE
    return Preset(
        kernel="inductor_quant.kernels.blockwise._search_tables_kernel",
        signature=dict(code_ptr="*fp32", mid_ptr="*fp32", first_ptr="*u8", fullest_ptr="*i32"),
        constexprs=dict(KEY_SHIFT=config.key_shift, BUCKETS=config.buckets,
                        BUCKETS_PER_PROGRAM=blockwise._BUCKETS_PER_PROGRAM),
        num_warps=4,
        codes_per_iteration=0,
        aligned=("code_ptr", "mid_ptr", "first_ptr", "fullest_ptr"),
        scope="kernel",
    )


PRESETS = {
    "gemv": _gemv_preset,
    "quantize_blockwise": _quantize_blockwise_preset,
    "quantize_4bit": _quantize_4bit_preset,
    "quantize_4bit_l1": lambda: _quantize_4bit_preset(smem_table=False),
    "search_tables": _search_tables_preset,
}


@dataclass
class LoopStats:
    """Instruction counts of a kernel's main loop."""

    instructions: int
    opcodes: dict[str, int]
    codes_per_iteration: int

    @property
    def per_code(self) -> float | None:
        return self.instructions / self.codes_per_iteration if self.codes_per_iteration else None

    @property
    def shared_memory_ops(self) -> int:
        return sum(self.opcodes.get(op, 0) for op in ("LDS", "STS", "BAR", "LDSM"))

    @property
    def local_memory_ops(self) -> int:
        """Loads and stores of thread-local memory: register spills."""
        return sum(self.opcodes.get(op, 0) for op in ("LDL", "STL"))


def _resolve(qualified: str):
    module, _, name = qualified.rpartition(".")
    __import__(module)
    return getattr(sys.modules[module], name)


def compile_cubin(preset: Preset, arch: int = 90, maxnreg: int | None = None) -> bytes:
    """The preset kernel compiled for ``sm_{arch}`` (optionally under a register cap): its cubin."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("kernel_sass needs TRITON_INTERPRET unset: the interpreter replaces compiled kernels")
    fn = _resolve(preset.kernel)
    names = fn.arg_names
    signature = {name: preset.signature.get(name, "constexpr") for name in names}
    constexprs = {(names.index(name),): value for name, value in preset.constexprs.items()}
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in preset.aligned}
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": preset.num_warps, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options).asm["cubin"]


def _run_on_cubin(tool: str, cubin: bytes, *flags: str) -> str:
    """Output of the Triton wheel's ``nvdisasm`` / ``cuobjdump`` on ``cubin``."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([path, *flags, file.name], check=True, capture_output=True, text=True).stdout


def sass_of(cubin: bytes) -> str:
    return _run_on_cubin("nvdisasm", cubin, "-c")


def registers_of(cubin: bytes) -> int:
    """Registers per thread of the cubin's kernel."""
    return int(re.search(r"REG:(\d+)", _run_on_cubin("cuobjdump", cubin, "--dump-resource-usage")).group(1))


def compile_preset(preset: Preset, arch: int = 90) -> str:
    """SASS text of the preset kernel compiled for ``sm_{arch}``."""
    return sass_of(compile_cubin(preset, arch))


_LABEL = re.compile(r"^\s*\.(L_x_\d+):")
_BRANCH = re.compile(r"BRA `\(\.(L_x_\d+)\)")
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")


def main_loop(sass: str) -> list[str]:
    """The SASS lines of the longest loop (a branch back to an earlier label)."""
    lines = sass.splitlines()
    labels: dict[str, int] = {}
    best: tuple[int, int] = (0, -1)
    for i, line in enumerate(lines):
        if label := _LABEL.match(line):
            labels[label.group(1)] = i
        elif (branch := _BRANCH.search(line)) and branch.group(1) in labels:
            start = labels[branch.group(1)]
            if i - start > best[1] - best[0]:
                best = (start, i)
    return lines[best[0] : best[1] + 1]


def loop_stats(sass: str, codes_per_iteration: int = 0, scope: str = "loop") -> LoopStats:
    """Instruction counts of the main loop (``scope="loop"``) or of the whole kernel (``"kernel"``)."""
    lines = main_loop(sass) if scope == "loop" else sass.splitlines()
    opcodes = collections.Counter(m.group(1) for line in lines if (m := _INSTRUCTION.match(line)))
    return LoopStats(sum(opcodes.values()), dict(opcodes.most_common()), codes_per_iteration)


def _parse_constexpr(item: str) -> tuple[str, object]:
    name, sep, text = item.partition("=")
    if not sep:
        raise SystemExit(f"--constexpr takes NAME=VALUE, got {item!r}")
    if text in ("True", "False"):
        return name, text == "True"
    try:
        return name, int(text)
    except ValueError:
        return name, text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", nargs="?", default="gemv", choices=sorted(PRESETS))
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = H100)")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    parser.add_argument("--maxnreg", type=int, default=None, help="compile under this register cap per thread")
    parser.add_argument("--constexpr", action="append", default=[], metavar="NAME=VALUE",
                        help="override one of the preset's constexprs (an int, True/False, or a string)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]()
    overrides = dict(_parse_constexpr(item) for item in args.constexpr)
    unknown = set(overrides) - set(preset.constexprs)
    if unknown:
        parser.error(f"{args.preset} has no constexpr {sorted(unknown)}; it has {sorted(preset.constexprs)}")
    preset = dataclasses.replace(preset, constexprs={**preset.constexprs, **overrides})
    cubin = compile_cubin(preset, args.arch, args.maxnreg)
    stats = loop_stats(sass_of(cubin), preset.codes_per_iteration, preset.scope)
    registers = registers_of(cubin)
    if args.json:
        print(json.dumps({"instructions": stats.instructions, "per_code": stats.per_code,
                          "shared_memory_ops": stats.shared_memory_ops, "local_memory_ops": stats.local_memory_ops,
                          "registers": registers, "opcodes": stats.opcodes}))
        return 0
    per_code = f", {stats.per_code:.2f} per code (element)" if stats.per_code else ""
    region = "main loop" if preset.scope == "loop" else "kernel"
    print(f"{args.preset} (sm_{args.arch}): {region} {stats.instructions} instructions{per_code}, "
          f"{stats.shared_memory_ops} shared-memory and {stats.local_memory_ops} local-memory (spill) instructions, "
          f"{registers} registers")
    print("  " + ", ".join(f"{op} {n}" for op, n in stats.opcodes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
