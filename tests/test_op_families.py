"""Targets beyond linear layers: convolutions, embeddings and every call form of MultiheadAttention.

Oracles: the original model with the folded weights loaded (`merged_state_dict`), PEFT with
identical weights (through `save_peft` / `PeftModel.from_pretrained`), ONNX Runtime for the
merged, swappable and per-row exports, and eager PyTorch for `torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

import copy

import numpy as np
import peft
import pytest
import torch
from torch import nn

import lowrank_fx as lfx


def rel(a, b) -> float:
    a, b = np.asarray(torch.as_tensor(a).detach()), np.asarray(torch.as_tensor(b).detach())
    return float(np.abs(a - b).max() / np.abs(b).max())


class Block(nn.Module):
    """A ResNet basic block: conv-bn-relu-conv-bn plus a (strided 1x1) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=2, dilation=2, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = Block(8, 8, 1, groups=2)
        self.layer2 = Block(8, 16, 2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = self.layer2(self.layer1(torch.relu(self.stem(x))))
        return self.fc(h.mean(dim=(2, 3)))


CONVS = ["stem", "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2", "layer2.shortcut"]


def build_resnet(seed: int = 0) -> ResNet:
    torch.manual_seed(seed)
    model = ResNet()
    with torch.no_grad():  # running statistics that are not the identity, so eval mode matters
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def resnet():
    model = build_resnet()
    x = torch.randn(2, 3, 12, 12)
    gm = lfx.rewrite(copy.deepcopy(model), lfx.Spec(targets=CONVS, method=lfx.LoRA(rank=4, init="nonzero")),
                     example_inputs=(x,))
    # Same rank: a grouped conv's factors have no shared rank axis, so swappable adapters keep one rank there.
    lfx.rewrite(gm, lfx.Spec(targets=CONVS, method=lfx.LoRA(rank=4, alpha=4.0, init="nonzero")), adapter="b")
    lfx.set_active_adapters(gm, ["default"])
    return model, gm.eval(), x


def test_resnet_convs_are_targets_with_their_settings(resnet):
    _, gm, _ = resnet
    plan = lfx.plan(gm, lfx.Spec(targets=CONVS))
    shapes = {r.target: (r.op, r.shape) for r in plan.rows}
    assert shapes["layer1.conv2"] == ("conv2d", (8, 4 * 9))  # groups=2: in/g · k·k
    assert shapes["layer2.shortcut"] == ("conv2d", (16, 8))
    # As PEFT: convs are targets by name only, and the one linear layer is the output head.
    with pytest.raises(lfx.SpecError, match="all-linear"):
        lfx.plan(gm, lfx.Spec("all-linear"))


def test_resnet_fold_into_the_original_model(resnet):
    model, gm, _ = resnet
    other = torch.randn(3, 3, 16, 16)  # another batch and image size than the capture
    fresh = build_resnet(seed=1)
    fresh.load_state_dict(lfx.merged_state_dict(gm))
    assert rel(fresh(other), gm(other)) < 1e-5
    assert rel(lfx.merge(gm)(other), gm(other)) < 1e-5
    assert rel(gm(other), model(other)) > 1e-3  # the adapter does change the output


def test_resnet_matches_peft(resnet, tmp_path):
    model, gm, x = resnet
    single = copy.deepcopy(gm)
    lfx.set_active_adapters(single, ["default"])
    # PEFT's LoRA conv A ignores the base's dilation (its output would not fit); the dilated convs
    # (conv2 of each block) are checked by folding above.
    spec = lfx.Spec(targets=[c for c in CONVS if not c.endswith("conv2")], method=lfx.LoRA(rank=4, init="nonzero"))
    ours = lfx.rewrite(copy.deepcopy(model), spec, example_inputs=(x,)).eval()
    lfx.save_peft(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    with torch.no_grad():
        assert rel(ours(x), theirs(x)) < 1e-5
        assert rel(lfx.merge(ours)(x), theirs.merge_and_unload()(x)) < 1e-5


def test_resnet_onnx_merged_swappable_and_per_row(resnet, tmp_path):
    _, gm, x = resnet
    refs = {}
    for adapter in ("default", "b", None):
        lfx.set_active_adapters(gm, [adapter] if adapter else [])
        refs[adapter] = gm(x).detach()
    lfx.set_active_adapters(gm, ["default"])
    merged = lfx.export_onnx(gm, tmp_path / "merged.onnx", example_inputs=(x,), mode="merged").session()
    assert rel(merged.run({"x": x.numpy()})["output"], refs["default"]) < 1e-5
    swappable = lfx.export_onnx(gm, tmp_path / "adapters.onnx", example_inputs=(x,), mode="adapters").session()
    for adapter in ("default", "b", None):
        assert rel(swappable.run({"x": x.numpy()}, adapter=adapter)["output"], refs[adapter]) < 1e-5
    rows = lfx.export_onnx(gm, tmp_path / "rows.onnx", example_inputs=(x,), mode="per_row").session()
    batch = torch.cat([x, x[:1]])
    out = rows.run({"x": batch.numpy()}, rows=["default", "b", None])["output"]
    for i, adapter in enumerate(["default", "b", None]):
        lfx.set_active_adapters(gm, [adapter] if adapter else [])
        assert rel(out[i], gm(batch[i:i + 1])[0]) < 1e-5
    lfx.set_active_adapters(gm, ["default"])


@pytest.mark.parametrize("method", [lfx.LoRA(rank=2, init="nonzero"), lfx.LoRA(rank=2, init="nonzero", dora=True),
                                    lfx.RandLoRA(rank=2, init="nonzero"), lfx.LoRTA(rank=2, init="nonzero")],
                         ids=["lora", "dora", "randlora", "lorta"])
def test_every_method_on_conv_and_embedding_folds_and_compiles_fullgraph(method):
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(20, 8), "conv": nn.Conv1d(8, 8, 3, padding=1)})

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.conv = model["emb"], model["conv"]

        def forward(self, ids):
            return self.conv(self.emb(ids).transpose(1, 2)).sum()

    ids = torch.randint(0, 20, (2, 6))
    net = Net()
    gm = lfx.rewrite(copy.deepcopy(net), lfx.Spec(targets=["emb", "conv"], method=method), example_inputs=(ids,))
    folded = copy.deepcopy(net)
    folded.load_state_dict(lfx.merged_state_dict(gm))
    other = torch.randint(0, 20, (3, 9))
    assert rel(folded(other), gm(other)) < 1e-5 and rel(gm(other), net(other)) > 1e-4
    params = [p for p in gm.parameters() if p.requires_grad]
    eager = torch.autograd.grad(gm(ids), params)
    compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")
    loss = compiled(ids)
    assert rel(loss, gm(ids)) < 1e-5
    for a, b in zip(torch.autograd.grad(loss, params), eager):
        assert rel(a, b) < 1e-5


class Attention(nn.Module):
    """nn.MultiheadAttention called in one form: self, cross (q, k, v distinct), k is v, unbatched, kdim."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        kdim = 6 if form == "kdim" else None
        self.mha = nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim, batch_first=True)
        self.key = nn.Linear(4, kdim or 8)
        self.value = nn.Linear(4, 8)

    def forward(self, q, memory):
        k = self.key(memory)
        if self.form == "self":
            return self.mha(q, q, q)[0]
        if self.form == "cross":
            return self.mha(q, k, self.value(memory))[0]
        if self.form in ("k_is_v", "kdim"):
            return self.mha(q, k, k)[0]
        return self.mha(q[0], k[0], self.value(memory)[0])[0]  # unbatched (L, E)


@pytest.mark.parametrize("form,targets", [
    ("self", ["mha.in_proj", "mha.out_proj"]),
    ("cross", ["mha.in_proj", "mha.out_proj"]),
    ("k_is_v", ["mha.in_proj", "mha.out_proj"]),
    ("unbatched", ["mha.in_proj", "mha.out_proj"]),
    ("kdim", ["mha.q_proj", "mha.k_proj", "mha.v_proj", "mha.out_proj"]),
])
def test_multihead_attention_every_call_form(form, targets):
    torch.manual_seed(0)
    model = Attention(form).eval()
    q, memory = torch.randn(2, 5, 8), torch.randn(2, 7, 4)
    found = [r.target for r in lfx.plan(model, lfx.Spec(targets="re:^mha\\."), example_inputs=(q, memory)).rows]
    assert found == targets
    gm = lfx.rewrite(copy.deepcopy(model), lfx.Spec(targets=targets, method=lfx.LoRA(rank=2, init="nonzero")),
                     example_inputs=(q, memory)).eval()
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(lfx.merged_state_dict(gm))
    q2, m2 = torch.randn(3, 4, 8), torch.randn(3, 6, 4)
    with torch.no_grad():
        assert rel(gm(q2, m2), fresh(q2, m2)) < 1e-5
        assert rel(gm(q2, m2), model(q2, m2)) > 1e-3


def test_dora_on_conv_and_embedding_runs_in_onnx_runtime(tmp_path):
    import peft_matrix_models as pm

    model, ids = pm.build("EmbConv1D"), pm.INPUTS["EmbConv1D"]()
    def spec(rank):
        return lfx.Spec(targets=["emb", "conv1d", "lin0"], method=lfx.LoRA(rank=rank, init="nonzero", dora=True))
    gm = lfx.rewrite(copy.deepcopy(model), spec(4), example_inputs=(ids,))
    lfx.rewrite(gm, spec(2), adapter="b")
    gm.eval()
    refs = {}
    for adapter in ("default", "b", None):
        lfx.set_active_adapters(gm, [adapter] if adapter else [])
        refs[adapter] = gm(ids).detach()
    assert rel(refs[None], model(ids)) < 1e-6 and rel(refs["b"], refs[None]) > 1e-3
    lfx.set_active_adapters(gm, ["default"])
    merged = lfx.export_onnx(gm, tmp_path / "merged.onnx", example_inputs=(ids,), mode="merged").session()
    assert rel(merged.run({"ids": ids.numpy()})["output"], refs["default"]) < 1e-5
    swappable = lfx.export_onnx(gm, tmp_path / "adapters.onnx", example_inputs=(ids,), mode="adapters").session()
    for adapter in ("default", "b", None):  # no adapter: DoRA's magnitude defaults to the base row norms
        assert rel(swappable.run({"ids": ids.numpy()}, adapter=adapter)["output"], refs[adapter]) < 1e-5


def test_trainable_tokens_fold_and_swap_in_onnx(tmp_path):
    import peft_matrix_models as pm

    model, ids = pm.build("EmbConv1D"), pm.INPUTS["EmbConv1D"]()
    ids[0, :3] = torch.tensor([0, 10, 10])
    gm = lfx.rewrite(copy.deepcopy(model), lfx.Spec(targets={"emb": lfx.TrainableTokens(indices=[0, 10])}),
                     example_inputs=(ids,)).eval()
    assert rel(gm(ids), model(ids)) < 1e-7  # rows start as the base rows
    with torch.no_grad():
        gm.lowrank_fx.default.tokens.units["emb"].rows.add_(1.0)
    fresh = pm.build("EmbConv1D", seed=1)
    fresh.load_state_dict(lfx.merged_state_dict(gm))
    assert rel(fresh(ids), gm(ids)) < 1e-6 and rel(gm(ids), model(ids)) > 1e-3
    untouched = [i for i in range(100) if i not in (0, 10)]
    assert torch.equal(fresh.emb.weight[untouched], model.emb.weight[untouched])
    swappable = lfx.export_onnx(gm, tmp_path / "tokens.onnx", example_inputs=(ids,), mode="adapters").session()
    assert rel(swappable.run({"ids": ids.numpy()}, adapter="default")["output"], gm(ids)) < 1e-5
    assert rel(swappable.run({"ids": ids.numpy()})["output"], model(ids)) < 1e-5
    with pytest.raises(lfx.SpecError, match="rows of an embedding"):
        lfx.rewrite(copy.deepcopy(model), lfx.Spec(targets={"lin0": lfx.TrainableTokens(indices=[1])}),
                    example_inputs=(ids,))
    with pytest.raises(lfx.SpecError, match="outside emb's table of 100 rows"):
        lfx.rewrite(copy.deepcopy(model), lfx.Spec(targets={"emb": lfx.TrainableTokens(indices=[100])}),
                    example_inputs=(ids,))


def test_plan_marks_ranks_above_the_weight_size():
    import peft_matrix_models as pm

    plan = lfx.plan(pm.build("MLP"), lfx.Spec(["lin0", "lin1"], method=lfx.LoRA(rank=8)),
                    example_inputs=(pm.INPUTS["MLP"](),))
    notes = {r.target: r.note for r in plan.rows}
    assert notes == {"lin0": "", "lin1": "rank > min(out, in)"}  # lin1 is 2 x 20
    assert "[rank > min(out, in)]" in str(plan)


def test_plan_lists_the_modules_spec_train_trains():
    import peft_matrix_models as pm

    plan = lfx.plan(pm.build("MLP"), lfx.Spec(targets=["lin0"], method=lfx.LoRA(rank=2), train=["lin1"]),
                    example_inputs=(pm.INPUTS["MLP"](),))
    assert plan.trained == {"lin1.weight": 40, "lin1.bias": 2}
    assert plan.trainable == 2 * (10 + 20) + 42 and "trained in full by Spec.train" in str(plan)
