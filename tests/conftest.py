import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/support (models, run_ranks), cli_utils
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub


@pytest.fixture(autouse=True)
def _fresh_runtime():
    """Each test starts single-process; a test that initialised the runtime leaves no state behind."""
    from paradiff import runtime

    yield
    runtime.shutdown()


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny random SD pipeline written with save_pretrained: a real folder for the real loading code."""
    from support.models import tiny_sd_pipeline

    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(path)
    return path
