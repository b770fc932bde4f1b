"""Machine code compiled offline for sm_90 (``tools/kernel_sass.py``; no GPU needed).

The 4-bit GEMV is bound by instruction issue and the L1/shared-memory datapath on the H100
(``tools/notes_gemm.md``). Its main loop must stay free of the activations' shared-memory round
trip (they are loaded in the words' thread mapping) and near 4 instructions per weight code
(shift, shuffle lookup, FMA, and a share of the loads) — a layout change that breaks either shows
here, before any GPU run. The 8-bit quantize and its table build must not spill registers (a
``[256, 256]`` comparison tile in the table build did: 255 registers, ~3000 local-memory
instructions, 2x slower on the H100; ``tools/notes_quant.md``). The 4-bit quantize kernels are
bound by instruction issue: they must not convert each element's bucket with a quarter-rate
``F2I``, and the bf16 pair kernel must keep its lead in instructions per element.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "kernel_sass.py"


def sass_stats(preset: str, *options: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(TOOL), preset, "--json", *options], env=env, capture_output=True,
                            text=True, timeout=300)
    if result.returncode and "ptxas" in result.stderr.lower() and "not found" in result.stderr.lower():
        pytest.skip("this Triton wheel ships no ptxas")
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def gemv_loop() -> dict:
    return sass_stats("gemv")


CODES_PER_ITERATION = 32 * 4  # the preset: 4 rows per thread, one 32-code chunk of each per K-tile


def test_gemv_main_loop_has_no_activation_relayout(gemv_loop):
    # Triton 3.7: none. Triton 3.6 keeps one small relayout per iteration (2 barriers, 1 store,
    # 1 ldmatrix). The layout this replaced moved every activation through shared memory: 5
    # shared-memory instructions per 16 codes, i.e. 40 per iteration of this preset.
    assert gemv_loop["shared_memory_ops"] <= CODES_PER_ITERATION // 32, gemv_loop["opcodes"]


def test_gemv_main_loop_is_one_shuffle_and_about_four_instructions_per_code(gemv_loop):
    assert gemv_loop["opcodes"]["SHFL"] == CODES_PER_ITERATION
    assert gemv_loop["per_code"] < 4.3, gemv_loop["opcodes"]


@pytest.mark.parametrize("preset", ["quantize_blockwise", "search_tables"])
def test_8bit_quantize_kernels_do_not_spill(preset):
    stats = sass_stats(preset)
    assert stats["instructions"] > 0
    assert stats["local_memory_ops"] == 0, stats["opcodes"]


@pytest.fixture(scope="module")
def quantize_4bit_kernels() -> dict:
    presets = ("quantize_4bit", "quantize_4bit_l1")
    return {preset: sass_stats(preset) for preset in presets}


def test_4bit_quantize_kernels_bucket_without_conversions_or_spills(quantize_4bit_kernels):
    # every config compiles; the bucket is the integer an fma lands on (kernels/fourbit.py), not a
    # quarter-rate F2I per element
    for stats in quantize_4bit_kernels.values():
        assert stats["local_memory_ops"] == 0, stats["opcodes"]
        assert "F2I" not in stats["opcodes"], stats["opcodes"]


def test_register_cap_and_constexpr_override_compile_a_variant():
    """``--maxnreg`` caps the registers per thread (the 8-bit quantize uses 71 without a cap), and
    ``--constexpr`` sets one of the preset's constexprs: without the default L2 prefetch its one
    bulk prefetch instruction goes."""
    plain = sass_stats("quantize_blockwise")
    variant = sass_stats("quantize_blockwise", "--maxnreg", "48", "--constexpr", "PREFETCH_AHEAD=0")
    assert variant["registers"] <= 48 < plain["registers"]
    assert plain["opcodes"].get("UBLKPF", 0) == 1 and "UBLKPF" not in variant["opcodes"], plain["opcodes"]
