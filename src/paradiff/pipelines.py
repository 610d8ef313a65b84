"""Load a diffusers pipeline from a hub id or a local folder, with one-line errors for the usual mistakes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from paradiff.errors import UserError

DTYPES = ("auto", "fp32", "fp16", "bf16")


def default_model() -> str:
    """The model `paradiff generate` uses when none is given: the embedded reference model."""
    from paradiff.reference import DEFAULT_MODEL

    return DEFAULT_MODEL


def torch_dtype(name: str, device: Any):
    """`auto` is fp16 on a GPU and fp32 on the CPU (CPU half precision is slow and lossy)."""
    import torch

    if name == "auto":
        return torch.float16 if getattr(device, "type", str(device)) == "cuda" else torch.float32
    try:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}.") from None


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1) or model.count("/") > 1


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint, so an offline machine fails in seconds, not after a minute of retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def _unreachable(model: str) -> UserError:
    return UserError(f"model={model!r}: not a local folder, not in the Hugging Face cache, and the hub cannot be "
                     "reached from this machine (offline). Give a local diffusers folder.")


def check_model(model: str | None) -> None:
    """The mistakes about `model` found without importing diffusers (seconds sooner): a missing folder, a folder that
    is not a pipeline, a hub id neither cached nor reachable. None: the embedded model."""
    if model is None:
        return
    model = _checked(model)
    if Path(model).exists():
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(model, "model_index.json"), str)
    except Exception:  # noqa: BLE001 - not a valid hub id: not cached (the hub says why, when it is reachable)
        cached = False
    if not cached and not hub_reachable():
        raise _unreachable(model)


def _load_config(model: str) -> dict:
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(model, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached: try the hub below
        pass
    if not hub_reachable():
        raise _unreachable(model)
    try:
        return DiffusionPipeline.load_config(model)
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; the user needs one sentence
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UserError(f"model={model!r}: the hub could not provide it ({reason}).") from None


def _checked(model: str) -> str:
    """`model` as a local folder path or a hub id, or the one-line error for a path that is not a pipeline folder."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model={model!r}: is a file; give a diffusers pipeline folder or a hub id.")
        if not (path / "model_index.json").is_file():
            raise UserError(
                f"model={model!r}: folder has no model_index.json, so it is not a diffusers pipeline folder."
            )
        return str(path)
    if _looks_like_path(model):
        raise UserError(f"model={model!r}: no such folder.")
    return model


def _component_config(model: str, subfolder: str) -> dict | None:
    """`subfolder/config.json` of a local folder or of a cached hub model; None when not at hand (never downloads)."""
    import json

    path = Path(model) / subfolder / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    if Path(model).exists():
        return None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(model, "config.json", subfolder=subfolder,
                                               local_files_only=True)).read_text())
    except Exception:  # noqa: BLE001 - not cached: the caller skips what needs it
        return None


def pipeline_facts(model: str | None = None) -> dict:
    """What the CLI checks before loading `model` (default: the reference model), from its config files only:
    `class_name` (model_index.json's pipeline class, which `load_pipeline` builds), `unet` and `vae` (their
    config.json, or None when not at hand), `transformer` (the class of a transformer denoiser, e.g. SD3's, or
    None), `name` (how to mention the model in a message)."""
    name = model or "the embedded model"
    model = _checked(model or default_model())
    config = _load_config(model)
    transformer = config.get("transformer")
    return {"class_name": config.get("_class_name", ""), "unet": _component_config(model, "unet"),
            "vae": _component_config(model, "vae"), "name": name,
            "transformer": transformer[1] if isinstance(transformer, list) and len(transformer) == 2 else None}


def load_pipeline(model: str | None = None, *, dtype: Any = None, pipeline_class: Any = None):
    """`DiffusionPipeline.from_pretrained` on `model` (default: the reference model), safety checker off; the
    pipeline class is model_index.json's (StableDiffusionInpaintPipeline, StableDiffusionUpscalePipeline, ...)."""
    from diffusers import DiffusionPipeline

    model = _checked(model or default_model())
    cls = pipeline_class or DiffusionPipeline
    config = _load_config(model)
    extra = {name: None for name, entry in config.items()  # saved as None (SD3 without T5): load as None
             if not name.startswith("_") and entry in ([None, None], (None, None))}
    if "safety_checker" in config:
        extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return cls.from_pretrained(model, torch_dtype=dtype, **extra)
