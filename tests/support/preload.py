"""Imported once by run_ranks' fork server, so each rank process forks with torch, diffusers, transformers and
paradiff already imported instead of importing them anew (seconds per process on a 2-CPU machine)."""

import importlib

for _name in ("torch", "diffusers", "transformers", "paradiff", "paradiff.comm", "paradiff.methods", "support.models"):
    importlib.import_module(_name)

# diffusers and transformers import their classes lazily, on first access: load the ones the tests build
_diffusers, _transformers = importlib.import_module("diffusers"), importlib.import_module("transformers")
for _cls in ("AutoencoderKL", "ControlNetModel", "DDIMScheduler", "EulerDiscreteScheduler", "StableDiffusionPipeline",
             "StableDiffusionXLPipeline", "UNet2DConditionModel"):
    getattr(_diffusers, _cls)
for _cls in ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer"):
    getattr(_transformers, _cls)
