"""Any output type of a forward becomes named ONNX outputs, and a diffusers UNet end to end.

Output names come from the result's structure: keys and fields (`logits`, `sample`),
`output_<i>` for tuple entries, `a.b` when nested, `out_<name>` where a name is also an
input's, `output` for a lone tensor. Checked on tiny models returning each kind: a
transformers `ModelOutput`, a diffusers `BaseOutput` (pytree-registered without keys),
a dataclass, a NamedTuple, nested dict/list/tuple, and user types registered with
`register_pytree_node` with and without a `flatten_with_keys_fn`. Each is rewritten with
LoRA, exported merged and with adapters, and run in ONNX Runtime against PyTorch.

A plain dataclass output is not a pytree type, which torch.export needs; capture registers
it (`torch.export.register_dataclass`) and exports again.

UNet2DConditionModel (tiny config, random weights): `timestep` must be a tensor, (batch,)
or 0-dim; a Python int is baked into the graph and other values fail its guard. Its output
`sample` shares the input's name, so the ONNX output is `out_sample`.
"""

from __future__ import annotations

import copy
import dataclasses
import typing

import diffusers
import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

# Imported before any capture: transformers registers a ModelOutput type with pytree when
# it is defined, but not while torch.export traces (a lazy first import inside forward).
from transformers.modeling_outputs import SequenceClassifierOutput

import lowrank_fx as lfx
from lowrank_fx.export.signature import flat_outputs

BaseOutput = diffusers.utils.BaseOutput

TOL = 1e-5  # fp32, relative to the largest magnitude
LORA = lfx.LoRA(rank=2, init="nonzero")


def rel_err(got, want) -> float:
    want = np.asarray(want)
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


# ---------------------------------------------------------------------------------------
# Output types


@dataclasses.dataclass
class TinyBase(BaseOutput):  # diffusers registers every BaseOutput subclass with pytree, keyless
    sample: torch.Tensor
    hidden: torch.Tensor | None = None


@dataclasses.dataclass
class Registered:  # registered with torch.export.register_dataclass below
    logits: torch.Tensor
    hidden: torch.Tensor
    extra: torch.Tensor | None = None


torch.export.register_dataclass(Registered, serialized_type_name="test_output_types.Registered")


@dataclasses.dataclass
class Plain:  # not registered at all
    logits: torch.Tensor
    hidden: torch.Tensor
    steps: int = 3


class Pair(typing.NamedTuple):
    logits: torch.Tensor
    hidden: torch.Tensor


class Keyless:
    """A user type registered without a flatten_with_keys_fn: names come from its attributes."""

    def __init__(self, first, second):
        self.first, self.second = first, second


pytree.register_pytree_node(Keyless, lambda o: ([o.first, o.second], None), lambda c, _: Keyless(*c))


class Keyed:
    """Registered with a flatten_with_keys_fn whose keys differ from its attributes."""

    def __init__(self, first, second):
        self.first, self.second = first, second


pytree.register_pytree_node(
    Keyed, lambda o: ([o.first, o.second], None), lambda c, _: Keyed(*c),
    flatten_with_keys_fn=lambda o: ([(pytree.MappingKey("alpha"), o.first), (pytree.MappingKey("beta"), o.second)], None),
)


class Opaque:
    def __init__(self, tensor):
        self.tensor = tensor


# kind -> (build the output from y (batch, seq, 3) and h (batch, seq, 8), {ONNX name: pick that tensor})
KINDS = {
    "model_output": (lambda y, h: SequenceClassifierOutput(logits=y, hidden_states=(h, h * 2)),
                     {"logits": lambda r: r.logits, "hidden_states.0": lambda r: r.hidden_states[0],
                      "hidden_states.1": lambda r: r.hidden_states[1]}),
    "base_output": (lambda y, h: TinyBase(sample=y, hidden=h),
                    {"sample": lambda r: r.sample, "hidden": lambda r: r.hidden}),
    "dataclass": (lambda y, h: Registered(logits=y, hidden=h),
                  {"logits": lambda r: r.logits, "hidden": lambda r: r.hidden}),
    "namedtuple": (lambda y, h: Pair(y, h), {"logits": lambda r: r.logits, "hidden": lambda r: r.hidden}),
    "nested": (lambda y, h: {"x": y, "a": {"b": h, "n": None}, "c": [y * 2, (h + 1, y - 1)], "k": 4},
               {"out_x": lambda r: r["x"], "a.b": lambda r: r["a"]["b"], "c.0": lambda r: r["c"][0],
                "c.1.0": lambda r: r["c"][1][0], "c.1.1": lambda r: r["c"][1][1]}),
    "tuple": (lambda y, h: (y, [h]), {"output_0": lambda r: r[0], "output_1.0": lambda r: r[1][0]}),
    "keyless": (lambda y, h: Keyless(y, h), {"first": lambda r: r.first, "second": lambda r: r.second}),
    "keyed": (lambda y, h: Keyed(y, h), {"alpha": lambda r: r.first, "beta": lambda r: r.second}),
}


class Tiny(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        y = self.fc2(h)
        if self.kind == "plain":
            return Plain(y, h)
        if self.kind == "opaque":
            return {"y": y, "rest": [Opaque(h)]}
        return KINDS[self.kind][0](y, h)


X = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1))
OTHER = torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(2))  # another batch and length


def expected(kind: str, result) -> dict[str, np.ndarray]:
    return {name: pick(result).detach().numpy() for name, pick in KINDS[kind][1].items()}


def test_names_of_every_kind_without_exporting():
    """flat_outputs alone (no capture, no export): the names and tensors of each kind."""
    y, h = torch.randn(2, 3), torch.randn(2, 8)
    for kind, (build, picks) in KINDS.items():
        result = build(y, h)
        names, tensors = flat_outputs(result, reserved=["x"])
        assert names == list(picks), kind
        assert all(got is pick(result) for got, pick in zip(tensors, picks.values())), kind
    assert flat_outputs(y) == (["output"], [y])
    assert flat_outputs(Plain(y, h))[0] == ["logits", "hidden"]
    assert flat_outputs({"a.b": y, "a": {"b": h}})[0] == ["a.b", "a.b_1"]  # names stay unique


@pytest.fixture(scope="module", params=list(KINDS))
def exported(request, tmp_path_factory):
    """(kind, original model, adapted graph, merged export, adapters export)."""
    kind = request.param
    torch.manual_seed(0)
    model = Tiny(kind).eval()
    gm = lfx.rewrite(model, lfx.Spec(targets=["fc1", "fc2"], method=LORA), example_inputs=(X,))
    folder = tmp_path_factory.mktemp(kind)
    merged = lfx.export_onnx(gm, folder / "merged.onnx", example_inputs=(X,), mode="merged", optimize=False)
    adapters = lfx.export_onnx(gm, folder / "adapters.onnx", example_inputs=(X,), mode="adapters", optimize=False)
    return kind, model, gm.eval(), merged, adapters


def test_output_names_come_from_the_structure(exported):
    kind, _, _, merged, adapters = exported
    names = list(KINDS[kind][1])
    assert merged.outputs == adapters.outputs == names
    assert [o.name for o in ort.InferenceSession(str(merged.path)).get_outputs()] == names
    assert adapters.session().output_names == names


def test_merged_export_matches_pytorch(exported):
    kind, _, gm, merged, _ = exported
    session = ort.InferenceSession(str(merged.path))
    for x in (X, OTHER):
        with torch.no_grad():
            want = expected(kind, gm(x))
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x.numpy()})))
        for name in want:
            assert rel_err(got[name], want[name]) <= TOL, (name, rel_err(got[name], want[name]))


def test_adapters_export_matches_pytorch_with_and_without_the_adapter(exported):
    kind, model, gm, _, adapters = exported
    session = adapters.session()
    for x in (X, OTHER):
        with torch.no_grad():
            adapted, base = expected(kind, gm(x)), expected(kind, model(x))
        got, got_base = session.run({"x": x}, adapter="default"), session.run({"x": x})
        for name in adapted:
            assert rel_err(got[name], adapted[name]) <= TOL, name
            assert rel_err(got_base[name], base[name]) <= TOL, name
            assert rel_err(adapted[name], base[name]) > 1e-3, name  # the adapter changes it


def test_plain_dataclass_output_is_registered_by_capture(tmp_path):
    """torch.export needs output types pytree knows: capture registers a plain dataclass it finds
    in the output and exports again; the ONNX outputs are its tensor fields (the int field is a
    constant, not an output). export_onnx of the plain model walks the fields too."""
    model = Tiny("plain").eval()
    gm = lfx.rewrite(model, lfx.Spec(targets=["fc1"], method=LORA), example_inputs=(X,)).eval()
    with torch.no_grad():
        want = gm(OTHER)
    assert type(want).__name__ == "Plain"
    result = lfx.export_onnx(gm, tmp_path / "plain.onnx", example_inputs=(X,), mode="adapters", optimize=False)
    assert result.outputs == ["logits", "hidden"]
    got = result.session().run({"x": OTHER}, adapter="default")
    assert rel_err(got["logits"], want.logits) <= TOL and rel_err(got["hidden"], want.hidden) <= TOL
    plain = lfx.export_onnx(Tiny("plain").eval(), tmp_path / "model.onnx", example_inputs=(X,), optimize=False)
    assert plain.outputs == ["logits", "hidden"]


def test_unknown_output_type_names_the_type_and_the_fix(tmp_path):
    with pytest.raises(lfx.ExportError) as info:
        lfx.export_onnx(Tiny("opaque"), tmp_path / "opaque.onnx", example_inputs=(X,))
    message = str(info.value)
    assert "'rest.0'" in message and f"{__name__}.Opaque" in message
    assert "register_pytree_node(Opaque" in message and "flatten_with_keys_fn" in message


# ---------------------------------------------------------------------------------------
# diffusers UNet2DConditionModel: attention and resnet-conv LoRA, fold, compile, ONNX


# alpha = rank (scale 1): still a 25% change of the output. With the default scale 16/2 and
# random B the adapted UNet is so ill-conditioned that any fp32 reordering (folding, ONNX
# Runtime's kernels) moves its output by 3e-5 to 1e-4; at scale 1 it is 1e-6, as for the base.
UNET_LORA = lfx.LoRA(rank=2, alpha=2.0, init="nonzero")
# self (attn1) and cross (attn2) attention, and the resnet convs that SD LoRAs also train
UNET_TARGETS = ["*.to_q", "*.to_k", "*.to_v", "*.to_out.0", "re:resnets\\.\\d+\\.conv[12]$"]


def _unet_inputs(batch: int, size: int, tokens: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            torch.randn(batch, tokens, 8, generator=g))


UNET_ARGS = _unet_inputs(2, 8, 5, seed=3)  # sample, timestep, encoder_hidden_states
UNET_OTHER = _unet_inputs(3, 16, 7, seed=4)
UNET_NAMES = ["sample", "timestep", "encoder_hidden_states"]


@pytest.fixture(scope="module")
def unet():
    """(original UNet, adapted graph in eval mode)."""
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).eval()
    gm = lfx.rewrite(model, lfx.Spec(targets=UNET_TARGETS, method=UNET_LORA), example_inputs=UNET_ARGS)
    return model, gm.eval()


def _sample(module, args) -> torch.Tensor:
    with torch.no_grad():
        return module(*args).sample


def test_unet_adapts_self_and_cross_attention(unet):
    model, gm = unet
    targets = list(gm.meta["lowrank_fx"].adapters["default"].groups)
    convs = [t for t in targets if ".resnets." in t]
    assert len(targets) - len(convs) == 32  # 4 projections x 2 attentions x 4 transformer blocks
    assert len(convs) == 16  # conv1, conv2 of 8 resnets (1 + 1 down, 2 mid, 2 + 2 up)
    assert any(".attn2.to_k" in t for t in targets) and any(".attn1.to_out.0" in t for t in targets)
    assert rel_err(_sample(gm, UNET_OTHER), _sample(model, UNET_OTHER)) > 1e-2


def test_unet_merge_and_fold_into_the_original(unet):
    model, gm = unet
    want = _sample(gm, UNET_OTHER)
    assert rel_err(_sample(lfx.merge(gm), UNET_OTHER), want) <= TOL
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(lfx.merged_state_dict(gm))
    assert rel_err(_sample(fresh, UNET_OTHER), want) <= TOL
    fresh = copy.deepcopy(model)
    lfx.load_merged(fresh, gm)
    assert rel_err(_sample(fresh, UNET_OTHER), want) <= TOL


def test_unet_compiled_training_step_equals_eager(unet):
    _, gm = unet
    gm.train()

    def step(module):
        for p in module.parameters():
            p.grad = None
        loss = module(*UNET_ARGS).sample.square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in module.parameters() if p.requires_grad]

    try:
        torch._dynamo.reset()
        compiled_loss, compiled_grads = step(torch.compile(gm, fullgraph=True, backend="aot_eager"))
        loss, grads = step(gm)
    finally:
        torch._dynamo.reset()
        gm.eval()
    assert len(grads) == 96  # A and B of 48 targets
    assert torch.allclose(compiled_loss, loss, rtol=1e-5, atol=0)
    for got, want in zip(compiled_grads, grads):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module", params=["merged", "adapters"])
def unet_export(request, unet, tmp_path_factory):
    _, gm = unet
    path = tmp_path_factory.mktemp("unet") / f"unet_{request.param}.onnx"
    return lfx.export_onnx(gm, path, example_inputs=UNET_ARGS, mode=request.param, optimize=False)


def test_unet_onnx_matches_pytorch(unet, unet_export):
    model, gm = unet
    assert unet_export.inputs == UNET_NAMES and unet_export.outputs == ["out_sample"]
    session = unet_export.session()
    for args in (UNET_ARGS, UNET_OTHER):
        feeds = dict(zip(UNET_NAMES, args))
        adapter = "default" if unet_export.mode == "adapters" else None
        assert rel_err(session.run(feeds, adapter=adapter)["out_sample"], _sample(gm, args)) <= TOL
        if unet_export.mode == "adapters":
            assert rel_err(session.run(feeds)["out_sample"], _sample(model, args)) <= TOL
