"""What the passes decided, and why: rewrite counters and fusion-decision records.

Every rewrite bumps ``torch._dynamo.utils.counters["inductor_quant"][<name>]``. Every decision a
pass takes about a quantized op it *could* have rewritten (rewritten, left alone on purpose,
rejected by a check) is appended to a module-level list (:func:`fusion_decisions`) and stored on
the FX node as ``node.meta["inductor_quant"]`` (a list of :class:`FusionDecision` dicts), so the
graph-inspection tool can show it next to the graph. Records accumulate for the process; call
:func:`clear_fusion_decisions` (tests do) to start afresh.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.fx
from torch._dynamo.utils import counters

__all__ = [
    "COUNTER_GROUP",
    "FusionDecision",
    "bump",
    "record",
    "fusion_decisions",
    "clear_fusion_decisions",
]

COUNTER_GROUP = "inductor_quant"
META_KEY = "inductor_quant"


@dataclass(frozen=True)
class FusionDecision:
    """One decision about one node.

    ``pattern``: the pass family and variant (e.g. ``"dequant_linear_4bit"``); ``node``: the FX
    node's name (the matmul for a rewrite, the dequantize for a consumer policy); ``op``: its
    target; ``action``: ``"rewritten"``, ``"not rewritten"``, ``"per-consumer"``, ``"prologue candidate"`` (a
    matmul whose dequantized weight is offered to Inductor's templates), or for a quant op left in
    the graph ``"kernel"`` (its hand-written kernel is called) or ``"lowered"`` (it becomes
    generated code); ``reason``: a sentence a user can act on."""

    pattern: str
    node: str
    op: str
    action: str
    reason: str


_DECISIONS: list[FusionDecision] = []


def bump(name: str, by: int = 1) -> None:
    counters[COUNTER_GROUP][name] += by


def record(pattern: str, node: torch.fx.Node, action: str, reason: str) -> FusionDecision:
    """Append a decision to the module list and to ``node.meta["inductor_quant"]``."""
    decision = FusionDecision(pattern, node.name, str(node.target), action, reason)
    _DECISIONS.append(decision)
    node.meta.setdefault(META_KEY, []).append(asdict(decision))
    return decision


def fusion_decisions() -> list[FusionDecision]:
    """Every decision recorded in this process so far, oldest first (a copy)."""
    return list(_DECISIONS)


def clear_fusion_decisions() -> None:
    _DECISIONS.clear()
