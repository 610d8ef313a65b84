"""Dropping the weights of a module this rank will never run, so that a mistaken call says so in one sentence."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from paradiff.errors import UserError

FREED_HOOK = "paradiff.freed"


class FreedGuard(ModelHook):
    """Innermost hook of a freed module: reached only when nothing stands in for it any more."""

    def __init__(self, what: str, remedy: str):
        super().__init__()
        self.what, self.remedy = what, remedy

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        raise UserError(f"{self.what} has no weights on this rank: paradiff.parallelize freed them; {self.remedy}")


def free_weights(module: torch.nn.Module, what: str, remedy: str) -> None:
    """Replace the module's weights by empty tensors (same dtype and device) and guard its forward; `remedy` is
    the sentence that tells the user what to do instead."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if registry.get_hook(FREED_HOOK) is not None:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    registry.register_hook(FreedGuard(what, remedy), FREED_HOOK)

