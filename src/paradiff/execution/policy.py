"""The compile policy: `compile` and `cuda_graph` mean the same in every method and in StreamPipeline.

- `compile`: False (default), True (torch.compile with static shapes), or a dict of torch.compile keyword
  arguments (`{"mode": "max-autotune-no-cudagraphs"}`, `{"backend": "eager"}`, `{"options": {...}}`).
- `cuda_graph`: None (default: on when the model is on a CUDA GPU), True (required: an error without CUDA),
  False (off). Steps are replayed through `paradiff.execution.GraphRunner`.
A method adds its own defaults (`defaults=`), which the user's dict overrides key by key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from paradiff.errors import UserError


@dataclass(frozen=True)
class Execution:
    compile: bool | dict = False
    cuda_graph: bool | None = None
    graph_warmup: int = 1

    def __post_init__(self):
        if not isinstance(self.compile, (bool, dict)):
            raise UserError(f"compile must be True, False or a dict of torch.compile arguments, got "
                            f"{self.compile!r} (a backend name goes in a dict: compile={{'backend': ...}}).")
        if self.cuda_graph not in (None, True, False):
            raise UserError(f"cuda_graph must be True, False or None (on for CUDA), got {self.cuda_graph!r}.")
        if isinstance(self.graph_warmup, bool) or not isinstance(self.graph_warmup, int) or self.graph_warmup < 0:
            raise UserError(f"graph_warmup must be a whole number >= 0, got {self.graph_warmup!r}.")

    def graphs_on(self, device: Any) -> bool:
        """Whether steps on `device` replay from CUDA graphs (an error if they must and cannot)."""
        cuda = torch.device(device).type == "cuda"
        if self.cuda_graph and not cuda:
            raise UserError(f"cuda_graph=True needs the model on a CUDA GPU; it is on {device}.")
        return cuda if self.cuda_graph is None else bool(self.cuda_graph)

    def compile_kwargs(self, defaults: dict | None = None) -> dict:
        user = self.compile if isinstance(self.compile, dict) else {}
        kwargs = {"dynamic": False, **(defaults or {}), **user}
        if defaults and "options" in defaults and "options" in user:
            kwargs["options"] = {**defaults["options"], **user["options"]}
        if "mode" in kwargs and "options" in kwargs:  # torch.compile takes one or the other
            del kwargs["options"]
        return kwargs

    def compiled(self, fn: Callable, defaults: dict | None = None) -> Callable:
        """`fn` under torch.compile when asked, else `fn`."""
        return torch.compile(fn, **self.compile_kwargs(defaults)) if self.compile else fn

    def runner(self, fn: Callable, device: Any, *, name: str, warmup: int | None = None,
               on_failure: Callable[[], None] | None = None) -> Callable:
        """`runner(*args, phase=..., **kwargs)`: `fn` replayed from CUDA graphs when `graphs_on(device)`, else
        called directly; `runner.reset()` forgets captured graphs."""
        from paradiff.execution.graphs import GraphRunner

        if not self.graphs_on(device):
            return Direct(fn)
        return GraphRunner(fn, warmup=self.graph_warmup if warmup is None else warmup, name=name,
                           on_failure=on_failure)


class Direct:
    """The runner when CUDA graphs are off: calls `fn` (same call signature as `GraphRunner`)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args: Any, phase: Any = None, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def reset(self) -> None:
        pass
