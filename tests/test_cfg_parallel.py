"""CFG parallelism is exact: the batch split over 2 gloo ranks gives the serial denoiser output."""

from __future__ import annotations

import pytest
import torch

from support.distributed import run_ranks
from support.models import tiny_sd3_transformer, tiny_unet, unet_inputs


def _check_cfg():
    from paradiff import runtime
    from paradiff.methods.cfg import apply_to_module

    group = runtime.mesh({"cfg": 2}).get_group("cfg")
    errors = {}
    with torch.no_grad():
        for kind in ("sd", "sdxl"):
            unet = tiny_unet(kind)
            kwargs = unet_inputs(kind)
            serial = unet(**kwargs).sample
            apply_to_module(unet, group)
            seen = []
            unet.conv_in.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
            out = unet(**kwargs).sample
            assert seen == [1], f"the UNet body should see half the batch, saw {seen}"
            out_tuple = unet(**kwargs, return_dict=False)[0]
            errors[kind] = max((out - serial).abs().max().item(), (out_tuple - serial).abs().max().item())
            # guidance off: batch 1 does not split; every rank computes it (still exact)
            one = {k: (v[:1] if k == "sample" or k == "encoder_hidden_states" else v) for k, v in kwargs.items()}
            if kind == "sdxl":
                one["added_cond_kwargs"] = {k: v[:1] for k, v in kwargs["added_cond_kwargs"].items()}
            with pytest.warns(UserWarning, match="does not split"):
                out1 = unet(**one).sample
            errors[kind + "-batch1"] = (out1 - serial[:1]).abs().max().item()

        sd3 = tiny_sd3_transformer(layers=2)
        g = torch.Generator().manual_seed(0)
        kwargs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([500.0, 500.0]),
                      encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                      pooled_projections=torch.randn(2, 16, generator=g))
        serial = sd3(**kwargs).sample
        apply_to_module(sd3, group)
        errors["sd3"] = (sd3(**kwargs).sample - serial).abs().max().item()
    return errors


@pytest.mark.slow  # 2 ranks
def test_cfg_parallel_exact_on_unets_and_sd3():
    for errors in run_ranks(_check_cfg, 2):
        for name, err in errors.items():
            assert err < 1e-5, f"{name}: CFG parallel differs from serial by {err}"


def test_cfg_degree_and_errors():
    from paradiff.errors import UserError
    from paradiff.methods.cfg import CFGParallel
    from paradiff.plans.common import denoiser_of

    assert CFGParallel().degree() == 2 and CFGParallel.mesh_dim == "cfg"
    with pytest.raises(UserError, match="no `unet` or `transformer`"):
        denoiser_of(object())
