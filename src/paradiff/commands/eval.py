"""`paradiff eval`: quality of a parallel method vs serial on the held-out prompts (adherence, PSNR, SSIM)."""

from __future__ import annotations

import argparse

from paradiff.commands.common import add_model_args, add_parallel_args, image_size, non_negative_int, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="measure a method's quality against serial on held-out prompts",
        description="Generate the reference held-out prompts serially and with --method (same seeds) and report "
                    "prompt adherence, PSNR/SSIM vs serial and max |difference|. Without --method: serial adherence.")
    add_model_args(p)
    p.add_argument("--fast", action="store_true", help="use the few-step reference model (paradiff.reference.FAST_MODEL)")
    p.add_argument("--controlnet", nargs="?", const="reference", default=None, metavar="PATH",
                   help="evaluate the model with this diffusers ControlNet folder (bare: the reference ControlNet, "
                        "paradiff.reference.CONTROLNET_MODEL); each held-out scene's silhouette is its control map")
    p.add_argument("--control-captions", choices=["no-positions", "full"], default=None,
                   help="with --controlnet: prompts without position phrases, so only the map places the shapes "
                        "(default), or the full captions")
    p.add_argument("--prompts", type=positive_int, default=None, help="first N held-out prompts (default: all 64)")
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default 25; 4 for LCM models)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale (default 3.0, the reference model's; 1.0 for LCM models)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="added to every prompt's fixed seed")
    p.add_argument("--size", type=image_size, default=None, help="N or HxW (default: the model's)")
    p.add_argument("--json", default=None, help="write the full result (per-prompt rows too) to this JSON file")
    p.add_argument("--rows", type=non_negative_int, default=0, help="also print the first N per-prompt rows")
    add_parallel_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from paradiff import evaluate
    from paradiff.commands.common import load_for_command
    from paradiff.errors import UserError

    model = args.model
    if args.fast:
        if model:
            raise UserError("--fast picks the few-step reference model; do not combine it with --model.")
        from paradiff.reference import FAST_MODEL

        model = FAST_MODEL
    if args.control_captions and not args.controlnet:
        raise UserError("--control-captions needs --controlnet.")
    rt, methods, pipe = load_for_command(args, model)
    control = {}
    if args.controlnet:
        from paradiff.reference import controlnet_pipeline
        from paradiff.reference.data import control_heldout_set

        pipe = controlnet_pipeline(pipe, None if args.controlnet == "reference" else args.controlnet)
        cases = control_heldout_set(args.prompts or 64, positions=args.control_captions == "full")
        control = dict(prompts=[(c.prompt, c.seed) for c in cases], control_images=[c.control for c in cases],
                       check_captions=[c.caption for c in cases])
    if not methods:
        pipe.to(rt.device)
    height, width = args.size if args.size is not None else (None, None)
    result = evaluate.evaluate(pipe, methods, num_prompts=args.prompts, steps=args.steps, guidance=args.guidance,
                               seed=args.seed, height=height, width=width, **control)
    evaluate.report(result, json_path=args.json, max_rows=args.rows)
    if args.json and rt.is_main:
        print(f"wrote {args.json}")
    return 0
