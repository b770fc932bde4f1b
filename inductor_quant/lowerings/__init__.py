"""Inductor IR lowerings of the quant ops, so compiled graphs fuse them with their neighbours.

Inductor keeps one process-global table of lowerings (``torch._inductor.lowering.lowerings``).
Entries are keyed by op, so ours only change how graphs that *contain* ``inductor_quant`` ops are
compiled: without them those ops run as opaque fallback calls, with them they become IR that
fuses with neighbouring pointwise work. Importing ``inductor_quant`` registers nothing;
:func:`register_lowerings` installs them (once per process) and is called by
``inductor_quant.compile`` and by the post-grad pass (``inductor_quant.patterns``), which runs
before Inductor lowers the graph. Code that compiles our ops with a plain ``torch.compile`` and
wants them fused calls it once up front (e.g. an optimizer whose compiled ``step`` uses the
functional optimizer ops, in its constructor): without it those ops run as opaque calls.

The FX graph cache does not key on lowerings: a graph compiled with them and one compiled
without them are different code for the same key. ``QuantPassManager.uuid()`` hashes these
files, so graphs compiled through the pass are keyed on the lowerings that shaped them.
"""

from __future__ import annotations

import functools

__all__ = ["register_lowerings", "lowering_files"]


@functools.lru_cache(maxsize=None)
def register_lowerings() -> None:
    """Install the lowerings of every ``inductor_quant`` op that has one (idempotent)."""
    from . import blockwise, fourbit, gemm, optim

    blockwise.register()
    fourbit.register()
    gemm.register()
    optim.register()


def lowering_files() -> tuple[str, ...]:
    """Source files of the lowerings (hashed into the pass uuid, so editing them invalidates the
    FX graph cache)."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    return tuple(sorted(os.path.join(here, f) for f in os.listdir(here) if f.endswith(".py")))
