"""The reference ControlNet's pieces: the silhouette condition, the map-adherence metric, the trainer's stage and the
`paradiff eval --controlnet` path, end to end on CPU with a tiny untrained ControlNet."""

import json
import os

import numpy as np
import pytest

from paradiff.errors import UserError
from paradiff.reference import data
from paradiff.reference.checker import map_adherence

from cli_utils import run_cli


def test_silhouette_is_the_rendered_shapes():
    scenes = data.SceneSampler(5).batch(16)
    img = data.render_numpy(scenes).astype(int)
    sil = data.render_numpy(scenes, silhouette=True)
    assert sil.shape == img.shape and (sil[..., 0] == sil[..., 2]).all()
    flat = [data.Scene(s.background, s.gradient, ()) for s in scenes]  # the same scenes without their shapes
    bg = data.render_numpy(flat).astype(int)
    moved = np.abs(img - bg).max(-1) > 0
    inside = sil[..., 0] > 0
    assert (moved == inside).mean() > 0.999  # a shape pixel is exactly a pixel whose colour the shapes changed


def test_position_free_captions_and_control_set():
    cases = data.control_heldout_set(8)
    assert cases == data.control_heldout_set(8)  # deterministic (maps compared below)
    assert [(c.caption, c.seed) for c in cases] == data.heldout_set(8)
    for c in cases:
        assert not any(p in c.prompt for p in data.POSITION_PHRASES.values())
        scene = data.parse_caption(c.caption)
        assert c.prompt == data.caption(scene, positions=False)
        np.testing.assert_array_equal(c.control, data.render_numpy([scene], silhouette=True)[0])
    assert data.control_heldout_set(2, positions=True)[0].prompt == cases[0].caption


def test_map_adherence_reads_position_and_shape():
    cases = data.control_heldout_set(16)
    for c in cases:
        scene = data.parse_caption(c.caption)
        image = data.render_numpy([scene])[0]
        ok = map_adherence(image, c.control)
        assert ok.matched and ok.iou > 0.8 and max(ok.centroid_errors) < 1.5, c.caption
        # 16 px sideways, towards the middle (so the shape stays whole)
        moved = [data.Shape(s.kind, s.color, s.size, s.position, dx=16.0 if data.POSITIONS[s.position][0] <= 0.5
                            else -16.0) for s in scene.shapes]
        shifted = map_adherence(data.render_numpy([data.Scene(scene.background, scene.gradient, tuple(moved))])[0],
                                c.control)
        assert not shifted.matched and shifted.iou < 0.5 and min(shifted.centroid_errors) > 15, c.caption
    # same place, another shape: position holds, IoU does not
    one = data.Scene("black", False, (data.Shape("circle", "white", "large", "center"),))
    star = data.Scene("black", False, (data.Shape("star", "white", "large", "center"),))
    res = map_adherence(data.render_numpy([star])[0], data.render_numpy([one], silhouette=True)[0])
    assert max(res.centroid_errors) < 3 and res.iou < 0.75
    # a missing shape
    two = data.control_heldout_set(64)
    pair = next(c for c in two if " and " in c.caption)
    first = data.parse_caption(pair.caption)
    lone = data.Scene(first.background, first.gradient, first.shapes[:1])
    res = map_adherence(data.render_numpy([lone])[0], pair.control)
    assert not res.matched and not res.count and any(np.isinf(res.centroid_errors))


def test_missing_controlnet_is_a_user_error(tmp_path):
    from paradiff.reference import load_controlnet

    with pytest.raises(UserError, match="no ControlNet at"):
        load_controlnet(str(tmp_path))


@pytest.fixture(scope="module")
def smoke_controlnet(tmp_path_factory):
    """The trainer's controlnet stage in --smoke mode (3 CPU steps): a real, barely trained ControlNet folder."""
    from paradiff.reference import train

    out = tmp_path_factory.mktemp("refcn")
    assert train.main(["--stage", "controlnet", "--out", str(out), "--smoke"]) == 0
    return out / "shapes-controlnet"


def test_trainer_stage_writes_a_small_controlnet_folder(smoke_controlnet):
    files = {f: os.path.getsize(smoke_controlnet / f) for f in os.listdir(smoke_controlnet)}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "training.json"} <= set(files)
    assert sum(files.values()) <= 15 * 2**20
    cfg = json.loads((smoke_controlnet / "config.json").read_text())
    assert cfg["_class_name"] == "ControlNetModel" and cfg["conditioning_embedding_out_channels"] == [16, 32, 64]
    st = json.loads((smoke_controlnet / "training.json").read_text())["stages"]["controlnet"]
    assert st["command"].startswith("python -m paradiff.reference.train --stage controlnet")
    for k in ("steps", "map_adherence_nopos", "map_iou_nopos", "adherence_full", "map_iou_full"):
        assert k in st["metrics"], k


def test_untrained_controlnet_pipeline_equals_the_base_model(smoke_controlnet, tmp_path):
    """from_unet's zero convolutions: before training the ControlNet adds nothing, so the wiring (control image
    size, residuals, CFG) is checked exactly against the plain pipeline; a smoke-trained one already differs."""
    import torch
    from diffusers import ControlNetModel, StableDiffusionPipeline

    from paradiff.reference import DEFAULT_MODEL, controlnet_pipeline
    from paradiff.reference.train import CONTROLNET_EMBEDDING_CHANNELS

    torch.set_num_threads(2)
    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    fresh = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=CONTROLNET_EMBEDDING_CHANNELS)
    fresh.save_pretrained(tmp_path / "cn")
    case = data.control_heldout_set(1)[0]
    kw = dict(num_inference_steps=2, guidance_scale=3.0, output_type="np")
    base = pipe(case.prompt, generator=torch.Generator().manual_seed(1), **kw).images[0]
    cpipe = controlnet_pipeline(pipe, str(tmp_path / "cn"))
    from PIL import Image

    with_cn = cpipe(case.prompt, image=Image.fromarray(case.control), generator=torch.Generator().manual_seed(1),
                    **kw).images[0]
    np.testing.assert_allclose(with_cn, base, atol=1e-5)
    trained = controlnet_pipeline(pipe, str(smoke_controlnet))
    moved = trained(case.prompt, image=Image.fromarray(case.control), generator=torch.Generator().manual_seed(1),
                    **kw).images[0]
    assert np.abs(moved - base).max() > 1e-4


def test_eval_cli_with_controlnet(smoke_controlnet, tmp_path):
    out = tmp_path / "r.json"
    proc, _ = run_cli("eval", "--controlnet", str(smoke_controlnet), "--prompts", "2", "--steps", "2",
                      "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "map adherence" in proc.stdout
    res = json.loads(out.read_text())
    assert res["config"]["pipeline"] == "StableDiffusionControlNetPipeline" and res["config"]["control_maps"]
    s = res["serial"]
    assert s["checked"] == 2 and 0 <= s["map_adherence"] <= 1 and 0 <= s["map_iou"] <= 1
    cases = data.control_heldout_set(2)
    assert [r["prompt"] for r in res["rows"]] == [c.prompt for c in cases]
    assert [r["checked_caption"] for r in res["rows"]] == [c.caption for c in cases]
    proc, _ = run_cli("eval", "--control-captions", "full", "--prompts", "1")
    assert proc.returncode != 0 and "--control-captions needs --controlnet" in proc.stderr
