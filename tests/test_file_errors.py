"""Files and sessions say what went wrong instead of doing something else quietly:
  - saving creates a missing folder, and an unwritable path is named (not the hidden temp file);
  - an adapter folded into a model's weights (load_merged, merge) is not loaded into it again;
  - damaged manifests and NaN / inf adapter values are refused;
  - AdapterSession refuses inputs the model does not take, and files ORT cannot read."""

from __future__ import annotations

import copy
import json
import os

import models
import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from models import toy

import lowrank_fx as lfx
from lowrank_fx.files.adapter_file import MANIFEST_KEY

X = torch.randn(3, 8)


def adapted(model, adapter="a", seed=2, targets=("fc1", "fc2")):
    torch.manual_seed(seed)
    return lfx.rewrite(model, lfx.Spec(list(targets), method=lfx.LoRA(rank=2, init="nonzero")), adapter=adapter).eval()


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_unchanged(module, before):
    after = module.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def run(module):
    with torch.no_grad():
        return module(X)


# --- saving --------------------------------------------------------------------------------


def test_save_creates_missing_folders(tmp_path):
    gm = adapted(toy())
    path = lfx.save_adapters(gm, tmp_path / "new" / "deeper" / "a.safetensors")
    assert torch.equal(run(lfx.load_adapters(toy(), path)), run(gm))
    directory = lfx.save_peft(gm, tmp_path / "peft" / "a", adapter="a")
    assert torch.equal(run(lfx.load_peft(toy(), directory, adapter="a")), run(gm))


def test_an_unwritable_path_is_named_not_the_temporary_file(tmp_path):
    gm = adapted(toy())
    (tmp_path / "file").write_text("not a folder")
    path = tmp_path / "file" / "a.safetensors"
    with pytest.raises(lfx.FileWriteError) as info:
        lfx.save_adapters(gm, path)
    assert isinstance(info.value, OSError) and isinstance(info.value, lfx.AdapterFileError)
    assert f"cannot write {path}:" in str(info.value) and ".tmp" not in str(info.value)
    with pytest.raises(lfx.FileWriteError, match=f"cannot write {tmp_path / 'file' / 'peft'}"):
        lfx.save_peft(gm, tmp_path / "file" / "peft", adapter="a")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_a_refused_rename_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch):
    """What a read-only directory does (simulated: the suite may run as root, which ignores modes)."""
    path = lfx.save_adapters(adapted(toy()), tmp_path / "a.safetensors")
    before = path.read_bytes()

    def refuse(source, destination):
        raise PermissionError(13, "Permission denied", str(source))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(lfx.FileWriteError, match=f"cannot write {path}: Permission denied") as info:
        lfx.save_adapters(adapted(toy(), seed=3), path)
    assert ".tmp" not in str(info.value)
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["a.safetensors"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_named(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(lfx.FileWriteError, match=f"cannot write {folder / 'a.safetensors'}"):
            lfx.save_adapters(adapted(toy()), folder / "a.safetensors")
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o755)


# --- refusals while loading ------------------------------------------------------------------


def _rewrite_manifest(path, edit):
    """Edit the manifest and keep its stored checksum: what a damaged file looks like."""
    with safetensors.safe_open(str(path), "pt") as file:
        metadata = file.metadata()
        tensors = {k: file.get_tensor(k) for k in file.keys()}
    manifest = json.loads(metadata[MANIFEST_KEY])
    edit(manifest)
    safetensors.torch.save_file(tensors, str(path), metadata={**metadata, MANIFEST_KEY: json.dumps(manifest)})


def test_a_changed_manifest_fails_its_checksum(tmp_path):
    gm = adapted(toy())
    path = lfx.save_adapters(gm, tmp_path / "a.safetensors")

    def alpha(manifest):
        manifest["adapters"]["a"]["spec"]["rules"][0]["method"]["alpha"] = 17.0

    _rewrite_manifest(path, alpha)
    target = adapted(toy())
    before = snapshot(target)
    with pytest.raises(lfx.AdapterFileError, match="fails its manifest checksum"):
        lfx.load_adapters(target, path)
    assert_unchanged(target, before)


def test_nan_adapter_values_are_refused(tmp_path):
    gm = adapted(toy())
    with torch.no_grad():
        gm.lowrank_fx["a"]["lora"].units["fc2"].lora_B[0, 0] = float("nan")
    path = lfx.save_adapters(gm, tmp_path / "a.safetensors")
    target = adapted(toy(), seed=5)
    before = snapshot(target)
    with pytest.raises(lfx.AdapterFileError, match="lora.units.fc2.lora_B holds NaN or inf values"):
        lfx.load_adapters(target, path)
    assert_unchanged(target, before)


# --- an adapter folded into the model is not loaded again ----------------------------------------

FOLDED = r"already has adapter 'a' folded into its weights \(by lfx.load_merged or lfx.merge\).*second time"


@pytest.fixture
def files(tmp_path):
    """(original model, its adapted graph, adapter file, PEFT directory, reference output)."""
    model = toy()
    gm = adapted(model)
    return (model, gm, lfx.save_adapters(gm, tmp_path / "a.safetensors"),
            lfx.save_peft(gm, tmp_path / "peft", adapter="a"), run(gm))


def test_load_merged_then_loading_the_same_adapter_is_refused(files):
    model, gm, path, peft_dir, reference = files
    lfx.load_merged(model, gm)
    torch.testing.assert_close(run(model), reference, rtol=1e-5, atol=1e-6)
    before = snapshot(model)
    with pytest.raises(lfx.AdapterFileError, match=FOLDED):
        lfx.load_adapters(model, path)
    with pytest.raises(lfx.AdapterFileError, match=FOLDED):
        lfx.load_peft(model, peft_dir, adapter="b")
    again = adapted(model, seed=9)  # rewrite, then load the file into that adapter
    graph_before = snapshot(again)
    with pytest.raises(lfx.AdapterFileError, match=FOLDED):
        lfx.load_adapters(again, path)
    assert_unchanged(again, graph_before)
    assert_unchanged(model, before)
    torch.testing.assert_close(run(model), reference, rtol=1e-5, atol=1e-6)


def test_merge_marks_its_weights_too(files):
    model, gm, path, _, _ = files
    with pytest.raises(lfx.AdapterFileError, match=FOLDED):
        lfx.load_adapters(lfx.merge(gm), path)
    lfx.merge(gm, inplace=True)  # the original model's own tensors now hold W + ΔW
    with pytest.raises(lfx.AdapterFileError, match=FOLDED):
        lfx.load_adapters(model, path)


def test_only_the_folded_adapter_on_the_folded_weights_is_refused(files, tmp_path):
    """The original weights take the adapter; a folded model takes another adapter on top (the same
    output as both adapters on the original weights); weights written again (load_state_dict of
    the originals) lose the mark and take it too."""
    model, gm, path, _, reference = files
    original = copy.deepcopy(model)
    lfx.load_merged(model, gm)
    with pytest.raises(lfx.AdapterFileError, match=FOLDED):
        lfx.load_adapters(model, path)
    torch.testing.assert_close(run(lfx.load_adapters(copy.deepcopy(original), path)), reference, rtol=1e-5, atol=1e-6)
    second = adapted(copy.deepcopy(original), adapter="b", seed=4, targets=("fc2",))
    other = lfx.save_adapters(second, tmp_path / "b.safetensors")
    both = lfx.load_adapters(lfx.load_adapters(copy.deepcopy(original), path), other)
    torch.testing.assert_close(run(lfx.load_adapters(model, other)), run(both), rtol=1e-5, atol=1e-6)
    model.load_state_dict(original.state_dict())
    torch.testing.assert_close(run(lfx.load_adapters(model, path)), reference, rtol=1e-5, atol=1e-6)


def test_export_generation_refuses_a_folded_adapter_file(tmp_path):
    case = models.build("llama")
    gm = lfx.rewrite(case.model, lfx.Spec(["q_proj", "v_proj"], method=lfx.LoRA(rank=2, init="nonzero")),
                     example_inputs=case.args, example_kwargs=case.kwargs, adapter="a")
    path = lfx.save_adapters(gm, tmp_path / "a.safetensors")
    lfx.load_merged(case.model, gm)
    with pytest.raises(lfx.AdapterFileError, match=FOLDED):
        lfx.export_generation(case.model, {"a": path}, tmp_path / "gen")
    assert not (tmp_path / "gen").exists()


# --- AdapterSession --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    gm = lfx.rewrite(toy(), lfx.Spec(["fc1", "fc2"], method=lfx.LoRA(rank=2, init="nonzero")),
                     example_inputs=(X,), adapter="a")
    result = lfx.export_onnx(gm, tmp_path_factory.mktemp("onnx") / "toy.onnx", example_inputs=(X,), optimize=False)
    return result, result.session()


def test_session_refuses_inputs_the_model_does_not_take(exported):
    _result, session = exported
    x = X.numpy()
    want = session.run({"x": x}, adapter="a")["output"]
    with pytest.raises(lfx.InputError, match=r"'attention_mask' is not an input of this model, so it would "
                                             r"change nothing; toy.onnx takes x \(float"):
        session.run({"x": x, "attention_mask": np.zeros((3, 8), np.int64)}, adapter="a")
    with pytest.raises(lfx.InputError, match=r"2 inputs given in order, but toy.onnx takes x"):
        session.run((x, x))
    with pytest.raises(lfx.InputError, match=r"missing input 'x': toy.onnx takes x"):
        session.run({})
    with pytest.raises(lfx.InputError, match=r"input 'x' is float64, the model takes float32"):
        session.run({"x": x.astype(np.float64)})
    np.testing.assert_array_equal(session.run([x], adapter="a")["output"], want)


def test_session_refuses_files_it_cannot_read(exported, tmp_path):
    result, _ = exported
    with pytest.raises(lfx.ExportError, match="does not exist"):
        lfx.AdapterSession(tmp_path / "missing.onnx")
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(result.path.read_bytes()[:2000])
    with pytest.raises(lfx.ExportError, match="ONNX Runtime cannot load .*truncated or corrupt"):
        lfx.AdapterSession(cut)
    model = tmp_path / "m.onnx"
    model.write_bytes(result.path.read_bytes())
    (tmp_path / "m.lowrank_fx.json").write_text('{"format": "lowrank_fx.onnx", "adapters": {"a": ')
    with pytest.raises(lfx.ExportError, match="m.lowrank_fx.json is not valid JSON"):
        lfx.AdapterSession(model)
    (tmp_path / "m.lowrank_fx.json").write_text('{"format": "lowrank_fx.onnx", "adapters": ["a"]}')
    with pytest.raises(lfx.ExportError, match="lists adapters in a malformed way"):
        lfx.AdapterSession(model)
