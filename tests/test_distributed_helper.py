import pytest
import torch

from support.distributed import run_ranks


def _sum_of_ranks():
    import torch.distributed as dist

    from paradiff import runtime

    rt = runtime.get()
    value = torch.tensor([float(rt.rank + 1)])
    dist.all_reduce(value)
    return {"rank": rt.rank, "sum": value}


def _fail_on_rank_one():
    from paradiff import runtime

    if runtime.get().rank == 1:
        raise ValueError("planted failure")
    return 0


def test_run_ranks_collects_each_rank():
    outputs = run_ranks(_sum_of_ranks, 2)
    assert [o["rank"] for o in outputs] == [0, 1]
    assert all(torch.equal(o["sum"], torch.tensor([3.0])) for o in outputs)


@pytest.mark.slow  # 2 ranks (test_run_ranks_collects_each_rank is the fast one)
def test_run_ranks_reports_a_failing_rank():
    with pytest.raises(AssertionError, match="planted failure"):
        run_ranks(_fail_on_rank_one, 2, timeout=60)
