"""The `lowrank-fx` command: every subcommand on a built-in model, and bad input."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from lowrank_fx.cli.builtin_models import builtin
from lowrank_fx.cli.main import main


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


def test_merge_writes_weights_the_original_model_loads(trained, tmp_path):
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--adapters", str(trained), "--out", str(out)]) == 0
    state = load_file(str(out))
    model = builtin("tiny-llama").model
    assert set(state) == set(model.state_dict())
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    model.load_state_dict(state)
    changed = (model.model.layers[0].self_attn.q_proj.weight - before).abs().max()
    assert changed > 0  # training moved B off zero, so the fold changed q_proj


def test_export_writes_onnx_and_adapter_files(trained, tmp_path):
    out = tmp_path / "model.onnx"
    assert main(["export", "--adapters", str(trained), "--out", str(out)]) == 0
    assert out.exists() and (tmp_path / "model.default.onnx_adapter").exists()


def test_synthetic_demo_runs_and_checks_its_fold(capsys):
    assert main(["demo", "--synthetic", "--steps", "5", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "fold check             PASS" in out and "ORT = lfx.generate     PASS" in out


@pytest.mark.parametrize("argv, words", [
    (["plan", "--model", "no-such-model"], "not a built-in"),
    (["plan", "--targets", "q_prj"], "q_proj"),
    (["plan", "--rank", "0"], "rank must be a positive integer"),
    (["plan", "--spec", "/nonexistent/spec.json"], "cannot read spec file"),
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
    assert main(argv + ["--steps", "2"]) == 0
    checkpoints = tmp_path / "adapter.safetensors.checkpoints"
    assert (checkpoints / "latest.json").exists()
    first = load_file(str(out))
    assert main(argv + ["--steps", "4"]) == 0  # resumes at step 2 and trains two more
    assert any((load_file(str(out))[k] != first[k]).any() for k in first)
    assert json.loads((checkpoints / "latest.json").read_text())["step"] == 4
