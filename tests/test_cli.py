"""The `lowrank-fx` command: every subcommand on a built-in model, and bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lowrank_fx as lfx
from lowrank_fx.cli.builtin_models import builtin
from lowrank_fx.cli.main import main


def rel_err(got, want) -> float:
    got, want = np.asarray(got), np.asarray(want)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog\nadapters are small and cheap to train\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("run") / "adapter.safetensors"
    assert main(["train", "--data", str(corpus), "--steps", "3", "--targets", "q_proj", "v_proj",
                 "--rank", "4", "--out", str(out)]) == 0
    return out


def test_plan_prints_a_table(capsys):
    assert main(["plan", "--model", "tiny-gpt2", "--targets", "c_attn", "--rank", "4"]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.0.attn.c_attn" in out and "2 targets" in out


def test_plan_from_spec_file_with_mixed_methods(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text('{"targets": {"re:.*(q|k|v|o)_proj": {"method": "lorta", "rank": 4},'
                    ' "re:.*(gate|up|down)_proj": {"method": "lora", "rank": 4}}}')
    assert main(["plan", "--spec", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "lorta" in out and "lora(" in out


def test_spec_file_trains_modules_in_full(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text('{"targets": ["q_proj"], "method": {"method": "lora", "rank": 2}, "train": ["lm_head"]}')
    assert main(["plan", "--spec", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "trained in full by Spec.train" in out and "lm_head.weight" in out


def test_train_writes_an_adapter_file(trained):
    tensors = load_file(str(trained))
    assert any(name.endswith("lora_A") for name in tensors)
    assert any(name.endswith("lora_B") for name in tensors)


def _adapted(path):
    """The built-in tiny Llama (the CLI's own weights) with the adapter file loaded, and its inputs."""
    built = builtin("tiny-llama")
    gm = lfx.load_adapters(built.model, str(path), example_inputs=built.example_inputs,
                           example_kwargs=built.example_kwargs)
    return gm, built


def test_merge_equals_the_library_fold(trained, tmp_path):
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--adapters", str(trained), "--out", str(out)]) == 0
    state = load_file(str(out))
    gm, built = _adapted(trained)
    expected = lfx.merged_state_dict(gm)
    assert set(state) == set(expected) == set(builtin("tiny-llama").model.state_dict())
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    base = builtin("tiny-llama").model.state_dict()
    adapter = load_file(str(trained))
    scale = 16.0 / 4  # LoRA's default alpha over the fixture's rank
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):  # by hand: W + (alpha / r) B A
            unit = f"default.lora.units.model-layers-{layer}-self_attn-{proj}"
            key = f"model.layers.{layer}.self_attn.{proj}.weight"
            folded = base[key] + scale * adapter[f"{unit}.lora_B"] @ adapter[f"{unit}.lora_A"]
            assert torch.allclose(state[key], folded, rtol=1e-6, atol=1e-6), key
            assert not torch.equal(state[key], base[key]), key  # the fixture's training moved B off zero
    model = builtin("tiny-llama").model
    model.load_state_dict(state)
    ids = built.example_inputs[0]
    with torch.no_grad():
        want = lfx.merge(gm)(ids, use_cache=False).logits
        got = model(ids, use_cache=False).logits
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("mode", ["adapters", "merged"])
def test_export_runs_in_onnx_runtime_as_the_graph_does(trained, tmp_path, mode):
    out = tmp_path / "model.onnx"
    assert main(["export", "--adapters", str(trained), "--out", str(out), "--mode", mode]) == 0
    gm, _built = _adapted(trained)
    ids = torch.randint(0, 64, (3, 11))  # another batch and length than the export's example
    session = lfx.AdapterSession(out)
    assert session.adapters == (["default"] if mode == "adapters" else [])
    with torch.no_grad():
        adapted = gm(ids, use_cache=False).logits.numpy()
        base = builtin("tiny-llama").model(ids, use_cache=False).logits.numpy()
    got = session.run({"input_ids": ids}, adapter="default" if mode == "adapters" else None)
    assert rel_err(got[session.output_names[0]], adapted) < 1e-5
    assert rel_err(adapted, base) > 1e-4  # the adapter changes the output, so the check above can tell
    if mode == "adapters":
        got = session.run({"input_ids": ids}, adapter=None)
        assert rel_err(got[session.output_names[0]], base) < 1e-5


def test_synthetic_demo_runs_and_checks_its_fold(capsys):
    assert main(["demo", "--synthetic", "--steps", "5", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "fold check             PASS" in out and "ORT = lfx.generate     PASS" in out


@pytest.mark.parametrize("argv, words", [
    (["plan", "--model", "no-such-model"], "not a built-in"),
    (["plan", "--targets", "q_prj"], "q_proj"),
    (["plan", "--rank", "0"], "rank must be a positive integer"),
    (["plan", "--spec", "/nonexistent/spec.json"], "spec file /nonexistent/spec.json does not exist"),
    (["plan", "--model", "json:no_such_factory"], "no attribute"),
    (["train", "--out", "x.safetensors"], "needs --data"),
])
def test_bad_input_is_one_line_and_exit_2(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err


def test_bad_adapter_files_are_refused(tmp_path, trained, capsys):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(trained.read_bytes()[:100])
    assert main(["merge", "--adapters", str(truncated), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "truncated" in capsys.readouterr().err
    other = tmp_path / "other.safetensors"  # trained on tiny-llama, loaded onto tiny-gpt2
    other.write_bytes(trained.read_bytes())
    assert main(["merge", "--model", "tiny-gpt2", "--adapters", str(other), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert not (tmp_path / "m.safetensors").exists()


def test_entry_point_never_prints_a_traceback():
    run = subprocess.run([sys.executable, "-m", "lowrank_fx.cli", "plan", "--targets", "nothing_like_this"],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr and "nothing_like_this" in run.stderr


def test_train_checkpoints_and_resumes(corpus, tmp_path):
    out = tmp_path / "adapter.safetensors"
    argv = ["train", "--data", str(corpus), "--targets", "q_proj", "--rank", "2", "--out", str(out), "--save-every", "2"]
    assert main([*argv, "--steps", "2"]) == 0
    checkpoints = tmp_path / "adapter.safetensors.checkpoints"
    assert (checkpoints / "latest.json").exists()
    first = load_file(str(out))
    assert main([*argv, "--steps", "4"]) == 0  # resumes at step 2 and trains two more
    assert any((load_file(str(out))[k] != first[k]).any() for k in first)
    assert json.loads((checkpoints / "latest.json").read_text())["step"] == 4
