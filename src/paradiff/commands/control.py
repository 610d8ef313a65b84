"""`paradiff generate --controlnet ... --control-image ...`: the ControlNet pipelines from the CLI.

The model's own pipeline (model_index.json) picks the ControlNet pipeline: SD 1.x/2.x -> StableDiffusion-
ControlNetPipeline, SDXL -> StableDiffusionXLControlNetPipeline, their img2img variants when `--image` is given.
A folder saved from a ControlNet pipeline already has its ControlNet; `--controlnet` (repeatable: a
MultiControlNet) adds or replaces it. The pipeline is made with `from_pipe`, so nothing is loaded twice.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from paradiff.errors import UserError

# base pipeline class -> (text-to-image, img2img) ControlNet pipeline classes
CONTROLNET_PIPELINES = {
    "StableDiffusionPipeline": ("StableDiffusionControlNetPipeline", "StableDiffusionControlNetImg2ImgPipeline"),
    "StableDiffusionXLPipeline": ("StableDiffusionXLControlNetPipeline",
                                  "StableDiffusionXLControlNetImg2ImgPipeline"),
}
BASE_OF = {cls: base for base, pair in CONTROLNET_PIPELINES.items() for cls in pair}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--controlnet", action="append", default=None, metavar="ID_OR_PATH",
                        help="a ControlNet (hub id or folder); repeat for a MultiControlNet")
    parser.add_argument("--control-image", action="append", default=None, metavar="PNG",
                        help="the ControlNet's control image (the output's size); one per --controlnet")


def _controlnet_config(ref: str) -> dict | None:
    """config.json of a ControlNet folder or cached hub id (None when not at hand); a missing folder is an error."""
    import json

    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"--controlnet {ref}: the folder has no config.json, so it is not a ControlNet folder.")
        return json.loads((path / "config.json").read_text())
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise UserError(f"--controlnet {ref}: no such folder.")
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(ref, "config.json", local_files_only=True)).read_text())
    except Exception:  # noqa: BLE001 - not cached: the hub may have it
        from paradiff.pipelines import hub_reachable

        if not hub_reachable():
            raise UserError(f"--controlnet {ref}: not a local folder, not in the Hugging Face cache, and the hub "
                            "cannot be reached from this machine (offline).") from None
        return None


def control_inputs(args: argparse.Namespace, facts: dict, open_image: Any) -> tuple[dict, tuple | None]:
    """The ControlNet arguments of the pipeline call and the output size they fix (None: no ControlNet), checked
    against the model's pipeline class and the ControlNets' configs; one-line UserErrors."""
    cls, name = facts["class_name"], facts["name"]
    nets, images = args.controlnet or [], args.control_image or []
    folder_net = cls in BASE_OF
    if not nets and not folder_net:
        if images:
            raise UserError(f"--control-image needs a ControlNet: give --controlnet ID_OR_PATH ({name} is a {cls}).")
        return {}, None
    if (nets or folder_net) and (cls not in CONTROLNET_PIPELINES and not folder_net):
        raise UserError(f"--controlnet needs an SD 1.x/2.x or SDXL text-to-image model; {name} is a {cls}.")
    if args.mask:
        raise UserError("--mask cannot be combined with a ControlNet (ControlNet inpainting is not supported).")
    count = len(nets) or 1
    if len(images) != count:
        raise UserError(f"{count} ControlNet(s) need {count} --control-image(s), got {len(images)}.")
    for ref in nets:
        config = _controlnet_config(ref)
        channels = (config or {}).get("conditioning_channels", 3)
        if channels != 3:
            raise UserError(f"--controlnet {ref} takes control images of {channels} channels; the CLI gives it RGB "
                            "pictures (3 channels).")
    pictures = [open_image("--control-image", path, "RGB") for path in images]
    sizes = {(p.height, p.width) for p in pictures}
    size = args.size or (pictures[0].height, pictures[0].width)
    for path, picture in zip(images, pictures):
        if (picture.height, picture.width) != tuple(size):
            raise UserError(f"--control-image {path} is {picture.height}x{picture.width} px but the image is "
                            f"{size[0]}x{size[1]} px{' (--size)' if args.size else ''}: give control images of "
                            "the output's size.")
    if len(sizes) == 1 and (size[0] % 8 or size[1] % 8):
        raise UserError(f"--control-image is {size[0]}x{size[1]} px; the output needs sides that are multiples of 8: "
                        f"resize it or give --size.")
    control = pictures if len(pictures) > 1 else pictures[0]
    kwargs = {"height": size[0], "width": size[1]}
    kwargs["control_image" if args.image else "image"] = control
    return kwargs, tuple(size)


def controlnet_pipeline(pipe: Any, args: argparse.Namespace, dtype: Any) -> Any:
    """`pipe` as the ControlNet pipeline the flags ask for (`from_pipe`: components shared), or itself."""
    import diffusers

    cls = type(pipe).__name__
    refs, img2img = getattr(args, "controlnet", None), getattr(args, "image", None)  # serve has no --image
    if not refs and cls not in BASE_OF:
        return pipe
    if cls not in BASE_OF and cls not in CONTROLNET_PIPELINES:
        raise UserError(f"--controlnet needs an SD 1.x/2.x or SDXL text-to-image model; this model is a {cls}.")
    pair = CONTROLNET_PIPELINES[BASE_OF.get(cls, cls)]
    extra = {}
    if refs:
        nets = [_load_controlnet(ref, dtype) for ref in refs]
        extra["controlnet"] = nets[0] if len(nets) == 1 else diffusers.MultiControlNetModel(nets)
    target = getattr(diffusers, pair[1 if img2img else 0])
    return pipe if (type(pipe) is target and not extra) else target.from_pipe(pipe, **extra)


def _load_controlnet(ref: str, dtype: Any):
    from diffusers import ControlNetModel

    try:
        return ControlNetModel.from_pretrained(str(Path(ref).expanduser()) if Path(ref).expanduser().exists() else ref,
                                               torch_dtype=dtype)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UserError(f"--controlnet {ref}: could not load it ({reason}).") from None
