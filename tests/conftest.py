import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/distributed.py helper
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub


@pytest.fixture(autouse=True)
def _fresh_runtime():
    """Each test starts single-process; a test that initialised the runtime leaves no state behind."""
    from paradiff import runtime

    yield
    runtime.shutdown()
