"""Conformance: a parallelized pipeline honours diffusers' whole call surface, exactly (tiny SD, gloo ranks).

For each method in its exact mode -- PatchParallel(warmup_steps=STEPS), CFGParallel(), AsyncDenoise(warmup_steps=
STEPS) on 2 ranks, and CFGParallel() x PatchParallel(warmup_steps=STEPS) on 4 -- rank 0's output must equal the
serial pipeline's (same code, no method) for what `StableDiffusionPipeline.__call__` accepts: every output type, a
list of prompts, num_images_per_prompt, prompt embeddings instead of prompts, a list of generators, user latents,
schedulers swapped after parallelize (multistep, stochastic, PRK and second-order ones: several denoiser calls per
scheduler step, so the warm-up must count scheduler steps, not denoiser calls), callback_on_step_end (changing the
latents, or interrupting: the next call starts a fresh step clock), img2img from_pipe'd from the parallel pipeline,
non-square and changing sizes. Then the guards: unparallelize, parallelize twice, FreeU under patch parallelism,
ranks seeded differently, a rank that never calls the pipeline, direct use of a text encoder whose weights rank 1
freed: each either works (equal to serial) or raises a UserError on every rank; never a silent mismatch, never a
crash on one rank and a hang on the other.

How it runs (cheaply): one `run_ranks` call per method plays every case of `CASES`. Each case gets a fresh tiny
pipeline and a fresh process group (the ranks meet at a store barrier between cases), so a case that crashes one rank
while the other waits in a collective (until PARADIFF's timeout) cannot desynchronise the cases after it. The serial
references are computed in the test process by the same case functions with no method applied.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback

import numpy as np
import pytest
import torch

from support.distributed import free_port, run_ranks

pytestmark = pytest.mark.slow

STEPS = 4                 # num_inference_steps of every call; the exact modes use warmup_steps=STEPS
PROMPT, PROMPT_2 = "a red circle on the left", "a blue square"
TIMEOUT_S = 15            # collective timeout of every case (a hang costs this much) ...
ABSENT_TIMEOUT_S = 10     # ... but the rank-never-calls case, which must fail within its timeout
ATOL = 1e-4               # of the output's scale (its std, at least 1); PIL images: 1 level of 255. The tiny random
#                           model's latents reach |x| ~ 70 (std ~ 16) under guidance 7.5, where fp32 rounding alone
#                           (CFG's halved batch, patch rows) differs from serial by ~1e-4; a stale step gives > 1e-2.
FREEU = dict(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
METHODS = ("patch", "cfg", "async")
SCHEDULERS = {            # name: (diffusers class name, from_config overrides)
    "dpm_multistep": ("DPMSolverMultistepScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),  # stochastic: noise from the seeded generator
    "pndm_prk": ("PNDMScheduler", {"skip_prk_steps": False}),    # PRK: 4 denoiser calls per step at first
    "heun": ("HeunDiscreteScheduler", {}),                       # second order: 2 calls per step
    "kdpm2": ("KDPM2DiscreteScheduler", {}),                     # second order
}


def _tiny_sd_pipeline():
    from support.models import tiny_sd_pipeline

    return tiny_sd_pipeline()


def _methods(method: str | None) -> list:
    """Fresh method instances for `method` (None: serial, no method)."""
    import paradiff

    exact = {"patch": lambda: paradiff.PatchParallel(warmup_steps=STEPS), "cfg": paradiff.CFGParallel,
             "async": lambda: paradiff.AsyncDenoise(warmup_steps=STEPS)}
    return [exact[part]() for part in method.split("+")] if method else []


class Ctx:
    """What a case sees: the method (None: serial reference) and this process's rank."""

    def __init__(self, method: str | None, rank: int):
        self.method, self.rank = method, rank

    @property
    def parallel(self) -> bool:
        return self.method is not None

    def methods(self) -> list:
        return _methods(self.method)

    def make(self):
        """A fresh tiny SD pipeline (the same weights in every process), parallelized unless serial."""
        import paradiff

        pipe = _tiny_sd_pipeline()
        pipe.set_progress_bar_config(disable=True)
        if self.parallel:
            pipe = paradiff.parallelize(pipe, *self.methods())
            pipe.set_progress_bar_config(disable=True)
        return pipe


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _array(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        return images.detach().float().cpu().numpy()
    if isinstance(images, list):  # PIL images
        return np.stack([np.asarray(image) for image in images])
    return np.asarray(images)


def _call(pipe, out: dict | None = None, key: str | None = None, **kwargs) -> np.ndarray:
    """`pipe(...)` with this file's defaults; the images as an array (also stored in out[key], with their type)."""
    call = dict(prompt=PROMPT, num_inference_steps=STEPS, generator=_gen(0), output_type="latent")
    call.update(kwargs)
    images = pipe(**call).images
    value = _array(images)
    if out is not None:
        out[key] = value
        out["_type:" + key] = type(images).__name__ if not isinstance(images, list) else type(images[0]).__name__
    return value


# -- the cases: fn(ctx, out) fills `out` (keys starting with "_" are information, not compared) ------------------
CASES: dict = {}


def case(fn):
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


@case
def case_output_types(ctx, out):
    pipe = ctx.make()
    for output_type in ("pil", "np", "pt", "latent"):
        _call(pipe, out, output_type, output_type=output_type)


@case
def case_prompt_batches(ctx, out):
    pipe = ctx.make()
    _call(pipe, out, "two_prompts", prompt=[PROMPT, PROMPT_2], output_type="np")
    _call(pipe, out, "images_per_prompt_2", num_images_per_prompt=2, output_type="np")
    _call(pipe, out, "generator_list", prompt=[PROMPT, PROMPT_2], generator=[_gen(0), _gen(1)])


@case
def case_prompt_embeds(ctx, out):
    pipe = ctx.make()
    g = _gen(7)
    embeds, negative = torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    _call(pipe, out, "embeds", prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative, output_type="np")


@case
def case_user_latents(ctx, out):
    pipe = ctx.make()
    latents = torch.randn(2, 4, 16, 16, generator=_gen(5))
    _call(pipe, out, "latents", prompt=[PROMPT, PROMPT_2], latents=latents, generator=None)


def _scheduler_case(name):
    def fn(ctx, out):
        import diffusers

        pipe = ctx.make()
        cls_name, overrides = SCHEDULERS[name]
        pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)  # after it
        calls = []
        pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
        _call(pipe, out, "latent")
        out["_unet_calls"] = len(calls)
    return fn


for _name in SCHEDULERS:
    CASES["scheduler_" + _name] = _scheduler_case(_name)


@case
def case_callback_latents(ctx, out):
    def flip(pipe, i, t, tensors):  # a change that mixes latent rows: no rank can keep its own copy of its rows
        return {"latents": tensors["latents"].flip(-2) * 0.8} if i == 1 else {}

    pipe = ctx.make()
    _call(pipe, out, "latent", callback_on_step_end=flip)


@case
def case_interrupt_then_call(ctx, out):
    def stop(pipe, i, t, tensors):
        if i == 2:
            pipe._interrupt = True
        return {}

    pipe = ctx.make()
    _call(pipe, out, "interrupted", callback_on_step_end=stop)
    _call(pipe, out, "next_call")  # a normal call: a new step clock (all its steps are warm-up steps again)


@case
def case_img2img_from_pipe(ctx, out):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = ctx.make()
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=_gen(3))
    _call(img2img, out, "img2img", image=image, strength=0.6, output_type="np")
    _call(pipe, out, "text2img_after")  # the pipeline it came from still works


@case
def case_sizes(ctx, out):
    pipe = ctx.make()
    _call(pipe, out, "64x96", height=64, width=96)
    _call(pipe, out, "48x32", height=48, width=32, output_type="np")
    _call(pipe, out, "default_size")


@case
def case_unparallelize(ctx, out):
    import paradiff

    pipe = ctx.make()
    _call(pipe, out, "parallel", output_type="np")
    if ctx.parallel:
        pipe = paradiff.unparallelize(pipe)
    if ctx.rank == 0:  # rank 1 does not call: any collective left would time out
        _call(pipe, out, "unparallelized", output_type="np")


@case
def case_parallelize_twice(ctx, out):
    import paradiff

    pipe = ctx.make()
    if ctx.parallel:
        paradiff.parallelize(pipe, *ctx.methods())  # must raise a UserError on every rank


@case
def case_freeu(ctx, out):
    pipe = ctx.make()
    pipe.enable_freeu(**FREEU)  # after parallelize
    _call(pipe, out, "freeu", output_type="np")
    if not ctx.parallel:
        pipe.disable_freeu()
        _call(pipe, out, "_without_freeu", output_type="np")


@case
def case_ranks_seeded_differently(ctx, out):
    pipe = ctx.make()
    torch.manual_seed(ctx.rank)  # serial: rank 0's seed
    _call(pipe, out, "latent", generator=None)
    if not ctx.parallel:
        torch.manual_seed(1)
        _call(pipe, out, "_seed_1", generator=None)


@case
def case_absent_rank(ctx, out):
    pipe = ctx.make()
    if ctx.rank == 0:  # rank 1 never calls the pipeline
        start = time.time()
        try:
            _call(pipe, out, "latent")
        finally:
            out["_call_seconds"] = time.time() - start
    else:
        out["_returned"] = True


@case
def case_text_encoder(ctx, out):
    pipe = ctx.make()
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    out["hidden"] = pipe.text_encoder(ids)[0].detach().numpy()


PARALLEL_ONLY = {"parallelize_twice", "absent_rank"}
CASE_TIMEOUT = {"absent_rank": ABSENT_TIMEOUT_S}


def _error(err: BaseException) -> dict:
    from paradiff.errors import CollectiveError, UserError

    frames = traceback.extract_tb(err.__traceback__)[-3:]
    return {"type": type(err).__name__, "user_error": isinstance(err, UserError),
            "collective_error": isinstance(err, CollectiveError), "message": str(err)[:800],
            "where": " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames))}


def _play(name: str, method: str | None, rank: int) -> dict:
    out: dict = {}
    start = time.time()
    try:
        CASES[name](Ctx(method, rank), out)
        error = None
    except Exception as err:  # noqa: BLE001 - recorded and judged by the test
        error = _error(err)
    return {"out": out, "error": error, "seconds": time.time() - start}


def _play_ranks(method: str, names: list, port: int) -> dict:
    """On every rank: each case on a fresh process group; a store barrier between cases. Returns {case: result}."""
    import torch.distributed as dist

    from paradiff import runtime

    rank, world = runtime.get().rank, runtime.get().world_size
    runtime.shutdown()
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=300))
    warm = _tiny_sd_pipeline()  # first-use imports and initialisation outside any collective (and its timeout)
    warm.set_progress_bar_config(disable=True)
    _call(warm, num_inference_steps=1, output_type="pil")
    results = {}
    for i, name in enumerate(names):
        seconds = CASE_TIMEOUT.get(name, TIMEOUT_S)
        os.environ["PARADIFF_TIMEOUT"] = str(seconds)
        dist.init_process_group("gloo", store=dist.PrefixStore(f"case{i}", store), rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=seconds))
        runtime.init("cpu")
        results[name] = _play(name, method, rank)
        store.set(f"done{i}/{rank}", "1")  # wait for the others (a rank stuck in a collective times out first)
        store.wait([f"done{i}/{r}" for r in range(world)], datetime.timedelta(seconds=240))
        runtime.shutdown()
    return results


# -- fixtures: serial references once, one multi-rank run per method ----------------------------------------------
RUNS = {"patch": (2, list(CASES)), "cfg": (2, list(CASES)), "async": (2, list(CASES)),
        "cfg+patch": (4, ["prompt_batches", "scheduler_heun", "interrupt_then_call", "sizes"])}


@pytest.fixture(scope="module")
def serial():
    return {name: _serial_play(name) for name in CASES if name not in PARALLEL_ONLY}


def _serial_play(name: str) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the ranks; more threads on shared, busy cores is many times slower
    try:
        return _play(name, None, 0)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def parallel():
    cache: dict = {}

    def get(method: str) -> list:
        if method not in cache:
            world, names = RUNS[method]
            start = time.time()
            cache[method] = run_ranks(_play_ranks, world, method, names, free_port(), timeout=540,
                                      env={"PARADIFF_TIMEOUT": str(TIMEOUT_S)})
            print(f"\n{method}: {world} ranks, {len(names)} cases in {time.time() - start:.0f} s: " + ", ".join(
                f"{n} {cache[method][0][n]['seconds']:.1f}" for n in names))
        return cache[method]
    return get


# -- checks --------------------------------------------------------------------------------------------------------
def _describe(error: dict) -> str:
    return f"{error['type']}: {error['message'][:300]} (at {error['where']})"


def _max_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a - b).max()) if a.size else 0.0


def _tolerance(want) -> float:
    return ATOL * max(1.0, float(np.asarray(want, dtype=np.float64).std()))


def _mismatches(got: dict, ref: dict) -> list:
    """Differences of rank 0's outputs from the serial ones: ["key: max diff d", ...]."""
    bad = []
    for key, want in ref.items():
        if key.startswith("_") and not key.startswith("_type:") or key.startswith("_type:_"):
            continue
        if key not in got:
            bad.append(f"{key}: missing")
        elif isinstance(want, str):
            if got[key] != want:
                bad.append(f"{key}: {got[key]!r} instead of {want!r}")
        else:
            have = np.asarray(got[key])
            atol = 1.0 if np.asarray(want).dtype == np.uint8 else _tolerance(want)
            diff = _max_diff(have, want)
            if not diff <= atol:
                shape = "" if have.shape == np.asarray(want).shape else f" (shape {have.shape} vs {want.shape})"
                bad.append(f"{key}: max |parallel - serial| = {diff:.3g}{shape}")
    return bad


def _assert_matches_serial(ranks: list, ref: dict, label: str) -> None:
    assert ref["error"] is None, f"serial reference of {label} failed: {_describe(ref['error'])}"
    errors = [f"rank {r} raised {_describe(res['error'])}" for r, res in enumerate(ranks) if res["error"]]
    assert not errors, f"{label}: " + "; ".join(errors)
    bad = _mismatches(ranks[0]["out"], ref["out"])
    assert not bad, f"{label}: rank 0 differs from serial: " + "; ".join(bad)


def _rank_results(parallel, method, name) -> list:
    return [by_case[name] for by_case in parallel(method)]


def _assert_user_error_everywhere(ranks: list, label: str, ref: dict | None = None) -> None:
    described = [f"rank {r}: " + (_describe(res["error"]) if res["error"] else "no error")
                 for r, res in enumerate(ranks)]
    if ref is not None and ranks[0]["error"] is None:  # say how wrong the silent result is
        described[0] += " (" + ("; ".join(_mismatches(ranks[0]["out"], ref["out"])) or "equal to serial") + ")"
    assert all(res["error"] and res["error"]["user_error"] for res in ranks), \
        f"{label}: expected a UserError on every rank; got " + "; ".join(described)


EQUAL_CASES = ["output_types", "prompt_batches", "prompt_embeds", "user_latents",
               *("scheduler_" + name for name in SCHEDULERS), "callback_latents", "interrupt_then_call",
               "img2img_from_pipe", "sizes"]


@pytest.mark.parametrize("name", EQUAL_CASES)
@pytest.mark.parametrize("method", METHODS)
def test_matches_serial(method, name, serial, parallel):
    """Items 1-5: every call of the case, on rank 0, equals the serial pipeline's; no rank raises."""
    _assert_matches_serial(_rank_results(parallel, method, name), serial[name], f"{method}/{name}")


@pytest.mark.parametrize("name", RUNS["cfg+patch"][1])
def test_cfg_times_patch_four_ranks(name, serial, parallel):
    _assert_matches_serial(_rank_results(parallel, "cfg+patch", name), serial[name], f"cfg+patch/{name}")


@pytest.mark.parametrize("method", METHODS)
def test_unparallelize(method, serial, parallel):
    """unparallelize removes every hook: rank 0 alone calls the pipeline afterwards and gets the serial image.
    Under AsyncDenoise each rank freed the other ranks' components (that is its memory saving), so rank 0's call
    must instead fail at once with a UserError that says the weights were freed."""
    ranks = _rank_results(parallel, method, "unparallelize")
    if method == "async":
        error = ranks[0]["error"]
        assert error is not None and error["user_error"] and "freed" in error["message"], ranks[0]
        return
    _assert_matches_serial(ranks, serial["unparallelize"], f"{method}/unparallelize")


@pytest.mark.parametrize("method", METHODS)
def test_parallelize_twice_is_a_user_error(method, parallel):
    _assert_user_error_everywhere(_rank_results(parallel, method, "parallelize_twice"), f"{method}/parallelize twice")


@pytest.mark.parametrize("method", METHODS)
def test_freeu(method, serial, parallel):
    """FreeU filters whole feature maps (FFT): patch parallelism must refuse it on every rank; CFG parallelism is
    unaffected (equal to serial FreeU); AsyncDenoise may do either."""
    ranks, ref = _rank_results(parallel, method, "freeu"), serial["freeu"]
    if method == "patch":
        _assert_user_error_everywhere(ranks, "patch/FreeU", ref)
    elif method == "async" and all(res["error"] and res["error"]["user_error"] for res in ranks):
        pass
    else:
        _assert_matches_serial(ranks, ref, f"{method}/FreeU")


@pytest.mark.parametrize("method", METHODS)
def test_ranks_seeded_differently(method, serial, parallel):
    """torch.manual_seed(rank), generator=None: a UserError on every rank, or every rank uses rank 0's latents."""
    ranks = _rank_results(parallel, method, "ranks_seeded_differently")
    if all(res["error"] and res["error"]["user_error"] for res in ranks):
        return
    _assert_matches_serial(ranks, serial["ranks_seeded_differently"], f"{method}/ranks seeded differently")


@pytest.mark.parametrize("method", METHODS)
def test_rank_that_never_calls(method, parallel):
    """Rank 0 calls the pipeline, rank 1 does not: rank 0 fails within the timeout, naming the likely cause."""
    main, other = _rank_results(parallel, method, "absent_rank")
    assert other["error"] is None and other["out"].get("_returned"), f"rank 1: {other}"
    error = main["error"]
    assert error is not None, f"{method}: rank 0's call returned although rank 1 never called the pipeline"
    assert error["collective_error"] and "every rank" in error["message"].lower(), \
        f"{method}: rank 0 should raise CollectiveError naming the likely cause; got {_describe(error)}"
    seconds = main["out"]["_call_seconds"]
    assert seconds < ABSENT_TIMEOUT_S + 10, \
        f"{method}: rank 0 failed after {seconds:.0f} s (collective timeout {ABSENT_TIMEOUT_S} s)"


@pytest.mark.parametrize("method", METHODS)
def test_direct_text_encoder_use(method, serial, parallel):
    """pipe.text_encoder(ids) on every rank: rank 0's values on every rank, or a UserError on every rank."""
    ranks, ref = _rank_results(parallel, method, "text_encoder"), serial["text_encoder"]
    if all(res["error"] and res["error"]["user_error"] for res in ranks):
        return
    errors = [f"rank {r} raised {_describe(res['error'])}" for r, res in enumerate(ranks) if res["error"]]
    assert not errors, f"{method}/text encoder: " + "; ".join(errors)
    for r, res in enumerate(ranks):
        bad = _mismatches(res["out"], ref["out"])
        assert not bad, f"{method}/text encoder: rank {r} differs from serial: " + "; ".join(bad)


def test_serial_references_are_informative(serial):
    """The references can tell a wrong result from a right one: each feature under test changes the output."""
    for name, res in serial.items():
        assert res["error"] is None, f"serial {name}: {_describe(res['error'])}"
    out = {name: res["out"] for name, res in serial.items()}
    again = _serial_play("output_types")["out"]
    assert not _mismatches(again, out["output_types"]) and _max_diff(again["np"], out["output_types"]["np"]) == 0
    types = out["output_types"]
    assert (types["_type:pil"], types["_type:np"], types["_type:pt"], types["_type:latent"]) == \
        ("Image", "ndarray", "Tensor", "Tensor")
    assert _max_diff(types["pil"] / 255.0, types["np"]) < 1 / 255 + 1e-6 and types["pil"].std() > 1
    plain = types["latent"]

    def differs(a, b):
        return _max_diff(a, b) > 10 * _tolerance(b)  # the feature changes the result well beyond the tolerance

    assert differs(out["callback_latents"]["latent"], plain)
    assert differs(out["interrupt_then_call"]["interrupted"], plain)
    assert _max_diff(out["interrupt_then_call"]["next_call"], plain) == 0
    assert _max_diff(out["img2img_from_pipe"]["text2img_after"], plain) == 0
    assert _max_diff(out["sizes"]["default_size"], plain) == 0 and out["sizes"]["64x96"].shape == (1, 4, 32, 48)
    assert out["sizes"]["48x32"].shape == (1, 48, 32, 3)
    assert differs(out["freeu"]["freeu"], out["freeu"]["_without_freeu"])
    assert differs(out["ranks_seeded_differently"]["latent"], out["ranks_seeded_differently"]["_seed_1"])
    two = out["prompt_batches"]["two_prompts"]
    assert two.shape[0] == 2 and differs(two[0], two[1])
    assert out["prompt_batches"]["images_per_prompt_2"].shape[0] == 2
    assert differs(out["prompt_batches"]["generator_list"][1], out["prompt_batches"]["generator_list"][0])
    assert differs(out["user_latents"]["latents"], out["prompt_batches"]["generator_list"])
    assert differs(out["prompt_embeds"]["embeds"], types["np"])
    assert differs(out["img2img_from_pipe"]["img2img"], types["np"])
    assert out["text_encoder"]["hidden"].shape == (1, 77, 32)
    for name in SCHEDULERS:
        assert differs(out["scheduler_" + name]["latent"], plain), name
    calls = {name: out["scheduler_" + name]["_unet_calls"] for name in SCHEDULERS}
    assert all(calls[name] > STEPS for name in ("pndm_prk", "heun", "kdpm2")), calls  # > 1 call per step
