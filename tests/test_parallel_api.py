"""parallelize(): mesh dimensions from the methods, clear errors for impossible plans."""

import pytest

from paradiff.errors import UserError
from paradiff.parallel import ParallelMethod, resolve_mesh_dims


class Fixed(ParallelMethod):
    mesh_dim = "cfg"

    def degree(self):
        return 2


class Fill(ParallelMethod):
    mesh_dim = "patch"


def test_fill_takes_the_remaining_ranks():
    assert resolve_mesh_dims((Fixed(), Fill()), 8) == {"cfg": 2, "patch": 4}
    assert resolve_mesh_dims((Fill(),), 3) == {"patch": 3}


def test_impossible_plans():
    with pytest.raises(UserError, match="cannot be split"):
        resolve_mesh_dims((Fixed(), Fill()), 3)
    with pytest.raises(UserError, match="same mesh dimension"):
        resolve_mesh_dims((Fill(), Fill()), 4)
    with pytest.raises(UserError, match="not a paradiff parallel method"):
        resolve_mesh_dims(("patch",), 2)


def test_parallelize_in_a_single_process_says_how_to_start_ranks():
    from paradiff import parallelize

    with pytest.raises(UserError, match="--nproc"):
        parallelize(object(), Fill())
