"""Capture once: the in-process memo (plan then rewrite trace once) and the on-disk cache of
the exported program (a new process loads it instead of tracing).

Oracles: the uncached graph's code and outputs, the model's own forward, and the count of
torch.export.export calls (monkeypatched), never "it ran".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from models import build

import lowrank_fx as lfx
from lowrank_fx.adapt import capture_memo
from lowrank_fx.adapt.capture import capture
from lowrank_fx.adapt.capture_cache import ENV, MAGIC, SUFFIX, CaptureCache
from lowrank_fx.graph.quantized import EXAMPLES

SPEC = lfx.Spec(targets=["*.q_proj", "*.v_proj"], method=lfx.LoRA(rank=4))
Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture
def exports(monkeypatch):
    """The list that every torch.export.export call appends to."""
    calls = []
    real = torch.export.export

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counting)
    return calls


@pytest.fixture(scope="module")
def case():
    return build("llama")


@pytest.fixture(scope="module")
def oracle(case):
    """The graph captured without any cache, and its outputs on other shapes."""
    capture_memo.forget(case.model)
    gm = capture(case.model, case.args, case.kwargs)
    with torch.no_grad():
        return gm, case.output(gm(*case.other_args, **case.other_kwargs))


def _capture(case, cache_dir=None):
    capture_memo.forget(case.model)  # as in a new process: only the disk can help
    return capture(case.model, case.args, case.kwargs, cache_dir=cache_dir)


def _out(case, gm):
    with torch.no_grad():
        return case.output(gm(*case.other_args, **case.other_kwargs))


@pytest.fixture(scope="module")
def stored(case, tmp_path_factory):
    """A cache directory holding the llama's entry."""
    directory = tmp_path_factory.mktemp("capture_cache")
    _capture(case, directory)
    return directory


def _entry(directory: Path) -> Path:
    (entry,) = directory.glob(f"*{SUFFIX}")
    return entry


def _header(entry: Path) -> dict:
    data = entry.read_bytes()
    return json.loads(data[len(MAGIC):data.index(b"\n", len(MAGIC))])


@pytest.fixture
def spare(stored, tmp_path):
    """A copy of the stored cache directory, for tests that add entries to it."""
    return Path(shutil.copytree(stored, tmp_path / "cache"))


# --- the in-process memo -------------------------------------------------------------------

def test_plan_then_rewrite_trace_once_and_do_not_see_each_other(case, exports):
    capture_memo.forget(case.model)
    before = lfx.plan(case.model, SPEC, example_inputs=case.args, example_kwargs=case.kwargs)
    gm = lfx.rewrite(case.model, SPEC, example_inputs=case.args, example_kwargs=case.kwargs)
    other = lfx.rewrite(case.model, SPEC, example_inputs=case.args, example_kwargs=case.kwargs, adapter="b")
    after = lfx.plan(case.model, SPEC, example_inputs=case.args, example_kwargs=case.kwargs)
    assert len(exports) == 1
    assert str(before) == str(after) and before.trainable == after.trainable > 0
    assert list(gm.lowrank_fx) == ["default"] and list(other.lowrank_fx) == ["b"]  # each its own graph
    assert gm.graph is not other.graph and gm.get_parameter(Q) is other.get_parameter(Q) is case.model.get_parameter(Q)
    for param in case.model.parameters():
        param.requires_grad_(True)  # rewrite froze the model's own weights; later tests start as built


def test_memo_copies_compute_what_the_uncached_graph_does(case, oracle, exports):
    gm, expected = oracle
    copy = capture(case.model, case.args, case.kwargs)  # a memo hit
    assert not exports
    assert copy is not gm and copy.code == gm.code
    assert torch.equal(_out(case, copy), expected)


def test_a_changed_or_replaced_weight_misses(case, exports):
    capture(case.model, case.args, case.kwargs)
    exports.clear()
    weight = case.model.get_parameter(Q)
    with torch.no_grad():
        weight.add_(0.0)  # in place: its _version moves
    capture(case.model, case.args, case.kwargs)
    assert len(exports) == 1
    layer = case.model.model.layers[0].self_attn.q_proj
    layer.weight = torch.nn.Parameter(weight.detach().clone())
    try:
        gm = capture(case.model, case.args, case.kwargs)
        assert len(exports) == 2 and gm.get_parameter(Q) is layer.weight
    finally:
        layer.weight = weight


def test_other_examples_or_options_miss(case, exports):
    capture(case.model, case.args, case.kwargs)
    exports.clear()
    capture(case.model, case.other_args, case.other_kwargs)  # other shapes
    capture(case.model, case.args, {**case.kwargs, "attention_mask": torch.ones_like(case.args[0])})  # another argument
    capture(case.model, case.args, case.kwargs, dynamic=False)
    assert len(exports) == 3


def test_another_attention_implementation_misses(exports):
    case = build("llama")
    sdpa = capture(case.model, case.args, case.kwargs)
    case.model.set_attn_implementation("eager")  # not in config.to_dict(), yet another graph
    eager = capture(case.model, case.args, case.kwargs)
    assert len(exports) == 2 and eager.code != sdpa.code
    assert torch.allclose(_out(case, eager), _out(case, sdpa), atol=1e-5)


def test_the_memo_holds_its_model_weakly():
    model = build("llama").model
    capture(model, (torch.randint(0, 128, (2, 8)),), {"use_cache": False})
    ref = weakref.ref(model)
    del model
    import gc
    gc.collect()
    assert ref() is None


def test_a_quantized_model_is_memoised_and_bypasses_the_disk(tmp_path, exports):
    import torchao
    case = build("llama", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torchao.quantization.quantize_(case.model.model.layers[0].self_attn.q_proj,
                                       torchao.quantization.Int8WeightOnlyConfig())
    plan = lfx.plan(case.model, SPEC, example_inputs=case.args, example_kwargs=case.kwargs, cache_dir=tmp_path)
    gm = lfx.rewrite(case.model, SPEC, example_inputs=case.args, example_kwargs=case.kwargs, cache_dir=tmp_path)
    assert len(exports) == 1 and not list(tmp_path.iterdir())
    assert plan.rows[0].scheme == "int8" and gm.meta.get(EXAMPLES) is not None  # what requantizing needs
    with torch.no_grad():  # LoRA's B starts at 0: the adapted graph computes the quantized model
        assert torch.equal(case.output(gm(*case.other_args, **case.other_kwargs)),
                           case.output(case.model(*case.other_args, **case.other_kwargs)))


# --- the disk cache ------------------------------------------------------------------------

def test_a_disk_hit_is_the_same_graph_without_tracing(case, oracle, stored, exports):
    gm, expected = oracle
    loaded = _capture(case, stored)
    assert not exports
    assert loaded.code == gm.code
    assert torch.equal(_out(case, loaded), expected)  # bit for bit, at other batch and sequence sizes


def test_a_memo_hit_after_a_disk_hit_loads_a_graph_of_its_own(case, oracle, stored, exports):
    """The memo keeps a hit's bytes: plan then rewrite, or two rewrites, each get their own graph."""
    capture_memo.forget(case.model)
    gm = lfx.rewrite(case.model, SPEC, example_inputs=case.args, example_kwargs=case.kwargs, cache_dir=stored)
    other = lfx.rewrite(case.model, SPEC, example_inputs=case.args, example_kwargs=case.kwargs, adapter="b",
                        cache_dir=stored)
    plain = capture(case.model, case.args, case.kwargs, cache_dir=stored)
    try:
        assert not exports
        assert list(gm.lowrank_fx) == ["default"] and list(other.lowrank_fx) == ["b"]
        assert not hasattr(plain, "lowrank_fx")  # no adapter of theirs in a third caller's graph
        assert gm.graph is not other.graph and gm.get_parameter(Q) is other.get_parameter(Q) is case.model.get_parameter(Q)
        assert plain.code == oracle[0].code and torch.equal(_out(case, plain), oracle[1])
    finally:
        for param in case.model.parameters():
            param.requires_grad_(True)  # rewrite froze the model's own weights; later tests start as built


def test_a_hits_input_guards_refuse_what_a_fresh_captures_do(case, oracle, stored):
    """torch.export's input guards (`_guards_fn`, generated code) are stored as code and rebuilt."""
    hit = _capture(case, stored)
    ids = case.other_args[0]
    for gm in (oracle[0], hit):
        gm._guards_fn(ids, False)
        with pytest.raises(AssertionError, match="Guard failed: use_cache == False"):
            gm._guards_fn(ids, True)


def test_a_new_process_loads_instead_of_tracing(stored, tmp_path):
    script = tmp_path / "rerun.py"
    script.write_text(
        "import sys, torch\n"
        "from models import build\n"
        "from lowrank_fx.adapt.capture import capture\n"
        "calls = []\n"
        "real = torch.export.export\n"
        "torch.export.export = lambda *a, **k: calls.append(1) or real(*a, **k)\n"
        "case = build('llama')\n"
        f"gm = capture(case.model, case.args, case.kwargs, cache_dir={str(stored)!r})\n"
        "print('exports', len(calls))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "exports 0" in done.stdout


def test_a_hit_rebinds_the_models_own_tensors(case, stored):
    gm = _capture(case, stored)
    weight = case.model.get_parameter(Q)
    assert gm.get_parameter(Q) is weight and gm.get_parameter(Q).data_ptr() == weight.data_ptr()
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(-3.0)
            expected = case.output(case.model(*case.other_args, **case.other_kwargs))
        assert torch.equal(_out(case, gm), expected)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_the_cache_file_holds_no_weights(case, stored):
    entry = _entry(stored)
    data = entry.read_bytes()
    for name, tensor in case.model.state_dict().items():
        probe = tensor.detach().contiguous().view(-1)[:16].numpy().tobytes()
        assert len(probe) < 16 or probe not in data, f"{name}'s values are in the cache file"
    own = dict(case.model.named_parameters()) | dict(case.model.named_buffers())
    asked = []

    class Placeholders(dict):
        """The model's tensors by name, as meta tensors, noting each name the entry asks for."""

        def get(self, name, default=None):
            asked.append(name)
            return torch.empty_like(own[name], device="meta") if name in own else default

    cache = CaptureCache(stored, json.loads(_header(entry)["key"]))
    gm = cache.graph(cache.payload(), Placeholders())  # as stored: every tensor of the model a reference
    assert sorted(set(asked)) == sorted(own) and len(asked) == len(own)  # each read once, by its name
    assert all(t.device.type == "meta" for t in [*gm.parameters(), *gm.buffers()])


def test_the_file_is_far_smaller_than_the_weights(tmp_path):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    capture(model, (torch.randint(0, 4096, (2, 8)),), {"use_cache": False}, cache_dir=tmp_path)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert _entry(tmp_path).stat().st_size < weights / 20


def test_the_environment_variable_turns_the_cache_on(case, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path))
    _capture(case)
    assert len(list(tmp_path.glob(f"*{SUFFIX}"))) == 1
    monkeypatch.setenv(ENV, str(tmp_path / "off"))
    _capture(case, cache_dir=False)
    assert not (tmp_path / "off").exists()


def test_a_changed_config_misses(spare, exports):
    case = build("llama")
    case.model.config.rms_norm_eps = 1e-3  # same tensors, another graph constant
    case.model.model.norm.variance_epsilon = 1e-3
    gm = _capture(case, spare)
    assert len(exports) == 1
    with torch.no_grad():
        assert torch.equal(_out(case, gm), case.output(case.model(*case.other_args, **case.other_kwargs)))


def test_a_changed_weight_shape_misses(spare, exports):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    config.intermediate_size = 64  # the config as the stored entry's; only the MLP weights' shapes differ
    capture_memo.forget(model)
    capture(model, (torch.randint(0, 128, (2, 8)),), {"use_cache": False}, cache_dir=spare)
    assert len(exports) == 1


def test_another_torch_version_misses(case, spare, exports, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    _capture(case, spare)
    assert len(exports) == 1


def test_edited_lowrank_fx_source_misses(case, spare, exports, monkeypatch):
    """The entry is a graph lowrank_fx's passes finished: other passes, another graph."""
    from lowrank_fx.adapt import capture_key

    monkeypatch.setattr(capture_key, "library", lambda: "another source")
    _capture(case, spare)
    assert len(exports) == 1


def _spoil(entry: Path, how: str) -> None:
    data = bytearray(entry.read_bytes())
    if how == "bad bytes":
        data[-200:-100] = bytes(100)
    elif how == "truncated":
        del data[len(data) // 2:]
    elif how == "other key":
        end = data.index(b"\n", len(MAGIC))
        header = json.loads(data[len(MAGIC):end])
        header["key"] = header["key"].replace("LlamaForCausalLM", "GPT2LMHeadModel")
        data[len(MAGIC):end] = json.dumps(header).encode()
    else:
        data[:] = b"not a cache file"
    entry.write_bytes(bytes(data))


@pytest.mark.parametrize("how,says", [("bad bytes", "checksum"), ("truncated", "truncated"),
                                      ("other key", "key differs"), ("garbage", "first bytes")])
def test_a_spoilt_entry_is_captured_again_with_a_warning_and_overwritten(case, oracle, stored, exports, how, says):
    entry = _entry(stored)
    good = entry.read_bytes()
    _spoil(entry, how)
    with pytest.warns(UserWarning, match=says):
        gm = _capture(case, stored)
    assert len(exports) == 1 and torch.equal(_out(case, gm), oracle[1])
    assert entry.read_bytes()[:len(MAGIC)] == MAGIC and len(entry.read_bytes()) == len(good)  # overwritten
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="lowrank_fx capture cache")
        _capture(case, stored)  # the rewritten entry loads
    assert len(exports) == 1


def test_a_program_that_does_not_fit_the_model_is_not_trusted(stored):
    """An entry whose key is right but whose program names a tensor the model lacks."""
    entry = _entry(stored)
    cache = CaptureCache(stored, json.loads(_header(entry)["key"]))
    assert cache.path == entry
    model = build("llama").model
    del model.model.rotary_emb._buffers["original_inv_freq"]  # the program reads it
    with pytest.warns(UserWarning, match="does not fit the model"):
        assert cache.load(model) is None


def test_graph_modules_and_hooked_models_bypass_the_disk(case, tmp_path):
    traced = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)))
    capture(traced, cache_dir=tmp_path)
    hooked = build("llama").model
    hooked.model.layers[0].register_forward_hook(lambda module, args, out: out)
    capture(hooked, case.args, case.kwargs, cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())


# --- a hit's graph against a fresh capture's, downstream ----------------------------------

@pytest.fixture(scope="module")
def twins(case, stored):
    """(fresh, hit): `rewrite` traced anew and `rewrite` whose capture is a disk hit, with the
    same non-zero adapter weights (LoRA's B starts at 0, which would hide a wrong adapter path)."""
    graphs = []
    for cache_dir in (False, stored):
        capture_memo.forget(case.model)
        gm = lfx.rewrite(case.model, SPEC, example_inputs=case.args, example_kwargs=case.kwargs, cache_dir=cache_dir)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in (p for p in gm.parameters() if p.requires_grad):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        graphs.append(gm)
    yield graphs
    for param in case.model.parameters():
        param.requires_grad_(True)  # rewrite froze the model's own weights; later tests start as built


def test_a_hit_keeps_every_nodes_shape_metadata(twins):
    fresh, hit = twins
    assert hit.code == fresh.code
    shapes = [[(n.name, str(getattr(n.meta.get("val"), "shape", n.meta.get("val"))),
                str(getattr(n.meta.get("val"), "dtype", None))) for n in gm.graph.nodes] for gm in twins]
    assert shapes[0] == shapes[1]
    values = [n.meta.get("val") for n in hit.graph.nodes]
    sizes = [size for value in values if isinstance(value, torch.Tensor) for size in value.shape]
    assert any(isinstance(size, torch.SymInt) for size in sizes)  # symbolic sizes, not the examples' numbers


def test_a_hits_outputs_and_gradients_are_a_fresh_captures(case, twins):
    results = []
    for gm in twins:
        gm.train()
        logits = case.output(gm(*case.other_args, **case.other_kwargs))
        trained = [(name, p) for name, p in gm.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad((logits.float() ** 2).mean(), [p for _, p in trained])
        results.append((logits.detach(), [name for name, _ in trained], grads))
        gm.eval()
    (logits, names, grads), (hit_logits, hit_names, hit_grads) = results
    assert names == hit_names and len(names) > 0
    assert torch.equal(hit_logits, logits)
    assert all(torch.equal(a, b) for a, b in zip(hit_grads, grads)) and any(g.abs().sum() > 0 for g in grads)


def test_a_hits_onnx_export_and_generation_are_a_fresh_captures(case, twins, tmp_path):
    ids = case.other_args[0]
    exports = [lfx.export_onnx(gm, tmp_path / f"{i}.onnx", example_inputs=(ids,), mode="merged", optimize=False)
               for i, gm in enumerate(twins)]
    outputs = [next(iter(e.session().run({e.inputs[0]: ids.numpy()}).values())) for e in exports]
    np.testing.assert_array_equal(outputs[1], outputs[0])
    with torch.no_grad():
        want, base = (case.output(m(ids, use_cache=False)).numpy() for m in (twins[1], case.model))
    assert float(np.abs(outputs[1] - want).max() / np.abs(want).max()) <= 1e-5  # the adapters are in it
    assert float(np.abs(base - want).max() / np.abs(want).max()) > 1e-2
    prompts = ids[:2, :5]
    tokens = [lfx.generate(gm, prompts, max_new_tokens=4, model=case.model) for gm in twins]
    assert tokens[0].shape == (2, 9) and torch.equal(tokens[1], tokens[0])
