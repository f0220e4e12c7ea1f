"""Shared test setup: `import models` works from any test file; each test starts from seed 0;
progress output is off (LOWRANK_FX_QUIET=1)."""

import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# no progress lines or bars in the suite's output (tests/test_progress.py unsets it where it looks)
os.environ["LOWRANK_FX_QUIET"] = "1"


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, whatever ran before it."""
    torch.manual_seed(0)
    yield


# torch.export logs every traced op at DEBUG to its structured-trace logger; pytest would
# print all of it beside any failure. Only TORCH_TRACE files need those records.
logging.getLogger("torch.__trace").setLevel(logging.INFO)
