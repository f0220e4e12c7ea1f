"""Adapter files, PEFT directories and ONNX export: the new spellings, and the old ones for one release.

Each old spelling (options passed positionally, `adapter=` where the selector is now
`adapters=`, `export_onnx_adapter(model=)`, `save_peft` picking a graph's only adapter) must
warn with a LowRankFxDeprecationWarning naming the new spelling, and do exactly what the new
spelling does. The model is a two-layer toy with two adapters, so every call is quick.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from models import toy

import lowrank_fx as lfx
from lowrank_fx.adapt.capture import capture
from lowrank_fx.deprecation import LowRankFxDeprecationWarning
from lowrank_fx.files.adapter_file import read_manifest

X = torch.randn(3, 8)


def two_adapters(first: str = "a", second: str = "b"):
    """The toy rewritten with two LoRA adapters of different values (both active)."""
    gm = lfx.rewrite(toy(), lfx.Spec(["fc1", "fc2"], method=lfx.LoRA(rank=2, init="nonzero")), adapter=first)
    return lfx.rewrite(gm, lfx.Spec(["fc1", "fc2"], method=lfx.LoRA(rank=3, alpha=2.0, init="nonzero")), adapter=second)


def one_adapter(name: str):
    return lfx.rewrite(toy(), lfx.Spec(["fc1", "fc2"], method=lfx.LoRA(rank=2, init="nonzero")), adapter=name)


def old(match: str):
    return pytest.warns(LowRankFxDeprecationWarning, match=match)


def saved_names(path) -> list[str]:
    return sorted(read_manifest(path)["adapters"])


def same_file(*paths) -> bool:
    """Adapter files with the same manifest and tensors (the header's key order may differ)."""
    manifests = [read_manifest(p) for p in paths]
    tensors = [safetensors.torch.load_file(p) for p in paths]
    return all(m == manifests[0] for m in manifests) and all(
        t.keys() == tensors[0].keys() and all(torch.equal(v, tensors[0][k]) for k, v in t.items()) for t in tensors)


# --- adapter files ------------------------------------------------------------------------


def test_adapters_selects_one_several_or_all(tmp_path):
    gm = two_adapters()
    assert saved_names(lfx.save_adapters(gm, tmp_path / "all.safetensors")) == ["a", "b"]
    assert saved_names(lfx.save_adapters(gm, tmp_path / "b.safetensors", adapters="b")) == ["b"]
    both = lfx.save_adapters(gm, tmp_path / "both.safetensors", adapters=["b", "a"])
    assert saved_names(both) == ["a", "b"]
    loaded = lfx.load_adapters(capture(toy()), both, adapters=["a"])
    assert lfx.active_adapters(loaded) == ["a"]
    with pytest.raises(lfx.AdapterFileError, match="has no adapter 'c'; it has: a, b"):
        lfx.save_adapters(gm, tmp_path / "x.safetensors", adapters=["a", "c"])
    with pytest.raises(lfx.AdapterFileError, match="adapters= must be an adapter name, a non-empty list"):
        lfx.load_adapters(capture(toy()), both, adapters=[])


def test_save_adapters_old_spellings_warn_and_save_the_same(tmp_path):
    gm = two_adapters()
    new = lfx.save_adapters(gm, tmp_path / "new.safetensors", adapters="b", include_buffers=True)
    with old(r"lowrank_fx.save_adapters: pass adapters, include_buffers as keyword arguments"):
        positional = lfx.save_adapters(gm, tmp_path / "positional.safetensors", "b", True)
    with old(r"lowrank_fx.save_adapters: adapter= is now adapters="):
        renamed = lfx.save_adapters(gm, tmp_path / "renamed.safetensors", adapter="b", include_buffers=True)
    assert same_file(new, positional, renamed) and saved_names(new) == ["b"]


def test_load_adapters_old_spellings_warn_and_load_the_same(tmp_path):
    gm = two_adapters()
    path = lfx.save_adapters(gm, tmp_path / "both.safetensors")
    lfx.set_active_adapters(gm, ["a"])
    want = gm(X)
    with old(r"pass adapters, example_inputs as keyword arguments"):
        positional = lfx.load_adapters(toy(), path, "a", (X,))
    with old(r"adapter= is now adapters="):
        renamed = lfx.load_adapters(toy(), path, adapter="a", example_inputs=(X,))
    for graph in (positional, renamed):
        assert list(graph.lowrank_fx) == ["a"]
        assert torch.equal(graph(X), want)


def test_loading_into_a_graph_changes_it_in_place_and_returns_it(tmp_path):
    source = two_adapters()
    path = lfx.save_adapters(source, tmp_path / "both.safetensors")
    target = capture(toy())
    assert lfx.load_adapters(target, path) is target  # as the docstring's Returns says
    assert torch.equal(target(X), source(X))
    peft_dir = lfx.save_peft(one_adapter("default"), tmp_path / "peft")
    assert lfx.load_peft(target, peft_dir, adapter="c") is target
    assert list(target.lowrank_fx) == ["a", "b", "c"]


# --- PEFT directories ---------------------------------------------------------------------


def test_peft_old_positional_options_warn_and_do_the_same(tmp_path):
    gm = two_adapters()
    with old(r"lowrank_fx.save_peft: pass adapter, base_model_name_or_path as keyword arguments"):
        lfx.save_peft(gm, tmp_path / "positional", "b", "tiny-toy")
    lfx.save_peft(gm, tmp_path / "new", adapter="b", base_model_name_or_path="tiny-toy")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "positional" / name).read_bytes() == (tmp_path / "new" / name).read_bytes()
    assert json.loads((tmp_path / "new" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-toy"
    with old(r"lowrank_fx.load_peft: pass adapter, example_inputs as keyword arguments"):
        positional = lfx.load_peft(toy(), tmp_path / "new", "tuned", (X,))
    loaded = lfx.load_peft(toy(), tmp_path / "new", adapter="tuned", example_inputs=(X,))
    lfx.set_active_adapters(gm, ["b"])
    assert list(positional.lowrank_fx) == list(loaded.lowrank_fx) == ["tuned"]
    assert torch.allclose(positional(X), gm(X), atol=1e-6) and torch.equal(positional(X), loaded(X))


def test_save_peft_defaults_to_the_default_adapter(tmp_path):
    gm = two_adapters("default", "b")
    lfx.save_peft(gm, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 2  # "default" (rank 2), not "b" (rank 3)
    with pytest.raises(lfx.AdapterFileError, match="no adapter 'default'; a PEFT directory holds one adapter: "
                                                   "pass adapter=<name>, one of a, b"):
        lfx.save_peft(two_adapters(), tmp_path / "none")


def test_save_peft_picking_the_only_adapter_warns_for_one_release(tmp_path):
    gm = one_adapter("tuned")
    with old(r"adapter= now defaults to 'default'; this graph's only adapter is 'tuned': pass adapter='tuned'") as got:
        lfx.save_peft(gm, tmp_path / "old")
    assert got[0].filename == __file__  # the warning points at the caller's line
    lfx.save_peft(gm, tmp_path / "new", adapter="tuned")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "old" / name).read_bytes() == (tmp_path / "new" / name).read_bytes()


# --- ONNX ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The two-adapter toy exported with swappable adapters (new spelling), and its graph."""
    gm = two_adapters()
    root = tmp_path_factory.mktemp("spellings")
    return gm, lfx.export_onnx(gm, root / "toy.onnx", example_inputs=(X,), optimize=False)


def outputs(gm, adapter: str | None) -> np.ndarray:
    lfx.set_active_adapters(gm, [] if adapter is None else [adapter])
    with torch.no_grad():
        out = gm(X).numpy()
    lfx.set_active_adapters(gm, ["a", "b"])
    return out


def test_export_onnx_old_positional_examples_warn_and_export_the_same(exported, tmp_path):
    gm, result = exported
    with old(r"lowrank_fx.export_onnx: pass example_inputs as keyword argument \(example_inputs=\.\.\.\)"):
        again = lfx.export_onnx(gm, tmp_path / "toy.onnx", (X,), optimize=False)
    assert (again.mode, again.inputs, again.adapter_inputs) == (result.mode, result.inputs, result.adapter_inputs)
    assert list(again.adapters) == list(result.adapters) == ["a", "b"]
    feeds = {result.inputs[0]: X.numpy()}
    for name in (None, "a", "b"):
        want = outputs(gm, name)
        for export in (result, again):
            assert np.allclose(export.session().run(feeds, adapter=name)[export.outputs[0]], want, atol=1e-5)


def test_export_onnx_takes_one_adapter_name(exported, tmp_path):
    gm, _ = exported
    merged = lfx.export_onnx(gm, tmp_path / "b.onnx", example_inputs=(X,), mode="merged", adapters="b",
                             optimize=False)
    out = merged.session().run({merged.inputs[0]: X.numpy()})[merged.outputs[0]]
    assert np.allclose(out, outputs(gm, "b"), atol=1e-5)


def test_export_onnx_adapter_model_path_and_its_old_spellings(exported, tmp_path):
    gm, result = exported
    new = lfx.export_onnx_adapter(gm, tmp_path / "new.onnx_adapter", adapter="b", model_path=result.path)
    with old(r"lowrank_fx.export_onnx_adapter: model= is now model_path="):
        renamed = lfx.export_onnx_adapter(gm, tmp_path / "renamed.onnx_adapter", adapter="b", model=result.path)
    with old(r"pass adapter, model_path as keyword arguments"):
        positional = lfx.export_onnx_adapter(gm, tmp_path / "positional.onnx_adapter", "b", result.path)
    assert new.read_bytes() == renamed.read_bytes() == positional.read_bytes()
    with pytest.raises(lfx.ExportError, match="model_path=.*no such .onnx file"):
        lfx.export_onnx_adapter(gm, tmp_path / "x.onnx_adapter", adapter="b", model_path=tmp_path / "none.onnx")


def test_adapter_session_old_positional_options_warn_and_run_the_same(exported, tmp_path):
    gm, result = exported
    file = lfx.export_onnx_adapter(gm, tmp_path / "extra.onnx_adapter", adapter="b")
    with old(r"lowrank_fx.AdapterSession: pass adapters, providers as keyword arguments"):
        session = lfx.AdapterSession(result.path, {"extra": file}, ["CPUExecutionProvider"])
    assert session.adapters == ["a", "b", "extra"]
    feeds = {result.inputs[0]: X.numpy()}
    with old(r"lowrank_fx.AdapterSession.run: pass adapter as keyword argument \(adapter=\.\.\.\)"):
        positional = session.run(feeds, "extra")[result.outputs[0]]
    assert np.array_equal(positional, session.run(feeds, adapter="extra")[result.outputs[0]])
    assert np.allclose(positional, outputs(gm, "b"), atol=1e-5)


def test_sessions_hold_no_current_adapter(exported):
    """Runs name their adapter; a run with one leaves the next run without it (the base model)."""
    gm, result = exported
    session = result.session(providers=["CPUExecutionProvider"])
    feeds = {result.inputs[0]: X.numpy()}
    session.run(feeds, adapter="a")
    assert np.allclose(session.run(feeds)[result.outputs[0]], outputs(gm, None), atol=1e-5)
