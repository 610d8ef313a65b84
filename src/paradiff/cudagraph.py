"""Replay a step function from a CUDA graph: inputs are copied into static tensors, outputs are cloned out.

The steady-state patch-parallel step has static shapes and static exchange buffers, so the whole step, its NCCL
collectives included, can be captured once and replayed: no Python or kernel-launch overhead per layer. The graph is
keyed on the call's structure, tensor shapes/dtypes and non-tensor arguments; a call that does not match runs `fn`
normally (and the next matching call is captured anew only if the key changed for good).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree


def _key(flat: list) -> tuple:
    return tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else ("const", repr(x))
                 for x in flat)


class GraphRunner:
    """`runner(*args, **kwargs)` == `fn(*args, **kwargs)`, from a captured CUDA graph after the first call."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None
        self.static_in: list = []
        self.static_out: Any = None
        self.replays = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat, spec = pytree.tree_flatten((args, kwargs))
        if not all(x.is_cuda for x in flat if isinstance(x, torch.Tensor)):
            return self.fn(*args, **kwargs)  # a host tensor cannot be a static graph input
        key = (spec, _key(flat))
        if key != self.key:
            self._capture(flat, spec, key)
        else:
            for static, value in zip(self.static_in, flat):
                if isinstance(static, torch.Tensor):
                    static.copy_(value, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, self.static_out)

    def _capture(self, flat: list, spec: Any, key: tuple) -> None:
        """Record one call of `fn` on static copies of the inputs. Recording runs nothing: the caller replays."""
        self.graph = None
        self.static_out = None
        self.static_in = [x.clone() if isinstance(x, torch.Tensor) else x for x in flat]
        args, kwargs = pytree.tree_unflatten(self.static_in, spec)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_out = self.fn(*args, **kwargs)
        self.graph, self.key = graph, key
