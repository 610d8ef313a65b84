"""Automatic split of a denoiser into N balanced sequential components (for asynchronous denoising).

`trace(model)` runs the model once on the meta device (no weights, no memory) with the family's example call and
records, for every splittable unit (see `paradiff.plans.async_units`): its execution order, its FLOPs
(`torch.utils.flop_counter.FlopCounterMode`) and which unit outputs each unit consumes. Dependencies are found
through autograd, so the glue code of the diffusers forward (skip-connection concatenation, residual adds,
tuple indexing) needs no hand-written table: every unit output is made an autograd leaf and each unit's inputs are
walked back to the leaves they were computed from. `split(model, n)` then cuts the execution order into `n`
contiguous components of near-equal FLOPs (exact min-max partition). The same trace is computed on every rank, so
all ranks agree on the split without communicating.

A pipeline's ControlNet is traced with the denoiser, and its blocks are units too (named `controlnet.` + the
module's name in it; see `paradiff.plans.async_units.controlnet_units`): its residuals enter the denoiser's forward,
so the same autograd walk finds the units that consume them, and its FLOPs are balanced with the denoiser's. Its
units read no denoiser unit, so `split` may place them first (before the down blocks) or last (after the
high-resolution up blocks, which consume its largest residuals) and keeps the better split. Of those it leaves out splits in which a value flows back to an earlier component
(`backward_transfers`): placed last, ControlNet units would send residuals back to the earlier components that
hold the lower-resolution up blocks, which would add the previous step's residuals to this step's skips (a
mismatch that can make an image diverge from serial).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch.utils import _pytree as pytree

from paradiff.errors import UserError
from paradiff.plans.async_units import ALL, controlnet_units, family_of
from paradiff.plans.common import meta_model

OUTPUT = -1
"""Consumer index of the model's final output (run by every rank from the last component's values)."""
CONTROLNET = "controlnet."
"""The prefix of the unit names of a pipeline's ControlNet (controlnet.down_blocks.0.resnets.0, for a
MultiControlNetModel controlnet.nets.1.mid_block, ...)."""


@dataclass(frozen=True)
class Graph:
    """The traced unit graph of one model configuration (at its native sample size, batch 2)."""

    model: str
    units: tuple[str, ...]                       # execution order
    flops: tuple[float, ...]                     # per unit
    params: tuple[int, ...]                      # per unit (element count)
    shared_flops: float                          # everything outside the units (embeddings, conv_in/out, glue)
    shared_params: int
    edges: tuple[tuple[int, int, int], ...]      # (producer unit, output leaf index, consumer unit or OUTPUT)
    leaf_bytes: dict = field(default_factory=dict)  # (unit, leaf) -> bytes at the example size (fp32)
    example: str = ""


@dataclass(frozen=True)
class Split:
    """`graph.units` cut into contiguous components: component k is units[bounds[k]:bounds[k+1]]."""

    graph: Graph
    bounds: tuple[int, ...]

    @property
    def n(self) -> int:
        return len(self.bounds) - 1

    @property
    def controlnet_units(self) -> tuple[int, ...]:
        """The indices of the ControlNet's units (none: traced without one)."""
        return tuple(u for u, name in enumerate(self.graph.units) if name.startswith(CONTROLNET))

    def component_of(self, unit: int) -> int:
        if unit == OUTPUT:
            return self.n - 1
        for k in range(self.n):
            if self.bounds[k] <= unit < self.bounds[k + 1]:
                return k
        raise IndexError(unit)

    def units_of(self, k: int) -> tuple[str, ...]:
        return self.graph.units[self.bounds[k]:self.bounds[k + 1]]

    @property
    def costs(self) -> list[float]:
        f = self.graph.flops
        return [sum(f[self.bounds[k]:self.bounds[k + 1]]) for k in range(self.n)]

    @property
    def balance(self) -> float:
        """max / min component cost (1.0 is perfect)."""
        costs = self.costs
        return max(costs) / max(min(costs), 1e-9)

    def transfers(self) -> list[tuple[int, int, int, int]]:
        """(producer unit, leaf, from component, to component): each stale value that crosses components, once per
        receiving component, in producer order (the order in which every rank posts its sends and receives)."""
        seen = set()
        out = []
        for producer, leaf, consumer in sorted(self.graph.edges, key=lambda e: (e[0], e[1], e[2] % 10**6)):
            src, dst = self.component_of(producer), self.component_of(consumer)
            if src != dst and (producer, leaf, dst) not in seen:
                seen.add((producer, leaf, dst))
                out.append((producer, leaf, src, dst))
        return out


def _tensor_leaves(obj: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(obj) if isinstance(x, torch.Tensor)]


def controlnet_configs(net: torch.nn.Module | None) -> str:
    from paradiff.plans.common import controlnets

    if net is None:
        return ""
    return json.dumps([type(net).__name__] + [dict(n.config) for n in controlnets(net)], sort_keys=True, default=str)


def controlnet_twin(configs: str) -> torch.nn.Module:
    """A meta-device copy of a ControlNet from `controlnet_configs` (a MultiControlNetModel of copies for several
    nets)."""
    import diffusers

    kind, *nets = json.loads(configs)
    with torch.device("meta"):
        twins = [diffusers.ControlNetModel.from_config(config) for config in nets]
        twin = diffusers.MultiControlNetModel(twins) if kind == "MultiControlNetModel" else twins[0]
    return twin.eval().requires_grad_(False)


def trace(model: torch.nn.Module, batch: int = 2, expand: Any = frozenset(),
          controlnet: torch.nn.Module | None = None) -> Graph:
    """The unit graph of `model` (cached per class and config; costs nothing but a meta-device forward), with the
    units of `controlnet` (the pipeline's, called first) when given."""
    return _trace_cached(type(model), json.dumps(dict(model.config), sort_keys=True, default=str), batch, expand,
                         controlnet_configs(controlnet))


@lru_cache(maxsize=16)
def _trace_cached(cls: type, config_json: str, batch: int, expand: Any, controlnet: str = "") -> Graph:
    from torch.utils.flop_counter import FlopCounterMode

    twin = meta_model(cls, json.loads(config_json))
    twin.eval().requires_grad_(False)
    family = family_of(twin)
    names = family.units(twin, expand)
    modules = dict(twin.named_modules())
    if controlnet:
        net = controlnet_twin(controlnet)
        for name in controlnet_units(net, CONTROLNET, expand):
            names.append(name)
            modules[name] = net.get_submodule(name[len(CONTROLNET):])
    index = {name: i for i, name in enumerate(names)}
    owner: dict[int, tuple[int, int]] = {}
    keep: list[torch.Tensor] = []          # keeps leaves alive so their ids stay unique
    order: list[int] = []
    flops = [0.0] * len(names)
    edges: set[tuple[int, int, int]] = set()
    leaf_bytes: dict = {}
    counter = FlopCounterMode(display=False)
    start: dict[int, int] = {}

    def producers(obj: Any) -> set[tuple[int, int]]:
        found, seen, stack = set(), set(), []
        for t in _tensor_leaves(obj):
            if id(t) in owner:
                found.add(owner[id(t)])
            elif t.grad_fn is not None:
                stack.append(t.grad_fn)
        while stack:
            fn = stack.pop()
            if id(fn) in seen:
                continue
            seen.add(id(fn))
            var = getattr(fn, "variable", None)
            if var is not None:
                if id(var) in owner:
                    found.add(owner[id(var)])
                continue
            stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
        return found

    def pre(unit: int):
        def hook(module, args, kwargs):
            order.append(unit)
            for producer, leaf in producers((args, kwargs)):
                edges.add((producer, leaf, unit))
            start[unit] = counter.get_total_flops()
        return hook

    def post(unit: int):
        def hook(module, args, kwargs, output):
            flops[unit] += counter.get_total_flops() - start[unit]
            leaves, spec = pytree.tree_flatten(output)
            new = []
            for i, x in enumerate(leaves):
                if isinstance(x, torch.Tensor) and x.is_floating_point():
                    x = x.detach().requires_grad_()
                    owner[id(x)] = (unit, i)
                    keep.append(x)
                    leaf_bytes[(unit, i)] = x.numel() * 4
                new.append(x)
            return pytree.tree_unflatten(new, spec)
        return hook

    handles = []
    for name, unit in index.items():
        handles.append(modules[name].register_forward_pre_hook(pre(unit), with_kwargs=True))
        handles.append(modules[name].register_forward_hook(post(unit), with_kwargs=True))
    inputs = family.example_inputs(twin, batch)
    try:
        with torch.enable_grad(), counter:
            if controlnet:
                down, mid = net(**controlnet_inputs(net, inputs), return_dict=False)
                inputs.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
            output = twin(**inputs)
    finally:
        for h in handles:
            h.remove()
    for producer, leaf in producers(output):
        edges.add((producer, leaf, OUTPUT))
    if sorted(order) != list(range(len(names))):
        missing = [names[i] for i in range(len(names)) if i not in order]
        raise UserError(f"AsyncDenoise: units {missing[:3]} did not run exactly once in a forward; cannot split.")
    remap = {old: new for new, old in enumerate(order)}
    params = [sum(p.numel() for p in modules[names[i]].parameters()) for i in order]
    total_params = sum(p.numel() for p in twin.parameters()) + (sum(p.numel() for p in net.parameters())
                                                                if controlnet else 0)
    side = inputs.get("sample", inputs.get("hidden_states"))
    return Graph(
        model=cls.__name__,
        units=tuple(names[i] for i in order),
        flops=tuple(flops[i] for i in order),
        params=tuple(params),
        shared_flops=counter.get_total_flops() - sum(flops),
        shared_params=total_params - sum(params),
        edges=tuple(sorted((remap[p], leaf, remap[c] if c != OUTPUT else OUTPUT) for p, leaf, c in edges)),
        leaf_bytes={(remap[u], i): b for (u, i), b in leaf_bytes.items()},
        example=f"batch {batch}, latent {tuple(side.shape[1:])}",
    )


def controlnet_inputs(net: torch.nn.Module, inputs: dict) -> dict:
    """A ControlNet call beside the denoiser call `inputs`: the same latent, timestep, text and added conditioning,
    and a control image per net at its scale (`embedding_factor` pixels per latent row)."""
    from paradiff.plans.common import controlnets, embedding_factor

    sample = inputs["sample"]
    images = [torch.zeros(sample.shape[0], n.config.conditioning_channels, sample.shape[-2] * embedding_factor(n),
                          sample.shape[-1] * embedding_factor(n), device=sample.device, dtype=sample.dtype)
              for n in controlnets(net)]
    many = len(images) > 1 or hasattr(net, "nets")
    keep = ("sample", "timestep", "encoder_hidden_states", "added_cond_kwargs", "class_labels")
    return {**{k: v for k, v in inputs.items() if k in keep}, "controlnet_cond": images if many else images[0],
            "conditioning_scale": [1.0] * len(images) if many else 1.0}


def _controlnet_last(graph: Graph) -> Graph:
    """`graph` with its ControlNet units moved after the denoiser's, in their order (they read no denoiser unit,
    so this is a valid execution order too; it joins them to the high-resolution up blocks)."""
    net = [u for u, name in enumerate(graph.units) if name.startswith(CONTROLNET)]
    order = [u for u in range(len(graph.units)) if u not in net] + net
    move = {**{old: new for new, old in enumerate(order)}, OUTPUT: OUTPUT}
    return Graph(model=graph.model, units=tuple(graph.units[u] for u in order),
                 flops=tuple(graph.flops[u] for u in order), params=tuple(graph.params[u] for u in order),
                 shared_flops=graph.shared_flops, shared_params=graph.shared_params,
                 edges=tuple(sorted((move[p], leaf, move[c]) for p, leaf, c in graph.edges)),
                 leaf_bytes={(move[u], i): b for (u, i), b in graph.leaf_bytes.items()}, example=graph.example)


def partition(costs: list[float] | tuple[float, ...], n: int) -> tuple[int, ...]:
    """Bounds of the contiguous partition of `costs` into `n` non-empty parts whose largest sum is smallest."""
    m = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][j]: smallest max-part cost splitting the first j units into k parts; cut[k][j]: where part k starts
    best = [[inf] * (m + 1) for _ in range(n + 1)]
    cut = [[0] * (m + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for k in range(1, n + 1):
        for j in range(k, m + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j] - 1e-9 * abs(value):
                    best[k][j], cut[k][j] = value, i
    bounds = [m]
    for k in range(n, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return tuple(reversed(bounds))


def split(model: torch.nn.Module, n: int, controlnet: torch.nn.Module | None = None) -> Split:
    """Cut `model` (with the pipeline's `controlnet`, if any) into `n` balanced components (UserError when it has
    fewer splittable units than `n`).

    Deep transformer stacks (SDXL's 10-block attentions) are first opened into single blocks to find the best
    cut; only the stacks that a cut actually falls inside stay open (their small glue then runs on every rank),
    the others are closed again. The better of this and the plain block-level split is kept; with a ControlNet,
    the best of these with its units first and last (last: only where the last component keeps a denoiser unit),
    leaving out splits that send a value back to an earlier component (`backward_transfers`).
    """
    if n < 1:
        raise UserError(f"AsyncDenoise needs at least 1 component, got {n}.")
    places = (lambda g: g, _controlnet_last) if controlnet is not None else (lambda g: g,)
    coarse = trace(model, controlnet=controlnet)
    fine = trace(model, expand=ALL, controlnet=controlnet)
    if n > len(fine.units):
        raise UserError(f"{coarse.model} has {len(fine.units)} splittable blocks, so it cannot be cut into {n} "
                        f"components; use components <= {len(fine.units)}.")
    candidates = []
    for place in places:
        if n <= len(coarse.units):
            candidates.append(Split(place(coarse), partition(place(coarse).flops, n)))
        if fine.units != coarse.units:
            candidates += _fine_split(model, place(fine), n, controlnet, place)
    # the last component computes the output from the denoiser's last unit: ControlNet units alone there would
    # only pass on the previous step's output in an asynchronous step
    candidates = [s for s in candidates if not all(name.startswith(CONTROLNET) for name in s.units_of(n - 1))]
    candidates = [s for s in candidates if not backward_transfers(s)]
    if not candidates:
        raise UserError(f"{coarse.model} cannot be cut into {n} balanced components.")
    return min(candidates, key=lambda s: max(s.costs) + s.graph.shared_flops)


def backward_transfers(s: Split) -> list[tuple[int, int, int, int]]:
    """The transfers of `s` from a later component to an earlier one. Every consumer of a stale value should get
    it from its own step's wavefront: component k at an asynchronous step reads what earlier components computed
    one step before. A value sent backwards (the ControlNet run last, its residuals read by earlier components'
    up blocks) reaches its consumer a step late while the consumer's other inputs are fresh."""
    return [t for t in s.transfers() if t[2] > t[3]]


def _fine_split(model: torch.nn.Module, fine: Graph, n: int, controlnet: Any, place: Any) -> list[Split]:
    """The split of `fine` (every deep stack open) with only the stacks a cut falls inside left open ([] when
    closing the others breaks the order)."""
    cut = Split(fine, partition(fine.flops, n))
    stacks: dict[str, set[int]] = {}
    for u, name in enumerate(fine.units):
        if ".transformer_blocks." in name:
            stacks.setdefault(name.split(".transformer_blocks.")[0], set()).add(cut.component_of(u))
    open_stacks = frozenset(name for name, comps in stacks.items() if len(comps) > 1)
    graph = place(trace(model, expand=open_stacks, controlnet=controlnet))
    comp_of = {name: cut.component_of(u) for u, name in enumerate(fine.units)}
    comps = [comp_of.get(name, comp_of.get(f"{name}.transformer_blocks.0")) for name in graph.units]
    if all(a <= b for a, b in zip(comps, comps[1:])) and len(set(comps)) == n:
        return [Split(graph, tuple(comps.index(k) for k in range(n)) + (len(comps),))]
    return []


def _range_text(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"


def explain_split(model: torch.nn.Module, n: int, controlnet: torch.nn.Module | None = None) -> str:
    """A human-readable table of the split of `model` (and `controlnet`) into `n` components (what `--explain`
    prints)."""
    s = split(model, n, controlnet)
    g = s.graph
    total = sum(g.flops) + g.shared_flops
    lines = [f"AsyncDenoise split of {g.model} into {n} components (FLOPs at {g.example}; "
             f"balance max/min = {s.balance:.3f}):",
             f"{'comp':>4}  {'units':>5}  {'GFLOP':>9}  {'share':>6}  {'params M':>8}  {'recv MB':>7}  blocks"]
    transfers = s.transfers()
    for k in range(n):
        lo, hi = s.bounds[k], s.bounds[k + 1]
        recv = sum(g.leaf_bytes.get((p, leaf), 0) for p, leaf, _, dst in transfers if dst == k) / 2**20
        lines.append(f"{k:>4}  {hi - lo:>5}  {s.costs[k] / 1e9:>9.1f}  {s.costs[k] / total:>6.1%}  "
                     f"{sum(g.params[lo:hi]) / 1e6:>8.1f}  {recv:>7.1f}  {_range_text(s.units_of(k))}")
    lines.append(f"shared (every rank): {g.shared_flops / 1e9:.1f} GFLOP ({g.shared_flops / total:.1%}), "
                 f"{g.shared_params / 1e6:.1f} M params: embeddings, input/output layers, glue")
    lines.append(f"stale values sent per step: {len(transfers)} tensors "
                 f"({sum(g.leaf_bytes.get((p, leaf), 0) for p, leaf, _, _ in transfers) / 2**20:.1f} MB fp32)")
    return "\n".join(lines)
