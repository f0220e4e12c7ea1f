"""The `lowrank-fx` command refuses bad input before any work, with one clear message and exit 2."""

import json
import os
import sys

import pytest

import lowrank_fx.cli.sources as sources
from lowrank_fx.cli.main import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog\nadapters are small and cheap to train\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("run") / "adapter.safetensors"
    assert main(["train", "--data", str(corpus), "--steps", "2", "--targets", "q_proj", "v_proj",
                 "--rank", "4", "--out", str(out)]) == 0
    return out


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command loads a model (bad input must be refused before that)."""
    def refuse(source):
        raise AssertionError(f"the command loaded the model {source!r} before refusing its input")
    monkeypatch.setattr(sources, "load_model", refuse)


def refused(argv, capsys, *words) -> str:
    """Run argv; check exit 2, one stderr line holding `words`, no traceback. Returns the line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


@pytest.mark.parametrize("argv, flag, bound", [
    (["train", "--steps", "0"], "--steps", ">= 1"),
    (["train", "--steps", "-3"], "--steps", ">= 1"),
    (["train", "--batch-size", "0"], "--batch-size", ">= 1"),
    (["train", "--seq-len", "1"], "--seq-len", ">= 2"),  # one token leaves nothing to predict
    (["train", "--save-every", "-1"], "--save-every", ">= 0"),
    (["train", "--lr", "0"], "--lr", "> 0"),
    (["demo", "--synthetic", "--steps", "0"], "--steps", ">= 1"),
    (["generate", "gen", "--prompt-ids", "1", "--max-new-tokens", "0"], "--max-new-tokens", ">= 1"),
])
def test_counts_and_rates_out_of_range_are_refused_before_work(argv, flag, bound, corpus, tmp_path, no_model, capsys):
    out = tmp_path / "adapter.safetensors"
    if argv[0] == "train":
        argv = [*argv, "--data", str(corpus), "--out", str(out)]
    refused(argv, capsys, f"argument {flag}", bound)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _spec(tmp_path, data) -> str:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_a_dora_spec_names_the_methods_and_the_dora_option(tmp_path, capsys):
    path = _spec(tmp_path, {"targets": ["q_proj"], "method": {"method": "dora", "rank": 2}})
    err = refused(["plan", "--spec", path], capsys, "unknown method 'dora'", "lora, lorta, randlora, trainable_tokens")
    assert "upgrade" not in err
    suggested = json.loads(err[err.rindex("write ") + len("write "):])
    assert suggested == {"method": "lora", "dora": True}
    path = _spec(tmp_path, {"targets": ["q_proj"], "method": {**suggested, "rank": 2}})
    assert main(["plan", "--spec", path]) == 0  # what the message says to write works
    # two 64 x 64 q_proj, each rank 2 · (64 + 64) plus DoRA's 64 magnitudes (plain LoRA: 512 in all)
    assert "2 targets; trainable 640 of base" in capsys.readouterr().out


@pytest.mark.parametrize("data, words", [
    ({"targets": ["q_proj"], "method": {"method": "LoRA"}}, ["unknown method 'LoRA'", "lowercase: 'lora'"]),
    ({"targets": {"q_proj": {"method": "lorra"}}}, ["the method for 'q_proj' has unknown method 'lorra'",
                                                    "lora, lorta, randlora"]),
    ({"targets": ["q_proj"], "rank": 4}, ["unknown key 'rank'", "the keys are targets, method, exclude, train"]),
    ({"targets": ["q_proj"], "method": "lora"}, ['"method" must be an object', '{"method": "lora", "rank": 8}']),
    ({"targets": ["q_proj"], "method": {"method": "lora", "rnak": 2}}, ["unknown option 'rnak'", "rank"]),
    (["q_proj"], ["must hold a JSON object", "not a list"]),
    ({"method": {"method": "lora"}}, ['has no "targets"']),
    ({"targets": {"q_proj": {"method": "lora"}}, "method": {"method": "lora"}}, ["give each method there"]),
    ({"targets": ["q_proj"], "exclude": 5}, ["exclude must be a pattern", "or a list of patterns, got 5"]),
    ({"targets": 5}, ["targets must be", "got 5"]),
])
def test_spec_file_mistakes_are_named(data, words, tmp_path, capsys):
    path = _spec(tmp_path, data)
    refused(["plan", "--spec", path], capsys, f"spec file {path}", *words)


def test_merge_error_shows_every_difference(trained, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"  # a tiny-llama adapter onto tiny-gpt2
    assert main(["merge", "--model", "tiny-gpt2", "--adapters", str(trained), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == f"lowrank-fx merge: error: cannot load adapters from {trained}; nothing was changed. Differences:"
    text = "\n".join(lines)
    assert "  adapter 'default':" in lines and "base model fingerprint differs" in text
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            assert f"model.layers.{layer}.self_attn.{proj}" in text
    assert lines[-1].startswith("Load it into a graph of the same base model") and "Traceback" not in text
    assert not out.exists()


def _file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    return path


@pytest.mark.parametrize("command, flag, words", [
    (["train", "--data", "CORPUS"], "--out", ["is a folder", "adapter.safetensors"]),
    (["merge", "--adapters", "ADAPTER"], "--out", ["is a folder", "merged.safetensors"]),
    (["export"], "--out", ["is a folder", "model.onnx"]),
])
def test_an_output_file_that_is_a_folder_is_refused_before_work(command, flag, words, corpus, trained, tmp_path,
                                                                 no_model, capsys):
    argv = [{"CORPUS": str(corpus), "ADAPTER": str(trained)}.get(a, a) for a in command]
    refused([*argv, flag, str(tmp_path)], capsys, f"{flag} {tmp_path}", *words)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, flag", [
    (["train", "--data", "CORPUS"], "--out"),
    (["merge", "--adapters", "ADAPTER"], "--out"),
    (["export"], "--out"),
    (["export", "--adapters", "ADAPTER"], "--generation"),
    (["demo"], "--out"),
])
def test_an_output_under_a_file_is_refused_before_work(command, flag, corpus, trained, tmp_path, no_model, capsys):
    argv = [{"CORPUS": str(corpus), "ADAPTER": str(trained)}.get(a, a) for a in command]
    blocker = _file(tmp_path)
    refused([*argv, flag, str(blocker / "sub" / "out.bin")], capsys, flag, f"{blocker} is a file, not a folder")
    assert blocker.read_text() == "x" and [p.name for p in tmp_path.iterdir()] == ["a_file"]


@pytest.mark.parametrize("command, flag", [(["export", "--adapters", "ADAPTER"], "--generation"), (["demo"], "--out")])
def test_an_output_folder_that_is_a_file_is_refused_before_work(command, flag, trained, tmp_path, no_model, capsys):
    argv = [{"ADAPTER": str(trained)}.get(a, a) for a in command]
    blocker = _file(tmp_path)
    refused([*argv, flag, str(blocker)], capsys, f"{flag} {blocker} is a file; give a folder")
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a user whom permissions bind")
def test_train_into_a_read_only_folder_is_refused_before_work(corpus, tmp_path, no_model, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        refused(["train", "--data", str(corpus), "--out", str(locked / "a.safetensors")], capsys,
                f"cannot write in {locked}")
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc takes no new files on Linux, even from root")
def test_train_into_a_folder_that_takes_no_files_is_refused_before_work(corpus, no_model, capsys):
    refused(["train", "--data", str(corpus), "--out", "/proc/a.safetensors"], capsys,
            "--out /proc/a.safetensors: cannot write in /proc")


def _bad_inputs(tmp_path) -> dict:
    """name -> (argv, words the message must hold) for files and folders that are not what they should be."""
    folder = tmp_path / "folder"
    folder.mkdir()
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{oops")
    no_type = tmp_path / "model"
    no_type.mkdir()
    (no_type / "config.json").write_text('{"hidden_size": 8}')
    damaged, foreign = tmp_path / "damaged", tmp_path / "foreign"  # generation directories
    for directory, content in ((damaged, "{oops"), (foreign, "{}")):
        directory.mkdir()
        (directory / "genai_config.json").write_text(content)
    return {
        "spec folder": (["plan", "--spec", str(folder)], [f"spec file {folder} is a folder"]),
        "spec bad json": (["plan", "--spec", str(bad_json)], [f"spec file {bad_json} is not valid JSON", "line 1, column 2"]),
        "config without model_type": (["plan", "--model", str(no_type)],
                                       [f"{no_type / 'config.json'} is not a transformers config"]),
        "factory needing arguments": (["train", "--data", "json:loads", "--out", str(tmp_path / "a.safetensors")],
                                      ["json:loads cannot be called without arguments"]),
        "damaged genai_config": (["generate", str(damaged), "--prompt-ids", "1"],
                                 [f"{damaged / 'genai_config.json'} is damaged or not from lfx.export_generation"]),
        "foreign genai_config": (["generate", str(foreign), "--prompt-ids", "1"],
                                 [f"{foreign / 'genai_config.json'} is damaged or not from lfx.export_generation"]),
    }


@pytest.mark.parametrize("case", ["spec folder", "spec bad json", "config without model_type",
                                  "factory needing arguments", "damaged genai_config", "foreign genai_config"])
def test_bad_files_and_folders_give_one_line(case, tmp_path, capsys):
    argv, words = _bad_inputs(tmp_path)[case]
    refused(argv, capsys, *words)


def test_a_bad_flag_is_one_line_and_exit_2(capsys):
    refused(["train", "--steps", "many", "--out", "x.safetensors"], capsys, "argument --steps", "--help")
    refused(["plan", "--method", "dora"], capsys, "argument --method: invalid choice: 'dora'", "randlora")


def test_synthetic_demo_with_out_is_refused_since_it_writes_nothing(tmp_path, no_model, capsys):
    refused(["demo", "--synthetic", "--out", str(tmp_path / "d")], capsys, "--synthetic writes no files", "--out")
    assert not (tmp_path / "d").exists()
