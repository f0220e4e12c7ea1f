"""Each old spelling of the public API still works for one release, with a warning naming the new one.

Options after the operands became keyword-only (issue 23); `combine_adapters(name=)` and
`delete_adapter(name=)` became `adapter=`. Each old call must warn (LowRankFxDeprecationWarning,
an error elsewhere in the test suite) and give exactly what the new spelling gives.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import lowrank_fx as lfx
from lowrank_fx.deprecation import LowRankFxDeprecationWarning


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


X = torch.randn(3, 6)
SPEC = lfx.Spec(targets=["fc1", "fc2"], method=lfx.LoRA(rank=2, init="nonzero"))


def _model() -> Toy:
    torch.manual_seed(0)
    return Toy()


def _graph(adapters=("default",)):
    model = _model()
    gm = None
    for adapter in adapters:
        torch.manual_seed(1)
        gm = lfx.rewrite(gm if gm is not None else model, SPEC, example_inputs=(X,), adapter=adapter)
    return model, gm


def _old(match: str):
    return pytest.warns(LowRankFxDeprecationWarning, match=match)


def test_rewrite_and_plan_positional_examples():
    torch.manual_seed(1)
    new = lfx.rewrite(_model(), SPEC, example_inputs=(X,), adapter="a")
    torch.manual_seed(1)
    with _old(r"lowrank_fx.rewrite: pass example_inputs, example_kwargs, adapter as keyword arguments"):
        old = lfx.rewrite(_model(), SPEC, (X,), None, "a")
    assert list(old.lowrank_fx) == ["a"] and torch.equal(old(X), new(X))
    with _old(r"lowrank_fx.plan: pass example_inputs as keyword argument \(example_inputs=\.\.\.\)"):
        assert str(lfx.plan(_model(), SPEC, (X,))) == str(lfx.plan(_model(), SPEC, example_inputs=(X,)))


def test_merge_and_merged_state_positional_options():
    model, gm = _graph()
    with _old(r"lowrank_fx.merge: pass requantize, tolerance as keyword"):
        old = lfx.merge(gm, False, 0.5)
    assert torch.equal(old(X), lfx.merge(gm)(X))
    with _old(r"lowrank_fx.merged_state_dict: pass untie as keyword"):
        state = lfx.merged_state_dict(gm, False)
    assert all(torch.equal(state[k], v) for k, v in lfx.merged_state_dict(gm).items())
    with _old(r"lowrank_fx.load_merged: pass tolerance as keyword"):
        assert lfx.load_merged(model, gm, 0.5) is model
    assert torch.allclose(model(X), gm(X), atol=1e-6)


def test_quantize_base_positional_exclude():
    pytest.importorskip("torchao")
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with _old(r"lowrank_fx.quantize_base: pass exclude as keyword"):
        assert lfx.quantize_base(model, "int8", ["1"]) is model
    assert model.lowrank_fx_quantized["layers"] == ["0"]


def test_combine_and_delete_adapter_old_names():
    _, new = _graph(("u", "v"))
    lfx.combine_adapters(new, {"u": 0.7, "v": 0.3}, adapter="uv", combination="cat")
    _, old = _graph(("u", "v"))
    with _old(r"lowrank_fx.combine_adapters: pass adapter, combination as keyword"):
        lfx.combine_adapters(old, {"u": 0.7, "v": 0.3}, "uv", "cat")
    _, renamed = _graph(("u", "v"))
    with _old(r"lowrank_fx.combine_adapters: name= is now adapter="):
        lfx.combine_adapters(renamed, {"u": 0.7, "v": 0.3}, name="uv", combination="cat")
    for gm in (old, renamed):
        lfx.set_active_adapters(gm, "uv")
    lfx.set_active_adapters(new, "uv")
    assert torch.equal(old(X), new(X)) and torch.equal(renamed(X), new(X))
    with _old(r"lowrank_fx.delete_adapter: name= is now adapter="):
        lfx.delete_adapter(old, name="u")
    assert list(old.lowrank_fx) == ["v", "uv"]


def test_loraplus_positional_options():
    _, gm = _graph()
    with _old(r"lowrank_fx.loraplus_param_groups: pass ratio, weight_decay as keyword"):
        old = lfx.loraplus_param_groups(gm, 1e-3, 4.0, 0.1)
    new = lfx.loraplus_param_groups(gm, 1e-3, ratio=4.0, weight_decay=0.1)
    assert [(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in old] == \
           [(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in new]
    with _old(r"lowrank_fx.loraplus_optimizer: pass ratio, optimizer_cls as keyword"):
        optimizer = lfx.loraplus_optimizer(gm, 1e-3, 4.0, torch.optim.SGD)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[1]["lr"] == pytest.approx(4e-3)


def test_trainer_and_fit_positional_options():
    _, gm = _graph()
    loss = lambda model, batch: model(batch).pow(2).mean()  # noqa: E731
    with _old(r"lowrank_fx.Trainer: pass lr as keyword argument \(lr=\.\.\.\)"):
        trainer = lfx.Trainer(gm, loss, 1e-3, compile=False, progress=False, schedule="constant")
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    with _old(r"lowrank_fx.Trainer.fit: pass steps as keyword argument \(steps=\.\.\.\)"):
        assert trainer.fit([X], 2)["step"] == 2


def test_method_and_spec_positional_options():
    with _old(r"lowrank_fx.LoRA: pass dropout, rslora by keyword"):
        assert lfx.LoRA(4, 8.0, 0.1, True) == lfx.LoRA(rank=4, alpha=8.0, dropout=0.1, rslora=True)
    with _old(r"lowrank_fx.Spec: pass exclude by keyword"):
        assert lfx.Spec(["fc1"], lfx.LoRA(), ["fc2"]) == lfx.Spec(targets=["fc1"], method=lfx.LoRA(), exclude=["fc2"])
    with pytest.raises(TypeError, match="both by position and as a keyword"):
        lfx.LoRA(4, 8.0, 0.1, dropout=0.2)


def test_signatures_show_keyword_only_options():
    kinds = {name: p.kind for name, p in inspect.signature(lfx.rewrite).parameters.items()}
    assert kinds["spec"] is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert kinds["example_inputs"] is inspect.Parameter.KEYWORD_ONLY
    assert str(inspect.signature(lfx.LoRA)).startswith("(rank: 'int' = 8, alpha: 'float' = 16.0, *, dropout")
    assert "*, adapter: 'str'" in str(inspect.signature(lfx.combine_adapters))
