"""Block-level capture: one traced child per kind of a repeated module list, the others copied.

The oracle is the whole-model capture (`trace_blocks=False`) of the same model: the same
nodes in the same order, and bit-identical (torch.equal) outputs and adapter gradients for
every method, on four-layer Llama, Qwen2, GPT-2, BERT and T5 built from configs.
"""

from __future__ import annotations

import copy
import logging
import zlib

import pytest
import torch
import transformers as T
from torch._subclasses.fake_tensor import FakeTensor

import lowrank_fx as lfx
from lowrank_fx.adapt import capture_memo
from lowrank_fx.adapt.capture import capture
from lowrank_fx.graph.block_lists import repeated_lists

VOCAB = 128
LAYERS = 4
METHODS = {
    "lora": lambda: lfx.LoRA(rank=4),
    "dora": lambda: lfx.LoRA(rank=4, dora=True),
    "lorta": lambda: lfx.LoRTA(rank=4, init="nonzero"),
    "randlora": lambda: lfx.RandLoRA(rank=8),
}


def _ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq))


def _model(family: str, **extra):
    torch.manual_seed(0)
    if family == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                           num_hidden_layers=LAYERS, num_attention_heads=4,
                                                           num_key_value_heads=2), **extra}))
        kwargs = {"input_ids": _ids(2, 8), "use_cache": False}
    elif family == "qwen2":
        model = T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=LAYERS, num_attention_heads=4,
                                                 num_key_value_heads=2, **extra))
        kwargs = {"input_ids": _ids(2, 8), "use_cache": False}
    elif family == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64,
                                               bos_token_id=0, eos_token_id=0))
        kwargs = {"input_ids": _ids(2, 8), "use_cache": False}
    elif family == "bert":
        model = T.BertModel(T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS,
                                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=64))
        kwargs = {"input_ids": _ids(2, 8)}
    else:
        model = T.T5ForConditionalGeneration(T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                                                        num_layers=LAYERS, num_heads=4, decoder_start_token_id=0))
        kwargs = {"input_ids": _ids(2, 8), "decoder_input_ids": _ids(2, 6), "use_cache": False}
    return model.eval(), kwargs


def _main(result) -> torch.Tensor:
    return result["logits"] if "logits" in result else result["last_hidden_state"]


def _ops(gm) -> list[tuple[str, str]]:
    return [(node.op, str(node.target)) for node in gm.graph.nodes]


def _fill(gm) -> None:
    """Every adapter tensor set to values drawn from its name alone (both graphs get the same)."""
    with torch.no_grad():
        for name, param in gm.lowrank_fx.named_parameters():
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.1)


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2", "bert", "t5"])
def family(request):
    """(name, model, kwargs, a twin of the model): each keeps its own capture memoised."""
    model, kwargs = _model(request.param)
    return request.param, model, kwargs, copy.deepcopy(model)


def test_every_family_is_traced_by_blocks_and_matches_the_whole_capture_node_for_node(family):
    name, model, kwargs, _ = family
    lists = repeated_lists(model)
    assert lists and all(entry.keep < LAYERS for entry in lists), name
    blocks = capture(model, example_kwargs=kwargs)
    whole = capture(model, example_kwargs=kwargs, trace_blocks=False)
    assert _ops(blocks) == _ops(whole)
    assert list(blocks.state_dict()) == list(whole.state_dict())
    theirs = whole.state_dict(keep_vars=True)
    for key, tensor in blocks.state_dict(keep_vars=True).items():
        assert tensor is theirs[key]  # the model's own tensors, no copy
    assert torch.equal(_main(blocks(**kwargs)), _main(whole(**kwargs)))


@pytest.mark.parametrize("method", list(METHODS))
def test_outputs_and_adapter_gradients_are_bit_identical(family, method):
    _name, model, kwargs, twin = family
    spec = lfx.Spec("all-linear", method=METHODS[method]())
    graphs = [lfx.rewrite(model, spec, example_kwargs=kwargs), lfx.rewrite(twin, spec, example_kwargs=kwargs, trace_blocks=False)]
    outputs = []
    for gm in graphs:
        _fill(gm)
        gm.train()
        torch.manual_seed(1)  # the same dropout masks: both graphs draw in the same node order
        out = _main(gm(**kwargs))
        out.square().mean().backward()
        outputs.append(out.detach())
    assert torch.equal(outputs[0], outputs[1])
    grads = [dict((n, p.grad) for n, p in gm.lowrank_fx.named_parameters()) for gm in graphs]
    assert list(grads[0]) == list(grads[1]) and grads[0]
    for key in grads[0]:
        assert grads[0][key] is not None and torch.equal(grads[0][key], grads[1][key]), key


def test_a_second_block_of_the_same_kind_is_not_traced_again(monkeypatch):
    model, kwargs = _model("llama")
    layer_class = type(model.model.layers[0])
    calls = []
    forward = layer_class.forward

    def counted(self, *args, **kw):
        calls.append(self)
        return forward(self, *args, **kw)

    monkeypatch.setattr(layer_class, "forward", counted)
    capture_memo.forget()
    capture(model, example_kwargs=kwargs, cache_dir=False)
    assert len(calls) == 2 and calls[0] is model.model.layers[0] and calls[1] is model.model.layers[1]
    calls.clear()
    capture(model, example_kwargs=kwargs, cache_dir=False, trace_blocks=False)
    assert len(calls) == LAYERS


def test_layers_of_another_kind_are_traced_once_each_sliding_window_qwen2():
    model, _ = _model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=2)
    kwargs = {"input_ids": _ids(2, 12), "use_cache": False}  # longer than the window: the masks differ
    (entry,) = repeated_lists(model)
    assert entry.kinds == [0, 0, 1, 1] and entry.keep == 3
    blocks = capture(model, example_kwargs=kwargs)
    whole = capture(model, example_kwargs=kwargs, trace_blocks=False)
    assert _ops(blocks) == _ops(whole)
    expected = _main(model(**kwargs))
    assert torch.equal(_main(blocks(**kwargs)), _main(whole(**kwargs)))
    torch.testing.assert_close(_main(blocks(**kwargs)), expected, rtol=1e-5, atol=1e-6)


class _EveryState(torch.nn.Module):
    """Four tanh(linear) blocks; returns every block's output, so no block is read by the next alone."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
                                          for _ in range(LAYERS))

    def forward(self, x):
        states = []
        for block in self.blocks:
            x = block(x)
            states.append(x)
        return torch.stack(states)


def test_a_model_returning_every_block_output_is_traced_whole_and_says_why(caplog):
    torch.manual_seed(0)
    model, x = _EveryState(), torch.randn(3, 8)
    with caplog.at_level(logging.INFO, logger="lowrank_fx"):
        gm = capture(model, example_inputs=(x,))
    assert "tracing every block of _EveryState: an output of blocks.0" in caplog.text
    assert sum(node.target == torch.ops.aten.tanh.default for node in gm.graph.nodes) == LAYERS
    torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-7)


def test_a_disk_cache_hit_gives_the_graph_of_the_traced_prefix_copied(tmp_path):
    model, kwargs = _model("llama")
    capture_memo.forget()
    first = capture(model, example_kwargs=kwargs, cache_dir=tmp_path)
    capture_memo.forget()
    again = capture(model, example_kwargs=kwargs, cache_dir=tmp_path)
    assert _ops(first) == _ops(again)
    assert torch.equal(_main(first(**kwargs)), _main(again(**kwargs)))


def test_the_kv_cache_decode_graph_is_traced_by_blocks_and_generates_like_transformers(monkeypatch):
    """The decode graph reads each layer's own cache slot and returns its own new keys and values:
    copied layers must read and write theirs, not the template's (greedy tokens and logits
    against transformers' generate on the folded model)."""
    model, _ = _model("llama", num_hidden_layers=5, eos_token_id=3, pad_token_id=0, bos_token_id=1)
    kwargs = {"input_ids": _ids(2, 6), "use_cache": False}
    gm = lfx.rewrite(model, lfx.Spec(["*.q_proj", "*.v_proj", "*.down_proj"], lfx.LoRA(rank=2, init="nonzero")),
                     example_kwargs=kwargs)
    merged = lfx.load_merged(copy.deepcopy(model), gm)
    layer_class = type(model.model.layers[0])
    calls = []
    forward = layer_class.forward

    def counted(self, hidden_states, *args, **kw):
        if isinstance(hidden_states, FakeTensor):  # traced by torch.export, not run eagerly
            calls.append(self)
        return forward(self, hidden_states, *args, **kw)

    monkeypatch.setattr(layer_class, "forward", counted)
    ids = torch.randint(4, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    got = lfx.generate(gm, ids, max_new_tokens=8, eos_token_id=[], output_logits=True)
    assert calls == [model.model.layers[0], model.model.layers[1]]  # the decode capture traced two layers
    with torch.no_grad():
        want = merged.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                               output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(got.sequences, want.sequences)
    for ours, theirs in zip(got.logits, want.logits):
        assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-5


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_a_quantized_base_is_traced_by_blocks_and_matches_the_whole_capture(scheme):
    (model, kwargs), (twin, _) = _model("llama"), _model("llama")
    for each in (model, twin):
        lfx.quantize_base(each, scheme)
    spec = lfx.Spec("all-linear", method=lfx.LoRA(rank=4))
    graphs = [lfx.rewrite(model, spec, example_kwargs=kwargs), lfx.rewrite(twin, spec, example_kwargs=kwargs,
                                                                          trace_blocks=False)]
    # a quantized weight's inner tensors are read just before each copied layer, not at the top
    assert sorted(_ops(graphs[0])) == sorted(_ops(graphs[1]))
    outputs = []
    for gm in graphs:
        _fill(gm)
        out = _main(gm(**kwargs))
        out.square().mean().backward()
        outputs.append(out.detach())
    assert torch.equal(outputs[0], outputs[1])
    for (name, ours), (_, theirs) in zip(graphs[0].lowrank_fx.named_parameters(), graphs[1].lowrank_fx.named_parameters()):
        assert torch.equal(ours.grad, theirs.grad), name
