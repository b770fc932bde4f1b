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
