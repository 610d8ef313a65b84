"""Engine options of a stream step, for speed on a GPU; each is measured before it is kept, and on by default only
where it was measured to help.

- `channels_last`: the UNet, ControlNets and VAE in NHWC memory format (cuDNN's fast convolution layout on tensor
  cores); numerics unchanged up to kernel choice. On by default on a CUDA GPU (None), where it was measured to help
  (benchmarks/results/stream-h200).
- `attention`: one scaled-dot-product-attention backend for the step ("flash", "efficient", "cudnn", "math"),
  through `torch.nn.attention.sdpa_kernel`; None lets PyTorch choose.
- `fuse_qkv`: each attention's query/key/value projections as one matmul (diffusers' `fuse_qkv_projections`, on
  the UNet and ControlNets): one larger GEMM instead of three; numerics unchanged up to kernel choice. Not with an
  unfused LoRA (its adapters sit on the separate projections).
- `float8`: the UNet's linear layers as float8 (torchao's dynamic-activation float8 weights): changes numerics,
  needs a GPU with float8 (H100/H200) and torchao.
- `compile_scope`: "modules" compiles the UNet/ControlNet/VAE calls; "step" compiles the whole step, so the uint8
  pre- and post-processing and the scheduler arithmetic fuse into the same kernels.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from paradiff.errors import UserError

ATTENTION = ("flash", "efficient", "cudnn", "math")
SCOPES = ("modules", "step")


def on_for(value: bool | None, device: Any) -> bool:
    """An option whose default (None) is "on where measured to help": on a CUDA GPU."""
    return torch.device(device).type == "cuda" if value is None else bool(value)


def check(attention: str | None, compile_scope: str) -> None:
    if attention is not None and attention not in ATTENTION:
        raise UserError(f"attention must be one of {', '.join(ATTENTION)} or None, got {attention!r}.")
    if compile_scope not in SCOPES:
        raise UserError(f"compile_scope must be one of {', '.join(SCOPES)}, got {compile_scope!r}.")


def attention_context(attention: str | None):
    """A context that pins the SDPA backend (a no-op for None)."""
    if attention is None:
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[attention]
    return lambda: sdpa_kernel([backend])


def to_channels_last(modules: list[Any]) -> None:
    for module in modules:
        module.to(memory_format=torch.channels_last)


def fuse_projections(modules: list[Any], lora_layers: list) -> None:
    """diffusers' fused QKV projections on each module that has them, in place."""
    if lora_layers:
        raise UserError("fuse_qkv=True cannot fuse projections that carry LoRA adapters (the adapters sit on the "
                        "separate query/key/value layers): fuse the LoRA first (pipe.fuse_lora(); "
                        "pipe.unload_lora_weights()) or leave fuse_qkv off.")
    for module in modules:
        if hasattr(module, "fuse_qkv_projections") and not is_fused(module):
            try:
                module.fuse_qkv_projections()
            except ValueError as err:  # diffusers refuses added K/V projections (IP-Adapter, some attention types)
                raise UserError(f"fuse_qkv=True: {type(module).__name__} cannot fuse its projections ({err}); "
                                "leave fuse_qkv off.") from None


def is_fused(module: Any) -> bool:
    return any(getattr(m, "fused_projections", False) for m in module.modules())


def weight_layout(modules: list[Any]) -> tuple:
    """Per module: whether its first 4-D weight is channels-last, the type of its first 2-D weight (float8
    swaps it for a tensor subclass) and whether its projections are fused: what compiled kernels assume of the
    weights and do not check again."""
    def facts(module):
        convs = (p for p in module.parameters() if p.dim() == 4)
        linears = (p for p in module.parameters() if p.dim() == 2)
        conv, linear = next(convs, None), next(linears, None)
        nhwc = conv is not None and not conv.is_contiguous() and conv.is_contiguous(memory_format=torch.channels_last)
        return nhwc, type(linear).__name__ if linear is not None else None, is_fused(module)

    return tuple(facts(module) for module in modules)


def float8_linears(unet: Any) -> None:
    """torchao float8 (dynamic activations, float8 weights) for the UNet's linear layers, in place."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_
    except ImportError:
        raise UserError("float8=True needs torchao (pip install torchao) with float8 support.") from None
    if unet.device.type != "cuda":
        raise UserError(f"float8=True needs the UNet on a CUDA GPU with float8 (H100/H200); it is on {unet.device}.")
    # set_inductor_config=False: torchao would otherwise turn on inductor's coordinate-descent tuning for the whole
    # process (measured: the stream's compile ran past 4 minutes, tuning every kernel, not only the quantized ones)
    quantize_(unet, Float8DynamicActivationFloat8WeightConfig(set_inductor_config=False),
              filter_fn=lambda module, name: isinstance(module, torch.nn.Linear))
