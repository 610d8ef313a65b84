"""The embedded reference model: a small trained text-to-image pipeline shipped in the package.

`DEFAULT_MODEL` (25-step DDIM, v-prediction, CFG) and `FAST_MODEL` (LCM few-step distillation with the guidance
baked in; sample with guidance_scale <= 1) are folders in the diffusers `StableDiffusionPipeline` format, so
`StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL)` works offline. `CONTROLNET_MODEL` is a diffusers
`ControlNetModel` folder for `DEFAULT_MODEL`, conditioned on the scene's shape silhouette
(`data.render_silhouette`); `controlnet_pipeline` pairs them. This module imports no torch at import time.
"""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))
MODELS_DIR = os.path.join(_HERE, "models")
DEFAULT_MODEL = os.path.join(MODELS_DIR, "shapes-sd")
FAST_MODEL = os.path.join(MODELS_DIR, "shapes-sd-fast")
CONTROLNET_MODEL = os.path.join(MODELS_DIR, "shapes-controlnet")
# The main model's CFG scale: 25-step adherence on the 64 held-out prompts is 93.8% at 3.0, 84.4% at 5.0 and 70.3%
# at diffusers' default 7.5 (benchmarks/results/reference-models.md). The fast model has 3.0 baked in.
DEFAULT_GUIDANCE = 3.0



def load_controlnet(path: str | None = None, dtype=None):
    """The ControlNetModel at `path` (default `CONTROLNET_MODEL`); a UserError, not a traceback, when it is absent."""
    from paradiff.errors import UserError

    path = CONTROLNET_MODEL if path is None else path
    if not os.path.isfile(os.path.join(path, "config.json")):
        hint = (" (the reference ControlNet is not shipped in this build; train one with `python -m "
                "paradiff.reference.train --stage controlnet --out DIR`)" if path == CONTROLNET_MODEL else "")
        raise UserError(f"no ControlNet at {path}: it needs a diffusers ControlNetModel folder with config.json{hint}.")
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(path, **({"torch_dtype": dtype} if dtype is not None else {}))


def controlnet_pipeline(pipe, controlnet=None):
    """`pipe` (a StableDiffusionPipeline) as a StableDiffusionControlNetPipeline sharing its components, with the
    ControlNet at `controlnet` (a folder, default `CONTROLNET_MODEL`, or a loaded ControlNetModel) in pipe's dtype."""
    from diffusers import StableDiffusionControlNetPipeline

    if controlnet is None or isinstance(controlnet, str):
        controlnet = load_controlnet(controlnet, dtype=pipe.unet.dtype)
    controlnet.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
    return StableDiffusionControlNetPipeline.from_pipe(pipe, controlnet=controlnet)


__all__ = ["CONTROLNET_MODEL", "DEFAULT_GUIDANCE", "DEFAULT_MODEL", "FAST_MODEL", "MODELS_DIR", "controlnet_pipeline",
           "load_controlnet"]
