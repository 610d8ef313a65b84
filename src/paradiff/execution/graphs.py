"""One CUDA-graph runner for every method and the stream pipeline.

At a few milliseconds per step, launching hundreds of kernels from Python costs more than the work, so steps are
replayed from CUDA graphs. The policy, the same everywhere:
- one graph per *key*: the caller's phase (e.g. patch's warm-up vs stale step) plus the call's tree structure,
  tensor shapes/dtypes/devices and non-tensor arguments; all graphs of a runner share one memory pool;
- the first `warmup` calls of a key run `fn` eagerly on a side stream (that is when torch.compile compiles and
  the allocator and libraries warm up); the next call is captured on static copies of its inputs, then replayed;
  later calls copy their inputs into the static tensors and replay. Warm-up calls are real calls: nothing runs
  twice, so functions with side effects (an exchange of activations, a stream's state) need no undo;
- outputs: each call returns fresh tensors (clones of the graph's static outputs), valid after the next replay;
- a call with a tensor off the GPU runs eagerly;
- a capture that fails warns once and the runner runs `fn` eagerly from then on (`on_failure` lets the caller
  drop half-done state); an error while replaying is raised.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree


def _leaf_key(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.dtype, x.device)
    return ("const", repr(x))


class _Graph:
    __slots__ = ("graph", "static_in", "static_out")

    def __init__(self, graph: torch.cuda.CUDAGraph, static_in: list, static_out: Any):
        self.graph, self.static_in, self.static_out = graph, static_in, static_out


class GraphRunner:
    """`runner(*args, phase=..., **kwargs)` equals `fn(*args, **kwargs)`, replayed from a CUDA graph when warm."""

    def __init__(self, fn: Callable[..., Any], *, warmup: int = 1, name: str = "step",
                 on_failure: Callable[[], None] | None = None):
        self.fn = fn
        self.warmup = max(0, int(warmup))
        self.name = name
        self.on_failure = on_failure
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: dict[tuple, int] = {}
        self.failed = False
        self.replays = 0
        self._pool = None
        self._side: torch.cuda.Stream | None = None

    def reset(self) -> None:
        """Forget every graph (buffers they read were reallocated)."""
        self.graphs.clear()
        self.seen.clear()

    def __call__(self, *args: Any, phase: Any = None, **kwargs: Any) -> Any:
        if self.failed:
            return self.fn(*args, **kwargs)
        flat, spec = pytree.tree_flatten((args, kwargs))
        if not self._on_gpu(flat):
            return self.fn(*args, **kwargs)
        key = (phase, spec, tuple(_leaf_key(x) for x in flat))
        entry = self.graphs.get(key)
        if entry is None:
            count = self.seen.get(key, 0)
            self.seen[key] = count + 1
            if count < self.warmup:
                return self._eager_on_side_stream(args, kwargs)
            entry = self._capture(key, flat, spec)
            if entry is None:
                return self.fn(*args, **kwargs)
        else:
            for static, value in zip(entry.static_in, flat):
                if isinstance(static, torch.Tensor):
                    static.copy_(value, non_blocking=True)
        entry.graph.replay()
        self.replays += 1
        return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, entry.static_out)

    @staticmethod
    def _on_gpu(flat: list) -> bool:
        return torch.cuda.is_available() and all(x.is_cuda for x in flat if isinstance(x, torch.Tensor))

    def _eager_on_side_stream(self, args: tuple, kwargs: dict) -> Any:
        if self._side is None:
            self._side = torch.cuda.Stream()
        main = torch.cuda.current_stream()
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            out = self.fn(*args, **kwargs)
        main.wait_stream(self._side)
        return out

    def _capture(self, key: tuple, flat: list, spec: Any) -> _Graph | None:
        """Record one call of `fn` on static copies of the inputs (recording runs nothing: the caller replays)."""
        static_in = [x.clone() if isinstance(x, torch.Tensor) else x for x in flat]
        args, kwargs = pytree.tree_unflatten(static_in, spec)
        try:
            graph, static_out = self._record(args, kwargs)
        except Exception as err:  # noqa: BLE001 - capture fails on some ops/versions: stay correct, go slower
            warnings.warn(f"{self.name}: CUDA graph capture failed, running without CUDA graphs "
                          f"({type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err) else ''}).",
                          stacklevel=3)
            self.failed = True
            self.reset()
            if self.on_failure is not None:
                self.on_failure()
            return None
        entry = self.graphs[key] = _Graph(graph, static_in, static_out)
        return entry

    def _record(self, args: tuple, kwargs: dict) -> tuple[Any, Any]:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.fn(*args, **kwargs)
        finally:
            torch.cuda.synchronize()
        return graph, out
