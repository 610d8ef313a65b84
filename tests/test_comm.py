"""StaleExchange on gloo ranks: a stale step returns last step's gathered payloads and lands this step's, with
mixed dtypes and shapes, batched (the gloo default) or one collective per payload (the NCCL default)."""

from __future__ import annotations

import pytest

from support.distributed import run_ranks


def _payloads(rank: int, step: int):
    import torch

    return [torch.full((2, 3, 4), 10.0 * step + rank),
            torch.arange(6, dtype=torch.bfloat16).view(3, 2) + rank + step,
            torch.full((1, 5), float(rank - step), dtype=torch.float64)]


def _exchange_steps(overlap, bucket_mb=16.0):
    import torch
    import torch.distributed as dist

    from paradiff.comm import StaleExchange

    ex = StaleExchange(dist.group.WORLD, overlap=overlap, bucket_mb=bucket_mb)
    rank, world = ex.rank, ex.world
    slots = [ex.slot() for _ in range(3)]
    ex.sync = True
    first = [ex.exchange(slot, p) for slot, p in zip(slots, _payloads(rank, 0))]
    ex.finish()
    ex.sync = False
    stale = [ex.exchange(slot, p).clone() for slot, p in zip(slots, _payloads(rank, 1))]
    in_flight = len(ex._sent)
    ex.finish()
    landed = [slot.recv.clone() for slot in slots]

    def expected(step):
        return [torch.cat([_payloads(r, step)[i] for r in range(world)]) for i in range(3)]

    return {
        "overlap": ex.overlap,
        "sync_ok": all(torch.equal(a, b) for a, b in zip(first, expected(0))),
        "stale_ok": all(torch.equal(a, b) for a, b in zip(stale, expected(0))),
        "landed_ok": all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(landed, expected(1))),
        "pending": ex.pending,
        "in_flight": in_flight,
    }


# 2 ranks each; the gloo default (overlap=None) stays in the fast tier as its multi-rank smoke test
@pytest.mark.parametrize("overlap", [None, pytest.param(False, marks=pytest.mark.slow),
                                     pytest.param(True, marks=pytest.mark.slow)])
def test_stale_exchange(overlap):
    for out in run_ranks(_exchange_steps, 2, overlap):
        assert out["overlap"] is (overlap is True), "gloo must default to the batched (non-overlapped) exchange"
        assert out["sync_ok"], "a sync step must return this step's payloads of all ranks"
        assert out["stale_ok"], "a stale step must return the previous step's payloads"
        assert out["landed_ok"], "finish() must land this step's payloads (dtype kept) in the buffers"
        assert out["pending"] == 0
        assert out["in_flight"] == 0, "small payloads wait for finish() in one bucket"


@pytest.mark.slow
def test_stale_exchange_sends_full_buckets_during_the_step():
    # bucket_mb=0: every payload is a full bucket and is sent at once; dtypes and shapes still land intact
    for out in run_ranks(_exchange_steps, 2, True, 0.0):
        assert out["in_flight"] == 3, out
        assert out["stale_ok"] and out["landed_ok"] and out["pending"] == 0, out


def _full_kv_steps(backend):
    """A `FullKV` hook on a Linear over 3 steps (sync, stale, stale), batch 2: what attention would read."""
    import torch
    import torch.distributed as dist
    from diffusers.hooks import HookRegistry

    from paradiff.comm import StaleExchange
    from paradiff.plans.patch_layers import FullKV

    ex = StaleExchange(dist.group.WORLD)
    rank, world = ex.rank, ex.world
    proj = torch.nn.Identity()
    HookRegistry.check_if_exists_or_initialize(proj).register_hook(FullKV(ex), "kv")

    def tokens(r, step):  # [B=2, L=3, C=4]: rank, step and batch row are all readable from the values
        return (torch.arange(24.0).view(2, 3, 4) + 100 * r + 1000 * step).contiguous()

    run = torch.compile(proj, backend=backend, fullgraph=True) if backend else proj
    seen = []
    for step, sync in enumerate((True, False, False)):
        ex.sync = sync
        seen.append(run(tokens(rank, step)).clone())
        ex.finish()

    def expected(step):  # every batch row: rank 0's tokens then rank 1's..., own ones from this step
        return torch.cat([tokens(r, step if r == rank or step == 0 else step - 1) for r in range(world)], dim=1)

    return [(a - expected(i)).abs().max().item() for i, a in enumerate(seen)]


# compiled by inductor: the in-place write of the own tokens into the kept buffer must survive functionalization
@pytest.mark.parametrize("backend", [None, pytest.param("inductor", marks=pytest.mark.slow)])
def test_full_kv_joins_stale_tokens_of_the_others_to_fresh_own_ones(backend):
    for errors in run_ranks(_full_kv_steps, 2, backend):
        assert errors == [0.0, 0.0, 0.0], errors
