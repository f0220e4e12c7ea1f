"""Adapter gates (eager): set_active_adapters picks adapters by writing buffers; folding,
saving and loading agree with what is active."""

import models
import pytest
import torch

import lowrank_fx as lfx


def _two_adapters():
    case = models.build("gpt2")
    gm = lfx.rewrite(case.model, lfx.Spec(targets=["c_attn"], method=lfx.LoRA(rank=4, init="nonzero")),
                     example_inputs=case.args, example_kwargs=case.kwargs, adapter="a")
    lfx.rewrite(gm, lfx.Spec(targets=["c_attn", "c_fc"], method=lfx.LoRA(rank=2, init="nonzero")), adapter="b")
    return case, gm.eval()


def _out(module, case):
    with torch.no_grad():
        return case.output(module(*case.other_args, **case.other_kwargs))


def test_gates_switch_outputs_and_merge_folds_only_active():
    case, gm = _two_adapters()
    assert lfx.active_adapters(gm) == ["a", "b"]  # every adapter starts active
    both = _out(gm, case)
    graph_before = gm.code
    lfx.set_active_adapters(gm, "a")
    only_a = _out(gm, case)
    assert gm.code == graph_before  # data, not structure
    assert torch.allclose(_out(lfx.merge(gm), case), only_a, atol=1e-5)
    lfx.set_active_adapters(gm, [])
    assert torch.allclose(_out(gm, case), _out(case.model, case), atol=1e-6)
    assert torch.allclose(_out(lfx.merge(gm), case), _out(case.model, case), atol=1e-6)
    lfx.set_active_adapters(gm, ["b", "a"])
    assert torch.allclose(_out(gm, case), both, atol=1e-6)
    assert not torch.allclose(only_a, both, atol=1e-4)
    state = lfx.merged_state_dict(gm, untie=True)
    lfx.set_active_adapters(gm, ["b"])
    assert not torch.allclose(lfx.merged_state_dict(gm, untie=True)["transformer.h.0.attn.c_attn.weight"],
                              state["transformer.h.0.attn.c_attn.weight"])


def test_gates_are_not_saved_and_survive_save_load(tmp_path):
    case, gm = _two_adapters()
    lfx.set_active_adapters(gm, "b")
    assert not any("gates" in key for key in gm.state_dict())
    path = lfx.save_adapters(gm, tmp_path / "two.safetensors")
    fresh = lfx.load_adapters(case.model, path, example_inputs=case.args, example_kwargs=case.kwargs)
    assert lfx.active_adapters(fresh) == ["a", "b"]  # a loaded graph starts with every adapter active
    lfx.set_active_adapters(fresh, "b")
    assert torch.allclose(_out(fresh.eval(), case), _out(gm, case), atol=1e-6)
    lfx.load_adapters(gm, path)  # into the graph itself: values replaced, gates untouched
    assert lfx.active_adapters(gm) == ["b"]


def test_gates_are_buffers_that_move_with_the_graph():
    _case, gm = _two_adapters()
    assert {name for name, _ in gm.named_buffers() if "gates" in name} == {"lowrank_fx_gates.a", "lowrank_fx_gates.b"}
    gm.to(torch.float64)
    lfx.set_active_adapters(gm, "a")
    assert gm.lowrank_fx_gates.a.dtype == torch.float64 and float(gm.lowrank_fx_gates.b) == 0.0


def test_unknown_adapter_names_are_refused():
    _case, gm = _two_adapters()
    with pytest.raises(lfx.SpecError, match=r"'c'.*its adapters are 'a', 'b'"):
        lfx.set_active_adapters(gm, ["a", "c"])
    assert lfx.active_adapters(gm) == ["a", "b"]  # nothing changed
    plain = lfx.merge(gm)
    with pytest.raises(lfx.SpecError, match="it has none"):
        lfx.set_active_adapters(plain, [])
