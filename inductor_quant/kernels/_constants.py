"""Small constant tables that kernels keep on the device across calls.

cudagraph trees (``torch.compile(mode="reduce-overhead")``) route every allocation of the calling
thread into their private memory pool while they warm up a graph, and then reject live pool
allocations that are not graph outputs. A lookup table first built inside such a warm-up and
cached for later calls would be exactly that. Copying the table from a short-lived worker thread
keeps it in the ordinary allocator pool, so caching it is safe whether or not the first call
happens inside a compiled, CUDA-graphed region.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

import torch

__all__ = ["to_device_constant", "MapCache"]

_T = TypeVar("_T")


def to_device_constant(table: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """Copy a small host tensor to ``device`` for caching across calls (see module doc)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return table.to(device)
    result: list[torch.Tensor] = []

    def copy() -> None:
        with torch.cuda.device(device):
            result.append(table.to(device))
            torch.cuda.current_stream(device).synchronize()

    worker = threading.Thread(target=copy, name="inductor_quant-device-constant")
    worker.start()
    worker.join()
    if not result:
        raise RuntimeError(f"copying a constant table to {device} failed (see the worker thread's traceback)")
    return result[0]


class MapCache(Generic[_T]):
    """LRU of tables derived from code maps (the kernels' search tables), keyed by each map's data
    pointer and version counter (plus ``extra``).

    An entry holds its maps, so their memory cannot be reused by another storage while it lives;
    views of one storage share its version counter, so an in-place change through any of them is
    seen. Maps without a version counter (inference tensors) are never cached: their table is
    built on every call."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._entries: OrderedDict[tuple, tuple[tuple[torch.Tensor, ...], _T]] = OrderedDict()

    def get(self, maps: Sequence[torch.Tensor], build: Callable[[], _T], extra: tuple[Hashable, ...] = ()) -> _T:
        try:
            key = (maps[0].device, *((m.data_ptr(), m._version) for m in maps), *extra)
        except RuntimeError:  # inference tensors carry no version counter
            return build()
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry[1]
        value = build()
        self._entries[key] = (tuple(maps), value)
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
