"""benchmarks/stream_bench.py runs end to end on a tiny CPU pipeline and writes JSON + markdown."""

import importlib.util
import json
from pathlib import Path

import torch

torch.set_num_threads(1)

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "stream_bench.py"


def test_stream_bench_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("stream_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    code = bench.main(["--tiny", "--device", "cpu", "--iters", "2", "--warmup", "0", "--out", str(tmp_path),
                       "--configs", "img2img-1step-b1,stream-2step-self-b1"])
    assert code == 0
    result = json.loads((tmp_path / "stream-bench.json").read_text())
    configs = {row["config"] for row in result["rows"]}
    assert {"img2img-1step-b1", "stream-2step-self-b1", "diffusers-img2img-1step-b1"} <= configs
    assert all(row["frames_per_s"] > 0 for row in result["rows"])
    assert result["ratios"]["img2img-1step-b1"]["speedup"] > 0
    assert result["versions"]["diffusers"] and result["date"] and result["command"]
    assert "| config |" in (tmp_path / "stream-bench.md").read_text()


def test_stream_bench_models_options_and_profile_tiny(tmp_path):
    """The SDXL and ControlNet configs, an engine option set and the profile mode, on toy pipelines."""
    spec = importlib.util.spec_from_file_location("stream_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    code = bench.main(["--tiny", "--device", "cpu", "--iters", "2", "--warmup", "0", "--out", str(tmp_path),
                       "--configs", "img2img-1step-b1,sdxl-img2img-1step-b1,controlnet-img2img-1step-b1",
                       "--options", "channels_last+attention=math,contiguous+fuse_qkv+inductor=tuned",
                       "--option-configs", "img2img-1step-b1",
                       "--profile", "--no-baseline", "--cudnn-benchmark"])
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False  # process-wide: undo
    assert code == 0 and benchmark
    result = json.loads((tmp_path / "stream-bench.json").read_text())
    runs = {(row["config"], row["options"]) for row in result["rows"]}
    assert runs == {("img2img-1step-b1", "default"), ("sdxl-img2img-1step-b1", "default"),
                    ("controlnet-img2img-1step-b1", "default"), ("img2img-1step-b1", "channels_last+attention=math"),
                    ("img2img-1step-b1", "contiguous+fuse_qkv+inductor=tuned")}
    profiles = {entry["config"]: entry for entry in result["profile"]}
    assert set(profiles) == {"img2img-1step-b1", "sdxl-img2img-1step-b1", "controlnet-img2img-1step-b1"}
    cn = profiles["controlnet-img2img-1step-b1"]["ms_by_component"]
    assert {"encode", "controlnet", "preprocess", "unet", "decode", "other"} <= set(cn) and cn["unet"] > 0
    assert "| component |" in (tmp_path / "stream-bench.md").read_text()
