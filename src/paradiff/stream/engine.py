"""The stream step as one CUDA graph: static buffers in and out, no allocation and no Python per replay.

At 200+ frames/s a step lasts a few milliseconds, so launching a few hundred kernels from Python would cost more
than the work. The step function reads its inputs from static device buffers and updates the stream state in
place; it is run a few times on a side stream (which is when `torch.compile` compiles), the state is put back, and
then it is captured once. A replay costs one launch. On the CPU (or when graphs are off) the same function runs
eagerly.
"""

from __future__ import annotations

from typing import Callable

import torch


class GraphStep:
    """`step()` runs `fn` eagerly, or replays its CUDA graph (captured on the first call)."""

    def __init__(self, fn: Callable[[], torch.Tensor], state: Callable[[], list[torch.Tensor]], use_graph: bool,
                 warmup: int = 2):
        self.fn = fn
        self.state = state  # tensors the step mutates; put back after the warm-up runs
        self.use_graph = use_graph
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        if not self.use_graph:
            return self.fn()
        if self.graph is None:
            self.capture()
        self.graph.replay()
        return self.out

    def capture(self) -> None:
        saved = [t.clone() for t in self.state()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn()
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip(self.state(), saved):
            t.copy_(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = self.fn()
        self.graph = graph

    def reset(self) -> None:
        """Forget the captured graph (after buffers were reallocated)."""
        self.graph = None
        self.out = None
