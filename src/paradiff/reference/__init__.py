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
# The main model's CFG scale: 25-step adherence on the 64 held-out prompts is 93.8% at 3.0, 84.4% at 5.0 and 70.3%
# at diffusers' default 7.5 (benchmarks/results/reference-models.md). The fast model has 3.0 baked in.
DEFAULT_GUIDANCE = 3.0

__all__ = ["DEFAULT_GUIDANCE", "DEFAULT_MODEL", "FAST_MODEL", "MODELS_DIR"]
