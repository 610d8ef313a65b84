"""paradiff: fast diffusion inference for diffusers pipelines.

    pipe = paradiff.parallelize(pipe, paradiff.PatchParallel(warmup_steps=4))   # under torchrun / --nproc
    image = pipe("an astronaut in a jungle").images[0]

Names are imported lazily so `import paradiff` (and the CLI's --help) stays fast and torch-free.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "parallelize": "paradiff.parallel",
    "unparallelize": "paradiff.parallel",
    "ParallelMethod": "paradiff.parallel",
    "PatchParallel": "paradiff.methods.patch",
    "parallelize_vae": "paradiff.methods.vae",
    "CFGParallel": "paradiff.methods.cfg",
    "AsyncDenoise": "paradiff.methods.asyncdenoise",
    "StreamPipeline": "paradiff.stream",
    "is_main_process": "paradiff.runtime",
    "init": "paradiff.runtime",
    "shutdown": "paradiff.runtime",
    "UserError": "paradiff.errors",
    "CollectiveError": "paradiff.errors",
    "load_pipeline": "paradiff.pipelines",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'paradiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
