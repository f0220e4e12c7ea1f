"""Activation checkpointing per layer block (passes/checkpoint_layers.py): the same gradients,
far fewer saved activations, eager and compiled; lfx.Trainer's checkpoint_activations and
memory_budget."""

import copy
import warnings

import pytest
import torch
import transformers as T

import lowrank_fx as lfx
from lowrank_fx.passes.layers import blocks

LAYERS, BATCH, SEQ, HIDDEN = 3, 2, 16, 32


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = T.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (BATCH, SEQ))
    spec = lfx.Spec(targets="all-linear", method=lfx.LoRA(rank=4, init="nonzero"))
    gm = lfx.rewrite(model, spec, example_inputs=(ids,), example_kwargs={"use_cache": False}, layers="auto")
    recomputed = lfx.rewrite(model, spec, example_inputs=(ids,), example_kwargs={"use_cache": False}, layers="auto")
    recomputed.load_state_dict(gm.state_dict())
    assert lfx.checkpoint_layers(recomputed) == [f"model.layers.{i}" for i in range(LAYERS)]
    return model, ids, gm, recomputed


def _step(model, gm, ids):
    """(gradients of the adapters, bytes of the activations autograd saved: unique storages, no parameters)."""
    for param in gm.parameters():
        param.grad = None
    tensors = {id(t) for t in [*gm.parameters(), *gm.buffers()]}
    storages = {}

    def pack(tensor):
        if id(tensor) not in tensors:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(ids).logits.float().square().mean()
    loss.backward()
    return [p.grad.clone() for p in gm.lowrank_fx.parameters()], sum(storages.values())


def _close(got, want, tol=1e-6):
    return all((g - w).abs().max() <= tol * max(w.abs().max(), 1.0) for g, w in zip(got, want, strict=True))


def test_eager_gradients_match_and_saved_activations_fall(setup):
    _, ids, gm, recomputed = setup
    want, saved = _step(gm, gm, ids)
    got, saved_recomputed = _step(recomputed, recomputed, ids)
    assert _close(got, want)
    block_inputs = LAYERS * BATCH * SEQ * HIDDEN * 4  # the hidden state each block is given (fp32)
    assert saved_recomputed <= saved / LAYERS + block_inputs  # about one block's worth plus block inputs
    assert saved_recomputed <= 0.35 * saved


def test_graph_calls_blocks_through_checkpoint_and_other_passes_see_them(setup):
    _model, ids, gm, recomputed = setup
    assert "torch.utils.checkpoint.checkpoint" in recomputed.code and "use_reentrant = False" in recomputed.code
    assert blocks(recomputed) == blocks(gm)
    assert lfx.checkpoint_layers(recomputed) == []  # already checkpointed: nothing to do
    with torch.no_grad():
        assert torch.equal(lfx.merge(recomputed)(ids).logits, lfx.merge(gm)(ids).logits)
    again = copy.deepcopy(recomputed)
    lfx.rewrite(again, lfx.Spec(targets=["*.q_proj"], method=lfx.LoRA(rank=2)), adapter="second")
    assert "torch.utils.checkpoint.checkpoint" in again.code and blocks(again) == blocks(gm)  # both kept


def test_compiled_gradients_match_and_saved_activations_fall(setup):
    _, ids, gm, recomputed = setup
    want, saved = _step(gm, gm, ids)
    compiled = torch.compile(recomputed, backend="aot_eager", fullgraph=True, dynamic=True)
    got, saved_compiled = _step(compiled, recomputed, ids)
    assert _close(got, want)
    assert saved_compiled <= 0.35 * saved


def _train(gm, ids, **options):
    for param in gm.parameters():
        param.grad = None  # what earlier tests left
    # SGD: a compiled step's rounding stays rounding (Adam's first steps would amplify it)
    trainer = lfx.Trainer(gm, lambda model, batch: model(batch).logits.square().mean(), lr=1e-2,
                          optimizer_cls=torch.optim.SGD, progress=False, **options)
    trainer.fit([ids, ids.flip(0)], steps=2)
    return [p.detach().clone() for p in gm.lowrank_fx.parameters()]


def test_trainer_checkpoint_activations_and_memory_budget(setup):
    _, ids, gm, _ = setup
    state = copy.deepcopy(gm.state_dict())
    want = _train(gm, ids, compile=False)
    for options in ({"compile": False, "checkpoint_activations": True},
                    {"compile": "aot_eager", "checkpoint_activations": True, "memory_budget": 0.5}):
        gm.load_state_dict(state)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = _train(gm, ids, **options)
        assert not [w for w in caught if "torch.compile failed" in str(w.message)]  # it did compile
        assert "torch.utils.checkpoint.checkpoint" in gm.code
        assert _close(got, want, 1e-5)


def test_errors_say_how_to_fix(setup):
    model, ids, _, _ = setup
    flat = lfx.rewrite(model, lfx.Spec(targets=["*.q_proj"], method=lfx.LoRA(rank=2)), example_inputs=(ids,),
                       example_kwargs={"use_cache": False})
    with pytest.raises(lfx.SpecError, match="layers='auto'"):
        lfx.checkpoint_layers(flat)
    with pytest.raises(lfx.SpecError, match="layers='auto'"):
        lfx.Trainer(flat, lambda m, b: m(b).logits.mean(), checkpoint_activations=True, compile=False)
    for budget, message in ((1.5, "between 0 and 1"), ("half", "between 0 and 1")):
        with pytest.raises(lfx.SpecError, match=message):
            lfx.Trainer(flat, lambda m, b: m(b).logits.mean(), memory_budget=budget)
    with pytest.raises(lfx.SpecError, match="compiled training"):
        lfx.Trainer(flat, lambda m, b: m(b).logits.mean(), memory_budget=0.5, compile=False)
