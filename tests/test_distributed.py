"""DDP: two gloo processes on CPU (launched with torchrun, as README shows) train an adapted
Llama graph; their adapters end identical, and equal to one process on the global batch."""

import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_worker.py")


def _run(args, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The adapters of one process trained on the whole global batches."""
    out = tmp_path_factory.mktemp("single")
    _run([sys.executable, WORKER, str(out), "eager", "single"])
    return safetensors.torch.load_file(out / "single.safetensors")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
@pytest.mark.parametrize("mode", ["eager", "aot_eager"])
def test_ddp_two_ranks_match_one_process(tmp_path, mode, single):
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          WORKER, str(tmp_path), mode])
    ranks = [safetensors.torch.load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == single.keys() and single
    for key, value in single.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        assert torch.allclose(ranks[0][key], value, atol=1e-6, rtol=1e-5), (key, (ranks[0][key] - value).abs().max())
    assert any(value.abs().max() > 0 for key, value in single.items() if key.endswith("lora_B"))  # it trained
