"""Nothing silent at capture and call: what torch.export could not do, or what a captured graph
cannot take, is a LowRankFxError that says so and how to capture instead (the original error
chained); a batch of 1 is captured as a graph for every batch size."""

from __future__ import annotations

import inspect
import warnings

import models
import pytest
import torch
import transformers as T
from torch import nn

import lowrank_fx as lfx

SPEC = lfx.Spec(targets=["*.q_proj"], method=lfx.LoRA(rank=4, init="nonzero"))


@pytest.fixture(scope="module")
def llama():
    return models.build("llama").model


@pytest.fixture(scope="module")
def llama_gm(llama):
    """Captured from input_ids alone (no attention_mask)."""
    return lfx.rewrite(llama, SPEC, example_inputs=(torch.randint(0, models.VOCAB, (2, 8)),),
                       example_kwargs={"use_cache": False}).eval()


def _ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, models.VOCAB, (batch, seq))


# capture


def test_one_dimensional_input_ids_asks_for_a_batch(llama):
    with pytest.raises(lfx.CaptureError, match=r"input_ids is 1-D \(shape \(3,\)\).*2-D \(batch, seq\)") as info:
        lfx.rewrite(llama, SPEC, example_inputs=(torch.tensor([1, 2, 3]),), example_kwargs={"use_cache": False})
    assert info.value.__cause__ is not None


class KeywordsOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(4, 4)

    def forward(self, **inputs):
        return self.q_proj(inputs["x"])


def test_forward_taking_only_kwargs_is_captured_with_dynamic_sizes():
    """x reaches forward through **inputs: captured with every size dynamic (a temporary forward
    names x while exporting), and the graph takes x by name at other batch sizes."""
    model = KeywordsOnly()
    spec = lfx.Spec(targets=["q_proj"], method=lfx.LoRA(rank=2, init="nonzero"))
    gm = lfx.rewrite(model, spec, example_kwargs={"x": torch.randn(3, 4)})
    assert list(inspect.signature(gm.forward).parameters) == ["x"]
    assert "forward" not in vars(model)  # the model's own forward again
    factors = {name.rsplit(".", 1)[1]: p for name, p in gm.named_parameters() if "lora_" in name}
    A, B = factors["lora_A"], factors["lora_B"]  # (2, 4), (4, 2); scale alpha / r = 16 / 2
    for batch in (2, 5):
        x = torch.randn(batch, 4)
        torch.testing.assert_close(gm(x=x), model(x=x) + 8.0 * x @ A.T @ B.T, rtol=1e-5, atol=1e-6)


def test_a_forward_set_on_the_instance_is_kept_after_capture():
    """A forward a hook library set on the instance is captured through, then put back."""
    model = KeywordsOnly()

    def own(**inputs):
        return KeywordsOnly.forward(model, **inputs) * 2

    model.forward = own
    gm = lfx.rewrite(model, lfx.Spec(targets=["q_proj"]), example_kwargs={"x": torch.randn(3, 4)})
    assert model.forward is own
    x = torch.randn(5, 4)
    torch.testing.assert_close(gm(x=x), model.q_proj(x) * 2, rtol=1e-5, atol=1e-6)  # LoRA's B starts at zero


class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.q_proj(x)
        return x


def test_data_dependent_branch_is_located_and_explained():
    with pytest.raises(lfx.CaptureError, match=r"test_capture_errors\.py:\d+ in forward: `if x\.sum\(\) > 0:`.*"
                                               r"torch\.cond.*depend on shapes only") as info:
        lfx.rewrite(ValueBranch(), SPEC, example_inputs=(torch.randn(2, 4),))
    assert "DataDependent" in type(info.value.__cause__).__name__


# calling the graph


def test_keyword_not_captured_says_to_capture_with_it(llama_gm):
    ids, mask = _ids(2, 8), torch.ones(2, 8, dtype=torch.long)
    with pytest.raises(lfx.CaptureError, match=r"captured without 'attention_mask'.*"
                                               r"example_kwargs=\{\.\.\., 'attention_mask': \.\.\.\}"):
        llama_gm(ids, attention_mask=mask)
    with pytest.raises(lfx.CaptureError, match=r"'attn_mask' is not a parameter of LlamaForCausalLM\.forward "
                                               r"\(did you mean 'attention_mask'\?\)"):
        llama_gm(ids, attn_mask=mask)
    with pytest.raises(lfx.CaptureError, match=r"takes 1 positional argument and got 2: it takes input_ids and "
                                               r"by name use_cache"):
        llama_gm(ids, mask)
    assert str(inspect.signature(llama_gm.forward)) == "(input_ids, *, use_cache=False)"  # catch-alls hidden


def test_batch_of_one_is_captured_for_every_batch(llama, llama_gm):
    """Examples of batch 1, no warning: the graph serves batch 1 and 3 as one captured at batch 2
    (same adapter weights) and, with a zero adapter, as the model itself."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*size 1 in its batch")
        gm = lfx.rewrite(llama, SPEC, example_inputs=(_ids(1, 8),), example_kwargs={"use_cache": False}).eval()
    gm.load_state_dict(llama_gm.state_dict())
    with torch.no_grad():
        for ids in (_ids(1, 8), _ids(3, 5)):
            torch.testing.assert_close(gm(ids).logits, llama_gm(ids).logits, rtol=1e-5, atol=1e-5)
            lfx.set_active_adapters(gm, [])
            torch.testing.assert_close(gm(ids).logits, llama(ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)
            lfx.set_active_adapters(gm, ["default"])


class BatchOneOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[0] != 1:
            raise ValueError("one sequence at a time")
        return self.q_proj(x)


class PairBroadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.q_proj(x + torch.arange(2.0).view(2, 1, 1))  # batch 1 or 2 only


@pytest.mark.parametrize("cls", [BatchOneOnly, PairBroadcast])
def test_model_that_needs_batch_one_keeps_it_and_says_so(cls):
    """The batch-2 trace fails (BatchOneOnly) or gives a graph whose guards refuse batch 1
    (PairBroadcast: fixed at batch 2): the graph is the batch-1 one, right at batch 1, and
    batch 3 is refused clearly."""
    model, x = cls(), torch.randn(1, 5, 4)
    with pytest.warns(UserWarning, match="size 1 in its batch"):
        gm = lfx.rewrite(model, lfx.Spec(targets=["q_proj"]), example_inputs=(x,))
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(lfx.CaptureError, match=r"captured with x of size 1 in dimension 0.*size 2 or more") as info:
        gm(torch.randn(3, 5, 4))
    assert isinstance(info.value.__cause__, AssertionError)


def test_sequence_of_one_is_refused_clearly_at_call(llama):
    with pytest.warns(UserWarning, match="size 1 in its batch or sequence"):
        gm = lfx.rewrite(llama, SPEC, example_inputs=(_ids(2, 1),), example_kwargs={"use_cache": False})
    with pytest.raises(lfx.CaptureError, match=r"input_ids of size 1 in dimension 1, which torch.export specialises"):
        gm(_ids(2, 4))


def test_float_after_bfloat16_capture_says_to_capture_in_that_dtype(llama):
    model = models.build("llama").model.to(torch.bfloat16)
    gm = lfx.rewrite(model, SPEC, example_inputs=(_ids(2, 8),), example_kwargs={"use_cache": False})
    gm.float()
    with pytest.raises(lfx.CaptureError, match=r"captured with the model in bfloat16 and now holds float32.*"
                                               r"model\.to\(torch\.float32\) before lfx\.rewrite") as info:
        gm(_ids(2, 8))
    assert isinstance(info.value.__cause__, RuntimeError)


# generation


def _bert_config():
    return T.BertConfig(vocab_size=models.VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)


@pytest.mark.parametrize("build, target", [
    (lambda: T.BertModel(_bert_config()), "*.query"),
    (lambda: T.BertForSequenceClassification(_bert_config()), "*.query"),
    (lambda: T.T5EncoderModel(T.T5Config(vocab_size=models.VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                         num_heads=4)), "*.q"),
], ids=["bert", "classifier", "t5-encoder"])
def test_generation_on_an_encoder_says_it_is_one(build, target, tmp_path):
    model = build().eval()
    gm = lfx.rewrite(model, lfx.Spec(targets=[target]), example_inputs=(_ids(2, 8),))
    says = r"is not a causal LM but an encoder.*support decoder-only causal LMs"
    with pytest.raises(lfx.ModelTypeError, match=says):
        lfx.generate(gm, _ids(1, 4), max_new_tokens=2)
    with pytest.raises(lfx.ModelTypeError, match=says):
        lfx.export_generation(model, {"a": gm}, tmp_path / "gen")
    assert not (tmp_path / "gen").exists()
