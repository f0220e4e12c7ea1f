"""Every numeric, flag and pattern option is checked where it is given: a SpecError naming the
option, the value and what is valid, never a NaN model, a silent no-op or a TypeError later.
Also `set_active_adapters` with [] / None (the base model) and with things that are not graphs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import lowrank_fx as lfx
from lowrank_fx.adapt.capture import capture

NAN, INF = float("nan"), float("inf")

# (method, option, bad value, words the message must hold besides the option and the value)
BAD = [
    (lfx.LoRA, "alpha", NAN, "finite number other than 0"),
    (lfx.LoRA, "alpha", INF, "finite number other than 0"),
    (lfx.LoRA, "alpha", 0, "0 would train nothing"),
    (lfx.LoRA, "alpha", 0.0, "0 would train nothing"),
    (lfx.LoRA, "alpha", "16", "finite number"),
    (lfx.LoRA, "alpha", True, "finite number"),
    (lfx.LoRA, "alpha", None, "finite number"),
    (lfx.LoRA, "dropout", "0.1", "in [0, 1)"),
    (lfx.LoRA, "dropout", False, "in [0, 1)"),
    (lfx.LoRTA, "alpha", NAN, "finite number other than 0"),
    (lfx.LoRTA, "alpha", 0, "0 would train nothing"),
    (lfx.LoRTA, "head_dim", True, "positive integer"),
    (lfx.LoRTA, "layer_pattern", 5, "regular expression"),
    (lfx.LoRTA, "matrix_pattern", b"q", "regular expression"),
    (lfx.RandLoRA, "alpha", -INF, "finite number other than 0"),
    (lfx.RandLoRA, "alpha", 0, "0 would train nothing"),
    (lfx.RandLoRA, "seed", -1, "integer in [0, 18446744073709551615]"),
    (lfx.RandLoRA, "seed", 1.5, "integer in [0, 18446744073709551615]"),
    (lfx.RandLoRA, "seed", 2**64, "integer in [0, 18446744073709551615]"),
    (lfx.RandLoRA, "sparse", 0, "True or False"),
]


@pytest.mark.parametrize("method, option, value, valid", BAD,
                         ids=[f"{m.__name__}-{o}-{v!r}" for m, o, v, _ in BAD])
def test_bad_method_options_name_option_value_and_range(method, option, value, valid):
    with pytest.raises(lfx.SpecError) as info:
        method(**{option: value})
    message = str(info.value)
    assert f"{method.__name__} {option} must be" in message
    assert f"got {value!r}" in message and valid in message


def test_dora_options_are_checked_like_lora():
    with pytest.raises(lfx.SpecError, match=r"LoRA alpha must be a finite number other than 0.*got nan"):
        lfx.LoRA(dora=True, alpha=NAN)


def test_valid_options_are_kept_as_plain_python_numbers():
    """numpy scalars and int alphas are accepted and stored as int / float, so configs stay JSON;
    a negative alpha (PEFT allows any) flips the update's sign: y = W x + (alpha / r) B A x, by hand."""
    method = lfx.LoRA(rank=np.int64(2), alpha=np.float32(-3.0), dropout=np.float64(0.25), init="nonzero")
    assert (type(method.rank), type(method.alpha), type(method.dropout)) == (int, float, float)
    assert (method.rank, method.alpha, method.dropout) == (2, -3.0, 0.25)
    assert json.loads(json.dumps(method.config()))["alpha"] == -3.0
    assert lfx.LoRA(alpha=16).alpha == 16.0 and lfx.RandLoRA(seed=np.uint64(2**64 - 1)).seed == 2**64 - 1
    assert lfx.LoRTA(head_dim=np.int32(8)).head_dim == 8
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5)).eval()
    gm = lfx.rewrite(model, lfx.Spec(["0"], method=method)).eval()
    unit = gm.lowrank_fx["default"]["lora"].units["0"]
    x = torch.randn(4, 6)
    with torch.no_grad():
        want = model(x) + (-3.0 / 2) * (x @ unit.lora_A.t()) @ unit.lora_B.t()
        torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options, option", [
    (dict(targets=5), "targets"), (dict(targets=None), "targets"), (dict(targets=["fc", 3]), "targets"),
    (dict(exclude=None), "exclude"), (dict(exclude=[b"fc"]), "exclude"), (dict(train=None), "train"),
    (dict(train=[1]), "train"),
])
def test_spec_pattern_options_must_be_strings(options, option):
    with pytest.raises(lfx.SpecError, match=rf"Spec\.{option} must be a pattern \(a string\) or a list of patterns, got"):
        lfx.Spec(**options)


@pytest.fixture(scope="module")
def graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    gm = lfx.rewrite(model, lfx.Spec(["0", "2"], method=lfx.LoRA(rank=2, init="nonzero")), adapter="a")
    lfx.rewrite(gm, lfx.Spec(["2"], method=lfx.LoRA(rank=1, init="nonzero")), adapter="b")
    return model, gm


@pytest.mark.parametrize("value, message", [
    (NAN, "ratio must be a finite number > 0"), (0.0, "ratio must be a finite number > 0"),
    (-16.0, "ratio must be a finite number > 0"), ("16", "ratio must be a finite number > 0"),
])
def test_loraplus_ratio_is_checked(graph, value, message):
    with pytest.raises(lfx.SpecError, match=rf"LoRA\+ {message}.*got {value!r}"):
        lfx.loraplus_optimizer(graph[1], lr=1e-3, ratio=value)


def test_loraplus_lr_and_weight_decay_are_checked(graph):
    with pytest.raises(lfx.SpecError, match=r"LoRA\+ lr must be a finite number > 0, got nan"):
        lfx.loraplus_param_groups(graph[1], lr=math.nan)
    with pytest.raises(lfx.SpecError, match=r"LoRA\+ weight_decay must be a finite number >= 0, got -0.1"):
        lfx.loraplus_param_groups(graph[1], lr=1e-3, weight_decay=-0.1)


def test_none_and_no_adapters_are_the_base_model_exactly(graph):
    model, gm = graph
    x = torch.randn(5, 6)
    try:
        for none in (None, [], ()):
            lfx.set_active_adapters(gm, none)
            assert lfx.active_adapters(gm) == []
            with torch.no_grad():
                assert torch.equal(gm(x), model(x))
    finally:
        lfx.set_active_adapters(gm, ["a", "b"])
    with torch.no_grad():
        assert not torch.allclose(gm(x), model(x), atol=1e-4)


def test_set_active_adapters_refusals_say_what_was_wrong(graph):
    model, gm = graph
    with pytest.raises(lfx.ModelTypeError, match="takes the graph lfx.rewrite returned, got a Sequential"):
        lfx.set_active_adapters(model, [])
    with pytest.raises(lfx.SpecError, match=r"a name, a list of names, or \[\] / None.*got \[1\]"):
        lfx.set_active_adapters(gm, [1])
    with pytest.raises(lfx.SpecError, match=r"no adapter named 'c' in this graph; its adapters are 'a', 'b'"):
        lfx.set_active_adapters(gm, "c")
    assert lfx.active_adapters(gm) == ["a", "b"]  # nothing changed
    with pytest.raises(lfx.SpecError, match="this graph has no adapters to turn off"):
        lfx.set_active_adapters(capture(model), [])
