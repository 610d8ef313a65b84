"""The CLI: user mistakes give one clear line and a non-zero exit, never a traceback; generate writes an image."""

import pytest
from PIL import Image

from cli_utils import run_cli


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "x", "--size", "100"], "multiples of 8"),
        (["generate", "x", "--size", "64x0"], "multiples of 8"),
        (["generate", "x", "--steps", "-3"], "must be 1 or more"),
        (["generate", "x", "--model", "/no/such/folder"], "no such folder"),
        (["generate", "x", "--model", "someone/not-cached-model"], "cannot be reached"),
        (["generate", "x", "--nproc", "2"], "needs a parallel --method"),
        (["generate", "x", "--warmup-steps", "2"], "needs a parallel --method"),
        (["generate", "x", "--stride", "2"], "needs a parallel --method"),
        (["bench", "--arch", "someone/unknown-arch"], "not a shipped architecture"),
    ],
)
def test_user_mistakes_give_one_clear_line(args, message):
    proc, _ = run_cli(*args, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("extra", [[], ["--method", "patch", "--nproc", "2"]])
def test_model_mistakes_are_found_before_diffusers_is_imported(tmp_path, extra):
    """A missing --model folder, or a folder that is not a pipeline, is said at once: no diffusers import (seconds),
    no rank started. A fresh interpreter, so what is imported is this call's doing."""
    import subprocess
    import sys

    code = ("import sys; from paradiff.cli import main; rc = main(sys.argv[1:]); "
            "print('imported diffusers' if 'diffusers' in sys.modules else 'no diffusers'); sys.exit(rc)")
    for model, message in (("/no/such/folder", "no such folder"), (str(tmp_path), "model_index.json")):
        proc = subprocess.run([sys.executable, "-c", code, "generate", "x", "--model", model, *extra],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr and f"--model {model}" in proc.stderr, proc.stderr
        assert proc.stdout.strip() == "no diffusers", proc.stdout


def test_folder_without_model_index(tmp_path):
    proc, _ = run_cli("generate", "x", "--model", str(tmp_path))
    assert proc.returncode == 2
    assert "model_index.json" in proc.stderr and "Traceback" not in proc.stderr


def test_library_errors_name_the_argument_and_the_cli_the_flag(capsys):
    """`load_pipeline` speaks in API terms; the CLI says the same sentence with the flag the user typed."""
    from paradiff.cli import main
    from paradiff.errors import UserError
    from paradiff.pipelines import load_pipeline

    with pytest.raises(UserError, match=r"^model='/no/such/folder': no such folder\.$"):
        load_pipeline("/no/such/folder")
    assert main(["generate", "x", "--model", "/no/such/folder"]) == 2
    assert capsys.readouterr().err.strip() == "paradiff: error: --model /no/such/folder: no such folder."


def test_generate_on_a_saved_pipeline_folder(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out.png"
    proc, _ = run_cli("generate", "a red circle", "--model", str(tiny_pipeline_dir), "--steps", "2",
                      "--size", "48x64", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (64, 48)
    assert "wrote" in proc.stdout


def test_main_command_draws_what_it_is_asked(tmp_path):
    """README's main job with no flags: the embedded model at its own guidance draws the prompt (checked from pixels).
    In a fresh interpreter, as a user runs it (the other CLI tests fork from the preloaded fork server)."""
    from paradiff.reference.checker import check

    out = tmp_path / "star.png"
    prompt = "a large yellow star at the top, purple background"
    proc, _ = run_cli("generate", prompt, "-o", str(out), timeout=300, fresh=True)
    assert proc.returncode == 0, proc.stderr
    result = check(Image.open(out), prompt)
    assert result.matched, result.analysis


def test_generate_uses_the_embedded_models_guidance_unless_told():
    from paradiff.cli import build_parser
    from paradiff.commands.generate import call_kwargs
    from paradiff.reference import DEFAULT_GUIDANCE

    parser = build_parser()
    assert call_kwargs(parser.parse_args(["generate", "x"]))["guidance_scale"] == DEFAULT_GUIDANCE == 3.0
    assert call_kwargs(parser.parse_args(["generate", "x", "--guidance", "6"]))["guidance_scale"] == 6.0
    assert "guidance_scale" not in call_kwargs(parser.parse_args(["generate", "x", "--model", "some/model"]))


def test_info_lists_versions_and_backends():
    proc, _ = run_cli("info")
    assert proc.returncode == 0, proc.stderr
    for key in ("torch", "diffusers", "gloo", "ranks"):
        assert key in proc.stdout


def test_nproc_larger_than_the_visible_gpus(monkeypatch):
    """Checked once in the launching process, before any rank starts (simulated: this machine has no GPU)."""
    import argparse

    import torch

    from paradiff.commands.common import check_before_launch
    from paradiff.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = argparse.Namespace(nproc=4, method="cfg+patch", device=None, warmup_steps=None, gn_mode=None,
                              stride=None, time_shift=None)
    with pytest.raises(UserError, match="more ranks than the 2 visible CUDA GPU"):
        check_before_launch(args)
    args.nproc = 2
    args.method = "patch"
    check_before_launch(args)  # fits


def test_compile_is_asked_for_not_assumed():
    """Patch and async steps compile only with --compile (minutes of compiling for one image is not a default)."""
    from paradiff.cli import build_parser
    from paradiff.commands.common import methods_from_args

    parser = build_parser()
    (patch,) = methods_from_args(parser.parse_args(["generate", "x", "--method", "patch"]))
    assert patch.compile is False and patch.cuda_graph is None  # CUDA graphs stay on by default on a GPU
    (patch,) = methods_from_args(parser.parse_args(["generate", "x", "--method", "patch", "--compile"]))
    assert patch.compile is True
    cfg, denoise = methods_from_args(parser.parse_args(["generate", "x", "--method", "cfg+async", "--compile"]))
    assert denoise.compile is True and cfg.compile is True
    (cfg,) = methods_from_args(parser.parse_args(["generate", "x", "--method", "cfg", "--compile"]))
    assert cfg.compile is True  # the measured CFG configuration, through the CLI


def test_library_errors_say_the_flag_the_user_typed():
    """Library messages name API arguments; the CLI re-says them with the flag (one rule for every command)."""
    import argparse

    from paradiff.cli import _with_flags

    args = argparse.Namespace(device="cuda", arch="sdxl")
    assert _with_flags("device='cuda' was asked for, but ...", args) == "--device cuda was asked for, but ..."
    assert _with_flags("arch='sdxl': unknown pipeline class.", args) == "--arch sdxl: unknown pipeline class."
    assert _with_flags("steps=3: too few", args) == "steps=3: too few"  # not an option of this command
    assert _with_flags("a plain sentence.", args) == "a plain sentence."
