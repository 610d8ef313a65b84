"""The execution core every method shares: the step clock, the CUDA-graph runner's policy, the compile policy."""

from __future__ import annotations

import warnings

import pytest
import torch


def _progress_bar_steps(scheduler, steps):
    """Step of each denoiser call by diffusers' own rule (the pipelines' progress bar), computed independently."""
    timesteps = scheduler.timesteps
    warm = len(timesteps) - steps * scheduler.order
    out, done = [], 0
    for i in range(len(timesteps)):
        out.append(done)
        if i == len(timesteps) - 1 or ((i + 1) > warm and (i + 1) % scheduler.order == 0):
            done += 1
    return out


class _Pipe:
    def __init__(self, scheduler):
        self.scheduler = scheduler


@pytest.mark.parametrize("name,kwargs", [("PNDMScheduler", {}), ("PNDMScheduler", {"skip_prk_steps": True}),
                                         ("HeunDiscreteScheduler", {}), ("KDPM2DiscreteScheduler", {}),
                                         ("DDIMScheduler", {}), ("DPMSolverMultistepScheduler", {}),
                                         ("EulerAncestralDiscreteScheduler", {})])
def test_clock_counts_scheduler_steps_like_diffusers(name, kwargs):
    import diffusers

    from paradiff.execution import StepClock

    scheduler = getattr(diffusers, name)(**kwargs)
    clock = StepClock(_Pipe(scheduler))
    for steps in (5, 10):
        scheduler.set_timesteps(steps)
        ticks = [clock.tick(t) for t in scheduler.timesteps]
        assert [t.step for t in ticks] == _progress_bar_steps(scheduler, steps)
        assert ticks[-1].step == steps - 1 and all(t.steps == steps for t in ticks)
        assert [t.call for t in ticks] == list(range(len(scheduler.timesteps))) and ticks[0].first
    generation = clock.generation
    clock.detach()
    assert "set_timesteps" not in vars(scheduler)  # the class's method again
    scheduler.set_timesteps(5)
    assert clock.generation == generation


def test_clock_img2img_starts_part_way_and_follows_a_swapped_scheduler():
    from diffusers import DDIMScheduler, HeunDiscreteScheduler

    from paradiff.execution import StepClock

    heun = HeunDiscreteScheduler()
    pipe = _Pipe(heun)
    clock = StepClock(pipe)
    heun.set_timesteps(6)
    begin = 2 * heun.order  # what img2img pipelines do for strength < 1
    heun.set_begin_index(begin)
    ticks = [clock.tick(t) for t in heun.timesteps[begin:]]
    assert [t.step for t in ticks] == [s - 2 for s in _progress_bar_steps(heun, 6)[begin:]]
    assert ticks[-1].steps == 4
    pipe.scheduler = DDIMScheduler()
    pipe.scheduler.set_timesteps(4)  # not hooked yet: picked up at the next denoiser call
    assert [clock.tick(t).step for t in pipe.scheduler.timesteps] == [0, 1, 2, 3]
    assert "set_timesteps" not in vars(heun) and "set_timesteps" in vars(pipe.scheduler)
    pipe.scheduler.set_timesteps(6)  # DDIM img2img: the loop starts at index 2, with no begin index to read
    positions = []
    for t in pipe.scheduler.timesteps[2:]:
        clock.tick(t)
        positions.append(clock.position(t))
    assert positions == [2, 3, 4, 5]


def test_clock_resets_at_each_generation():
    from diffusers import DDIMScheduler

    from paradiff.execution import StepClock

    scheduler = DDIMScheduler()
    starts = []
    clock = StepClock(_Pipe(scheduler), on_start=lambda: starts.append(1))
    for _ in range(2):
        scheduler.set_timesteps(3)
        clock.tick(scheduler.timesteps[0])  # interrupted after one step
    assert clock.current.step == 0 and clock.generation == 2 and len(starts) == 2


class _FakeGraph:
    def __init__(self, fn, args, kwargs, out):
        self.fn, self.args, self.kwargs, self.out = fn, args, kwargs, out

    def replay(self):
        new = self.fn(*self.args, **self.kwargs)
        self.out.copy_(new)


class _FakeRunner:
    """GraphRunner with the CUDA parts replaced: the dispatch policy is what is under test."""

    @staticmethod
    def make(fn, fail=False, **kwargs):
        from paradiff.execution import GraphRunner

        class Runner(GraphRunner):
            eager_calls = 0
            records = 0

            @staticmethod
            def _on_gpu(flat):
                return True

            def _eager_on_side_stream(self, args, kwargs):
                Runner.eager_calls += 1
                return self.fn(*args, **kwargs)

            def _record(self, args, kwargs):
                Runner.records += 1
                if fail:
                    raise RuntimeError("operation not permitted when stream is capturing")
                out = self.fn(*args, **kwargs)
                return _FakeGraph(self.fn, args, kwargs, out), out

        return Runner(fn, **kwargs)


@pytest.mark.parametrize("warmup", [1, 2])
def test_graph_runner_one_graph_per_phase_after_warmup(warmup):
    calls = []

    def step(x, scale=1.0):
        calls.append(1)
        return x * scale

    runner = _FakeRunner.make(step, warmup=warmup)
    x = torch.ones(3)
    outs = [runner(x + i, phase=phase) for i, phase in enumerate(["sync"] * 3 + ["stale"] * 4)]
    assert [o.tolist() for o in outs] == [[1.0 + i] * 3 for i in range(7)]  # replays read the new inputs
    assert type(runner).eager_calls == 2 * warmup and type(runner).records == 2 and len(runner.graphs) == 2
    assert runner.replays == 7 - 2 * warmup
    first = runner(x, phase="stale")
    second = runner(x * 2, phase="stale")
    assert first.tolist() == [1.0] * 3 and second.tolist() == [2.0] * 3  # outputs stay valid after a replay
    runner(x, phase="stale", scale=3.0)  # another constant argument: another key, warmed up on its own
    assert len(runner.graphs) == 2 and len(runner.seen) == 3


def test_graph_runner_failed_capture_warns_once_and_runs_eagerly():
    dropped = []
    runner = _FakeRunner.make(lambda x: x + 1, fail=True, warmup=1, on_failure=lambda: dropped.append(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [runner(torch.zeros(2), phase=p) for p in ("a", "a", "a", "b", "b")]
    assert all(o.tolist() == [1.0, 1.0] for o in outs)
    assert runner.failed and not runner.graphs and dropped == [1] and type(runner).records == 1
    assert sum("capture failed" in str(w.message) for w in caught) == 1


def test_execution_policy_means_the_same_everywhere():
    from paradiff.errors import UserError
    from paradiff.execution import Execution

    with pytest.raises(UserError, match="compile must be"):
        Execution(compile="aot_eager")
    with pytest.raises(UserError, match="cuda_graph must be"):
        Execution(cuda_graph="yes")
    with pytest.raises(UserError, match="needs the model on a CUDA GPU"):
        Execution(cuda_graph=True).graphs_on("cpu")
    assert not Execution().graphs_on("cpu") and not Execution(cuda_graph=False).graphs_on("cpu")
    defaults = {"options": {"a": 1}}
    assert Execution(True).compile_kwargs(defaults) == {"dynamic": False, "options": {"a": 1}}
    assert Execution({"options": {"b": 2}}).compile_kwargs(defaults)["options"] == {"a": 1, "b": 2}
    assert "options" not in Execution({"mode": "reduce-overhead"}).compile_kwargs(defaults)
    fn = lambda x: x  # noqa: E731
    assert Execution(False).compiled(fn) is fn
    runner = Execution().runner(fn, "cpu", name="t")
    assert runner(3, phase="x") == 3


def test_every_method_takes_the_same_compile_and_cuda_graph_arguments():
    from paradiff import AsyncDenoise, CFGParallel, PatchParallel
    from paradiff.errors import UserError

    for cls in (PatchParallel, CFGParallel, AsyncDenoise):
        method = cls(compile={"backend": "eager"}, cuda_graph=False)
        assert method.execution.compile == {"backend": "eager"} and method.execution.cuda_graph is False
        assert "compile=" in repr(method) and "cuda_graph=" in repr(method)
        with pytest.raises(UserError):
            cls(compile="inductor")


def test_a_model_changed_after_parallelize_is_refused_before_it_computes():
    """A hooked module replaced (a LoRA layer, a conv swapped) or projections fused after parallelize: one sentence
    at the next generation, not a silently wrong image."""
    import torch.distributed as dist

    from paradiff import PatchParallel
    from paradiff.errors import UserError
    from paradiff.parallel import parallelize_module
    from support.models import tiny_unet, unet_inputs

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        unet, kwargs = tiny_unet("sd"), unet_inputs("sd")
        target = parallelize_module(unet, PatchParallel(warmup_steps=9), groups={"patch": dist.group.WORLD})
        with torch.no_grad():
            unet(**kwargs)
            conv = unet.down_blocks[0].resnets[0].conv1
            unet.down_blocks[0].resnets[0].conv1 = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1)
            target.start()
            with pytest.raises(UserError, match="changed after parallelize"):
                unet(**kwargs)
            unet.down_blocks[0].resnets[0].conv1 = conv
            target.start()
            unet(**kwargs)  # put back: runs again
            unet.fuse_qkv_projections()
            target.start()
            with pytest.raises(UserError, match="fused"):
                unet(**kwargs)
        target.remove()
        assert not hasattr(unet, "_paradiff")
    finally:
        dist.destroy_process_group()
