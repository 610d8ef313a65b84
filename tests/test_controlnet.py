"""The ControlNet family under every method: SD-style and SDXL-style ControlNet pipelines (text-to-image and
img2img) and MultiControlNet, through diffusers' own pipeline call, on gloo ranks, exact modes against serial.

What each method must do with the ControlNet (not only give the serial image):
- PatchParallel: the ControlNet is row-split too; its conditioning embedding gets the control image's rows of this
  rank's patch (pixel rows = latent rows x its scale), and the residuals stay per-patch rows.
- CFGParallel: the ControlNet's batch is split with the UNet's (guess mode: the cond batch whole).
- AsyncDenoise: the ControlNet's blocks are units of the split: each runs on one rank of the async group only (a
  large ControlNet over several ranks).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from support.distributed import run_ranks

STEPS = 3
PROMPT = "a red circle on the left"
ATOL = 1e-4  # of the output's scale (its std, at least 1), as in test_families


def _inputs(kind: str, guess: bool = False) -> dict:
    """A 32x32 control image (two different ones for MultiControlNet) and, for img2img, a 32x32 init image."""
    rng = np.random.default_rng(0)
    control = rng.random((1, 32, 32, 3)).astype(np.float32)
    control = [control, control[:, ::-1].copy()] if kind == "sd-multi" else control
    kwargs = {"image": control}
    if kind.endswith("img2img"):
        kwargs = {"image": rng.random((1, 32, 32, 3)).astype(np.float32), "control_image": control, "strength": 0.8}
    return dict(kwargs, height=32, width=32, guess_mode=guess)


def _call(pipe, kind: str, guess: bool = False, **kwargs) -> np.ndarray:
    images = pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(0),
                  output_type="latent", **{**_inputs(kind, guess), **kwargs}).images
    return images.detach().float().numpy()


def _methods(spec: str, warmup: int) -> list:
    import paradiff

    make = {"patch": lambda: paradiff.PatchParallel(warmup_steps=warmup), "cfg": paradiff.CFGParallel,
            "async": lambda: paradiff.AsyncDenoise(warmup_steps=warmup)}
    return [make[name]() for name in spec.split("+")]


def _build(kind: str):
    from support.models import tiny_controlnet_pipeline

    pipe = tiny_controlnet_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ran(pipe, methods: list) -> set:
    """Under AsyncDenoise, the ControlNet units this rank runs (not stands in for), filled in as they run: each
    unit's first weight-holding layer records it."""
    from paradiff import AsyncDenoise
    from paradiff.methods.split import CONTROLNET

    ran: set = set()
    for method in methods:
        if isinstance(method, AsyncDenoise):
            for name in method.split.graph.units:
                if name.startswith(CONTROLNET):
                    unit = pipe.controlnet.get_submodule(name[len(CONTROLNET):])
                    layer = next(m for m in unit.modules() if not list(m.children()) and list(m.parameters()))
                    layer.register_forward_pre_hook(lambda *_, name=name: ran.add(name))
    return ran


def _play(cases: list) -> dict:
    """On every rank, per (kind, methods, exact, guess): serial and parallel latents, and what this rank's
    ControlNets computed: the control image rows their conditioning embedding saw, per call, and (async) the
    ControlNet units it ran."""
    import paradiff
    from paradiff.plans.common import controlnets

    out = {}
    for kind, spec, exact, guess in cases:
        serial = _call(_build(kind), kind, guess)
        methods = _methods(spec, STEPS if exact else 1)
        pipe = paradiff.parallelize(_build(kind), *methods)
        pipe.set_progress_bar_config(disable=True)
        seen = []
        for net in controlnets(pipe.controlnet):  # its first conv: runs only where the embedding really runs
            net.controlnet_cond_embedding.conv_in.register_forward_pre_hook(
                lambda m, a: seen.append(tuple(a[0].shape)))
        ran = _ran(pipe, methods)
        out[(kind, spec, exact, guess)] = {"latent": _call(pipe, kind, guess), "serial": serial, "seen": seen,
                                           "ran": ran}
        if not exact:
            out[(kind, spec, exact, guess)]["again"] = _call(pipe, kind, guess)
    return out


def _diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float("inf") if a.shape != b.shape else float(np.abs(a - b).max())


def _tolerance(want) -> float:
    return ATOL * max(1.0, float(np.asarray(want, np.float64).std()))


def _check_async_units(ranks: list, case: tuple, groups: int) -> list[str]:
    """Each ControlNet unit ran on one rank of each async group."""
    counts: dict = {}
    for result in ranks:
        for name in result[case]["ran"]:
            counts[name] = counts.get(name, 0) + 1
    wrong = {name: count for name, count in counts.items() if count != groups}
    return [f"{case[0]}/{case[1]}: ControlNet units not run once per async group: {wrong}"] if wrong or not counts \
        else []


def _check_exact(ranks: list, cases: list, mesh: dict) -> list[str]:
    """Every rank's latents equal serial's; each rank's ControlNets saw what its method gives them."""
    bad = []
    nets = {"sd-multi": 2}
    for case in cases:
        kind, spec, _, guess = case
        calls = STEPS if not kind.endswith("img2img") else int(STEPS * 0.8)
        per_net = nets.get(kind, 1)
        runs = []
        for rank, result in enumerate(ranks):
            diff = _diff(result[case]["latent"], result[case]["serial"])
            if not diff <= _tolerance(result[case]["serial"]):
                bad.append(f"{kind}/{spec}{'/guess' if guess else ''} rank {rank}: max |parallel - serial| = "
                           f"{diff:.3g}")
            seen = result[case]["seen"]
            runs.append(len(seen) // per_net)
            batch = 2 if not guess else 1  # guess mode: the cond half only, whole on every CFG rank
            if "cfg" in spec and not guess:
                batch //= 2
            rows = 32 // (mesh[spec] // (2 if "cfg" in spec else 1)) if "patch" in spec else 32
            if seen and set(seen) != {(batch, 3, rows, 32)}:
                bad.append(f"{kind}/{spec} rank {rank}: the ControlNet saw control images {sorted(set(seen))}, "
                           f"not {(batch, 3, rows, 32)}")
        if "async" in spec:  # the embedding once per step per async group: one rank of each runs it
            groups = 2 if "cfg" in spec else 1
            if sorted(runs) != [0] * (len(ranks) - groups) + [calls] * groups:
                bad.append(f"{kind}/{spec}: ControlNet embedding runs per rank {runs}, want one rank per async "
                           f"group")
            bad += _check_async_units(ranks, case, groups)
        elif runs != [calls] * len(ranks):
            bad.append(f"{kind}/{spec}: ControlNet runs per rank {runs}, want {calls} on every rank")
    return bad


EXACT_2 = [(kind, spec, True, False) for kind in ("sd", "sd-img2img", "sd-multi", "sdxl")
           for spec in ("patch", "cfg", "async")] + [("sd", "cfg", True, True)]
EXACT_2_FAST = [("sd", "patch", True, False), ("sdxl", "cfg", True, False), ("sd-multi", "async", True, False),
                ("sd-img2img", "async", True, False), ("sd", "cfg", True, True)]


@pytest.mark.timeout(300)
def test_controlnet_pipelines_exact_on_two_ranks():
    """Each method and each pipeline kind once, exact: equal to serial on both ranks; patch ranks' ControlNets
    see their band of control image rows, CFG ranks their half batch (guess mode: the whole cond batch), and
    under AsyncDenoise one rank runs the ControlNet."""
    ranks = run_ranks(_play, 2, EXACT_2_FAST, timeout=280)
    bad = _check_exact(ranks, EXACT_2_FAST, {"patch": 2, "cfg": 2, "async": 2})
    assert not bad, "; ".join(bad)


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_controlnet_pipelines_exact_on_two_ranks_every_pair():
    """SD, SD img2img, MultiControlNet and SDXL ControlNet pipelines under every method, exact."""
    ranks = run_ranks(_play, 2, EXACT_2, timeout=480)
    bad = _check_exact(ranks, EXACT_2, {"patch": 2, "cfg": 2, "async": 2})
    assert not bad, "; ".join(bad)


EXACT_4 = [("sd", "patch", True, False), ("sd-multi", "cfg+patch", True, False), ("sdxl", "async", True, False),
           ("sd-img2img", "cfg+async", True, False)]


def _split_ranks(ranks: list, case: tuple) -> int:
    """How many ranks ran ControlNet units."""
    return sum(bool(result[case]["ran"]) for result in ranks)


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_controlnet_pipelines_exact_on_four_ranks():
    """Patch over 4, CFG x patch 2 x 2 (MultiControlNet), async over 4 (the ControlNet's blocks over two ranks)
    and CFG x async 2 x 2 (img2img): equal to serial on every rank."""
    ranks = run_ranks(_play, 4, EXACT_4, timeout=480)
    bad = _check_exact(ranks, EXACT_4, {"patch": 4, "cfg+patch": 4, "async": 4, "cfg+async": 4})
    assert not bad, "; ".join(bad)
    assert _split_ranks(ranks, ("sdxl", "async", True, False)) > 1


def _check_stale(ranks: list, cases: list) -> None:
    """Warm-up 1: each case runs, repeats bit for bit, differs from serial and stays close to it (within a fifth
    of the latent's spread on the tiny random model)."""
    for case in cases:
        result = ranks[0][case]
        diff, scale = _diff(result["latent"], result["serial"]), float(result["serial"].std())
        assert np.isfinite(result["latent"]).all() and _tolerance(result["serial"]) < diff < 0.2 * scale, \
            (case, diff, scale)
        assert _diff(result["latent"], result["again"]) == 0.0, case


STALE = [("sd", "patch", False, False), ("sdxl", "async", False, False)]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_controlnet_stale_modes_run_close_and_deterministic():
    """The approximate defaults' kind (warm-up 1): patch and async run, repeat bit for bit, differ from serial,
    and stay close to it."""
    _check_stale(run_ranks(_play, 2, STALE, timeout=280), STALE)


SPLIT_4 = [("sd-multi", "async", True, False), ("sd-multi", "async", False, False), ("sdxl", "async", False, False)]


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_controlnet_blocks_split_over_async_ranks():
    """Over 4 async ranks the tiny ControlNets' blocks span the first two components (MultiControlNet's two nets
    cut inside the second net, SDXL's inside its mid block): exact with warm-up over every step; warm-up 1 runs
    close to serial, deterministic; every block runs on one rank."""
    ranks = run_ranks(_play, 4, SPLIT_4, timeout=480)
    bad = _check_exact(ranks, SPLIT_4[:1], {"async": 4})
    assert not bad, "; ".join(bad)
    _check_stale(ranks, SPLIT_4[1:])
    for case in SPLIT_4:
        assert not _check_async_units(ranks, case, 1) and _split_ranks(ranks, case) > 1, \
            (case, [sorted(result[case]["ran"]) for result in ranks])


def _wrong_channels() -> str:
    """A ControlNet of 1 conditioning channel given the pipeline's RGB control image, under AsyncDenoise (the
    ranks that free it check too): the UserError's message on this rank."""
    import paradiff
    from diffusers import ControlNetModel

    pipe = _build("sd")
    pipe.register_modules(controlnet=ControlNetModel.from_config(dict(pipe.controlnet.config),
                                                                 conditioning_channels=1).eval())
    paradiff.parallelize(pipe, *_methods("async", STEPS))
    try:
        _call(pipe, "sd")
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {err}"
    return "no error"


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_wrong_conditioning_channels_is_one_user_error_on_every_rank():
    for message in run_ranks(_wrong_channels, 2, timeout=180):
        assert message.startswith("UserError: the ControlNet takes control images of 1 channels "
                                  "(conditioning_channels), got 3 channels.") and "\n" not in message, message


def test_control_image_checks():
    """The shared check the ControlNet's first call runs: channels, size, one image per net."""
    from paradiff.errors import UserError
    from paradiff.plans.common import check_control_images
    from support.models import tiny_controlnet

    net = tiny_controlnet()
    sample = torch.zeros(2, 4, 16, 16)
    check_control_images(net, (sample, 1.0, None, torch.zeros(2, 3, 32, 32)), {})
    with pytest.raises(UserError, match=r"needs a control image of 32x32 px \(2 px per latent row of the 16x16 "
                                        r"latent\), got 48x32 px"):
        check_control_images(net, (sample,), {"controlnet_cond": torch.zeros(2, 3, 48, 32)})
    with pytest.raises(UserError, match="takes control images of 3 channels"):
        check_control_images(net, (sample,), {"controlnet_cond": torch.zeros(2, 1, 32, 32)})
    from diffusers import MultiControlNetModel

    with pytest.raises(UserError, match="2 ControlNets got 1 control images"):
        check_control_images(MultiControlNetModel([net, net]), (sample,), {"controlnet_cond": [torch.zeros(2, 3, 32,
                                                                                                        32)]})


def test_async_split_cuts_the_controlnet_into_units():
    """The ControlNet's blocks are units of the traced graph, in its execution order before the denoiser's: the
    conditioning embedding first, then its down and mid block units. Its residuals are unit outputs that the
    UNet's up blocks consume, and its FLOPs are balanced with the UNet's."""
    import diffusers

    from paradiff.methods.split import CONTROLNET, split, trace
    from support.models import tiny_controlnet, tiny_unet

    unet, net = tiny_unet("sd-wide"), tiny_controlnet()
    graph = trace(unet, controlnet=net)
    ours = [u for u, name in enumerate(graph.units) if name.startswith(CONTROLNET)]
    assert ours == list(range(len(ours))) and graph.units[0] == "controlnet.controlnet_cond_embedding"
    assert {graph.units[u].split(".")[1] for u in ours} == {"controlnet_cond_embedding", "down_blocks", "mid_block"}
    assert sum(graph.flops[u] for u in ours) > 0.2 * sum(graph.flops)
    residuals = {(p, leaf) for p, leaf, c in graph.edges if p in ours and c not in ours}
    assert {graph.units[c] for p, _, c in graph.edges if p in ours and c not in ours} <= \
        {name for name in graph.units if name.startswith("up_blocks.")}
    assert len(residuals) == 5  # conv_in + the embedding, 3 down skips, the mid residual
    assert all(any(c == u for _, _, c in graph.edges) for u in ours[1:])  # each reads an earlier unit
    plan = split(unet, 2, net)
    assert plan.controlnet_units and plan.balance < 1.3
    assert split(unet, 2).controlnet_units == ()
    many = trace(unet, controlnet=diffusers.MultiControlNetModel([net, tiny_controlnet(seed=1)]))
    assert [name for name in many.units if name.startswith(CONTROLNET)][::len(ours)] == \
        ["controlnet.nets.0.controlnet_cond_embedding", "controlnet.nets.1.controlnet_cond_embedding"]


def test_async_split_keeps_the_output_with_the_last_component():
    """With the ControlNet's units placed after the UNet's, the last component must keep a UNet unit (it computes
    the output); tiny SD over 4 would otherwise end on ControlNet blocks alone."""
    from paradiff.methods.split import CONTROLNET, _controlnet_last, partition, split, trace
    from support.models import tiny_controlnet, tiny_unet

    unet, net = tiny_unet("sd-wide"), tiny_controlnet()
    last = _controlnet_last(trace(unet, controlnet=net))
    bounds = partition(last.flops, 4)
    assert all(name.startswith(CONTROLNET) for name in last.units[bounds[3]:])  # the cheapest split, rejected
    plan = split(unet, 4, net)
    assert not all(name.startswith(CONTROLNET) for name in plan.units_of(3))


def test_async_split_sends_no_controlnet_residual_back():
    """Regression: for this UNet at N=2 the split used to put the ControlNet last (better balance), so its residuals
    went back to component 0's up blocks and reached them a step late, added to that step's fresh skips; on the
    reference ControlNet one held-out image in 16 diverged from serial. Every transfer now runs forwards."""
    from paradiff.methods.split import CONTROLNET, backward_transfers, split
    from support.models import tiny_controlnet, tiny_unet

    unet, net = tiny_unet("sd-wide"), tiny_controlnet()
    for n in (2, 3, 4):
        plan = split(unet, n, net)
        assert [t for t in plan.transfers() if t[2] >= t[3]] == [], n
        assert backward_transfers(plan) == [], n
    plan = split(unet, 2, net)
    assert {plan.component_of(u) for u, name in enumerate(plan.graph.units) if name.startswith(CONTROLNET)} == {0}


# -- the CLI: `paradiff generate --controlnet ... --control-image ...` -------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny SD pipeline folder, two tiny ControlNet folders (one of 1 conditioning channel), the tiny inpainting
    folder, 32x32 pictures and a 48x32 one."""
    from diffusers import ControlNetModel
    from PIL import Image

    from support.models import tiny_controlnet, tiny_sd_inpaint_pipeline, tiny_sd_pipeline

    root = tmp_path_factory.mktemp("controlnet")
    tiny_sd_pipeline().save_pretrained(root / "sd")
    net = tiny_controlnet()
    net.save_pretrained(root / "cn")
    tiny_controlnet(seed=1).save_pretrained(root / "cn2")
    ControlNetModel.from_config(dict(net.config), conditioning_channels=1).save_pretrained(root / "gray")
    tiny_sd_inpaint_pipeline().save_pretrained(root / "inpaint")
    rng = np.random.default_rng(0)
    for name, shape in (("edges", (32, 32, 3)), ("init", (32, 32, 3)), ("tall", (48, 32, 3))):
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(root / f"{name}.png")
    return root


@pytest.mark.parametrize("model, args, message", [
    ("sd", ["--control-image", "edges.png"], "--control-image needs a ControlNet: give --controlnet"),
    ("sd", ["--controlnet", "cn"], "1 ControlNet(s) need 1 --control-image(s), got 0."),
    ("sd", ["--controlnet", "cn", "--controlnet", "cn2", "--control-image", "edges.png"],
     "2 ControlNet(s) need 2 --control-image(s), got 1."),
    ("sd", ["--controlnet", "cn", "--control-image", "tall.png", "--size", "32"],
     "--control-image tall.png is 48x32 px but the image is 32x32 px (--size): give control images"),
    ("sd", ["--controlnet", "cn", "--control-image", "edges.png", "--control-image", "tall.png",
            "--controlnet", "cn2"], "--control-image tall.png is 48x32 px but the image is 32x32 px: give"),
    ("sd", ["--controlnet", "gray", "--control-image", "edges.png"],
     "takes control images of 1 channels; the CLI gives it RGB pictures (3 channels)."),
    ("sd", ["--controlnet", "./nope", "--control-image", "edges.png"], "--controlnet ./nope: no such folder."),
    ("sd", ["--controlnet", "someone/nothing", "--control-image", "edges.png"], "not in the Hugging Face cache"),
    ("inpaint", ["--controlnet", "cn", "--control-image", "edges.png"],
     "--controlnet needs an SD 1.x/2.x or SDXL text-to-image model; "),
    ("sd", ["--controlnet", "cn", "--control-image", "edges.png", "--image", "init.png", "--mask", "init.png"],
     "--mask cannot be combined with a ControlNet"),
    # the tiny SD UNet over 4 patches needs 8 latent rows (16 px): a 48 px image has 24 rows, 40 px 20
    ("sd", ["--controlnet", "cn", "--control-image", "tall.png", "--method", "patch", "--nproc", "4"],
     "no error"),
])
def test_generate_controlnet_mistakes_are_one_line_before_any_rank(folders, monkeypatch, capsys, model, args,
                                                                   message):
    from paradiff import launch
    from paradiff.cli import main

    started = []
    monkeypatch.setattr(launch, "launch", lambda *_, **__: started.append(True) or 0)
    monkeypatch.setattr("paradiff.pipelines.hub_reachable", lambda *_, **__: False)  # offline, and fast
    monkeypatch.chdir(folders)
    code = main(["generate", "x", "--model", str(folders / model), *args])
    err = capsys.readouterr().err.strip()
    if message == "no error":
        assert code == 0 and started, err
        return
    assert code == 2 and not started
    assert err.startswith("paradiff: error: ") and message in err and "\n" not in err, err


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_generate_with_controlnets(folders):
    """From the CLI: one ControlNet (text to image), two (MultiControlNet) with --image (img2img), and the first
    again under `--method patch --nproc 2 --warmup-steps 2`, which writes the serial image (within 1 level)."""
    from PIL import Image

    from cli_utils import run_cli

    base = ["generate", "a red circle", "--model", str(folders / "sd"), "--steps", "2"]
    one = ["--controlnet", str(folders / "cn"), "--control-image", str(folders / "edges.png")]
    two = one + ["--controlnet", str(folders / "cn2"), "--control-image", str(folders / "init.png"),
                 "--image", str(folders / "init.png")]
    for name, extra in (("one", one), ("two", two), ("patch", one + ["--method", "patch", "--nproc", "2",
                                                                      "--warmup-steps", "2"])):
        proc, _ = run_cli(*base, *extra, "-o", str(folders / f"{name}.png"))
        assert proc.returncode == 0, proc.stderr
        assert Image.open(folders / f"{name}.png").size == (32, 32)
    one, patch = (np.asarray(Image.open(folders / f"{n}.png"), np.int16) for n in ("one", "patch"))
    assert np.abs(one - patch).max() <= 1


# -- shipped configs: parameter counts, the async split, the benchmark step ---------------------------------------
@pytest.mark.parametrize("arch, count, pipeline", [
    ("sd15-controlnet", 361_279_120, "StableDiffusionControlNetPipeline"),
    ("sdxl-controlnet", 1_251_014_160, "StableDiffusionXLControlNetPipeline"),  # = ControlNetModel.from_unet(SDXL)
])
def test_shipped_controlnet_configs(arch, count, pipeline):
    """The ControlNet's parameters on the meta device; the whole pipeline builds; the async splits with the
    ControlNet's blocks in them are balanced, and over 4 the ControlNet spans two components."""
    from paradiff import archs
    from paradiff.methods.split import split

    assert archs.parameter_count(arch, "controlnet") == count
    assert type(archs.build_pipeline(arch, device="meta")).__name__ == pipeline
    unet, net = archs.build_model(arch, device="meta"), archs.build_controlnet(arch, device="meta")
    for n in (2, 3, 4):
        plan = split(unet, n, net)
        comps = {plan.component_of(u) for u in plan.controlnet_units}
        assert plan.balance <= 1.3 and comps, (arch, n, plan.balance)
        assert n < 4 or len(comps) > 1, (arch, n, comps)
    assert archs.build_controlnet("sd15", device="meta") is None


def test_bench_step_includes_the_controlnet():
    """`bench --what step` on a ControlNet model times the ControlNet's call and the UNet's, in one module (so
    the compiled baseline compiles both); the pipeline's step timer spans both calls."""
    from paradiff import bench
    from support.models import tiny_controlnet, tiny_unet

    unet, net = tiny_unet("sd-wide"), tiny_controlnet()
    calls = []
    net.register_forward_pre_hook(lambda *_: calls.append("controlnet"))
    unet.register_forward_pre_hook(lambda *_: calls.append("unet"))
    rows = bench.bench_denoiser(unet, batch=2, height=128, width=128, dtype=torch.float32, device=torch.device("cpu"),
                                variants=("eager",), runs=2, warmup=0, controlnet=net)
    assert [r.what for r in rows] == ["step"] and calls == ["controlnet", "unet"] * 2
    pipe = _build("sd")
    rows = bench.bench_pipeline(pipe, variant="eager", prompt="x", steps=2, height=32, width=32, guidance=None,
                                device=torch.device("cpu"), runs=1, warmup=0)
    assert next(r for r in rows if r.what == "step").runs == 2


def _stride_two(warmup: int) -> tuple:
    import paradiff

    serial = _call(_build("sd"), "sd")
    pipe = paradiff.parallelize(_build("sd"), paradiff.AsyncDenoise(stride=2, warmup_steps=warmup))
    pipe.set_progress_bar_config(disable=True)
    first, again = _call(pipe, "sd"), _call(pipe, "sd")
    return _diff(first, serial), _diff(first, again), _tolerance(serial)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_controlnet_under_async_stride_two():
    """Stride 2 (3 ranks): exact with warm-up over every step; with warm-up 1 it runs, repeats, and differs."""
    for diff, repeat, tolerance in run_ranks(_stride_two, 3, STEPS, timeout=380):
        assert diff <= tolerance and repeat == 0.0
    for diff, repeat, tolerance in run_ranks(_stride_two, 3, 1, timeout=380):
        assert diff > tolerance and repeat == 0.0
