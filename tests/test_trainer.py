"""lfx.Trainer: resuming after a kill, NaN losses, gradient accumulation, compiled steps."""

import json

import pytest
import torch
from torch import nn

import lowrank_fx as lfx
import lowrank_fx.training.checkpoint as checkpoint


def _graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    spec = lfx.Spec(targets=["0", "2"], method=lfx.LoRA(rank=2, dropout=0.1))
    return lfx.rewrite(model, spec, example_inputs=(torch.randn(4, 8),))


def _batches(n=12, rows=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 8, generator=g), torch.randn(rows, 4, generator=g)) for _ in range(n)]


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _adapters(gm):
    return {k: v.detach().clone() for k, v in gm.lowrank_fx.state_dict().items()}


def _trainer(gm, directory=None, **kw):
    options = dict(lr=1e-2, warmup_steps=2, compile=False, progress=False, checkpoint_dir=directory,
                   checkpoint_every=2 if directory else None)
    return lfx.Trainer(gm, mse, **{**options, **kw})


class Killed(Exception):
    pass


def _killed_at(batches, index):
    for i, batch in enumerate(batches):
        if i == index:
            raise Killed
        yield batch


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    batches = _batches()
    whole = _graph()
    _trainer(whole, tmp_path / "whole").fit(batches, steps=7)
    gm = _graph()
    with pytest.raises(Killed):
        _trainer(gm, tmp_path / "run").fit(_killed_at(batches, 5), steps=7)
    assert json.loads((tmp_path / "run" / "latest.json").read_text())["step"] == 4
    fresh = _graph()
    with torch.no_grad():  # other adapter values: everything must come from the checkpoint
        for p in fresh.lowrank_fx.parameters():
            p.normal_()
    resumed = _trainer(fresh, tmp_path / "run")
    assert (resumed.step, resumed.batches) == (4, 4)
    resumed.fit(batches, steps=7)
    assert resumed.step == 7
    expected = _adapters(whole)
    assert all(torch.equal(v, expected[k]) for k, v in _adapters(resumed.gm).items())
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*")) == ["step-00000006", "step-00000007"]


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    batches = _batches()
    whole = _graph()
    _trainer(whole).fit(batches, steps=5)
    real, calls = checkpoint.write_atomic, []

    def dies_on_second_checkpoint(path, data):
        calls.append(path)
        if len(calls) == 3:  # step 2 wrote state + latest.json; die writing step 4's state
            raise Killed
        return real(path, data)

    monkeypatch.setattr(checkpoint, "write_atomic", dies_on_second_checkpoint)
    with pytest.raises(Killed):
        _trainer(_graph(), tmp_path).fit(batches, steps=5)
    monkeypatch.setattr(checkpoint, "write_atomic", real)
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 2
    resumed = _trainer(_graph(), tmp_path)
    assert resumed.step == 2
    resumed.fit(batches, steps=5)
    expected = _adapters(whole)
    assert all(torch.equal(v, expected[k]) for k, v in _adapters(resumed.gm).items())


def test_nan_loss_names_the_step_and_keeps_the_checkpoint(tmp_path):
    batches = _batches()
    batches[4] = (torch.full((4, 8), float("nan")), batches[4][1])
    gm = _graph()
    trainer = _trainer(gm, tmp_path)
    with pytest.raises(lfx.TrainingError, match=r"loss is nan at step 5 .*step-00000004.*step 4"):
        trainer.fit(batches, steps=8)
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 4
    assert all(torch.isfinite(v).all() for v in _adapters(gm).values())
    saved = lfx.load_adapters(_graph(), tmp_path / "step-00000004" / "adapters.safetensors")
    current = _adapters(gm)
    assert all(torch.equal(v, current[k]) for k, v in _adapters(saved).items())  # not updated after step 4


def test_accumulation_equals_the_concatenated_batch():
    small = _batches(n=8, rows=3)
    big = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(small[::2], small[1::2])]
    spec = lfx.Spec(targets=["0", "2"], method=lfx.LoRA(rank=2, init="nonzero"))
    results = []
    for batches, accumulate in ((small, 2), (big, 1)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
        gm = lfx.rewrite(model, spec, example_inputs=(torch.randn(4, 8),))
        _trainer(gm, accumulate=accumulate, schedule="linear").fit(batches, steps=4)
        results.append(_adapters(gm))
    assert all(torch.allclose(v, results[1][k], atol=1e-6) for k, v in results[0].items())


def test_compiled_steps_match_eager_and_a_failing_compile_falls_back():
    batches = _batches(n=4)
    eager, compiled = _graph(), _graph()
    for gm in (eager, compiled):
        gm.lowrank_fx.default.lora.units["0"].dropout.p = 0.0  # RNG streams differ under compile
        gm.lowrank_fx.default.lora.units["2"].dropout.p = 0.0
    torch._dynamo.reset()
    _trainer(eager).fit(batches, steps=4)
    _trainer(compiled, compile="aot_eager").fit(batches, steps=4)
    expected = _adapters(eager)
    assert all(torch.allclose(v, expected[k], atol=1e-6) for k, v in _adapters(compiled).items())

    def broken(gm, example_inputs):
        raise RuntimeError("this backend is broken")

    torch._dynamo.reset()
    fallback = _graph()
    with pytest.warns(UserWarning, match="torch.compile failed .*training continues without compiling"):
        result = _trainer(fallback, compile=broken).fit(batches, steps=2)
    assert result["step"] == 2
    torch._dynamo.reset()


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(lfx.SpecError, match="accumulate"):
        _trainer(_graph(), accumulate=0)
    with pytest.raises(lfx.SpecError, match="checkpoint_dir"):
        lfx.Trainer(_graph(), mse, checkpoint_every=5)
    with pytest.raises(lfx.SpecError, match="needs the number of steps"):
        _trainer(_graph()).fit(iter(_batches()))  # a list's len() gives it: one pass
