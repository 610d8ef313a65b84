"""CFG parallelism: the conditional and unconditional halves of each denoiser call run on two ranks.

Classifier-free guidance doubles the denoiser batch ([uncond, cond]). The hook below splits every batch-sized
tensor argument of the denoiser call (sample, timestep when it has a batch dim, encoder states, SDXL's
`added_cond_kwargs`, SD3's pooled projections, ...) into 2 chunks, runs this rank's chunk and all-gathers the
output along the batch. It is exact (same maths, half the batch) and generic over denoisers: it never looks at the
model's internals, only at the call's arguments and output, so it composes with any other method's hooks.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils import _pytree as pytree

from paradiff.comm import all_gather
from paradiff.errors import UserError
from paradiff.parallel import ParallelMethod

HOOK_NAME = "paradiff.cfg"
_SAMPLE_NAMES = ("sample", "hidden_states", "x")


def denoiser_of(pipe: Any) -> torch.nn.Module:
    """The pipeline's denoiser (`pipe.unet` or `pipe.transformer`), or a UserError naming what is missing."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise UserError(f"{type(pipe).__name__} has no `unet` or `transformer` denoiser; paradiff cannot parallelize it.")


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    sample = args[0] if args else next((kwargs[k] for k in _SAMPLE_NAMES if k in kwargs), None)
    return sample.shape[0] if isinstance(sample, torch.Tensor) and sample.dim() > 0 else None


class BatchSplitHook(ModelHook):
    """Runs this rank's 1/`degree` of the batch and all-gathers the outputs along dim 0."""

    def __init__(self, group: Any):
        super().__init__()
        self.group = group
        self.degree = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._split = False
        self._warned = False

    def pre_forward(self, module, *args, **kwargs):
        batch = _batch_size(args, kwargs)
        self._split = batch is not None and batch % self.degree == 0
        if not self._split:
            if not self._warned:
                warnings.warn(f"CFG parallel: a denoiser batch of {batch} does not split over {self.degree} ranks "
                              "(guidance off?); every rank computes the whole batch.", stacklevel=2)
                self._warned = True
            return args, kwargs
        part = batch // self.degree

        def take(x):
            if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch:
                return x.narrow(0, self.rank * part, part)
            return x

        return pytree.tree_map(take, args), pytree.tree_map(take, kwargs)

    def post_forward(self, module, output):
        if not self._split:
            return output
        return pytree.tree_map(
            lambda x: all_gather(x, 0, self.group) if isinstance(x, torch.Tensor) and x.dim() > 0 else x, output)


class CFGParallel(ParallelMethod):
    """Split the guidance batch of every denoiser call over 2 ranks (mesh dimension "cfg"); exact.

    Combines with patch parallelism (`parallelize(pipe, CFGParallel(), PatchParallel())`, 2 x N ranks) and with
    asynchronous denoising. With guidance off (batch not divisible by 2) each rank computes the whole batch.
    """

    mesh_dim = "cfg"

    def degree(self) -> int:
        return 2

    def apply(self, pipe: Any, mesh: Any) -> None:
        apply_to_module(denoiser_of(pipe), mesh.get_group(self.mesh_dim))

    def __repr__(self) -> str:
        return "CFGParallel()"


def apply_to_module(module: torch.nn.Module, group: Any) -> BatchSplitHook:
    """Install the batch-split hook on a bare denoiser (what `CFGParallel.apply` does to the pipeline's)."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if registry.get_hook(HOOK_NAME) is not None:
        raise UserError("CFG parallelism is already applied to this model.")
    hook = BatchSplitHook(group)
    registry.register_hook(hook, HOOK_NAME)
    return hook
