"""Imported once by run_ranks' fork server, so each rank process forks with torch, diffusers, transformers and
paradiff already imported instead of importing them anew (seconds per process on a 2-CPU machine)."""

import diffusers  # noqa: F401
import torch  # noqa: F401
from diffusers import (  # noqa: F401
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: F401

import paradiff  # noqa: F401
import paradiff.comm  # noqa: F401
import paradiff.methods  # noqa: F401
from support import models  # noqa: F401
