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
