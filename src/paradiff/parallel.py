"""`parallelize(pipe, *methods)`: apply parallel methods (plans of module wrappers) to a stock diffusers pipeline.

Each method spans one named dimension of a device mesh, in the order given (outermost first), e.g.
`parallelize(pipe, CFGParallel(), PatchParallel())` on 4 ranks builds the mesh {"cfg": 2, "patch": 2}.
"""

from __future__ import annotations

from typing import Any, ClassVar

from paradiff import main_rank, runtime
from paradiff.errors import UserError


class ParallelMethod:
    """Base class of a parallel method: a plan applied to an unchanged pipeline over one mesh dimension.

    Subclasses set `mesh_dim` and implement `apply`; `degree` returns how many ranks the method spans (None: all
    ranks the other methods leave).
    """

    mesh_dim: ClassVar[str] = ""

    def degree(self) -> int | None:
        return None

    def apply(self, pipe: Any, mesh: Any) -> None:
        """Install wrappers/hooks on `pipe`; the mesh's `self.mesh_dim` group is this method's."""
        raise NotImplementedError


def resolve_mesh_dims(methods: tuple[ParallelMethod, ...], world_size: int) -> dict[str, int]:
    """Sizes of each method's mesh dimension; a method with no fixed degree takes the ranks left over."""
    dims: dict[str, int | None] = {}
    for method in methods:
        if not isinstance(method, ParallelMethod):
            raise UserError(f"{method!r} is not a paradiff parallel method (PatchParallel, CFGParallel, AsyncDenoise).")
        if method.mesh_dim in dims:
            raise UserError(f"two methods use the same mesh dimension {method.mesh_dim!r}.")
        dims[method.mesh_dim] = method.degree()
    fixed = 1
    for size in dims.values():
        fixed *= size or 1
    free = [name for name, size in dims.items() if size is None]
    if len(free) > 1:
        raise UserError(f"only one method may take the remaining ranks; give a size to one of {free}.")
    if free:
        if world_size % fixed:
            raise UserError(f"{world_size} ranks cannot be split into groups of {fixed}.")
        dims[free[0]] = world_size // fixed
    return {name: int(size) for name, size in dims.items()}  # type: ignore[arg-type]


def parallelize(pipe: Any, *methods: ParallelMethod, device: str | None = None,
                main_rank_stages: bool = True) -> Any:
    """Apply `methods` to `pipe` in place and move it to this rank's device; returns `pipe`.

    Call it in every rank (under torchrun or `paradiff ... --nproc N`). Only rank 0 shows progress bars.
    `main_rank_stages`: prompt encoding and VAE decoding run on rank 0 only (embeddings are broadcast; the other
    ranks free those weights and return blank images), see `paradiff.main_rank`.
    """
    if not methods:
        raise UserError("parallelize() needs at least one method, e.g. paradiff.PatchParallel().")
    rt = runtime.init(device)
    dims = resolve_mesh_dims(methods, rt.world_size)
    for name, size in dims.items():
        if size < 2:
            raise UserError(
                f"the {name!r} method needs at least 2 ranks but gets {size}; start the job with more ranks "
                "(--nproc N or torchrun --nproc-per-node N)."
            )
    mesh = runtime.mesh(dims)
    for method in methods:
        method.apply(pipe, mesh)
    if main_rank_stages:
        main_rank.share_prompt_encoding(pipe, device=rt.device)
        main_rank.decode_on_main_only(pipe, rt.is_main)
    pipe.to(rt.device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=not rt.is_main)
    pipe._paradiff_mesh = mesh
    pipe._paradiff_methods = methods
    return pipe
