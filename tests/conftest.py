"""Test configuration.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before any
``@triton.jit`` decorator runs, so it is set here, before test modules import the kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (CI has none; run on the device machine)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def inductor_cpp(tmp_path_factory):
    """Inductor set up for the CPU compile tests of one module: a private cache directory, no FX
    graph cache (every compile must run our passes and lowerings), compiles in-process, scalar C++
    (it builds in half the time of the vectorized code)."""
    from torch._inductor import config as inductor_config

    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor_cache"))
    with inductor_config.patch(fx_graph_cache=False, compile_threads=1, **{"cpp.simdlen": 1}):
        yield
    if old is None:
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


def compiled(fn, *args, dynamic=False):
    """Compile ``fn`` (fullgraph, after ``torch._dynamo.reset()``), run it once, return (outputs,
    generated source)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    out, source = run_and_get_code(torch.compile(fn, fullgraph=True, dynamic=dynamic), *args)
    return out, "\n".join(source)


def kernel_count(source: str) -> int:
    """Number of C++ kernels in Inductor's generated CPU code."""
    return source.count("async_compile.cpp_pybinding(")
