"""`paradiff` command line: parse, start ranks if `--nproc N` asks for them, run the command, one clear line on error.

Each subcommand lives in `paradiff.commands.<name>` with `add_parser(subparsers)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from paradiff.errors import UserError

COMMANDS = ("generate", "serve", "bench", "eval", "stream", "info")


def build_parser() -> argparse.ArgumentParser:
    from paradiff import __version__

    parser = argparse.ArgumentParser(
        prog="paradiff",
        description="Fast diffusion inference: patch parallelism, asynchronous denoising, real-time streaming.",
    )
    parser.add_argument("--version", action="version", version=f"paradiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"paradiff.commands.{name}").add_parser(sub)
    return parser


def _quiet_libraries() -> None:
    """diffusers/transformers warn about things a CLI user cannot act on; PARADIFF_VERBOSE=1 keeps them."""
    import os

    if os.environ.get("PARADIFF_VERBOSE"):
        return
    for name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(name, "error")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", module="huggingface_hub")


_API_ARGUMENT = re.compile(r"^(\w+)=('[^']*'|\"[^\"]*\"|\S+?)(?=[:, ])")


def _with_flags(message: str, args: argparse.Namespace) -> str:
    """Library errors name API arguments (`device='cuda' ...`); say the flag the user typed (`--device cuda`)."""
    match = _API_ARGUMENT.match(message)
    if match is None or not hasattr(args, match.group(1)):
        return message
    name, value = match.group(1), match.group(2).strip("'\"")
    return f"--{name.replace('_', '-')} {value}{message[match.end():]}"


def _launch_or_run(args: argparse.Namespace, argv: list[str]) -> int:
    """Start `--nproc N` ranks that re-run this command line (after the launch checks), or run it in this process."""
    import os

    from paradiff import launch

    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc > 1 and not launch.in_launched_job() and not getattr(args, "explain", False):
        check = getattr(args, "check_before_launch", None)
        if check is not None:
            check(args)
        return launch.launch(nproc, argv, forward_stop_signals=getattr(args, "forward_stop_signals", False))
    if nproc is not None and launch.in_launched_job():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if nproc != world:
            raise UserError(f"--nproc {nproc} does not match the {world} ranks this job was started with.")
    return args.run(args)


def main(argv: list[str] | None = None) -> int:
    """Run `paradiff ARGS`: the command's exit status, 2 for a user mistake (one line on stderr), 1 for a failed
    collective, 130 when interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    from paradiff import runtime

    try:
        return _launch_or_run(args, argv)
    except UserError as err:
        print(f"paradiff: error: {_with_flags(str(err), args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("paradiff: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a dead peer must not print a wall of tracebacks on every rank
        rt = runtime.current()
        from paradiff.comm.collectives import is_collective_failure

        if rt is not None and rt.distributed and is_collective_failure(err):
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(
                f"paradiff: rank {rt.rank}: a collective failed, another rank died or stopped responding "
                f"(timeout {runtime.timeout_seconds():.0f} s): {first}",
                file=sys.stderr,
            )
            return 1
        raise
    finally:
        runtime.shutdown()
