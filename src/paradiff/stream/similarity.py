"""Stochastic similarity filter (StreamDiffusion's SSF), decided on the device with no host sync per frame.

A frame very similar to the last processed one is skipped with a probability that rises as the cosine similarity
goes from `threshold` to 1: p = max(0, 1 - (1 - sim) / (1 - threshold)). At most `max_skip_frames` frames in a row
are skipped, so a static scene still refreshes. The reference implementation calls `.item()` on the similarity and
draws from Python's `random` every frame, which stalls the CPU on the GPU; here the decision is a device tensor
that the caller applies with `torch.where`, random numbers come from a pre-drawn table indexed by a device counter
(so the step stays capturable in a CUDA graph), and statistics are read only when asked for.
"""

from __future__ import annotations

import torch

from paradiff.errors import UserError

TABLE_SIZE = 4096


class SimilarityFilter:
    """Filter state on `device`; `decide(frames)` returns a 0-dim bool tensor (True: skip this frame)."""

    def __init__(self, threshold: float, max_skip_frames: int, sample_shape: tuple[int, ...], device, seed: int = 0):
        if not isinstance(threshold, (int, float)) or not 0.0 < float(threshold) < 1.0:
            raise UserError(f"similarity_filter must be a threshold between 0 and 1 (e.g. 0.98), got {threshold!r}.")
        if not isinstance(max_skip_frames, int) or max_skip_frames < 0:
            raise UserError(f"max_skip_frames must be a whole number >= 0, got {max_skip_frames!r}.")
        self.threshold = float(threshold)
        self.max_skip_frames = max_skip_frames
        gen = torch.Generator("cpu").manual_seed(seed)
        self.uniforms = torch.rand(TABLE_SIZE, generator=gen, dtype=torch.float32).to(device)
        self.prev = torch.zeros(sample_shape, dtype=torch.float32, device=device)
        self.has_prev = torch.zeros((), dtype=torch.bool, device=device)
        self.run = torch.zeros((), dtype=torch.long, device=device)  # skips in a row
        self.count = torch.zeros((), dtype=torch.long, device=device)  # frames seen
        self.skipped = torch.zeros((), dtype=torch.long, device=device)  # frames skipped

    def state(self) -> dict[str, torch.Tensor]:
        return {"prev": self.prev, "has_prev": self.has_prev, "run": self.run, "count": self.count,
                "skipped": self.skipped}

    def decide(self, frames: torch.Tensor, enabled: torch.Tensor) -> torch.Tensor:
        """Skip decision for `frames` (a float tensor of `sample_shape`), updating the state in place.

        `enabled` (0-dim bool tensor) turns the filter off without a branch, e.g. during a warm start; frames seen
        while it is off are not counted."""
        cur = frames.to(torch.float32)
        sim = torch.nn.functional.cosine_similarity(cur.reshape(1, -1), self.prev.reshape(1, -1), eps=1e-6)[0]
        prob = (1 - (1 - sim) / (1 - self.threshold)).clamp(min=0)
        # index_select, not uniforms[count]: a 0-dim tensor index is read back to the host (a sync)
        u = self.uniforms.index_select(0, (self.count % TABLE_SIZE).view(1))[0]
        skip = (u < prob) & self.has_prev & (self.run < self.max_skip_frames) & enabled
        self.run.copy_(torch.where(skip, self.run + 1, torch.zeros_like(self.run)))
        self.prev.copy_(torch.where(skip, self.prev, cur))
        self.has_prev.copy_(self.has_prev | enabled)
        self.count.add_(enabled.to(torch.long))
        self.skipped.add_(skip.to(torch.long))
        return skip

    def stats(self) -> dict[str, int]:
        """Frames seen and skipped so far (one host sync)."""
        seen, skipped = (int(v) for v in torch.stack([self.count, self.skipped]).cpu())
        return {"frames": seen, "skipped": skipped}
