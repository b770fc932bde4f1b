"""``inductor_quant.compile``: ``torch.compile`` with the inductor_quant passes and lowerings.

It changes no global setting: the pass manager goes into this compile's ``options`` (Inductor
applies them as a config patch around this compile only), chained with any pass already
installed in the same hook, and the lowerings of the quant ops are registered (once per process,
idempotent; they only affect graphs that contain ``torch.ops.inductor_quant`` ops).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from .lowerings import register_lowerings
from .patterns.pass_manager import QuantPassConfig, QuantPassManager, install_options

__all__ = ["compile", "QuantPassConfig", "QuantPassManager"]

_F = TypeVar("_F", bound=Callable[..., Any])


def compile(
    model_or_fn: _F | None = None,
    *,
    pass_config: QuantPassConfig | None = None,
    hook: str = "post_grad_custom_post_pass",
    **torch_compile_kwargs: Any,
) -> _F | Callable[[_F], _F]:
    """``torch.compile(model_or_fn, **torch_compile_kwargs)`` with the inductor_quant passes.

    Args:
        model_or_fn: module or function to compile; ``None`` returns a decorator.
        pass_config: which rewrites run (:class:`QuantPassConfig`; all by default).
        hook: the Inductor hook to install the pass manager in (``"post_grad_custom_post_pass"``
            or ``"post_grad_custom_pre_pass"``).
        torch_compile_kwargs: forwarded to ``torch.compile`` (``fullgraph``, ``dynamic``,
            ``mode``, ``options``, ...). ``mode`` and ``options`` may both be given: the mode's
            Inductor options are expanded first, yours override them. The backend must be
            Inductor.
    """
    backend = torch_compile_kwargs.pop("backend", "inductor")
    if backend != "inductor":
        raise ValueError(f"backend must be 'inductor' (the passes are Inductor passes), got {backend!r}")
    options = dict(torch_compile_kwargs.pop("options", None) or {})
    mode = torch_compile_kwargs.pop("mode", None)
    if mode is not None and mode != "default":
        from torch._inductor import list_mode_options

        options = {**list_mode_options(mode, torch_compile_kwargs.get("dynamic")), **options}
    options = install_options(options, config=pass_config, hook=hook)
    register_lowerings()
    if model_or_fn is None:
        return lambda fn: torch.compile(fn, backend="inductor", options=options, **torch_compile_kwargs)
    return torch.compile(model_or_fn, backend="inductor", options=options, **torch_compile_kwargs)
