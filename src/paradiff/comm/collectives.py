"""Collectives every layer uses: all-gather along a dim, and broadcasts of Python objects and tensor pytrees.

Every collective paradiff runs outside the stale exchange goes through this module, so that a failure or a
timeout (a rank that died, or one that never made the same call) reaches the user as one sentence naming the
likely cause (`CollectiveError`), and so that one process can stand in for rank 0 of N (`paradiff.comm.emulate`).
"""

from __future__ import annotations

import contextlib
import pickle
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.utils import _pytree as pytree

from paradiff.errors import CollectiveError

# `all_gather_single` replaces the deprecated `all_gather_tensor` in recent PyTorch; same semantics.
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor

LIKELY_CAUSE = ("Every rank must make the same pipeline calls, with the same arguments: the usual cause is calling "
                "the pipeline on rank 0 only (`if is_main_process(): pipe(...)`); call it on every rank and keep "
                "rank 0's result. A rank that crashed or is still compiling gives the same symptom "
                "(PARADIFF_TIMEOUT raises the limit).")


@contextlib.contextmanager
def guarded(what: str):
    """Turn a failed or timed-out collective into a `CollectiveError` that names `what` and the likely cause."""
    try:
        yield
    except CollectiveError:
        raise
    except (RuntimeError, dist.DistError) as err:
        if not is_collective_failure(err):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CollectiveError(f"the collective of {what} failed on this rank ({first}). {LIKELY_CAUSE}") from None


_FAILURE_WORDS = ("gloo", "nccl", "timed out", "timeout", "connection", "peer", "socket", "watchdog")


def is_collective_failure(err: BaseException) -> bool:
    """A backend error (a dead or absent peer, a timeout), not a bug in the computation around it."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(word in text for word in _FAILURE_WORDS)


def _wait(x: torch.Tensor) -> torch.Tensor:
    return x.wait() if isinstance(x, funcol.AsyncCollectiveTensor) else x


class Collectives:
    """The traced collectives of the step. `paradiff.comm.emulate` swaps in local copies (one GPU as rank 0 of N)."""

    @staticmethod
    def all_gather(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
        return _wait(_all_gather(x.contiguous(), dim, group))

    @staticmethod
    def start_all_gathers(xs: list[torch.Tensor], group_name: str, world: int) -> list[torch.Tensor]:
        """Issue one coalesced all-gather (along dim 0) of several tensors of one dtype (gloo's mixes up several
        dtypes, torch 2.13) and return their (not yet valid) results; `wait_started` makes each valid. Coalesced,
        the backend sends them as one group without copying them into one flat buffer first."""
        return torch.ops._c10d_functional.all_gather_into_tensor_coalesced(xs, world, group_name)

    @staticmethod
    def wait_started(x: torch.Tensor) -> torch.Tensor:
        return torch.ops._c10d_functional.wait_tensor(x)


backend = Collectives()


def all_gather(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """All-gather `x` along `dim` over `group`, waited (functional collective: traceable by torch.compile)."""
    return backend.all_gather(x, dim, group)


def _picklable(value: Any) -> Any:
    """An exception that can travel to the other ranks (else a RuntimeError with its message)."""
    try:
        pickle.dumps(value)
        return value
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(value).__name__}: {value}")


def broadcast_object(obj: Any, src: int = 0, group: Any = None, what: str = "an object") -> Any:
    """`obj` of group rank `src` on every rank of `group` (pickled; for small control messages)."""
    box = [obj if dist.get_rank(group) == src else None]
    with guarded(what):
        dist.broadcast_object_list(box, group=group, group_src=src)
    return box[0]


def broadcast_tree(tree: Any = None, src: int = 0, group: Any = None, device: Any = None, *,
                   error: BaseException | None = None, what: str = "a result") -> Any:
    """Group rank `src`'s pytree (tensors and constants) on every rank of `group`; tensors land on `device`.

    The source may pass `error` instead of a tree: it is raised on every rank (the source re-raises its own), so
    a failure on the source rank does not leave the others waiting in a collective.
    """
    main = dist.get_rank(group) == src
    if main:
        leaves, spec = pytree.tree_flatten(None if error is not None else tree)
        leaves = [x.contiguous() if isinstance(x, torch.Tensor) else x for x in leaves]
        meta = [(tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else None for x in leaves]
        header = (pytree.treespec_dumps(spec), meta, [None if m else x for m, x in zip(meta, leaves)],
                  _picklable(error) if error is not None else None)
    else:
        header = None
    spec_text, meta, constants, sent_error = broadcast_object(header, src, group, what)
    if sent_error is not None:
        if main:
            raise error
        raise sent_error
    if not main:
        target = torch.device("cpu") if device is None else torch.device(device)
        leaves = [torch.empty(m[0], dtype=m[1], device=target) if m else c for m, c in zip(meta, constants)]
    with guarded(what):
        for x, m in zip(leaves, meta):
            if m:
                dist.broadcast(x, group=group, group_src=src)
    return pytree.tree_unflatten(leaves, pytree.treespec_loads(spec_text))


def broadcast_(tensor: torch.Tensor, src: int = 0, group: Any = None, what: str = "a tensor") -> torch.Tensor:
    """In-place broadcast of one tensor from group rank `src` (shape and dtype agreed beforehand)."""
    with guarded(what):
        dist.broadcast(tensor, group=group, group_src=src)
    return tensor
