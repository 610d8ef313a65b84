"""Helpers shared by the patch/CFG parallel tests: run a function on N gloo ranks, and tiny random denoisers.

(No tests here. Kept private to the patch/CFG tests until a shared multi-rank helper exists.)
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, queue, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), PARADIFF_TIMEOUT="60")
    try:
        import torch

        torch.set_num_threads(1)
        from paradiff import runtime

        runtime._runtime = None
        runtime.init("cpu")
        queue.put((rank, "ok", fn(*args)))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from paradiff import runtime

            runtime.shutdown()
        except Exception:  # noqa: BLE001
            pass


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """Run `fn(*args)` on `world_size` gloo ranks (spawned processes); return the results ordered by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, queue, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in procs:
            rank, status, value = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]


def tiny_unet(kind: str = "sd", seed: int = 0):
    """A tiny random UNet2DConditionModel: "sd" (SD-1.x-like) or "sdxl" (text_time added conditioning)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
                  cross_attention_dim=32)
    if kind == "sd":
        unet = UNet2DConditionModel(block_out_channels=(16, 32), attention_head_dim=4,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **common)
    elif kind == "sdxl":
        unet = UNet2DConditionModel(block_out_channels=(16, 32, 32), attention_head_dim=(2, 4, 4),
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                    transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
                                    addition_embed_type="text_time", addition_time_embed_dim=8,
                                    projection_class_embeddings_input_dim=8 * 6 + 32, **common)
    else:
        raise ValueError(kind)
    # random init of a fresh UNet zero-initialises conv_out; give it weights so outputs are informative
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return unet.eval()


def unet_inputs(kind: str = "sd", batch: int = 2, size: int = 16, seed: int = 1) -> dict:
    """Call kwargs for `tiny_unet(kind)`: latent, scalar timestep, text states (+ SDXL added conditioning)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    kwargs = dict(sample=torch.randn(batch, 4, size, size, generator=g), timestep=torch.tensor(500.0),
                  encoder_hidden_states=torch.randn(batch, 7, 32, generator=g))
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 32, generator=g),
                                       "time_ids": torch.tensor([[size * 8.0, size * 8.0, 0, 0, size * 8.0, size * 8.0]] * batch)}
    return kwargs
