"""The step clock: which scheduler step of which generation each denoiser call belongs to.

A generation starts when the pipeline calls `scheduler.set_timesteps` (every diffusers pipeline does, once per
call); the clock counts *scheduler steps*, not denoiser calls, with the rule diffusers' own progress bar uses:
a scheduler of `order` o that made T timesteps for N inference steps spends its first T - N*o calls in step 0
(PNDM's Runge-Kutta warm-up, PLMS's first step) and o calls in every later step (Heun, KDPM2: the last step, to
sigma 0, is a single call). So
`warmup_steps = num_inference_steps` covers every denoiser call under every scheduler, and a method's exact mode
stays exact when a user swaps in a second-order scheduler.

At each generation start the clock resets the denoiser's stateful hooks through diffusers' contract
(`ModelHook._is_stateful` / `reset_state`, `HookRegistry.reset_stateful_hooks`). A scheduler swapped on the
pipeline (`pipe.scheduler = ...`) is picked up at the next denoiser call.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

from paradiff.errors import UserError

_WRAPPED = "_paradiff_set_timesteps"


@dataclass(frozen=True)
class Tick:
    """One denoiser call: `step` (scheduler step within this generation), `call` (denoiser call within it),
    `steps` (scheduler steps this generation runs), `generation` (counts pipeline calls), `first` (first call)."""

    generation: int
    call: int
    step: int
    steps: int

    @property
    def first(self) -> bool:
        return self.call == 0


class StepClock:
    """Counts the scheduler steps of one denoiser, for every method applied to it."""

    def __init__(self, host: Any = None, on_start: Callable[[], None] | None = None):
        """`host`: the object whose `scheduler` the pipeline steps (the pipeline), or None for a bare model whose
        caller starts each generation with `start()` (every call is then one step)."""
        self._pipe = weakref.ref(host) if host is not None else (lambda: None)
        self.on_start = on_start
        self.scheduler: Any = None
        self.generation = 0
        self.calls = 0
        self.current: Tick | None = None
        self._total = self._order = 1
        self._warm = 0
        self._begin: int | None = 0
        self._begin_known = True  # False: 0 stands in, which the step arithmetic of the scheduler allows
        self._started = False
        if host is not None:
            self.attach(host.scheduler)

    # -- generations -------------------------------------------------------------------------------------------
    def attach(self, scheduler: Any) -> None:
        """Follow `scheduler`'s `set_timesteps` (the previous scheduler, if any, is released)."""
        self.detach()
        original = scheduler.set_timesteps
        clock = weakref.ref(self)

        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            for listener in list(getattr(scheduler, _WRAPPED, ())):
                if listener() is not None:
                    listener().start(scheduler)
            return result

        if not hasattr(scheduler, _WRAPPED):
            setattr(scheduler, _WRAPPED, [])
            scheduler.set_timesteps = set_timesteps
        getattr(scheduler, _WRAPPED).append(clock)
        self.scheduler = scheduler

    def detach(self) -> None:
        scheduler, self.scheduler = self.scheduler, None
        listeners = getattr(scheduler, _WRAPPED, None)
        if listeners is None:
            return
        listeners[:] = [ref for ref in listeners if ref() not in (None, self)]
        if not listeners:
            del scheduler.set_timesteps  # the class's method again
            delattr(scheduler, _WRAPPED)

    def start(self, scheduler: Any = None) -> None:
        """A generation starts on `scheduler` (called after its `set_timesteps`; None: a bare model's caller)."""
        if scheduler is None:
            self._total, self._order, self._warm, self._begin = 2**62, 1, 0, 0
            self._begin_known = True
        else:
            timesteps = getattr(scheduler, "timesteps", None)
            if timesteps is None:
                raise UserError("the scheduler has no timesteps after set_timesteps; paradiff cannot count its steps.")
            self._total = len(timesteps)
            self._order = max(1, int(getattr(scheduler, "order", 1)))
            steps = getattr(scheduler, "num_inference_steps", None) or self._total
            self._warm = self._total - int(steps) * self._order  # diffusers' `num_warmup_steps` (Heun: -1)
            self._begin = None if (self._warm or self._order > 1) else 0  # only these need the offset
            self._begin_known = False
        self.generation += 1
        self.calls = 0
        self._started = True
        self.current = None
        if self.on_start is not None:
            self.on_start()

    def _step_of(self, position: int) -> int:
        """Steps completed before call `position`: diffusers' progress bar advances after call j when
        j + 1 > num_warmup_steps and (j + 1) % order == 0."""
        low = max(1, self._warm + 1)
        return 0 if position < low else position // self._order - (low - 1) // self._order

    def _find_begin(self, timestep: Any, call: int) -> int:
        """Where this generation starts in `scheduler.timesteps` (img2img skips the first ones), from call number
        `call` and its timestep: the scheduler's begin index, else the first match (one host sync)."""
        begin = getattr(self.scheduler, "begin_index", None)
        if begin is not None:
            return int(begin)
        if timestep is None:
            return 0
        ts = self.scheduler.timesteps
        t = timestep.reshape(-1)[0] if isinstance(timestep, torch.Tensor) else torch.tensor(float(timestep))
        hits = (ts.to(t.device, t.dtype) == t).nonzero()
        return int(hits[0, 0]) - call if len(hits) else 0

    # -- calls -------------------------------------------------------------------------------------------------
    def tick(self, timestep: Any = None) -> Tick:
        """Advance by one denoiser call (the outermost paradiff hook calls this once per call)."""
        pipe = self._pipe()
        if pipe is not None and getattr(pipe, "scheduler", None) is not self.scheduler:
            self.attach(pipe.scheduler)  # swapped after parallelize: its set_timesteps already ran
            self.start(pipe.scheduler)
        if not self._started and self.scheduler is None:
            self.start()  # a bare model: the first call starts the first generation
        if not self._started:
            raise UserError("the denoiser was called outside a pipeline call paradiff can follow (no "
                            "scheduler.set_timesteps since parallelize); call the pipeline, or set_timesteps first.")
        if self._begin is None:  # multi-call schedulers only
            self._begin, self._begin_known = self._find_begin(timestep, self.calls), True
        position = self._begin + self.calls
        first = self._step_of(self._begin)
        self.current = Tick(self.generation, self.calls, self._step_of(position) - first,
                            self._step_of(self._total - 1) - first + 1)
        self.calls += 1
        return self.current

    def position(self, timestep: Any) -> int:
        """Index into `scheduler.timesteps` of the current call (after `tick`; `timestep`: the call's own, to find
        where an img2img generation starts, once per generation)."""
        if not self._begin_known:
            self._begin, self._begin_known = self._find_begin(timestep, self.calls - 1), True
        return self._begin + self.calls - 1
