"""LoRA in a running stream: new weights or a new scale without a recompile or a CUDA-graph re-capture.

A LoRA loaded with diffusers' `load_lora_weights` before the stream is built simply runs (peft layers inside the
UNet; fused ones are plain weights). What a compiled and captured step must not see change is its *structure*: new
modules, new shapes, or Python floats baked into the graph. So:
- scales: peft keeps each adapter's scale as a Python float, which torch.compile guards on (a new value
  recompiles) and a CUDA graph bakes in (a new value is ignored). The stream turns them into device tensors when
  it is built, and `set_lora_scale` fills them in place;
- weights: `load_lora` hot-swaps a new LoRA into the loaded adapter's tensors (diffusers' `hotswap=True`, which
  copies into the existing peft parameters). A LoRA of another rank or other target modules needs
  `pipe.enable_lora_hotswap(target_rank=...)` before the first LoRA is loaded, as in diffusers.
Text-encoder LoRAs are not hot-swapped (diffusers does not support it); the prompt is re-encoded after a swap.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch

from paradiff.errors import UserError


def lora_layers(module: Any) -> list:
    """The peft LoRA layers inside `module` (none when peft is not installed or no LoRA is loaded)."""
    if getattr(module, "peft_config", None) is None:
        return []
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def adapters(module: Any) -> list[str]:
    return sorted(getattr(module, "peft_config", None) or {})


def is_fused(layers: list) -> bool:
    return any(getattr(layer, "merged_adapters", None) for layer in layers)


def scalings_to_tensors(layers: list) -> None:
    """Each adapter's scale as a 0-dim tensor on the layer's device, so it can change under a graph (peft's own
    hot-swap preparation does the same; tensors are left as they are)."""
    for layer in layers:
        for key, value in list(layer.scaling.items()):
            if isinstance(value, (int, float)):
                layer.scaling[key] = torch.tensor(float(value), device=layer.weight.device)


def set_scale(layers: list, adapter: str, scale: float) -> int:
    """Fill `adapter`'s scale tensors with `scale` x its base scale (lora_alpha / r, or / sqrt(r) for rsLoRA) in place;
    returns how many layers hold the adapter."""
    count = 0
    for layer in layers:
        if adapter not in layer.scaling:
            continue
        rank = layer.r[adapter]
        base = layer.lora_alpha[adapter] / (math.sqrt(rank) if layer.use_rslora.get(adapter, False) else rank)
        value = layer.scaling[adapter]
        if isinstance(value, torch.Tensor):
            value.fill_(scale * base)
        else:
            layer.scaling[adapter] = scale * base
        count += 1
    return count


def _unet_tensors(pipe: Any, source: Any) -> dict:
    """The UNet part of a LoRA in peft's key format, read the way diffusers' loader reads it."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    state = pipe.lora_state_dict(source)[0]
    unet = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    if unet and not any("lora_A" in k for k in unet):
        unet = convert_unet_state_dict_to_peft(unet)
    return unet


def check_fits(pipe: Any, source: Any, adapter: str) -> None:
    """Every UNet tensor of the LoRA must have a place in `adapter` of the same shape (its rank at most the loaded
    one's). Checked before swapping because a failed diffusers hot-swap deletes the adapter it was swapping into."""
    try:
        tensors = _unet_tensors(pipe, source)
    except (ValueError, RuntimeError, KeyError, TypeError, OSError) as err:
        raise UserError(f"could not read the LoRA {_name(source)}: {type(err).__name__}: {err}") from None
    if not tensors:
        raise UserError(f"the LoRA {_name(source)} has no UNet weights; only UNet LoRAs can be swapped live.")
    params = dict(pipe.unet.named_parameters())
    for key, value in tensors.items():
        name = key.replace(".lora_A.", f".lora_A.{adapter}.").replace(".lora_B.", f".lora_B.{adapter}.")
        have = params.get(name)
        if have is None:
            raise UserError(f"the LoRA {_name(source)} has {key}, which adapter {adapter!r} of the UNet does not: it "
                            "was made for another model, or targets other layers than the loaded LoRA.")
        rank_dim = 0 if ".lora_A." in key else 1
        mine, theirs = list(have.shape), list(value.shape)
        if len(mine) != len(theirs) or any(a != b for i, (a, b) in enumerate(zip(mine, theirs)) if i != rank_dim) \
                or theirs[rank_dim] > mine[rank_dim]:
            raise UserError(f"the LoRA {_name(source)} has {key} of shape {tuple(theirs)}, where adapter {adapter!r} "
                            f"has {tuple(mine)}: it was made for another model (or a higher rank; see "
                            "pipe.enable_lora_hotswap).")


def hotswap(pipe: Any, source: Any, adapter: str) -> None:
    """Load `source` (a folder, file or state dict) into `adapter`'s existing tensors; a LoRA that does not fit the
    model or the loaded adapter is one UserError, and the loaded adapter is left as it was."""
    check_fits(pipe, source, adapter)
    try:
        with _quiet_diffusers():
            pipe.load_lora_weights(source, adapter_name=adapter, hotswap=True)
    except (ValueError, RuntimeError, KeyError, TypeError, OSError) as err:
        first = _first_line(err)
        raise UserError(f"the LoRA {_name(source)} does not fit the stream's adapter {adapter!r} ({first}); a LoRA of "
                        "another rank or other layers needs pipe.enable_lora_hotswap(target_rank=...) before the "
                        "first LoRA is loaded, and it must be made for this model.") from None


def load(pipe: Any, source: Any, adapter: str | None = None) -> None:
    """`pipe.load_lora_weights` with a LoRA that does not match the model as one UserError (CLI, before the stream)."""
    try:
        with _quiet_diffusers():
            pipe.load_lora_weights(source, adapter_name=adapter)
    except (ValueError, RuntimeError, KeyError, TypeError, OSError) as err:
        first = _first_line(err)
        raise UserError(f"LoRA {_name(source)} does not match {type(pipe).__name__} ({first}).") from None
    _check_loaded(pipe, source)


def _check_loaded(pipe: Any, source: Any) -> None:
    """diffusers only warns when no key of a LoRA matched the UNet or text encoders: make that an error."""
    if not any(lora_layers(getattr(pipe, name, None)) for name in ("unet", "text_encoder", "text_encoder_2")):
        raise UserError(f"LoRA {_name(source)} has no weights for any layer of {type(pipe).__name__}'s UNet or "
                        "text encoders: it was made for another model.")


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers logs a failed LoRA load (a traceback) before raising; the UserError says it in one line instead."""
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300].rstrip(":") if text else type(err).__name__


def _name(source: Any) -> str:
    return f"{source!r}" if isinstance(source, str) else "(state dict)"
