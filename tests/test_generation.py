"""Generation with unmerged adapters: the KV-cache decode graph, lfx.generate, the ONNX decoder.

Oracle everywhere: transformers' own `generate()` (greedy, with `output_logits=True`) on a
copy of the model with the adapter folded in (`lfx.load_merged`). Tiny random models
(hidden 32, 2 layers, vocabulary 128) of four families: Llama, Qwen2, Phi-3 (fused qkv and
gate_up projections) and GPT-2 (Conv1D). Each family's training graph holds two LoRA
adapters of different rank, `a` (rank 2) and `b` (rank 4); captures and exports are
module-scoped and shared by the tests.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import lowrank_fx as lfx
from lowrank_fx.errors import ModelTypeError, SpecError
from lowrank_fx.generation.torch_generate import decoder_for

VOCAB, EOS, PAD = 128, 3, 0
TARGETS = {
    "llama": ["*.q_proj", "*.v_proj", "*.down_proj"],
    "qwen2": ["*.q_proj", "*.k_proj", "*.o_proj"],
    "phi3": ["*.qkv_proj", "*.gate_up_proj"],
    "gpt2": ["*.c_attn", "*.c_fc"],
}
FAMILIES = list(TARGETS)
ADAPTERS = [None, "a", "b"]


def tiny(family: str, **extra) -> torch.nn.Module:
    ids = {"vocab_size": VOCAB, "eos_token_id": EOS, "pad_token_id": PAD, "bos_token_id": 1}
    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, **ids, **extra}
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif family == "phi3":
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**common))
    elif family == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, **ids, **extra))
    return model.eval()


class Family:
    """A model, its training graph with adapters a and b, and one merged copy per adapter."""

    def __init__(self, family: str):
        torch.manual_seed(0)
        self.name = family
        self.model = tiny(family)
        example = {"input_ids": torch.randint(4, VOCAB, (2, 6)), "use_cache": False}
        gm = lfx.rewrite(self.model, lfx.Spec(targets=TARGETS[family], method=lfx.LoRA(rank=2, init="nonzero")),
                         example_kwargs=example, adapter="a")
        self.gm = lfx.rewrite(gm, lfx.Spec(targets=TARGETS[family], method=lfx.LoRA(rank=4, alpha=2.0, init="nonzero")),
                              adapter="b")
        self.merged = {None: self.model}
        for name in ("a", "b"):
            lfx.set_active_adapters(self.gm, [name])
            self.merged[name] = lfx.load_merged(copy.deepcopy(self.model), self.gm)
        lfx.set_active_adapters(self.gm, ["a", "b"])


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return Family(request.param)


@pytest.fixture(scope="module")
def llama():
    return Family("llama")


def prompts(seed: int, lengths=(5, 3)) -> list[torch.Tensor]:
    draw = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (1, n), generator=draw) for n in lengths]


def hf_generate(model, ids, mask=None, **kwargs):
    kwargs.setdefault("pad_token_id", PAD)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids), do_sample=False,
                              output_logits=True, return_dict_in_generate=True, **kwargs)


def rel(got, want) -> float:
    return max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want))


def active(adapter):
    return [] if adapter is None else [adapter]


# -- the decode graph ------------------------------------------------------------------------


def test_decode_graph_holds_the_training_graphs_adapter_modules(llama):
    decode = decoder_for(llama.gm)
    for name in ("a", "b"):
        assert decode.lowrank_fx[name] is llama.gm.lowrank_fx[name]
    assert decode.lowrank_fx_gates is llama.gm.lowrank_fx_gates
    for name, param in decode.named_parameters():
        if not name.startswith("lowrank_fx."):
            assert param is llama.gm.get_parameter(name)  # the base weights are the graph's too


def test_training_the_graph_changes_generation(llama):
    ids = prompts(1)[0]
    before = lfx.generate(llama.gm, ids, adapter="a", max_new_tokens=4, eos_token_id=[], output_logits=True)
    group = next(iter(llama.gm.lowrank_fx["a"].values()))
    param = next(iter(group.units.values())).lora_B
    saved = param.detach().clone()
    with torch.no_grad():
        param.mul_(3.0)  # what an optimizer step on the training graph does
    try:
        after = lfx.generate(llama.gm, ids, adapter="a", max_new_tokens=4, eos_token_id=[], output_logits=True)
        lfx.set_active_adapters(llama.gm, ["a"])
        with torch.no_grad():
            want = llama.gm(input_ids=ids).logits[:, -1]
        assert rel([after.logits[0]], [want]) < 1e-5
        assert rel([after.logits[0]], [before.logits[0]]) > 1e-4
    finally:
        lfx.set_active_adapters(llama.gm, ["a", "b"])
        with torch.no_grad():
            param.copy_(saved)


def test_decode_graph_steps_match_the_eager_model(llama):
    """A prompt (past 0), then one token and then two tokens at a time, batch 1 and 3, with padding."""
    decode = decoder_for(llama.gm)
    lfx.set_active_adapters(llama.gm, [])
    try:
        for batch in (1, 3):
            ids = torch.randint(4, VOCAB, (batch, 7))
            mask = torch.ones_like(ids)
            mask[0, :2] = 0
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                want = llama.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
                past = [{"key": torch.zeros(batch, 2, 0, 8), "value": torch.zeros(batch, 2, 0, 8)}] * 2
                got = []
                for start, stop in ((0, 4), (4, 5), (5, 7)):
                    out = decode(input_ids=ids[:, start:stop], attention_mask=mask[:, :stop],
                                 position_ids=positions[:, start:stop], past_key_values=past)
                    past = out["present"]
                    got.append(out["logits"])
                    assert out["present"][1]["value"].shape == (batch, 2, stop, 8)
            assert rel([torch.cat(got, 1)[mask == 1]], [want[mask == 1]]) < 1e-5
    finally:
        lfx.set_active_adapters(llama.gm, ["a", "b"])


def test_targets_that_differ_are_named(llama):
    other = tiny("llama", num_hidden_layers=3)
    with pytest.raises(SpecError, match=r"only in the decode graph: model\.layers\.2\.") as err:
        lfx.generate(llama.gm, prompts(0)[0], model=other, max_new_tokens=2)
    assert "Rewrite the training graph from this same model" in str(err.value)


@pytest.mark.parametrize("setting, build", [
    ("sliding_window=4096", lambda: tiny("mistral")),
    ("sliding_window=16", lambda: tiny("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0)),
    ("longrope", lambda: tiny("phi3", max_position_embeddings=256, original_max_position_embeddings=64,
                              rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
                                               "long_factor": [2.0] * 4, "original_max_position_embeddings": 64})),
])
def test_models_whose_cache_is_not_full_kv_are_refused(setting, build):
    model = build()
    gm = lfx.rewrite(model, lfx.Spec(targets="all-linear", method=lfx.LoRA(rank=2)),
                     example_kwargs={"input_ids": torch.randint(4, VOCAB, (2, 5)), "use_cache": False})
    with pytest.raises(ModelTypeError, match=setting):
        lfx.generate(gm, prompts(0)[0], max_new_tokens=2)


def test_recurrent_models_are_refused(llama):
    mamba = transformers.MambaForCausalLM(transformers.MambaConfig(hidden_size=32, num_hidden_layers=2,
                                                                   vocab_size=VOCAB, state_size=4))
    with pytest.raises(ModelTypeError, match="recurrent state"):
        lfx.generate(llama.gm, prompts(0)[0], model=mamba, max_new_tokens=2)


def test_mistral_without_a_window_generates():
    model = tiny("mistral", sliding_window=None)
    gm = lfx.rewrite(model, lfx.Spec(targets=["*.q_proj"], method=lfx.LoRA(rank=2, init="nonzero")),
                     example_kwargs={"input_ids": torch.randint(4, VOCAB, (2, 5)), "use_cache": False})
    ids = prompts(2)[0]
    want = hf_generate(lfx.load_merged(copy.deepcopy(model), gm), ids, max_new_tokens=5, eos_token_id=None)
    assert torch.equal(lfx.generate(gm, ids, max_new_tokens=5, eos_token_id=[]), want.sequences)


def test_a_graph_without_its_model_asks_for_it(llama):
    loose = lfx.rewrite(torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4))),
                        lfx.Spec(targets=["0"], method=lfx.LoRA(rank=1)))
    loose.meta.pop("lowrank_fx_source", None)
    with pytest.raises(ModelTypeError, match="model="):
        lfx.generate(loose, prompts(0)[0])


# -- lfx.generate against transformers' generate -------------------------------------------------


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_generate_matches_transformers(family, adapter):
    before = lfx.active_adapters(family.gm)
    for ids in prompts(3):
        got = lfx.generate(family.gm, ids, adapter=active(adapter), max_new_tokens=8, eos_token_id=[],
                           output_logits=True)
        want = hf_generate(family.merged[adapter], ids, max_new_tokens=8, eos_token_id=None)
        assert torch.equal(got.sequences, want.sequences)
        assert rel(got.logits, want.logits) < 1e-5
    assert lfx.active_adapters(family.gm) == before  # the active set is restored


def test_eos_stops_rows_and_pads_them_like_transformers(family):
    ids = torch.cat([p for p in prompts(4, lengths=(4, 4, 4))])
    free = lfx.generate(family.gm, ids, adapter="a", max_new_tokens=8, eos_token_id=[])
    eos = int(free[0, 6])  # row 0 stops at its third new token; the others at that token or never
    got = lfx.generate(family.gm, ids, adapter="a", max_new_tokens=8, eos_token_id=eos, pad_token_id=PAD,
                       output_logits=True)
    want = hf_generate(family.merged["a"], ids, max_new_tokens=8, eos_token_id=eos)
    assert torch.equal(got.sequences, want.sequences)
    assert (got.sequences[0, 7:] == PAD).all()
    assert rel(got.logits, want.logits) < 1e-5


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_give_each_rows_own_tokens(family, side):
    rows = prompts(5, lengths=(3, 6, 4))
    width = max(r.shape[1] for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        span = slice(width - row.shape[1], width) if side == "left" else slice(0, row.shape[1])
        ids[i, span], mask[i, span] = row[0], 1
    got = lfx.generate(family.gm, ids, mask, adapter="b", max_new_tokens=6, eos_token_id=[])
    assert torch.equal(got[:, :width], ids)
    for i, row in enumerate(rows):
        alone = lfx.generate(family.gm, row, adapter="b", max_new_tokens=6, eos_token_id=[])
        assert torch.equal(got[i, width:], alone[0, row.shape[1]:])
    if side == "left":  # left padding is exactly transformers' generate
        want = hf_generate(family.merged["b"], ids, mask, max_new_tokens=6, eos_token_id=None)
        assert torch.equal(got, want.sequences)


def test_sampling(llama):
    ids = prompts(6)[0]
    options = {"max_new_tokens": 10, "eos_token_id": [], "do_sample": True, "temperature": 0.7, "top_k": 20,
               "top_p": 0.9, "adapter": "a"}
    one = lfx.generate(llama.gm, ids, seed=7, **options)
    assert torch.equal(one, lfx.generate(llama.gm, ids, seed=7, **options))
    assert not torch.equal(one, lfx.generate(llama.gm, ids, seed=8, **options))
    greedy = lfx.generate(llama.gm, ids, adapter="a", max_new_tokens=10, eos_token_id=[])
    assert torch.equal(lfx.generate(llama.gm, ids, seed=1, **{**options, "top_k": 1}), greedy)
    assert torch.equal(lfx.generate(llama.gm, ids, seed=1, **{**options, "top_p": 1e-6}), greedy)
    # transformers' sampler, same warpers and the same torch seed: the same draws
    torch.manual_seed(11)
    ours = lfx.generate(llama.gm, ids, **options)
    torch.manual_seed(11)
    theirs = llama.merged["a"].generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.7,
                                        top_k=20, top_p=0.9, max_new_tokens=10, eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("bad, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1"),
    ({"temperature": 0.0, "do_sample": True}, "temperature must be a number > 0"),
    ({"top_p": 1.5}, "top_p must be in"),
    ({"attention_mask": torch.zeros(1, 3, dtype=torch.long)}, "all padding"),
    ({"input_ids": torch.tensor([[1, 2, VOCAB]])}, "outside the vocabulary"),
])
def test_bad_arguments_say_what_is_wrong(llama, bad, message):
    kwargs = {"input_ids": torch.tensor([[5, 6, 7]]), **bad}
    with pytest.raises(ValueError, match=message):
        lfx.generate(llama.gm, **kwargs)


def test_unknown_adapter_is_named(llama):
    with pytest.raises(SpecError, match="'c'"):
        lfx.generate(llama.gm, prompts(0)[0], adapter="c", max_new_tokens=2)


def test_compiled_generation_matches_and_never_recompiles(llama):
    import torch._dynamo

    torch._dynamo.reset()
    rows = prompts(8, lengths=(5, 5))
    ids = torch.cat(rows)
    options = {"max_new_tokens": 6, "eos_token_id": [], "compile": "aot_eager"}
    warm = lfx.generate(llama.gm, ids, adapter="a", **options)  # compiles the prompt and the token step
    assert torch.equal(warm, lfx.generate(llama.gm, ids, adapter="a", max_new_tokens=6, eos_token_id=[]))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for adapter, width, steps in (("b", 3, 9), ([], 7, 4), ("a", 2, 12)):  # other prompt lengths, adapters
            got = lfx.generate(llama.gm, ids[:, :width], adapter=adapter, **{**options, "max_new_tokens": steps},
                               output_logits=True)
            want = hf_generate(llama.merged[adapter if isinstance(adapter, str) else None], ids[:, :width],
                               max_new_tokens=steps, eos_token_id=None)
            assert torch.equal(got.sequences, want.sequences)
            assert rel(got.logits, want.logits) < 1e-5
