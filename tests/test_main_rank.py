"""Under a parallel method, prompt encoding and VAE decoding run on rank 0 only (2 gloo ranks, tiny SD and SDXL):
rank 0's image equals serial, the other rank never runs the text encoders or the decoder and has freed them."""

from __future__ import annotations

import copy

import pytest
import torch

from support.distributed import run_ranks

pytestmark = pytest.mark.slow


def _pipeline(kind: str):
    from support.models import tiny_sd_pipeline, tiny_sdxl_pipeline

    return tiny_sd_pipeline() if kind == "sd" else tiny_sdxl_pipeline()


def _run(kind: str, main_rank_stages: bool):
    from paradiff import CFGParallel, runtime
    from paradiff.parallel import parallelize

    rt = runtime.init()
    pipe = _pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=["a red circle", "a blue star"], num_inference_steps=3, height=32, width=32,
                output_type="pt", guidance_scale=5.0)
    serial = copy.deepcopy(pipe)(**call, generator=torch.Generator().manual_seed(0)).images
    runs = {"text": 0, "decoder": 0}
    encoders = [m for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m]
    # counted where the computation runs (the encoder and decoder modules themselves are called on every rank:
    # on ranks other than 0 a stand-in answers for them)
    for encoder in encoders:
        encoder.get_input_embeddings().register_forward_pre_hook(
            lambda *_: runs.__setitem__("text", runs["text"] + 1))
    pipe.vae.decoder.conv_in.register_forward_pre_hook(lambda *_: runs.__setitem__("decoder", runs["decoder"] + 1))
    parallelize(pipe, CFGParallel(), main_rank_stages=main_rank_stages)
    images = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    # the embeddings can also be passed in: rank 0 passes them through, the others receive them
    embeds = pipe.encode_prompt(prompt="a red circle", device=torch.device("cpu"), num_images_per_prompt=1,
                                do_classifier_free_guidance=True)
    try:  # a user mistake on rank 0 is raised on every rank, not left as a hang
        pipe.encode_prompt(prompt=42, device=torch.device("cpu"), num_images_per_prompt=1,
                           do_classifier_free_guidance=True)
        bad_prompt = None
    except Exception as err:  # noqa: BLE001
        bad_prompt = type(err).__name__
    return {
        "rank": rt.rank,
        "diff": (images - serial).abs().max().item(),
        "blank": bool((images == images.flatten()[0]).all()),
        "runs": runs,
        "encoder_numel": sum(p.numel() for m in encoders for p in m.parameters()),
        "decoder_numel": sum(p.numel() for p in pipe.vae.decoder.parameters()),
        "encoder_kept": sum(p.numel() for p in pipe.vae.encoder.parameters()),
        "embeds": [e.shape if e is not None else None for e in embeds],
        "bad_prompt": bad_prompt,
    }


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_prompt_encoding_and_decoding_on_rank_0_only(kind):
    main, other = run_ranks(_run, 2, kind, True)
    assert main["diff"] < 1e-5, f"rank 0's image differs from serial by {main['diff']}"
    assert main["runs"]["text"] >= 1 and main["runs"]["decoder"] == 1
    assert main["encoder_numel"] > 0 and main["decoder_numel"] > 0
    assert other["runs"] == {"text": 0, "decoder": 0}, "rank 1 ran a stage that rank 0 does for everyone"
    assert other["encoder_numel"] == 0 and other["decoder_numel"] == 0, "rank 1 should free those weights"
    assert other["encoder_kept"] > 0, "the VAE encoder (img2img) stays on every rank"
    assert other["blank"], "rank 1 returns placeholder images"
    assert other["embeds"] == main["embeds"]
    assert main["bad_prompt"] is not None and other["bad_prompt"] == main["bad_prompt"]


def test_main_rank_stages_off_keeps_every_stage_on_every_rank():
    for out in run_ranks(_run, 2, "sd", False):
        assert out["diff"] < 1e-5
        assert out["runs"]["text"] >= 1 and out["runs"]["decoder"] == 1 and out["decoder_numel"] > 0
