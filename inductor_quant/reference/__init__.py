"""Vectorized pure-torch reference implementations.

They are the CPU kernels of the ops and the oracle every Triton kernel is tested against. Each
function is functional (returns new tensors) and runs on any device torch supports.
"""

from . import blockwise, fourbit, optim

__all__ = ["blockwise", "fourbit", "optim"]
