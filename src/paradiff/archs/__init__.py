"""Real model architectures with random weights, for speed benchmarks without downloads.

Speed does not depend on weight values, so `paradiff bench --arch stable-diffusion-xl-base-1.0` builds the real
SDXL UNet from its config and fills it with random numbers. The configs of popular models ship with the package
(JSON only); any other local diffusers folder or hub id works too (only its config files are read).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from paradiff.errors import UserError

CONFIG_DIR = Path(__file__).parent / "configs"
_CLIP_BPE = CONFIG_DIR / "_clip_bpe"

SHIPPED = (
    "stable-diffusion-v1-5",
    "stable-diffusion-2-1",
    "stable-diffusion-2-1-base",
    "stable-diffusion-xl-base-1.0",
    "sd-turbo",
    "sdxl-turbo",
    "taesd",
    "taesdxl",
    "stable-diffusion-inpainting",
    "stable-diffusion-xl-1.0-inpainting-0.1",
    "stable-diffusion-x4-upscaler",
    "sd-controlnet-canny",
    "controlnet-union-sdxl-1.0",
    "stable-video-diffusion-img2vid-xt",
    "animatediff-motion-adapter-v1-5-2",
    "animatediff-motion-adapter-v1-5-3",
    "stable-diffusion-3-medium-diffusers",
    "stable-diffusion-3.5-large",
)
ALIASES = {"sd15": "stable-diffusion-v1-5", "sd21": "stable-diffusion-2-1", "sd21-base": "stable-diffusion-2-1-base",
           "sdxl": "stable-diffusion-xl-base-1.0", "sd15-inpainting": "stable-diffusion-inpainting",
           "sdxl-inpainting": "stable-diffusion-xl-1.0-inpainting-0.1", "x4-upscaler": "stable-diffusion-x4-upscaler",
           "sd15-controlnet": "sd-controlnet-canny", "sdxl-controlnet": "controlnet-union-sdxl-1.0",
           "svd-xt": "stable-video-diffusion-img2vid-xt", "animatediff": "animatediff-motion-adapter-v1-5-2",
           "animatediff-v1-5-2": "animatediff-motion-adapter-v1-5-2",
           "animatediff-v1-5-3": "animatediff-motion-adapter-v1-5-3", "sd3-medium": "stable-diffusion-3-medium-diffusers",
           "sd35-large": "stable-diffusion-3.5-large"}
"""The AnimateDiff folders are SD 1.5 with a motion adapter, laid out as AnimateDiffPipeline.save_pretrained writes
them: `unet` is the UNetMotionModel (SD 1.5's UNet + the adapter's motion modules), `motion_adapter` the adapter
alone (for counting)."""


def resolve(arch: str) -> str:
    """A shipped name (or alias, or `org/name` whose name is shipped) -> its packaged folder; else `arch` as given."""
    name = ALIASES.get(arch, arch)
    if name in SHIPPED:
        return str(CONFIG_DIR / name)
    tail = name.rstrip("/").split("/")[-1]
    if not Path(name).exists() and tail in SHIPPED:
        return str(CONFIG_DIR / tail)
    return name


def _read_config(arch: str, subfolder: str | None, filename: str = "config.json") -> dict:
    root = resolve(arch)
    path = Path(root) / (subfolder or "") / filename
    if Path(root).exists():
        if not path.is_file():
            raise UserError(f"arch={arch!r}: {path} is missing; it is not a diffusers model folder with a {subfolder}.")
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download

    from paradiff.pipelines import hub_reachable

    known = ", ".join(SHIPPED)
    try:
        local = hf_hub_download(root, filename, subfolder=subfolder, local_files_only=not hub_reachable())
    except Exception as err:  # noqa: BLE001
        raise UserError(
            f"arch={arch!r}: not a shipped architecture ({known}), not a local folder, and its config is neither "
            f"cached nor reachable on the hub ({type(err).__name__})."
        ) from None
    return json.loads(Path(local).read_text())


def model_index(arch: str) -> dict:
    if Path(resolve(arch)).joinpath("config.json").is_file() and not Path(resolve(arch)).joinpath("model_index.json").is_file():
        return {}
    return _read_config(arch, None, "model_index.json")


def denoiser_name(arch: str) -> str:
    index = model_index(arch)
    return "transformer" if "transformer" in index else "unet"


def _model_class(config: dict, default: str):
    import diffusers

    name = config.get("_class_name", default)
    try:
        return getattr(diffusers, name)
    except AttributeError:
        raise UserError(f"diffusers {diffusers.__version__} has no model class {name}.") from None


def _randomize(module: Any, seed: int) -> Any:
    """Deterministic small random weights (fast on GPU, sane activations in fp16)."""
    import torch

    gen_device = next((p.device for p in module.parameters()), torch.device("cpu"))
    if gen_device.type == "meta":  # nothing allocated: nothing to fill
        return module
    generator = torch.Generator(gen_device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.device.type == "meta":
                continue
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:  # norm scales
                param.fill_(1.0)
            else:
                fan_in = param[0].numel()
                param.normal_(0.0, fan_in ** -0.5, generator=generator)
    return module


def build_model(arch: str, component: str | None = None, *, dtype: Any = None, device: Any = "cpu", seed: int = 0):
    """The diffusers model `component` of `arch` (default: its denoiser) with random weights, on `device`.

    On the meta device nothing is allocated: use it to count parameters or plan a split.
    """
    import torch

    component = component or denoiser_name(arch)
    if component == "vae" and not Path(resolve(arch), "vae").exists() and Path(resolve(arch), "config.json").exists():
        config = _read_config(arch, None)  # a lone autoencoder folder such as taesd
    elif Path(resolve(arch), "config.json").is_file() and not Path(resolve(arch), "model_index.json").is_file():
        config = _read_config(arch, None)
    else:
        config = _read_config(arch, component)
    cls = _model_class(config, "UNet2DConditionModel")
    device = torch.device(device)
    if device.type == "meta":
        from paradiff.plans.common import meta_model

        model = meta_model(cls, config)  # every parameter on meta, SVD's legacy-constructed mix factors too
    else:
        with torch.device(device):
            model = cls.from_config(config)
        _randomize(model, seed)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval().requires_grad_(False)


def build_controlnet(arch: str, **kwargs: Any):
    """The ControlNet of `arch` with random weights (`build_model`'s arguments), or None when it has none."""
    if "controlnet" not in model_index(arch):
        return None
    return build_model(arch, "controlnet", **kwargs)


def parameter_count(arch: str, component: str | None = None) -> int:
    model = build_model(arch, component, device="meta")
    return sum(p.numel() for p in model.parameters())


def _tokenizer(arch: str, subfolder: str):
    from transformers import CLIPTokenizer

    root = Path(resolve(arch)) / subfolder
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (root / name).is_file():
                shutil.copy(root / name, Path(tmp) / name)
        for name in ("vocab.json", "merges.txt"):
            source = root / name if (root / name).is_file() else _CLIP_BPE / name
            shutil.copy(source, Path(tmp) / name)
        return CLIPTokenizer.from_pretrained(tmp)


def _clip_encoder(arch: str, subfolder: str, class_name: str, dtype: Any, device: Any, seed: int):
    """A CLIP text encoder, or SVD's CLIP vision encoder (`CLIPVisionModelWithProjection`), from its config."""
    import torch
    import transformers

    config_cls = transformers.CLIPVisionConfig if "Vision" in class_name else transformers.CLIPTextConfig
    config = config_cls.from_dict(_read_config(arch, subfolder))
    cls = getattr(transformers, class_name)
    with torch.device(device):
        model = cls(config)
    _randomize(model, seed)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval().requires_grad_(False)


IMAGE_ENCODER_PIPELINES = ("StableVideoDiffusionPipeline",)  # the image encoder is the conditioning, not optional
LEFT_OUT = ("motion_adapter", "text_encoder_3", "tokenizer_3")
"""Components `build_pipeline` leaves out (None): AnimateDiff's adapter (its motion modules are in the UNetMotionModel
already) and SD3's T5 (4.7 B parameters; the pipeline gives zeros in place of its embeddings, the denoiser's work is
the same)."""


def build_pipeline(arch: str, *, dtype: Any = None, device: Any = "cpu", seed: int = 0):
    """A complete diffusers pipeline of `arch` (text encoders, tokenizers, denoiser, VAE, scheduler), random weights.

    CLIP-tokenizer pipelines (SD1.x/2.x/XL/Turbo, their inpainting models, the x4 upscaler, AnimateDiff, SD3 without
    its T5, see `LEFT_OUT`) and Stable Video Diffusion (a CLIP image encoder); `device="meta"` builds one without
    allocating its weights.
    """
    import diffusers
    import transformers

    root = Path(resolve(arch))
    if not root.exists():
        raise UserError(f"arch={arch!r}: whole random pipelines are built only from shipped or local folders.")
    index = model_index(arch)
    pipe_cls = getattr(diffusers, index.get("_class_name", ""), None)
    if pipe_cls is None:
        raise UserError(f"arch={arch!r}: unknown pipeline class {index.get('_class_name')!r}.")
    components: dict[str, Any] = {}
    for offset, (name, entry) in enumerate(sorted(index.items())):
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2:
            continue
        library, class_name = entry
        if not isinstance(library, str) or not isinstance(class_name, str):
            continue
        keep_image = index.get("_class_name") in IMAGE_ENCODER_PIPELINES
        if name in ("safety_checker",) + (() if keep_image else ("feature_extractor", "image_encoder")):
            continue
        if name in LEFT_OUT:
            components[name] = None
        elif name == "feature_extractor":
            components[name] = getattr(transformers, class_name).from_pretrained(str(root), subfolder=name)
        elif name.startswith("tokenizer"):
            components[name] = _tokenizer(arch, name)
        elif name.startswith("text_encoder") or name == "image_encoder":
            components[name] = _clip_encoder(arch, name, class_name, dtype, device, seed + offset)
        elif name.endswith("scheduler"):  # the x4 upscaler also has a low_res_scheduler
            components[name] = getattr(diffusers, class_name).from_pretrained(str(root), subfolder=name)
        else:
            components[name] = build_model(arch, name, dtype=dtype, device=device, seed=seed + offset)
    import inspect

    accepted = inspect.signature(pipe_cls.__init__).parameters
    extra = {key: value for key, value in index.items()  # pipeline settings: max_noise_level, requires_aesthetics_score
             if not key.startswith("_") and not isinstance(value, list) and key in accepted}
    if "safety_checker" in index:
        extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if "image_encoder" in index and "image_encoder" not in components:
        extra["image_encoder"] = None
    return pipe_cls(**components, **extra)
