"""Options shared by several commands: model, size, device and the parallel method flags."""

from __future__ import annotations

import argparse

from paradiff.errors import UserError

METHODS = ("none", "patch", "cfg", "cfg+patch", "async", "cfg+async")
GN_MODES = ("auto", "corrected", "sync", "stale", "separate")


def _int_at_least(minimum: int):
    """An argparse type: a whole number >= `minimum`, with a message that says which."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
        return value

    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def float_between(low: float, high: float | None, what: str, example: str):
    """An argparse type: a number strictly between `low` and `high` (None: no upper bound)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value > low and (high is None or value < high)):
            bound = f"more than {low:g}" if high is None else f"between {low:g} and {high:g}"
            raise argparse.ArgumentTypeError(f"must be {bound} ({example}), got {text}")
        return value

    return parse


def image_size(text: str) -> tuple[int, int]:
    """'512' or 'HxW' ('768x1024'); both sides multiples of 8 (the VAE downsamples by 8)."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        if len(parts) == 1:
            height = width = int(parts[0])
        elif len(parts) == 2:
            height, width = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or HxW, e.g. 512 or 768x1024; got {text!r}") from None
    for side in (height, width):
        if side <= 0 or side % 8:
            raise argparse.ArgumentTypeError(
                f"size {text!r}: height and width must be positive multiples of 8 (e.g. {max(8, side // 8 * 8)} "
                f"or {max(8, side // 8 * 8 + 8)})"
            )
    return height, width


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="hub id or local diffusers folder (default: embedded reference model)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                        help="weights/activations dtype (auto: fp16 on GPU, fp32 on CPU)")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available")


def add_parallel_args(parser: argparse.ArgumentParser, methods: tuple[str, ...] = METHODS) -> None:
    group = parser.add_argument_group("parallelism")
    group.add_argument("--method", default="none", choices=methods, help="parallel method (default: none, one device)")
    group.add_argument("--nproc", type=positive_int, default=None,
                       help="start N local ranks (not needed under torchrun)")
    group.add_argument("--warmup-steps", type=non_negative_int, default=None,
                       help="synchronous steps before stale activations are used (patch, async)")
    group.add_argument("--gn-mode", default=None, choices=GN_MODES,
                       help="GroupNorm statistics in stale steps (patch; default auto: corrected with >= 16 latent "
                            "rows per patch, stale below)")
    group.add_argument("--stride", type=positive_int, default=None, help="async denoising stride: 1 or 2")
    group.add_argument("--time-shift", action="store_true", default=None, help="async denoising time shift")
    group.add_argument("--compile", action="store_true", default=None,
                       help="torch.compile the parallel step (every method; GPU): minutes of compiling before the "
                            "first image, faster steps after it. With --method none: the denoiser under "
                            "torch.compile(mode='reduce-overhead'), CUDA graphs included (the single-GPU baseline)")
    parser.set_defaults(check_before_launch=check_before_launch)


def check_method_flags(args: argparse.Namespace) -> None:
    """The method options without a method: checked before torch or diffusers is imported (a fast error)."""
    if getattr(args, "method", "none") == "none":
        for flag in ("warmup_steps", "gn_mode", "stride", "time_shift"):
            if getattr(args, flag, None) is not None:
                raise UserError(f"--{flag.replace('_', '-')} needs a parallel --method.")


def check_before_launch(args: argparse.Namespace) -> None:
    """Checks made once, in the launching process, so a mistake gives one line instead of one per rank."""
    check_method_flags(args)
    check_model_flag(args)
    if args.nproc and args.nproc > 1 and getattr(args, "method", "none") == "none":
        raise UserError(f"--nproc {args.nproc} needs a parallel --method ({', '.join(METHODS[1:])}).")
    device = getattr(args, "device", None)
    import torch

    if device == "cuda" or (device is None and torch.cuda.is_available()):
        count = torch.cuda.device_count()
        if args.nproc > count:
            raise UserError(f"--nproc {args.nproc} asks for more ranks than the {count} visible CUDA GPU(s).")
    methods_from_args(args)  # validates the method options before any rank starts


class SaidWithFlag:
    """Library errors name arguments (`model='x': ...`); re-say the ones about `api` with the flag typed (`--model x`).

    A context manager, reusable: `with SaidWithFlag(f"model={value!r}", f"--model {value}"): ...`.
    """

    def __init__(self, api: str, flag: str):
        self.api, self.flag = api, flag

    def __enter__(self) -> "SaidWithFlag":
        return self

    def __exit__(self, kind, err, traceback) -> bool:
        if isinstance(err, UserError) and str(err).startswith(self.api):
            raise UserError(self.flag + str(err)[len(self.api):]) from None
        return False


def check_model_flag(args: argparse.Namespace) -> None:
    """--model's mistakes that need no diffusers import (a missing folder, an unreachable hub id), said at once."""
    from paradiff.pipelines import check_model

    model = getattr(args, "model", None)
    with SaidWithFlag(f"model={model!r}", f"--model {model}"):
        check_model(model)


def load_model(args: argparse.Namespace, model: str | None = None, dtype=None):
    """`load_pipeline` on `model` (default: --model); an error about the --model the user typed names the flag."""
    from paradiff.pipelines import load_pipeline

    with SaidWithFlag(f"model={args.model!r}", f"--model {args.model}"):
        return load_pipeline(model or args.model, dtype=dtype)


def load_for_command(args: argparse.Namespace, model: str | None):
    """What generate/eval share: this rank's runtime, the parallel methods the flags ask for, the loaded pipeline."""
    from paradiff import runtime
    from paradiff.pipelines import torch_dtype

    rt = runtime.init(args.device)
    methods = methods_from_args(args)
    if rt.world_size > 1 and not methods:
        raise UserError(f"this job has {rt.world_size} ranks; choose a parallel --method.")
    return rt, methods, load_model(args, model, dtype=torch_dtype(args.dtype, rt.device))


def methods_from_args(args: argparse.Namespace) -> list:
    """The parallel method objects the flags ask for, outermost first (cfg before patch/async)."""
    name = getattr(args, "method", "none")
    compile = getattr(args, "compile", None)
    if name == "none":
        check_method_flags(args)
        return []
    methods = []
    for part in name.split("+"):
        if part == "cfg":
            from paradiff.methods.cfg import CFGParallel

            methods.append(CFGParallel(**({"compile": compile} if compile is not None else {})))
        elif part == "patch":
            from paradiff.methods.patch import PatchParallel

            kwargs = {"warmup_steps": args.warmup_steps, "gn_mode": args.gn_mode, "compile": compile}
            methods.append(PatchParallel(**{k: v for k, v in kwargs.items() if v is not None}))
        elif part == "async":
            from paradiff.methods.asyncdenoise import AsyncDenoise

            kwargs = {"warmup_steps": args.warmup_steps, "stride": args.stride, "time_shift": args.time_shift,
                      "compile": compile}
            methods.append(AsyncDenoise(**{k: v for k, v in kwargs.items() if v is not None}))
    return methods
