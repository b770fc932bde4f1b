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

import torch

__all__ = ["to_device_constant"]


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
