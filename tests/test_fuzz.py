"""Fuzz tests (hypothesis, derandomized: the same examples on every run, bounded in number).

1. Options: random method options (ranks, alphas with NaN / inf / 0 / negative, dropouts, flags,
   inits, token ids) and spec patterns either raise a LowRankFxError when the method or spec is
   built or the model rewritten, or give a graph whose outputs are finite, equal to its folded
   graph's, and, with the default init (an update that starts at 0), to the base model's.
2. Damaged files: truncated or bit-flipped adapter files, PEFT directories, .onnx models and
   .onnx_adapter files either fail with a LowRankFxError, leaving the graph (or session) as it
   was, or load. Our adapter files carry checksums over their tensors and their manifest, so one
   that loads leaves the graph's values exactly those of the intact file; PEFT and ONNX files
   have no checksums, so a flip in their tensor data loads that value.
ONNX Runtime was run on a few hundred damaged .onnx and .onnx_adapter files of this kind without a
crash, so lowrank_fx hands such files to it unparsed and turns its errors into ExportError /
AdapterFileError (export/session.py).
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from models import toy
from torch import nn

import lowrank_fx as lfx

NAN, INF = math.nan, math.inf
IDS = torch.tensor([[1, 5, 7, 2], [0, 3, 11, 4]])
X = torch.randn(3, 8)
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.lin0 = nn.Linear(8, 16)
        self.lin1 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, ids):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(self.emb(ids))))))


@pytest.fixture(scope="module")
def net():
    """The model, captured once here; each example's rewrite reuses that capture."""
    torch.manual_seed(0)
    model = Net().eval()
    lfx.rewrite(model, lfx.Spec(["lin0"]), example_inputs=(IDS,))
    with torch.no_grad():
        return model, model(IDS)


# Per option: values that are valid, and values that are not (wrong type, NaN / inf, out of range).
VALID = {
    "rank": st.integers(1, 40),
    "alpha": st.one_of(st.floats(1e-3, 1e3), st.floats(-1e3, -1e-3)),
    "dropout": st.floats(0.0, 0.99),
    "init": st.sampled_from(["default", "nonzero"]),
    "rslora": st.booleans(), "bias": st.booleans(), "sparse": st.booleans(),
    "head_dim": st.one_of(st.none(), st.sampled_from([1, 2, 4, 8]), st.integers(1, 20)),
    "seed": st.integers(0, 2**64 - 1),
    "form": st.sampled_from(["auto", "dense", "factored"]),
    "indices": st.lists(st.integers(0, 11), min_size=1, max_size=3, unique=True),
}
INVALID = {
    "rank": st.sampled_from([0, -2, 2.5, 4.0, True, None, "8"]),
    "alpha": st.sampled_from([0, 0.0, -0.0, NAN, INF, -INF, True, None, "16"]),
    "dropout": st.sampled_from([1.0, -0.1, NAN, INF, False, "0.1"]),
    "init": st.sampled_from(["zeros", None, 0]),
    "rslora": st.sampled_from([0, 1, None, "yes"]), "bias": st.sampled_from([0, 1, None]),
    "sparse": st.sampled_from([0, None]),
    "head_dim": st.sampled_from([0, -1, 4.0, True, "8"]),
    "seed": st.sampled_from([-1, 2**64, 1.5, None]),
    "form": st.sampled_from(["fast", None]),
    "indices": st.sampled_from([[], [-1], [12], [3, 3], [True], "1"]),
}
OPTIONS = {"lora": ["rank", "alpha", "dropout", "init", "rslora", "bias"],
           "dora": ["rank", "alpha", "dropout", "init", "rslora"],
           "lorta": ["rank", "alpha", "dropout", "init", "head_dim"],
           "randlora": ["rank", "alpha", "dropout", "init", "seed", "sparse", "form"],
           "tokens": ["indices"]}
CLASSES = {"lora": lfx.LoRA, "dora": lfx.LoRA, "lorta": lfx.LoRTA, "randlora": lfx.RandLoRA,
           "tokens": lfx.TrainableTokens}

good_patterns = st.sampled_from(["lin0", "lin1", "head", "emb", "*", "lin?", "all-linear", "re:lin[01]", "lin0.weight"])
bad_patterns = st.sampled_from(["re:(", "", "nothing", None, 5, ["lin0", 3], b"lin0"])
targets = st.one_of(st.lists(good_patterns, min_size=1, max_size=3), good_patterns, st.just("emb"), bad_patterns)
excludes = st.one_of(st.just(()), st.lists(good_patterns, max_size=2), bad_patterns)


@st.composite
def methods(draw):
    """(method class, its options): valid options but at most one, which may be broken."""
    kind = draw(st.sampled_from(sorted(OPTIONS)))
    broken = draw(st.sampled_from([*[None] * len(OPTIONS[kind]), *OPTIONS[kind]]))  # half of them: none
    options = {name: draw(INVALID[name] if name == broken else VALID[name]) for name in OPTIONS[kind]}
    if kind == "dora":
        options["dora"] = True
    return CLASSES[kind], options


@settings(FUZZ, max_examples=80)
@given(method=methods(), targets=targets, exclude=excludes)
def test_options_fail_clearly_or_give_finite_outputs(net, method, targets, exclude):
    model, base = net
    cls, options = method
    try:
        spec = lfx.Spec(targets=targets, method=cls(**options), exclude=exclude)
        gm = lfx.rewrite(model, spec, example_inputs=(IDS,))
    except lfx.LowRankFxError as err:
        event(f"refused: {type(err).__name__}")
        return
    event(f"rewritten: {cls.__name__}")
    with torch.no_grad():
        out = gm(IDS)
        assert torch.isfinite(out).all()
        if options.get("init", "default") == "default":  # every method's update starts at 0
            torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-6)
        scale = float(out.abs().max())
        torch.testing.assert_close(lfx.merge(gm)(IDS), out, rtol=1e-4, atol=1e-5 * max(scale, 1.0))  # folds alike


# --- damaged files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An adapter file, a PEFT directory and an ONNX export (with its .onnx_adapter) of one adapter."""
    root = tmp_path_factory.mktemp("fuzz")
    gm = lfx.rewrite(toy(), lfx.Spec(["fc1", "fc2"], method=lfx.LoRA(rank=2, init="nonzero")),
                     example_inputs=(X,), adapter="a")
    export = lfx.export_onnx(gm, root / "onnx" / "toy.onnx", example_inputs=(X,), optimize=False)
    return {"root": root, "file": lfx.save_adapters(gm, root / "a.safetensors"),
            "peft": lfx.save_peft(gm, root / "peft", adapter="a"), "onnx": export, "session": export.session()}


def damaged(data: bytes, cut: bool, where: int, bit: int, header: bool = False) -> bytes:
    """`data` cut short at `where`, or with bit `bit` of byte `where` flipped, `where` taken modulo
    the size, or with `header` modulo a safetensors file's header (its names, shapes and metadata)."""
    size = 8 + int.from_bytes(data[:8], "little") if header and len(data) > 8 else len(data)
    where %= min(size, len(data))
    if cut:
        return data[:where]
    return data[:where] + bytes([data[where] ^ (1 << bit)]) + data[where + 1:]


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_unchanged(module, before):
    after = module.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


damage = {"cut": st.booleans(), "where": st.integers(0, 2**32), "bit": st.integers(0, 7)}
FILES = settings(FUZZ, max_examples=100)


@FILES
@given(header=st.booleans(), **damage)
def test_damaged_adapter_files_are_refused_or_load_the_same_values(saved, cut, where, bit, header):
    graph = lfx.load_adapters(toy(), saved["file"])
    before = snapshot(graph)
    path = saved["root"] / "damaged.safetensors"
    path.write_bytes(damaged(saved["file"].read_bytes(), cut, where, bit, header))
    try:
        lfx.load_adapters(graph, path)  # into a graph with the adapter: values only
        fresh = lfx.load_adapters(toy(), path)  # into the bare model: the file's spec too
    except lfx.LowRankFxError:
        assert_unchanged(graph, before)
        return
    assert_unchanged(graph, before)  # loaded exactly the intact file's values
    with torch.no_grad():
        assert torch.equal(fresh(X), graph(X))


@FILES
@given(config=st.booleans(), header=st.booleans(), **damage)
def test_damaged_peft_directories_are_refused_or_load(saved, config, cut, where, bit, header):
    graph = lfx.load_peft(toy(), saved["peft"], adapter="a")
    before = snapshot(graph)
    directory = saved["root"] / "damaged_peft"
    shutil.copytree(saved["peft"], directory, dirs_exist_ok=True)
    name = "adapter_config.json" if config else "adapter_model.safetensors"
    (directory / name).write_bytes(damaged((saved["peft"] / name).read_bytes(), cut, where, bit, header and not config))
    try:
        lfx.load_peft(graph, directory, adapter="a")
    except lfx.LowRankFxError:
        assert_unchanged(graph, before)
        return
    with torch.no_grad():
        assert torch.isfinite(graph(X)).all()  # NaN / inf values are refused


@FUZZ
@given(**damage)
def test_damaged_onnx_models_are_refused_or_run(saved, cut, where, bit):
    export = saved["onnx"]
    directory = saved["root"] / "damaged_onnx"
    shutil.copytree(export.path.parent, directory, dirs_exist_ok=True)
    (directory / export.path.name).write_bytes(damaged(export.path.read_bytes(), cut, where, bit))
    try:
        session = lfx.AdapterSession(directory / export.path.name)
        session.run({"x": X.numpy()}, adapter="a")
    except lfx.LowRankFxError:
        pass


@FUZZ
@given(**damage)
def test_damaged_onnx_adapter_files_are_refused_or_run(saved, cut, where, bit):
    session, source = saved["session"], saved["onnx"].adapters["a"]
    path = saved["root"] / "damaged.onnx_adapter"
    path.write_bytes(damaged(source.read_bytes(), cut, where, bit))
    try:
        session.add_adapter("damaged", path)
    except lfx.LowRankFxError:
        assert session.adapters == ["a"]
        return
    try:
        session.run({"x": X.numpy()}, adapter="damaged")
    except lfx.LowRankFxError:
        pass
    finally:
        session._loaded.pop("damaged")
