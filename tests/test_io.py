"""Adapter files: round trips, atomic writes, and every refusal leaving the graph untouched.

Most tests use a two-layer toy model (symbolic_trace, instant); the Llama tests check real
captured graphs, LoRTA's shared factors, and loading straight into an uncaptured model.
"""

from __future__ import annotations

import json
import os
import pickle

import models
import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import lowrank_fx as lfx
from lowrank_fx.adapt.capture import capture
from lowrank_fx.files.adapter_file import MANIFEST_KEY, read_manifest


class Toy(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(8, width)
        self.fc2 = nn.Linear(width, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


X = torch.randn(3, 8)


def toy_graph(spec=None, width: int = 16, dtype=torch.float32, adapter="default"):
    """The toy model (same base weights every time), captured, and rewritten if `spec` is given."""
    torch.manual_seed(1)
    model = Toy(width).to(dtype)
    if spec is None:
        return capture(model)
    return lfx.rewrite(model, spec, adapter=adapter)


def nonzero(rank=2, alpha=4.0):
    return lfx.LoRA(rank=rank, alpha=alpha, init="nonzero")


def snapshot(gm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in gm.state_dict().items()}


def assert_unchanged(gm, before):
    after = gm.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


# --- round trips -------------------------------------------------------------------------


def test_round_trip_into_graph_rewritten_with_same_spec(tmp_path):
    source = toy_graph(lfx.Spec(["fc1", "fc2"], method=nonzero()))
    path = lfx.save_adapters(source, tmp_path / "a.safetensors")
    target = toy_graph(lfx.Spec(["fc1", "fc2"], method=lfx.LoRA(rank=2, alpha=4.0)))
    assert not torch.equal(target(X), source(X))
    assert lfx.load_adapters(target, path) is target
    assert torch.equal(target(X), source(X))


def test_loading_into_graph_without_the_adapter_rewrites_it_from_the_manifest(tmp_path):
    spec = lfx.Spec({"fc1": nonzero(2, 4.0), "fc2": lfx.LoRA(rank=3, alpha=1.5, rslora=True, init="nonzero")})
    source = toy_graph(spec)
    path = lfx.save_adapters(source, tmp_path / "a.safetensors")
    base = toy_graph()
    loaded = lfx.load_adapters(base, path)
    assert torch.equal(loaded(X), source(X))
    record = loaded.meta["lowrank_fx"]
    assert record.adapters["default"].spec.rules() == spec.rules()
    # trainable like any rewritten adapter
    assert all(p.requires_grad for p in loaded.lowrank_fx.default.parameters())


def test_dropout_and_init_may_differ_between_file_and_graph(tmp_path):
    source = toy_graph(lfx.Spec(["fc1"], method=lfx.LoRA(rank=2, init="nonzero", dropout=0.1)))
    source.eval()
    path = lfx.save_adapters(source, tmp_path / "a.safetensors")
    target = toy_graph(lfx.Spec(["fc1"], method=lfx.LoRA(rank=2))).eval()
    lfx.load_adapters(target, path)
    assert torch.equal(target(X), source(X))


def test_all_adapters_by_default_or_one_by_name(tmp_path):
    gm = toy_graph(lfx.Spec(["fc1"], method=nonzero()), adapter="first")
    lfx.rewrite(gm, lfx.Spec(["fc2"], method=nonzero(3)), adapter="second")
    both = lfx.save_adapters(gm, tmp_path / "both.safetensors")
    only = lfx.save_adapters(gm, tmp_path / "second.safetensors", adapters="second")
    assert set(read_manifest(both)["adapters"]) == {"first", "second"}
    assert set(read_manifest(only)["adapters"]) == {"second"}

    everything = lfx.load_adapters(toy_graph(), both)
    assert torch.equal(everything(X), gm(X))
    one = lfx.load_adapters(toy_graph(), both, adapters="first")
    assert set(one.meta["lowrank_fx"].adapters) == {"first"}
    with pytest.raises(lfx.AdapterFileError, match="no adapter 'third'.*first, second"):
        lfx.load_adapters(toy_graph(), both, adapters="third")
    with pytest.raises(lfx.AdapterFileError, match="no adapter 'third'"):
        lfx.save_adapters(gm, tmp_path / "x.safetensors", adapters="third")


def test_llama_lora_and_lorta_round_trip_into_uncaptured_model(tmp_path):
    case = models.build("llama")
    spec = lfx.Spec({"*.q_proj": lfx.LoRTA(rank=2, init="nonzero"), "*.v_proj": lfx.LoRTA(rank=2, init="nonzero"),
                     "*.down_proj": nonzero(4, 8.0)})
    gm = lfx.rewrite(case.model, spec, example_inputs=case.args, example_kwargs=case.kwargs)
    path = lfx.save_adapters(gm, tmp_path / "llama.safetensors")
    loaded = lfx.load_adapters(case.model, path, example_inputs=case.args, example_kwargs=case.kwargs)
    ours, theirs = case.output(loaded(*case.args, **case.kwargs)), case.output(gm(*case.args, **case.kwargs))
    assert torch.equal(ours, theirs)
    base = case.output(case.model(*case.args, **case.kwargs))
    assert not torch.allclose(ours, base)  # the adapters do something
    # LoRTA's shared factors are saved once per group, under the group
    with safetensors.safe_open(str(path), "pt") as file:
        keys = set(file.keys())
    assert any(k.startswith("default.lorta_") and k.endswith(".C_L") for k in keys)


def test_random_bases_are_not_saved_unless_asked(tmp_path):
    spec = lfx.Spec(["fc1", "fc2"], method=lfx.RandLoRA(rank=4, alpha=8.0, seed=3, init="nonzero"))
    source = toy_graph(spec)
    lean = lfx.save_adapters(source, tmp_path / "lean.safetensors")
    full = lfx.save_adapters(source, tmp_path / "full.safetensors", include_buffers=True)
    with safetensors.safe_open(str(lean), "pt") as file:
        lean_keys = set(file.keys())
    with safetensors.safe_open(str(full), "pt") as file:
        full_keys = set(file.keys())
    assert not any("basis" in k for k in lean_keys)
    assert full_keys - lean_keys == {"default.randlora.basis_A", "default.randlora.basis_B"}
    for path in (lean, full):
        assert torch.equal(lfx.load_adapters(toy_graph(), path)(X), source(X))


# --- the file itself ---------------------------------------------------------------------


def test_manifest_holds_version_spec_targets_and_fingerprint(tmp_path):
    gm = toy_graph(lfx.Spec(["fc1", "fc2"], method=nonzero(), exclude=["fc2"]))
    path = lfx.save_adapters(gm, tmp_path / "a.safetensors")
    manifest = read_manifest(path)
    assert manifest["format"] == "lowrank_fx.adapters" and manifest["version"] == 1
    entry = manifest["adapters"]["default"]
    assert entry["spec"]["rules"][0] == {"pattern": "fc1", "method": nonzero().config()}
    assert entry["spec"]["exclude"] == ["fc2"]
    assert entry["targets"] == {"fc1": [16, 8]}
    assert entry["fingerprint"].startswith("sha256:")
    # plain safetensors: an 8-byte header length, then the JSON header
    raw = path.read_bytes()
    assert raw[8:9] == b"{"
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert json.loads(header["__metadata__"][MANIFEST_KEY]) == manifest


def test_loading_never_unpickles(tmp_path, monkeypatch):
    path = lfx.save_adapters(toy_graph(lfx.Spec(["fc1"], method=nonzero())), tmp_path / "a.safetensors")

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    lfx.load_adapters(toy_graph(), path)


def test_a_crash_mid_save_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    first = toy_graph(lfx.Spec(["fc1"], method=nonzero()))
    lfx.save_adapters(first, path)
    before = path.read_bytes()

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        lfx.save_adapters(toy_graph(lfx.Spec(["fc1", "fc2"], method=nonzero(3))), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.safetensors"]  # no temporary file left behind
    assert torch.equal(lfx.load_adapters(toy_graph(), path)(X), first(X))


# --- refusals ----------------------------------------------------------------------------


def test_truncated_file(tmp_path):
    path = lfx.save_adapters(toy_graph(lfx.Spec(["fc1"], method=nonzero())), tmp_path / "a.safetensors")
    path.write_bytes(path.read_bytes()[:-10])
    base = toy_graph()
    with pytest.raises(lfx.AdapterFileError, match="truncated or corrupt"):
        lfx.load_adapters(base, path)
    assert not base.meta["lowrank_fx"].adapters


def test_corrupt_tensor_bytes_fail_the_checksum(tmp_path):
    path = lfx.save_adapters(toy_graph(lfx.Spec(["fc1"], method=nonzero())), tmp_path / "a.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(lfx.AdapterFileError, match="checksum"):
        lfx.load_adapters(toy_graph(), path)


def test_wrong_shapes_are_all_listed_and_nothing_changes(tmp_path):
    path = lfx.save_adapters(toy_graph(lfx.Spec(["fc1", "fc2"], method=nonzero(rank=2))), tmp_path / "a.safetensors")
    target = toy_graph(lfx.Spec(["fc1", "fc2"], method=lfx.LoRA(rank=3, alpha=4.0)))
    before = snapshot(target)
    with pytest.raises(lfx.AdapterFileError) as info:
        lfx.load_adapters(target, path)
    message = str(info.value)
    assert "nothing was changed" in message
    assert "rank=2 in the file, 3 in the graph" in message
    for key in ("fc1.lora_A", "fc1.lora_B", "fc2.lora_A", "fc2.lora_B"):
        assert f"lora.units.{key}: shape" in message
    assert_unchanged(target, before)


def test_method_setting_that_changes_values_is_refused(tmp_path):
    path = lfx.save_adapters(toy_graph(lfx.Spec(["fc1"], method=nonzero(alpha=4.0))), tmp_path / "a.safetensors")
    target = toy_graph(lfx.Spec(["fc1"], method=lfx.LoRA(rank=2, alpha=8.0)))
    with pytest.raises(lfx.AdapterFileError, match="alpha=4.0 in the file, 8.0 in the graph"):
        lfx.load_adapters(target, path)


def test_other_targets_in_graph_adapter_are_refused(tmp_path):
    path = lfx.save_adapters(toy_graph(lfx.Spec(["fc1"], method=nonzero())), tmp_path / "a.safetensors")
    target = toy_graph(lfx.Spec(["fc2"], method=nonzero()))
    before = snapshot(target)
    with pytest.raises(lfx.AdapterFileError) as info:
        lfx.load_adapters(target, path)
    assert "also adapts fc2, which the file lacks" in str(info.value)
    assert "also adapts fc1, which the graph's adapter lacks" in str(info.value)
    assert_unchanged(target, before)


def test_file_from_another_model(tmp_path):
    path = lfx.save_adapters(toy_graph(lfx.Spec(["fc1", "fc2"], method=nonzero())), tmp_path / "a.safetensors")
    wider = toy_graph(width=32)
    with pytest.raises(lfx.AdapterFileError) as info:
        lfx.load_adapters(wider, path)
    message = str(info.value)
    assert "fingerprint differs" in message and "another base model" in message
    assert "target fc1: base weight is 16x8 (out x in) in the file, 32x8 in this graph" in message
    assert "target fc2: base weight is 8x16 (out x in) in the file, 8x32 in this graph" in message
    assert not wider.meta["lowrank_fx"].adapters

    case = models.build("gpt2")
    gpt2 = lfx.rewrite(case.model, lfx.Spec(["c_attn"], method=lfx.LoRA(rank=2)),
                       example_inputs=case.args, example_kwargs=case.kwargs, adapter="other")
    with pytest.raises(lfx.AdapterFileError, match=r"targets not in this graph: fc1, fc2 \(nearest"):
        lfx.load_adapters(gpt2, path)


def test_dtype_mismatch_is_refused(tmp_path):
    path = lfx.save_adapters(toy_graph(lfx.Spec(["fc1"], method=nonzero())), tmp_path / "a.safetensors")
    target = toy_graph(lfx.Spec(["fc1"], method=lfx.LoRA(rank=2, alpha=4.0)), dtype=torch.float64)
    with pytest.raises(lfx.AdapterFileError, match="dtype torch.float32 in the file, torch.float64 expected"):
        lfx.load_adapters(target, path)


def test_files_that_are_not_adapter_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(lfx.AdapterFileError, match="without a lowrank_fx manifest.*load_peft"):
        lfx.load_adapters(toy_graph(), plain)
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    with pytest.raises(lfx.AdapterFileError, match="PEFT adapter directory"):
        lfx.load_adapters(toy_graph(), tmp_path / "peft")
    with pytest.raises(lfx.AdapterFileError, match="does not exist"):
        lfx.load_adapters(toy_graph(), tmp_path / "missing.safetensors")
    with pytest.raises(lfx.AdapterFileError, match="no adapters to save"):
        lfx.save_adapters(toy_graph(), tmp_path / "none.safetensors")


def _rewrite_manifest(path, edit):
    with safetensors.safe_open(str(path), "pt") as file:
        metadata = file.metadata()
        tensors = {k: file.get_tensor(k) for k in file.keys()}
    manifest = json.loads(metadata[MANIFEST_KEY])
    manifest.pop("manifest_checksum", None)  # a hand-edited manifest, read as an older writer's file
    edit(manifest)
    safetensors.torch.save_file(tensors, str(path), metadata={**metadata, MANIFEST_KEY: json.dumps(manifest)})


def test_newer_format_and_unknown_method_are_refused(tmp_path):
    path = lfx.save_adapters(toy_graph(lfx.Spec(["fc1"], method=nonzero())), tmp_path / "a.safetensors")
    _rewrite_manifest(path, lambda m: m.update(version=2))
    with pytest.raises(lfx.AdapterFileError, match="version 2.*upgrade lowrank_fx"):
        lfx.load_adapters(toy_graph(), path)

    def unknown(manifest):
        manifest["version"] = 1
        manifest["adapters"]["default"]["spec"]["rules"][0]["method"]["method"] = "dora"

    _rewrite_manifest(path, unknown)
    with pytest.raises(lfx.AdapterFileError, match="method 'dora'.*known: lora"):
        lfx.load_adapters(toy_graph(), path)
