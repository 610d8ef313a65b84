"""Pipeline stages outside the denoiser that every rank would otherwise repeat identically run on the main rank only.

Under any parallel method all ranks run the pipeline loop and hold the same prompt embeddings and the same final
latent. So, when a pipeline is parallelized:
- prompt encoding: rank 0 runs the text encoder(s) and broadcasts what `encode_prompt` returned; the other ranks
  drop their text encoder weights (SDXL: 0.8 B parameters, SD3's T5: 4.7 B, per GPU saved);
- VAE decode: only rank 0 decodes; the others return zeros of the decoded shape (placeholder images) and drop
  their decoder weights. The VAE encoder (img2img) stays on every rank: the initial latents are computed locally.
`parallelize(..., main_rank_stages=False)` keeps every stage on every rank.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def free_weights(module: torch.nn.Module) -> None:
    """Replace the module's weights by empty tensors (same dtype and device): it must never run again."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)


def _picklable(error: Exception | None) -> Exception | None:
    """The error itself if it can be sent to the other ranks, else a RuntimeError with its message."""
    if error is None:
        return None
    try:
        pickle.dumps(error)
        return error
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(error).__name__}: {error}")


def share_prompt_encoding(pipe: Any, group: Any = None, device: torch.device | None = None) -> None:
    """Rank 0 of `group` runs `pipe.encode_prompt` and broadcasts its result; the other ranks' encoders are freed.

    Every rank must call the pipeline the same number of times (as every parallel method requires anyway).
    """
    if not hasattr(pipe, "encode_prompt"):
        return
    original = pipe.encode_prompt
    main = dist.get_rank(group) == 0

    def encode_prompt(*args: Any, **kwargs: Any) -> Any:
        error = None
        if main:
            try:
                leaves, spec = pytree.tree_flatten(original(*args, **kwargs))
            except Exception as err:  # e.g. a bad prompt type: the other ranks raise it too instead of waiting
                error, leaves, spec = err, [], pytree.tree_flatten(None)[1]
            leaves = [x.contiguous() if isinstance(x, torch.Tensor) else x for x in leaves]
            meta = [(tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else None for x in leaves]
            header = [pytree.treespec_dumps(spec), meta, [None if m else x for m, x in zip(meta, leaves)],
                      _picklable(error)]
        else:
            header = [None, None, None, None]
        dist.broadcast_object_list(header, group=group, group_src=0)
        spec_text, meta, constants, sent_error = header
        if sent_error is not None:
            raise error if main else sent_error
        if not main:
            target = device or torch.device("cpu")
            leaves = [torch.empty(m[0], dtype=m[1], device=target) if m else c for m, c in zip(meta, constants)]
        for x, m in zip(leaves, meta):
            if m:
                dist.broadcast(x, group=group, group_src=0)
        return pytree.tree_unflatten(leaves, pytree.treespec_loads(spec_text))

    pipe.encode_prompt = encode_prompt
    if not main:
        for name in TEXT_ENCODERS:
            encoder = getattr(pipe, name, None)
            if isinstance(encoder, torch.nn.Module):
                free_weights(encoder)


def decode_on_main_only(pipe: Any, main: bool) -> None:
    """On ranks other than the main one, `vae.decode` returns zeros of the decoded shape and the decoder is freed."""
    vae = getattr(pipe, "vae", None)
    if main or vae is None:
        return
    from diffusers.models.autoencoders.vae import DecoderOutput

    scale = getattr(pipe, "vae_scale_factor", 8)
    channels = getattr(vae.config, "out_channels", 3)
    if not isinstance(scale, int) or vae.decode.__func__ is not type(vae).decode:  # unusual VAE: leave it alone
        return

    def decode(z: torch.Tensor, return_dict: bool = True, *args: Any, **kwargs: Any) -> Any:
        out = z.new_zeros(z.shape[0], channels, z.shape[-2] * scale, z.shape[-1] * scale)
        return DecoderOutput(sample=out) if return_dict else (out,)

    vae.decode = decode
    for name in ("decoder", "post_quant_conv"):
        part = getattr(vae, name, None)
        if isinstance(part, torch.nn.Module):
            free_weights(part)
