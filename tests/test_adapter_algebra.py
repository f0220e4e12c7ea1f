"""Adapter algebra: combine_adapters against PEFT's add_weighted_adapter, delete_adapter against a
graph that never had the adapter, adapters_disabled against the base model.

The PEFT twin holds the very factors of our adapters (copied in). Parity is
max|ours - peft| / max|peft| ≤ 1e-5 in fp32, on the new adapter's factors A and B of every
target and on the model output with the new adapter active. DARE: PEFT draws its masks from
torch's global generator after its new layers' init draws; a PEFT run of a combination that
draws nothing gives the generator's state at the first mask, and ours starts from that state.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import safetensors.torch
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import lowrank_fx as lfx
from lowrank_fx.adapt.capture import capture
from lowrank_fx.errors import SpecError
from lowrank_fx.graph.record import CONTAINER, Record

TOL = 1e-5
IDS = torch.tensor([[1, 5, 7, 2, 0, 15], [3, 3, 9, 11, 4, 6]])
PIXELS = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
# adapter -> (targets, rank, alpha); "u" and "v" share a rank, "w" does not
ADAPTERS = {"u": (["emb", "fc1", "fc2"], 4, 8.0), "v": (["fc1", "fc2"], 4, 6.0), "w": (["fc1", "emb"], 2, 4.0)}


class Tiny(nn.Module):
    """fc2 is registered before emb and fc1: PEFT's (module) order differs from the call order."""

    def __init__(self):
        super().__init__()
        self.fc2 = nn.Linear(12, 6)
        self.emb = nn.Embedding(16, 8)
        self.fc1 = nn.Linear(8, 12)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids))))


class Wide(nn.Module):
    """A 3x3 convolution and a transposed-weight linear (GPT-2's Conv1D: PEFT's fan_in_fan_out)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.proj = Conv1D(6, 4)

    def forward(self, pixels):
        return self.proj(self.conv(pixels).flatten(2).transpose(1, 2).contiguous())


# model -> (class, input, adapters, PEFT config options)
MODELS = {
    "tiny": (Tiny, IDS, ADAPTERS, {}),
    "wide": (Wide, PIXELS, {"u": (["conv", "proj"], 4, 8.0), "v": (["conv", "proj"], 4, 6.0), "w": (["proj"], 2, 4.0)},
             {"fan_in_fan_out": True}),
}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Tiny().eval()


@pytest.fixture(scope="module")
def base(model):
    return capture(model, (IDS,))


def ours_with(base, adapters=ADAPTERS, **options) -> torch.fx.GraphModule:
    gm = copy.deepcopy(base)
    torch.manual_seed(1)
    for name, (targets, rank, alpha) in adapters.items():
        spec = lfx.Spec(targets=targets, method=lfx.LoRA(rank=rank, alpha=alpha, init="nonzero", **options))
        gm = lfx.rewrite(gm, spec, adapter=name)
    return gm


def unit(gm, adapter, target):
    record = Record.find(gm)
    return getattr(gm, CONTAINER)[adapter][record.adapters[adapter].groups[target]].unit(target)


def factors(layer, adapter):
    """PEFT's (A, B) of `adapter` in `layer` (a linear-like layer's or an embedding's), or None."""
    if adapter in layer.lora_A:
        return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if adapter in layer.lora_embedding_A:
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    return None


def peft_twin(model, gm, adapters, **options):
    """A PeftModel with adapters u, v, w holding exactly the factors of `gm`'s."""
    twin = None
    for name, (targets, rank, alpha) in adapters.items():
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **options)
        if twin is None:
            twin = get_peft_model(copy.deepcopy(model), config, adapter_name=name)
        else:
            twin.add_adapter(name, config)
        for target in targets:
            A, B = factors(twin.base_model.model.get_submodule(target), name)
            with torch.no_grad():
                A.copy_(unit(gm, name, target).lora_A)
                B.copy_(unit(gm, name, target).lora_B)
    return twin.eval()


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request):
    """(our graph with adapters u, v, w, its PEFT twin, the input) for each model."""
    model_class, inputs, adapters, options = MODELS[request.param]
    torch.manual_seed(0)
    model = model_class().eval()
    base = capture(model, (inputs,))
    gm = ours_with(base, adapters)
    return gm, peft_twin(model, gm, adapters, **options), inputs, base


CASES = [  # (combination, adapters and weights, options)
    ("linear", {"u": 0.7, "v": -0.3}, {}),
    ("linear", {"w": 1.5}, {}),
    ("cat", {"u": 0.7, "v": 0.3, "w": -0.4}, {}),
    ("svd", {"u": 0.7, "v": 0.3, "w": -0.4}, {}),
    ("svd", {"u": 0.6, "w": 0.9}, {"svd_rank": 3, "svd_clamp": 0.9, "svd_full_matrices": False}),
    ("ties", {"u": 0.7, "v": 0.3}, {"density": 0.5}),
    ("ties", {"u": 0.7, "v": -0.3}, {"density": 0.6, "majority_sign_method": "frequency"}),
    ("ties_svd", {"u": 0.7, "v": 0.3, "w": 0.5}, {"density": 0.5}),
    ("magnitude_prune", {"u": 0.7, "v": 0.3}, {"density": 0.4}),
    ("magnitude_prune_svd", {"u": 0.7, "w": 0.3}, {"density": 0.4}),
    ("dare_linear", {"u": 0.7, "v": 0.3}, {"density": 0.5}),
    ("dare_ties", {"u": 0.7, "v": -0.3}, {"density": 0.5}),
    ("dare_linear_svd", {"u": 0.7, "v": 0.3, "w": 0.2}, {"density": 0.6}),
    ("dare_ties_svd", {"u": 0.7, "w": 0.3}, {"density": 0.5, "majority_sign_method": "frequency"}),
]


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[0]}-{''.join(c[1])}" for c in CASES])
def test_combination_matches_peft(pair, index):
    combination, weights, options = CASES[index]
    gm, twin, inputs, base = pair
    name = f"mix{index}"
    if combination.startswith("dare"):  # PEFT's generator at its first mask: after a same-rank run drawing none
        torch.manual_seed(7)
        twin.add_weighted_adapter(list(weights), list(weights.values()), f"probe{index}",
                                  "svd" if combination.endswith("svd") else "linear",
                                  **{k: v for k, v in options.items() if k.startswith("svd")})
        state = torch.get_rng_state()
        torch.manual_seed(7)
        twin.add_weighted_adapter(list(weights), list(weights.values()), name, combination, **options)
        torch.set_rng_state(state)
    else:
        twin.add_weighted_adapter(list(weights), list(weights.values()), name, combination, **options)
    lfx.combine_adapters(gm, weights, adapter=name, combination=combination, **options)
    groups = Record.find(gm).adapters[name].groups
    theirs = {t: f for t in groups if (f := factors(twin.base_model.model.get_submodule(t), name)) is not None}
    assert set(theirs) == set(groups)
    for target, (A, B) in theirs.items():
        ours = unit(gm, name, target)
        assert ours.lora_A.shape == A.shape and ours.lora_B.shape == B.shape
        assert rel_err(ours.lora_A.detach(), A) <= TOL, (target, "A")
        assert rel_err(ours.lora_B.detach(), B) <= TOL, (target, "B")
    assert lfx.active_adapters(gm) == ["u", "v", "w"]  # the new adapter starts inactive, as in PEFT
    lfx.set_active_adapters(gm, name)
    twin.set_adapter(name)
    try:
        with torch.no_grad():
            ours_out, theirs_out, base_out = gm(inputs), twin(inputs), base(inputs)
    finally:
        lfx.set_active_adapters(gm, ["u", "v", "w"])
    assert rel_err(ours_out, theirs_out) <= TOL
    assert rel_err(ours_out, base_out) > 1e-3


def test_dare_seed_is_torch_manual_seed_without_touching_the_global_generator(base):
    gm = ours_with(base)
    torch.manual_seed(11)
    lfx.combine_adapters(gm, {"u": 0.7, "v": 0.3}, adapter="drawn", combination="dare_ties", density=0.5)
    state = torch.get_rng_state()
    lfx.combine_adapters(gm, {"u": 0.7, "v": 0.3}, adapter="seeded", combination="dare_ties", density=0.5, seed=11)
    assert torch.equal(torch.get_rng_state(), state)  # a seed draws from its own generator
    lfx.combine_adapters(gm, {"u": 0.7, "v": 0.3}, adapter="other", combination="dare_ties", density=0.5, seed=12)
    for target in ("fc1", "fc2", "emb"):
        assert torch.equal(unit(gm, "seeded", target).lora_A, unit(gm, "drawn", target).lora_A)
        assert torch.equal(unit(gm, "seeded", target).lora_B, unit(gm, "drawn", target).lora_B)
    assert not torch.equal(unit(gm, "seeded", "fc1").lora_A, unit(gm, "other", "fc1").lora_A)


@pytest.fixture(scope="module")
def combined(base):
    """A graph with u, v, w and their exact "cat" combination, made the only active adapter."""
    gm = ours_with(base)
    lfx.combine_adapters(gm, {"u": 0.7, "v": 0.3, "w": -0.4}, adapter="mix", combination="cat")
    lfx.set_active_adapters(gm, "mix")
    return gm


def summed_update(gm, target, weights):
    """Σ_i w_i s_i B_i A_i (out, in) over the adapters that adapt `target`: the oracle of "cat"."""
    total = 0
    for adapter, weight in weights.items():
        if target in Record.find(gm).adapters[adapter].groups:
            part = unit(gm, adapter, target)
            total = total + weight * part.scale * (part.lora_B @ part.lora_A).detach()
    return total


def test_combined_adapter_folds_to_its_update(combined, model):
    merged = lfx.merge(combined)
    weights = {"u": 0.7, "v": 0.3, "w": -0.4}
    for target, stored in (("fc1", lambda d: d), ("fc2", lambda d: d), ("emb", lambda d: d.t())):
        want = model.get_submodule(target).weight + stored(summed_update(combined, target, weights))
        assert rel_err(merged.get_parameter(f"{target}.weight"), want) <= TOL
    assert unit(combined, "mix", "fc1").lora_A.shape[0] == 4 + 4 + 2  # cat: the ranks add up
    with torch.no_grad():
        assert rel_err(merged(IDS), combined(IDS)) <= TOL


def test_combined_adapter_saves_loads_and_switches(combined, base, tmp_path):
    with torch.no_grad():
        want = combined(IDS)
    path = lfx.save_adapters(combined, tmp_path / "mix.safetensors", adapters="mix")
    loaded = lfx.load_adapters(copy.deepcopy(base), path)
    assert lfx.active_adapters(loaded) == ["mix"]
    with torch.no_grad():
        assert torch.equal(loaded(IDS), want)
    saved = safetensors.torch.load_file(path)
    for key, value in getattr(combined, CONTAINER)["mix"].state_dict().items():
        assert torch.equal(saved[f"mix.{key}"], value)
    lfx.set_active_adapters(combined, ["u", "v", "w"])
    try:
        with torch.no_grad():
            assert rel_err(combined(IDS), want) > 1e-3  # switching away changes the output ...
        lfx.set_active_adapters(combined, "mix")
        with torch.no_grad():
            assert torch.equal(combined(IDS), want)  # ... and back
    finally:
        lfx.set_active_adapters(combined, "mix")


def test_svd_combines_other_methods_through_their_update(base):
    """RandLoRA has no LoRA factors, but an SVD of full rank reproduces its ΔW exactly."""
    gm = copy.deepcopy(base)
    torch.manual_seed(3)
    gm = lfx.rewrite(gm, lfx.Spec(targets=["fc1"], method=lfx.RandLoRA(rank=2, init="nonzero")), adapter="rand")
    lfx.combine_adapters(gm, {"rand": 0.5}, adapter="low", combination="svd", svd_rank=8)  # min(out, in) = 8
    lfx.set_active_adapters(gm, "rand")
    folded = lfx.merge(gm).get_parameter("fc1.weight")
    lfx.set_active_adapters(gm, "low")
    got = lfx.merge(gm).get_parameter("fc1.weight") - base.get_parameter("fc1.weight")
    assert rel_err(got, 0.5 * (folded - base.get_parameter("fc1.weight"))) <= TOL
    with pytest.raises(SpecError, match="combines LoRA factors"):
        lfx.combine_adapters(gm, {"rand": 1.0}, adapter="bad", combination="linear")


def refusal_graph(base):
    gm = ours_with(base, {name: (["fc1"], rank, alpha) for name, (_, rank, alpha) in ADAPTERS.items()})
    torch.manual_seed(2)
    gm = lfx.rewrite(gm, lfx.Spec(targets=["fc1"], method=lfx.LoRA(rank=4, dora=True, init="nonzero")), adapter="dora")
    gm = lfx.rewrite(gm, lfx.Spec(targets=["fc2"], method=lfx.LoRA(rank=4, bias=True)), adapter="biased")
    return lfx.rewrite(gm, lfx.Spec(targets=["fc1"], method=lfx.LoRA(rank=4), train=["emb"]), adapter="trains")


@pytest.mark.parametrize("call, message", [
    (lambda gm: lfx.combine_adapters(gm, {"u": 1.0, "nope": 1.0}, adapter="x"), "no adapter named 'nope'"),
    (lambda gm: lfx.combine_adapters(gm, {"u": 1.0}, adapter="v"), "already has an adapter named 'v'"),
    (lambda gm: lfx.combine_adapters(gm, {}, adapter="x"), "non-empty dict"),
    (lambda gm: lfx.combine_adapters(gm, {"u": float("nan")}, adapter="x"), "finite numbers"),
    (lambda gm: lfx.combine_adapters(gm, {"u": 1.0}, adapter="global"), "neither a keyword"),
    (lambda gm: lfx.combine_adapters(gm, {"u": 1.0}, adapter="x", combination="average"),
     "unknown combination 'average'"),
    (lambda gm: lfx.combine_adapters(gm, {"u": 1.0, "w": 1.0}, adapter="x", combination="linear"), "same rank"),
    (lambda gm: lfx.combine_adapters(gm, {"u": 1.0, "v": 1.0}, adapter="x", combination="ties"), "give density="),
    (lambda gm: lfx.combine_adapters(gm, {"u": 1.0, "v": 1.0}, adapter="x", combination="ties", density=1.5),
     r"in \(0, 1\]"),
    (lambda gm: lfx.combine_adapters(gm, {"u": 1.0, "v": 1.0}, adapter="x", combination="linear", density=0.5),
     "only applies"),
    (lambda gm: lfx.combine_adapters(gm, {"u": 1.0, "v": 1.0}, adapter="x", combination="ties", density=0.5, seed=1),
     "draws nothing"),
    (lambda gm: lfx.combine_adapters(gm, {"u": 1.0, "v": 1.0}, adapter="x", combination="cat", svd_rank=2),
     "SVD combinations"),
    (lambda gm: lfx.combine_adapters(gm, {"u": 1.0, "v": 1.0}, adapter="x", combination="svd", svd_rank=0), "svd_rank"),
    (lambda gm: lfx.combine_adapters(gm, {"u": 1.0, "v": 1.0}, adapter="x", combination="svd", svd_clamp=2.0),
     "quantile"),
    (lambda gm: lfx.combine_adapters(gm, {"u": 1.0, "v": 1.0}, adapter="x", combination="ties", density=0.5,
                                     majority_sign_method="max"),
     "majority_sign_method"),
    (lambda gm: lfx.combine_adapters(gm, {"u": 1.0, "dora": 1.0}, adapter="x", combination="linear"), "DoRA"),
    (lambda gm: lfx.combine_adapters(gm, {"u": 1.0, "biased": 1.0}, adapter="x", combination="svd"), "LoRA bias"),
    (lambda gm: lfx.combine_adapters(gm, {"u": 1.0, "trains": 1.0}, adapter="x", combination="svd"), "Spec.train"),
    (lambda gm: lfx.combine_adapters(torch.nn.Linear(2, 2), {"u": 1.0}, adapter="x"), "lfx.rewrite returned"),
    (lambda gm: lfx.delete_adapter(gm, "nope"), "no adapter named 'nope'"),
])
def test_refusals_leave_the_graph_unchanged(base, call, message):
    gm = refusal_graph(base)
    before = (list(Record.find(gm).adapters), lfx.active_adapters(gm), gm.code)
    state = {key: value.clone() for key, value in gm.state_dict().items()}
    with pytest.raises(lfx.LowRankFxError, match=message):
        call(gm)
    assert (list(Record.find(gm).adapters), lfx.active_adapters(gm), gm.code) == before
    assert gm.state_dict().keys() == state.keys() and all(torch.equal(gm.state_dict()[k], v) for k, v in state.items())


def read_metadata(path):
    with safetensors.safe_open(str(path), framework="pt") as file:
        return {key: json.loads(value) for key, value in file.metadata().items() if key == "lowrank_fx"}


def test_deleted_adapter_leaves_what_a_graph_without_it_has(base, tmp_path):
    """Adapter "gone" (LoRA sites and a trained module) is deleted between "u" and a combination
    of "u"; files, ONNX exports and outputs are those of a graph that only ever had the other two."""
    def with_u(gm):
        torch.manual_seed(5)
        return lfx.rewrite(gm, lfx.Spec(targets=["fc1"], method=lfx.LoRA(rank=4, init="nonzero")), adapter="u")

    had = with_u(copy.deepcopy(base))
    torch.manual_seed(6)
    had = lfx.rewrite(had, lfx.Spec(targets=["emb", "fc1"], method=lfx.LoRA(rank=2, init="nonzero"), train=["fc2"]),
                      adapter="gone")
    lfx.combine_adapters(had, {"u": -0.5}, adapter="negated")
    with torch.no_grad():
        assert rel_err(had(IDS), with_u(copy.deepcopy(base))(IDS)) > 1e-3
    lfx.delete_adapter(had, "gone")
    never = lfx.combine_adapters(with_u(copy.deepcopy(base)), {"u": -0.5}, adapter="negated")
    assert list(Record.find(had).adapters) == ["u", "negated"] and lfx.active_adapters(had) == ["u"]
    assert all("gone" not in key for key in [*dict(had.named_parameters()), *dict(had.named_buffers())])
    assert "gone" not in had.code and "select_trained" not in had.code
    assert had.state_dict().keys() == never.state_dict().keys()
    assert all(torch.equal(had.state_dict()[k], v) for k, v in never.state_dict().items())
    with torch.no_grad():
        assert torch.equal(had(IDS), never(IDS))
    files = [lfx.save_adapters(gm, tmp_path / f"{i}.safetensors") for i, gm in enumerate((had, never))]
    contents = [(read_metadata(f), safetensors.torch.load_file(f)) for f in files]  # (bytes vary: header order)
    assert contents[0][0] == contents[1][0] and contents[0][1].keys() == contents[1][1].keys()
    assert all(torch.equal(contents[0][1][k], v) for k, v in contents[1][1].items())
    loaded = lfx.load_adapters(copy.deepcopy(base), files[0])
    lfx.set_active_adapters(loaded, "u")
    with torch.no_grad():
        assert torch.equal(loaded(IDS), never(IDS))
    exports = [lfx.export_onnx(gm, tmp_path / f"{i}.onnx", example_inputs=(IDS,), optimize=False)
               for i, gm in enumerate((had, never))]
    assert [onnx_inputs(e.path) for e in exports[:1]] == [onnx_inputs(e.path) for e in exports[1:]]
    assert exports[0].adapter_inputs == exports[1].adapter_inputs and list(exports[0].adapters) == ["u", "negated"]
    for adapter in ("u", "negated"):
        outputs = [next(iter(e.session().run({e.inputs[0]: IDS.numpy()}, adapter=adapter).values())) for e in exports]
        np.testing.assert_array_equal(outputs[0], outputs[1])
        lfx.set_active_adapters(never, adapter)
        with torch.no_grad():
            want = never(IDS).numpy()
        assert float(np.abs(outputs[0] - want).max() / np.abs(want).max()) <= TOL  # the combined one exports too
    lfx.delete_adapter(had, "u")
    lfx.delete_adapter(had, "negated")
    assert not hasattr(had, CONTAINER) and not Record.find(had).adapters
    with torch.no_grad():
        assert torch.equal(had(IDS), base(IDS))


def onnx_inputs(path) -> list[str]:
    return [value.name for value in onnx.load(str(path), load_external_data=False).graph.input]


def test_adapters_disabled_is_the_base_model_and_restores_the_active_set(base):
    gm = ours_with(base)
    lfx.set_active_adapters(gm, ["u", "w"])
    with torch.no_grad():
        adapted, plain = gm(IDS), base(IDS)
        with lfx.adapters_disabled(gm):
            assert lfx.active_adapters(gm) == []
            assert torch.equal(gm(IDS), plain)
        assert lfx.active_adapters(gm) == ["u", "w"]
        assert torch.equal(gm(IDS), adapted)
        with pytest.raises(KeyError), lfx.adapters_disabled(gm):
            raise KeyError("inside")
        assert lfx.active_adapters(gm) == ["u", "w"]
        assert torch.equal(gm(IDS), adapted)
    with pytest.raises(SpecError, match="no adapters"), lfx.adapters_disabled(copy.deepcopy(base)):
        pass


class Stack(nn.Module):
    """Two identical blocks in a ModuleList: layers="auto" makes each a call_module block."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def test_delete_and_combine_on_checkpointed_layer_blocks():
    torch.manual_seed(0)
    model, x = Stack().eval(), torch.randn(3, 8)

    def build(names):
        gm = model
        for i, adapter in enumerate(names):
            torch.manual_seed(20 + i)
            spec = lfx.Spec(targets=["0"] if adapter == "u" else ["2"], method=lfx.LoRA(rank=2, init="nonzero"))
            gm = lfx.rewrite(gm, spec, example_inputs=(x,), adapter=adapter, layers="auto")
        lfx.checkpoint_layers(gm)
        return gm

    had, never = build(["u", "gone"]), build(["u"])
    lfx.combine_adapters(had, {"u": 1.0, "gone": 1.0}, adapter="both", combination="cat")
    lfx.set_active_adapters(had, "both")
    with torch.no_grad():
        both = had(x)
    lfx.set_active_adapters(had, ["u", "gone"])
    with torch.no_grad():
        assert rel_err(both, had(x)) <= TOL  # cat is exact: one adapter doing what both did
    lfx.delete_adapter(had, "gone")
    lfx.set_active_adapters(had, "u")
    assert "checkpoint" in had.code and "gone" not in had.code
    assert all("gone" not in had.get_submodule(f"blocks.{i}").code for i in range(2))
    assert all("gone" not in n.target for n in had.graph.nodes if n.op == "get_attr")
    with torch.no_grad():
        assert torch.equal(had(x), never(x))


def test_a_hot_swap_slot_combines_as_the_adapter_it_holds(base, tmp_path):
    """A slot (max_rank 8) holding "u" (rank 4) combines to the same factors as "u" itself."""
    plain = ours_with(base)
    file = lfx.save_adapters(plain, tmp_path / "u.safetensors", adapters="u")
    targets, _rank, alpha = ADAPTERS["u"]
    slot = lfx.rewrite(copy.deepcopy(base), lfx.Spec(targets=targets, method=lfx.LoRA(rank=2, alpha=alpha)),
                       adapter="u", max_rank=8)
    lfx.load_adapters(slot, file)
    for combination in ("cat", "svd"):
        lfx.combine_adapters(plain, {"u": 0.7}, adapter=f"c_{combination}", combination=combination)
        lfx.combine_adapters(slot, {"u": 0.7}, adapter=f"c_{combination}", combination=combination)
        for target in targets:
            for name in ("lora_A", "lora_B"):
                ref = getattr(unit(plain, f"c_{combination}", target), name)
                assert rel_err(getattr(unit(slot, f"c_{combination}", target), name), ref) <= TOL


def test_delete_drops_the_per_row_gate_too(base):
    gm = ours_with(base)
    with lfx.adapter_rows(gm, ["u", "w"]):
        gm(IDS)
    lfx.delete_adapter(gm, "w")
    assert not [key for key in dict(gm.named_buffers()) if key.endswith(".w")]
    with lfx.adapter_rows(gm, ["u", "v"]), torch.no_grad():
        mixed = gm(IDS)
    lfx.set_active_adapters(gm, "u")
    with torch.no_grad():
        assert rel_err(mixed[0], gm(IDS)[0]) <= TOL


def test_deleting_a_pissa_adapter_gives_back_the_models_weight(model, base):
    """PiSSA runs on the residual W − s·B₀A₀ in the graph's own tensor; deleting it reads W again."""
    gm = copy.deepcopy(base)
    weight = gm.get_parameter("fc1.weight")
    gm = lfx.rewrite(gm, lfx.Spec(targets=["fc1"], method=lfx.LoRA(rank=2, init="pissa")), adapter="p")
    assert gm.get_parameter("fc1.weight") is not weight
    with lfx.adapters_disabled(gm), torch.no_grad():
        assert rel_err(gm(IDS), base(IDS)) > 1e-3  # the residual base alone is not the model
    lfx.delete_adapter(gm, "p")
    assert gm.get_parameter("fc1.weight") is weight
    with torch.no_grad():
        assert torch.equal(gm(IDS), base(IDS))
