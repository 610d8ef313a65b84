"""The benchmark harness measures and writes results that say how they were produced."""

import json

import pytest
import torch

from cli_utils import run_cli
from paradiff import bench
from paradiff.errors import UserError


@pytest.mark.slow  # ~15 s; test_step_timer_counts_each_denoiser_call is the fast one
def test_bench_cli_step_and_e2e(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "r.json"
    proc, _ = run_cli("bench", "--arch", str(tiny_pipeline_dir), "--what", "all", "--variants", "eager",
                      "--runs", "4", "--warmup", "1", "--steps", "2", "--size", "32", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    for key in ("date", "command", "device", "torch", "diffusers"):
        assert data[key]
    whats = sorted(r["what"] for r in data["rows"])
    assert whats == ["e2e", "step", "step"]
    assert all(r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] <= r["max_ms"] for r in data["rows"])
    assert out.with_suffix(".md").read_text().count("| step | eager |") == 2


def test_step_timer_counts_each_denoiser_call(tiny_pipeline_dir):
    from paradiff import archs

    pipe = archs.build_pipeline(str(tiny_pipeline_dir))
    pipe.set_progress_bar_config(disable=True)
    rows = bench.bench_pipeline(pipe, variant="eager", prompt="x", steps=3, height=32, width=32, guidance=None,
                                device=torch.device("cpu"), runs=2, warmup=0, skip_steps=1)
    step = next(r for r in rows if r.what == "step")
    assert step.runs == 2 * (3 - 1)  # two runs, first step of each skipped


def test_speedup_is_relative_to_compiled():
    rows = [bench.Row("step", "compiled", 10, 9, 11, 3, None), bench.Row("step", "patch x2", 5, 5, 6, 3, None)]
    assert bench.speedups(rows)["step:patch x2"] == pytest.approx(2.0)


def test_max_autotune_is_refused():
    with pytest.raises(UserError, match="not offered"):
        bench.compile_model(torch.nn.Linear(2, 2), "max-autotune")


def test_sdxl_inputs_have_added_conditioning():
    from paradiff import archs

    unet = archs.build_model("sdxl", device="meta")
    args, kwargs = bench.denoiser_inputs(unet, 2, 1024, 1024, dtype=torch.float16, device="meta")
    assert args[0].shape == (2, 4, 128, 128)
    assert kwargs["encoder_hidden_states"].shape == (2, 77, 2048)
    assert kwargs["added_cond_kwargs"]["text_embeds"].shape == (2, 1280)


@pytest.mark.slow  # 2 ranks
def test_bench_a_method_on_two_ranks_against_the_baseline(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "cfg.json"
    proc, _ = run_cli("bench", "--arch", str(tiny_pipeline_dir), "--what", "e2e", "--method", "cfg", "--nproc", "2",
                      "--variants", "eager", "--runs", "4", "--warmup", "1", "--steps", "2", "--size", "32",
                      "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    variants = {(r["what"], r["variant"]) for r in data["rows"]}
    assert {("e2e", "eager"), ("e2e", "cfg x2"), ("step", "cfg x2")} <= variants
    assert data["ranks"] == 2 and data["method"] == "cfg"


@pytest.mark.slow  # ~15 s (SDXL's split); test_async.py::test_sdxl_split_is_balanced_on_meta is in the fast tier
def test_explain_prints_the_async_split_without_starting_ranks():
    proc, _ = run_cli("bench", "--arch", "sdxl", "--method", "async", "--nproc", "2", "--explain")
    assert proc.returncode == 0, proc.stderr
    assert "into 2 components" in proc.stdout and "balance max/min" in proc.stdout


def test_explain_needs_the_async_method():
    proc, _ = run_cli("bench", "--arch", "sdxl", "--method", "patch", "--nproc", "2", "--explain")
    assert proc.returncode == 2 and "--method async" in proc.stderr
