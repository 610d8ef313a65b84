"""torch.compile of the patch-parallel step (fullgraph, collectives traced) gives the eager result, sync and stale."""

from __future__ import annotations

import copy

import pytest
import torch

from support.distributed import run_ranks
from support.models import tiny_unet, unet_inputs

pytestmark = pytest.mark.slow


def _check_compiled(backend, overlap, warmup=1, compile_warmup=False):
    from torch._dynamo.utils import counters

    from paradiff import runtime
    from paradiff.methods.patch import PatchParallel, apply_to_unet
    from test_patch_parallel import _loop

    group = runtime.mesh({"patch": runtime.get().world_size}).get_group("patch")
    base, kwargs = tiny_unet("sd"), unet_inputs("sd")
    eager_unet = copy.deepcopy(base)
    eager_hook = apply_to_unet(eager_unet, group, PatchParallel(warmup_steps=warmup))
    compiled_unet = copy.deepcopy(base)
    compiled_hook = apply_to_unet(compiled_unet, group, PatchParallel(
        warmup_steps=warmup, compile={"backend": backend, "fullgraph": True}, compile_warmup=compile_warmup))
    eager_hook.exchange.overlap = compiled_hook.exchange.overlap = overlap
    # step 1 fills the buffers eagerly; the other warm-up steps are synchronous, the last two stale (async
    # collectives traced)
    eager = _loop(eager_unet, kwargs, eager_hook, steps=warmup + 2)
    torch._dynamo.reset()
    counters.clear()
    compiled = _loop(compiled_unet, kwargs, compiled_hook, steps=warmup + 2)
    return {"diff": (compiled - eager).abs().max().item(), "graphs": counters["stats"]["unique_graphs"]}


def test_compiled_equals_eager_with_batched_exchange():
    for out in run_ranks(_check_compiled, 2, "aot_eager", False):
        assert out["graphs"] == 1, out  # the stale step
        assert out["diff"] < 1e-5, out


@pytest.mark.parametrize("compile_warmup", [False, True])
def test_compile_warmup_compiles_the_synchronous_steps_too(compile_warmup):
    """The overlapped exchange (as on NCCL), 3 synchronous warm-up steps, then stale steps: compiled = eager, and
    the warm-up steps compile only when asked."""
    for out in run_ranks(_check_compiled, 2, "aot_eager", True, 3, compile_warmup):
        assert out["graphs"] == (2 if compile_warmup else 1), out
        assert out["diff"] < 1e-5, out


def _generated_order():
    """Inductor code of a step with two stale exchanges, each followed by compute, compiled like the patch step."""
    import torch.distributed as dist
    from torch._inductor.utils import run_and_get_code

    from paradiff.comm import StaleExchange
    from paradiff.methods.patch import compile_kwargs

    ex = StaleExchange(dist.group.WORLD, overlap=True, bucket_mb=0)  # the NCCL path, a bucket per payload
    slots = [ex.slot(), ex.slot()]
    slots[0].recv, slots[1].recv = torch.zeros(4, 8), torch.zeros(16, 8)
    ex.sync = False

    def step(x):
        stale0 = ex.exchange(slots[0], x * 2)
        y = torch.mm(x.t(), x).relu()
        stale1 = ex.exchange(slots[1], y * 3)
        z = torch.mm(y, y.t()).relu()
        out = z.sum() + stale0.sum() + stale1.sum()
        ex.finish()
        return out

    _, codes = run_and_get_code(torch.compile(step, fullgraph=True, **compile_kwargs(True)), torch.ones(2, 8))
    lines = [line.strip() for line in codes[0].splitlines() if not line.strip().startswith("#")]

    def where(marker):
        return [i for i, line in enumerate(lines) if marker in line]

    return {"gathers": where("all_gather_into_tensor_coalesced.default("), "computes": where("extern_kernels.mm("),
            "waits": where("wait_tensor.default(")}


def test_inductor_overlaps_the_stale_exchange():
    order = run_ranks(_generated_order, 2)[0]
    (gather0, gather1), (mm0, mm1), waits = order["gathers"], order["computes"], order["waits"]
    assert len(waits) == 2, order
    # each all-gather is issued before the compute that follows it in the step, and waited only after all compute
    assert gather0 < mm0 < gather1 < mm1 < min(waits), order
