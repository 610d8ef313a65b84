"""The embedded reference model: a small trained text-to-image pipeline shipped in the package.

`DEFAULT_MODEL` (25-step DDIM, v-prediction, CFG) and `FAST_MODEL` (LCM few-step distillation with the guidance
baked in; sample with guidance_scale <= 1) are folders in the diffusers `StableDiffusionPipeline` format, so
`StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL)` works offline. This module imports no torch.
"""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))
MODELS_DIR = os.path.join(_HERE, "models")
DEFAULT_MODEL = os.path.join(MODELS_DIR, "shapes-sd")
FAST_MODEL = os.path.join(MODELS_DIR, "shapes-sd-fast")

__all__ = ["DEFAULT_MODEL", "FAST_MODEL", "MODELS_DIR"]
