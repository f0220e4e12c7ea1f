"""Capture: examples given by name only, non-tensor examples as forward defaults, an HF
Trainer on a rewritten graph, every submodule's train/eval flag kept, and no-match errors
naming the pattern that matched nothing."""

from __future__ import annotations

import copy
import inspect
import types

import models
import pytest
import torch
import transformers as T
from torch import nn

import lowrank_fx as lfx

SPEC = lfx.Spec(targets=["*.q_proj", "*.v_proj"], method=lfx.LoRA(rank=4, alpha=8.0, init="nonzero"))


def _batch(batch: int = 2, seq: int = 8) -> dict:
    ids = torch.randint(0, models.VOCAB, (batch, seq))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # right padding in the first row
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _llama() -> nn.Module:
    return models.build("llama").model


@pytest.mark.parametrize("wrap", [dict, T.BatchEncoding, types.MappingProxyType], ids=["dict", "BatchEncoding", "Mapping"])
def test_example_kwargs_alone_is_a_complete_example(wrap):
    model = _llama()
    example = _batch()
    gm = lfx.rewrite(model, lfx.Spec(["*.q_proj"]), example_kwargs=wrap({**example, "use_cache": False}))
    with torch.no_grad():
        for batch in (example, _batch(3, 11)):
            got = gm(**batch)
            want = model(**batch, use_cache=False)
            torch.testing.assert_close(got.logits, want.logits)
            torch.testing.assert_close(got.loss, want.loss)


def test_examples_that_do_not_fit_the_forward_are_refused_clearly():
    model, example = _llama(), _batch()
    with pytest.raises(lfx.CaptureError, match="multiple values for argument 'input_ids'.*example_kwargs alone"):
        lfx.rewrite(model, SPEC, example_inputs=(example["input_ids"],), example_kwargs=example)
    with pytest.raises(lfx.CaptureError, match="example_kwargs must map argument names"):
        lfx.rewrite(model, SPEC, example_kwargs=[("input_ids", example["input_ids"])])


class Flags(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(8, 8)
        self.lin1 = nn.Linear(8, 4)

    def forward(self, x, scale=None, flag=True, *, mode="a"):
        h = self.lin0(x)
        h = h.relu() if flag else h.tanh()
        if scale is not None:
            h = h * scale
        return self.lin1(h) * (2.0 if mode == "b" else 1.0)


def _flags_graph():
    model = Flags().eval()
    gm = lfx.rewrite(model, lfx.Spec(["lin0"], method=lfx.LoRA(rank=2, init="nonzero")),
                     example_inputs=(torch.randn(3, 5, 8), None, False), example_kwargs={"mode": "b"})
    return model, gm


def test_non_tensor_examples_become_defaults_and_other_values_are_refused():
    model, gm = _flags_graph()
    assert str(inspect.signature(gm.forward)) == "(x, scale=None, flag=False, *, mode='b')"
    x = torch.randn(4, 7, 8)
    with torch.no_grad():
        want = gm(x, None, False, mode="b")
        torch.testing.assert_close(gm(x), want)
        torch.testing.assert_close(gm(x, flag=False), want)
        folded = lfx.load_merged(copy.deepcopy(model), gm)  # the model itself, adapter folded in
        torch.testing.assert_close(folded(x, None, False, mode="b"), want)
        assert not torch.allclose(model(x, None, False, mode="b"), want)  # the adapter does something
    for call, captured in [({"flag": True}, "flag=False"), ({"mode": "a"}, "mode='b'"),
                           ({"scale": torch.ones(4)}, "scale=None")]:
        with pytest.raises(lfx.CaptureError, match="captured with " + captured.replace("(", r"\(")) as info:
            gm(x, **call)
        assert "capture again" in str(info.value)


def test_a_non_tensor_before_a_tensor_stays_required_and_checked():
    class Mid(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x, flag, y):
            return self.lin(x) + (y if flag else -y)

    model = Mid()
    x, y = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    gm = lfx.rewrite(model, lfx.Spec(["lin"]), example_inputs=(x, True, y))
    assert str(inspect.signature(gm.forward)) == "(x, flag, y)"
    with torch.no_grad():
        torch.testing.assert_close(gm(x, True, y), model(x, True, y))
    with pytest.raises(lfx.CaptureError, match="captured with flag=True"):
        gm(x, False, y)


def test_a_value_without_a_literal_form_is_still_the_default():
    class Clip(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x, clip=1.0):
            return self.lin(x).clamp(max=clip)

    model = Clip()
    x = torch.randn(2, 3, 8)
    gm = lfx.rewrite(model, lfx.Spec(["lin"]), example_inputs=(x,), example_kwargs={"clip": float("inf")})
    assert inspect.signature(gm.forward).parameters["clip"].default == float("inf")
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x, clip=float("inf")))
        assert not torch.allclose(gm(x), model(x))
    with pytest.raises(lfx.CaptureError, match="captured with clip=inf"):
        gm(x, clip=1.0)


def test_signature_survives_a_second_adapter_deepcopy_merge_and_compile():
    _, gm = _flags_graph()
    lfx.rewrite(gm, lfx.Spec(["lin1"], method=lfx.LoRA(rank=2, init="nonzero")), adapter="second")
    signature = "(x, scale=None, flag=False, *, mode='b')"
    x = torch.randn(3, 6, 8)
    with torch.no_grad():
        want = gm(x)
        for other in (copy.deepcopy(gm), lfx.merge(gm)):
            assert str(inspect.signature(other.forward)) == signature
            torch.testing.assert_close(other(x), want)
        compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), want)
        x2 = torch.randn(5, 2, 8)
        torch.testing.assert_close(compiled(x2), gm(x2))


def test_hf_trainer_trains_a_rewritten_llama(tmp_path):
    model = _llama()
    example = _batch()
    spec = lfx.Spec(targets=["*.q_proj", "*.v_proj"], method=lfx.LoRA(rank=4, alpha=8.0))  # starts at the base
    gm = lfx.rewrite(model, spec, example_kwargs={**example, "use_cache": False})
    params = inspect.signature(gm.forward).parameters
    assert list(params) == ["input_ids", "attention_mask", "labels", "use_cache"]
    assert params["use_cache"].default is False
    adapters = {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}
    base = {n: p.detach().clone() for n, p in gm.named_parameters() if not p.requires_grad}
    assert adapters and base
    data = []
    for i in range(4):  # "idx" is no forward argument: Trainer drops it by the signature
        rows = _batch()
        data += [{**{k: v[r] for k, v in rows.items()}, "idx": 2 * i + r} for r in range(2)]
    with torch.no_grad():
        rows = {k: torch.stack([row[k] for row in data]) for k in example}
        before = gm(**rows).loss
        torch.testing.assert_close(before, model(**rows, use_cache=False).loss)
    args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4,
                               learning_rate=3e-2, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                               logging_steps=1, seed=0)
    trainer = T.Trainer(model=gm, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 8
    moved = {n for n, p in gm.named_parameters() if n in adapters and not torch.equal(p.detach(), adapters[n])}
    assert moved == set(adapters)
    for name, p in gm.named_parameters():
        if name in base:
            assert torch.equal(p.detach(), base[name]), name
    gm.eval()
    with torch.no_grad():
        after = gm(**rows).loss
        assert after < before - 0.05
        torch.testing.assert_close(model(**rows, use_cache=False).loss, before)  # base model untouched


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.head = nn.Linear(32, 3)

    def forward(self, input_ids):
        return self.head(self.inner(input_ids).last_hidden_state)


def test_rewrite_keeps_every_submodules_train_flag():
    bert = models.build("bert").model  # eval, with dropout 0.1
    wrapper = Wrapper(bert).train()
    bert.eval()  # a model in train mode around an HF model in eval mode
    assert wrapper.training and not bert.training
    flags = {name: m.training for name, m in wrapper.named_modules()}
    ids = torch.randint(0, models.VOCAB, (2, 8))
    with torch.no_grad():
        before = bert(ids).last_hidden_state
    gm = lfx.rewrite(wrapper, lfx.Spec(["*.query"]), example_inputs=(ids,))
    assert {name: m.training for name, m in wrapper.named_modules()} == flags
    assert gm.training
    with torch.no_grad():  # still eval: no dropout, the same output as before
        torch.testing.assert_close(bert(ids).last_hidden_state, before)
        gm.eval()
        wrapper.eval()
        torch.testing.assert_close(gm(ids), wrapper(ids))


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(8, 8)
        self.lin1 = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.lin1(self.lin0(x)))


def _two(spec):
    return lfx.rewrite(Two(), spec, example_inputs=(torch.randn(2, 3, 8),))


def test_no_match_error_names_the_pattern_that_matched_nothing():
    with pytest.raises(lfx.SpecError) as info:
        _two(lfx.Spec(targets=["lin0", "lin9"]))
    assert not isinstance(info.value, lfx.TargetError)
    message = str(info.value)
    assert "'lin9' matched no linear-like target" in message
    assert "lin0.bias" not in message and "'lin0'" not in message
    assert message.split("Nearest target names:")[1].split("(")[0].strip().split(", ")[:2] in (
        ["lin0", "lin1"], ["lin1", "lin0"])


def test_the_bias_of_a_target_is_not_reported_as_not_linear_like():
    with pytest.raises(lfx.SpecError) as info:
        _two(lfx.Spec(targets=["lin0", "lin0.bias"]))
    assert not isinstance(info.value, lfx.TargetError)
    assert "'lin0.bias' matched no linear-like target" in str(info.value)


def test_not_linear_like_names_the_failing_pattern_and_its_weight():
    with pytest.raises(lfx.TargetError) as info:
        _two(lfx.Spec(targets=["lin0", "norm"]))
    message = str(info.value)
    assert message.startswith("pattern 'norm' matches norm.weight") and "layer_norm" in message
    assert "drop 'norm' from Spec.targets" in message


def test_targets_that_all_match_still_work():
    model = Two()
    x = torch.randn(2, 3, 8)
    gm = lfx.rewrite(model, lfx.Spec(targets=["lin0", "lin1"]), example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
