"""FSDP2 per layer block: two gloo processes on CPU (torchrun, as README shows) train a
Llama graph rewritten with layers="auto" under lfx.Trainer(distributed="fsdp"), compiled
(aot_eager, without falling back to eager) for the first two steps, eager after resuming. Their adapters,
merged state and PEFT directory (gathered, written by rank 0) equal one process on the global
batches; each rank holds half of the base weights; the sharded checkpoint resumes sharded
(in tests/fsdp_worker.py) and unsharded."""

import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsdp_worker.py")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")


def _start(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(process, timeout=240):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-6000:]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    single = _start([sys.executable, WORKER, str(out), "single"])  # alongside the two ranks
    _wait(_start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  WORKER, str(out), "fsdp"]))
    _wait(single)
    _wait(_start([sys.executable, WORKER, str(out), "resume"]))
    return out


def _equal(path_a, path_b, atol=1e-6):
    a, b = safetensors.torch.load_file(path_a), safetensors.torch.load_file(path_b)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=1e-5), (key, (a[key] - b[key]).abs().max())
    return a


@pytest.mark.parametrize("name", [".safetensors", "-merged.safetensors", "-peft/adapter_model.safetensors"])
def test_two_ranks_match_one_process(out, name):
    saved = _equal(out / f"fsdp{name}", out / f"single{name}")
    if name == ".safetensors":
        assert any(v.abs().max() > 0 for k, v in saved.items() if k.endswith("lora_B"))  # it trained
    if name.startswith("-peft"):
        assert (out / "fsdp-peft/adapter_config.json").read_text() == (out / "single-peft/adapter_config.json").read_text()


def test_each_rank_holds_half_of_the_base_weights(out):
    for rank in (0, 1):
        held = json.loads((out / f"rank{rank}.json").read_text())
        assert 0.45 <= held["held"] / held["full"] <= 0.55, held


def test_sharded_checkpoint_resumes_unsharded(out):
    _equal(out / "resumed.safetensors", out / "single.safetensors")
    state = safetensors.torch.load_file(out / "ckpt-copy/step-00000002/adapters.safetensors")
    single = safetensors.torch.load_file(out / "single.safetensors")
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in single.items()}  # whole tensors


def test_errors_say_how_to_fix():
    import models

    import lowrank_fx as lfx
    from lowrank_fx.training.fsdp import shard_layers

    case = models.build("llama")
    flat = lfx.rewrite(case.model, lfx.Spec(targets=["*.q_proj"], method=lfx.LoRA(rank=2)),
                       example_inputs=case.args, example_kwargs=case.kwargs)
    with pytest.raises(lfx.SpecError, match="layers='auto'"):
        shard_layers(flat)
    def loss(model, batch):
        return model(batch).logits.mean()
    with pytest.raises(lfx.SpecError, match="init_process_group"):
        lfx.Trainer(flat, loss, distributed="fsdp")
    with pytest.raises(lfx.SpecError, match="'ddp' \\(or True\\) or 'fsdp'"):
        lfx.Trainer(flat, loss, distributed="zero3")
