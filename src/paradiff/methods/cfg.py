"""CFG parallelism: the conditional and unconditional halves of each denoiser call run on two ranks.

Classifier-free guidance doubles the denoiser batch ([uncond, cond]). The hook below splits every batch-sized
tensor argument of the denoiser call (sample, timestep when it has a batch dim, encoder states, SDXL's
`added_cond_kwargs`, SD3's pooled projections, SVD's image latents and `added_time_ids`, AnimateDiff's prompt
embeddings repeated once per frame, ...) into 2 chunks, runs this rank's chunk and all-gathers the
output along the batch. It is exact (same maths, half the batch) and generic over denoisers: it never looks at the
model's internals, only at the call's arguments and output, so it composes with any other method's hooks.

`compile=True` compiles this rank's half of the call and `cuda_graph` replays it from a CUDA graph (on by
default on CUDA, `paradiff.execution`): the all-gather stays outside both, in the hook.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from diffusers.hooks import ModelHook
from torch.utils import _pytree as pytree

from paradiff.comm import all_gather
from paradiff.execution import Execution
from paradiff.parallel import ParallelMethod, Parallelized, parallelize_module
from paradiff.plans.common import frames_per_batch_row

HOOK_NAME = "paradiff.cfg"
_SAMPLE_NAMES = ("sample", "hidden_states", "x")


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    sample = args[0] if args else next((kwargs[k] for k in _SAMPLE_NAMES if k in kwargs), None)
    return sample.shape[0] if isinstance(sample, torch.Tensor) and sample.dim() > 0 else None


class BatchSplitHook(ModelHook):
    """Runs this rank's 1/`degree` of the batch (compiled and graph-replayed when asked) and all-gathers the
    outputs along dim 0 (`gather=False`: keeps this rank's part, for a consumer split the same way)."""

    def __init__(self, module: torch.nn.Module, group: Any, execution: Execution, device: torch.device,
                 gather: bool = True):
        super().__init__()
        self.group = group
        self.degree = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._warned = not gather  # only the denoiser's hook says that guidance is off
        self._run = None
        self.execution, self.device, self.gather = execution, device, gather

    def _whole(self, args: tuple, kwargs: dict) -> bool:
        return False

    def new_forward(self, module, *args, **kwargs):
        batch = _batch_size(args, kwargs)
        if batch is None or batch % self.degree or self._whole(args, kwargs):
            if not self._warned and not self._whole(args, kwargs):
                warnings.warn(f"CFG parallel: a denoiser batch of {batch} does not split over {self.degree} ranks "
                              "(guidance off?); every rank computes the whole batch.", stacklevel=2)
                self._warned = True
            return self.fn_ref.original_forward(*args, **kwargs)
        part = batch // self.degree
        frames = frames_per_batch_row(module, args, kwargs)  # AnimateDiff's prompt embeddings: one row per frame

        def take(x):
            if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] in (batch, batch * frames):
                rows = part * (x.shape[0] // batch)
                return x.narrow(0, self.rank * rows, rows)
            return x  # also a ControlNet's residuals that are this rank's part already

        if self._run is None:
            fn = self.execution.compiled(self.fn_ref.original_forward)
            self._run = self.execution.runner(fn, self.device, name="CFG parallel")
        output = self._run(*pytree.tree_map(take, args), **pytree.tree_map(take, kwargs))
        if not self.gather:
            return output
        return pytree.tree_map(
            lambda x: all_gather(x, 0, self.group) if isinstance(x, torch.Tensor) and x.dim() > 0 else x, output)


class ControlNetSplitHook(BatchSplitHook):
    """On the pipeline's ControlNet: its batch ([uncond, cond], control images doubled) split as the UNet's, the
    residuals kept as this rank's half for this rank's UNet half. In guess mode the pipeline runs the ControlNet
    on the cond half only and pads the uncond half with zeros: every rank then runs that whole cond batch, since
    the cond rank has to anyway and the UNet call after it waits for both."""

    def __init__(self, module: torch.nn.Module, group: Any, execution: Execution, device: torch.device, host: Any):
        super().__init__(module, group, execution, device, gather=False)
        self.host = host

    def _whole(self, args: tuple, kwargs: dict) -> bool:
        return bool(kwargs.get("guess_mode")) and bool(getattr(self.host, "do_classifier_free_guidance", True))


class CFGParallel(ParallelMethod):
    """Split the guidance batch of every denoiser call over 2 ranks (mesh dimension "cfg"); exact.

    Combines with patch parallelism (`parallelize(pipe, CFGParallel(), PatchParallel())`, 2 x N ranks) and with
    asynchronous denoising. With guidance off (batch not divisible by 2) each rank computes the whole batch.
    compile / cuda_graph: as everywhere in paradiff (`paradiff.execution.Execution`). When another method shares
    the denoiser, that method compiles and replays the step instead.
    """

    mesh_dim = "cfg"

    def __init__(self, *, compile: bool | dict = False, cuda_graph: bool | None = None):
        self.execution = Execution(compile, cuda_graph)

    def degree(self) -> int:
        return 2

    def apply(self, target: Parallelized) -> None:
        alone = len(target.methods) == 1
        execution = self.execution if alone else Execution(False, False)
        if alone:
            execution.graphs_on(target.device)  # cuda_graph=True without a GPU: say so now
        target.register(target.denoiser,
                        BatchSplitHook(target.denoiser, target.group(self), execution, target.device), HOOK_NAME)
        self._execution = execution

    def apply_controlnet(self, target: Parallelized) -> None:
        target.register(target.controlnet, ControlNetSplitHook(target.controlnet, target.group(self),
                                                               self._execution, target.device, target.host),
                        HOOK_NAME)

    def __repr__(self) -> str:
        return f"CFGParallel(compile={self.execution.compile!r}, cuda_graph={self.execution.cuda_graph!r})"


def apply_to_module(module: torch.nn.Module, group: Any, **config: Any) -> Parallelized:
    """CFG parallelism on a bare denoiser over `group` (what `parallelize` does to a pipeline's)."""
    return parallelize_module(module, CFGParallel(**config), groups={CFGParallel.mesh_dim: group})
