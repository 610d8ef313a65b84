"""The evaluator: fidelity metrics behave, serial-only adherence works, and an exact method scores as exact."""

import json
import math

import numpy as np
import pytest

from paradiff import evaluate


def test_metrics_on_identical_and_perturbed_images():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    same = evaluate.compare_images(a, a.copy())
    assert math.isinf(same["psnr"]) and same["max_abs_diff"] == 0 and same["ssim"] == pytest.approx(1.0)
    b = a.astype(np.int16)
    b[0, 0, 0] = (b[0, 0, 0] + 100) % 256
    b = b.astype(np.uint8)
    diff = evaluate.compare_images(a, b)
    mse = (int(a[0, 0, 0]) - int(b[0, 0, 0])) ** 2 / a.size
    assert diff["psnr"] == pytest.approx(10 * math.log10(255**2 / mse))
    assert diff["max_abs_diff"] == abs(int(a[0, 0, 0]) - int(b[0, 0, 0]))
    smooth = np.broadcast_to(np.linspace(0, 255, 64)[None, :, None], (64, 64, 3)).astype(np.uint8)
    noisy = np.clip(smooth.astype(int) + rng.integers(-40, 41, smooth.shape), 0, 255).astype(np.uint8)
    assert evaluate.compare_images(smooth, noisy)["ssim"] < 0.5
    floats = evaluate.compare_images(a.astype(np.float32) / 255, a)  # float [0,1] outputs are quantised the same
    assert floats["max_abs_diff"] == 0
    with pytest.raises(ValueError):
        evaluate.compare_images(a, a[:32])


def _reference_pipe(threads: int | None = 2):
    """The reference model; `threads=None` in rank processes, which keep run_ranks' one thread each (two ranks
    of two threads on two CPUs run several times slower)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from paradiff.reference import DEFAULT_MODEL

    if threads:
        torch.set_num_threads(threads)
    return StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL)


def test_serial_only_adherence_report_and_json(tmp_path):
    pipe = _reference_pipe()
    prompts = [("a large orange circle at the bottom, green background", 1002),  # matches at 25 steps
               "an astronaut riding a horse"]  # outside the grammar: generated, not scored
    res = evaluate.evaluate(pipe, [], prompts=prompts, steps=25, guidance=5.0)
    assert res["method"] is None and res["vs_serial"] is None
    assert res["serial"]["checked"] == 1 and res["serial"]["adherence"] == 1.0
    assert [r["serial_match"] for r in res["rows"]] == [True, None]
    assert res["rows"][1]["seed"] == 1
    text = evaluate.format_report(res, max_rows=3)
    assert "serial" in text and "LPIPS" in text
    path = tmp_path / "r.json"
    evaluate.write_json(res, str(path))
    assert json.loads(path.read_text())["config"]["steps"] == 25
    res2 = evaluate.evaluate(pipe, [], prompts=prompts[:1], steps=2, guidance=5.0, seed=1)
    assert res2["rows"][0]["seed"] == 1003
    # the serial images of an earlier run (test_fidelity.py compares three methods against one serial run)
    with pytest.raises(ValueError, match="give methods too"):
        evaluate.evaluate(pipe, [], prompts=prompts, steps=2, serial_images=[object(), object()])
    with pytest.raises(ValueError, match="serial_images has 1 entries for 2 prompts"):
        evaluate.evaluate(pipe, ["a method"], prompts=prompts, steps=2, serial_images=[object()])


def test_defaults_follow_the_scheduler():
    from diffusers import DiffusionPipeline

    from paradiff.reference import FAST_MODEL

    fast = DiffusionPipeline.from_pretrained(FAST_MODEL)
    assert evaluate.default_steps(fast) == 4 and evaluate.default_guidance(fast) == 1.0
    res = evaluate.evaluate(fast, [], num_prompts=2)
    assert res["config"]["steps"] == 4 and res["config"]["guidance"] == 1.0 and len(res["rows"]) == 2
    with pytest.raises(ValueError):
        evaluate.evaluate(fast, [], num_prompts=0)


def _two_rank_cfg_eval():
    from paradiff.methods.cfg import CFGParallel

    res = evaluate.evaluate(_reference_pipe(threads=None), [CFGParallel()], num_prompts=2, steps=6)
    return {k: res[k] for k in ("serial", "method", "vs_serial", "config")}


@pytest.mark.slow
def test_exact_method_scores_as_exact_on_two_ranks():
    from support.distributed import run_ranks

    outs = run_ranks(_two_rank_cfg_eval, 2, timeout=240)
    for out in outs:  # every rank computes the same serial reference and the same report
        assert out["config"]["world_size"] == 2
        assert out["vs_serial"]["max_abs_diff"] <= 2  # CFG parallel is exact up to float reassociation
        assert out["vs_serial"]["psnr_min"] > 45
        assert out["vs_serial"]["ssim_min"] > 0.999
        assert out["method"]["adherence"] == out["serial"]["adherence"]
    assert outs[0]["vs_serial"] == outs[1]["vs_serial"]
