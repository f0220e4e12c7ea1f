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

import onnxruntime_genai as og
import pytest
import tokenizers
import torch
import transformers

import lowrank_fx as lfx
from lowrank_fx.errors import ModelTypeError, SpecError
from lowrank_fx.generation.active_graph import inactive_adapters, without_adapters
from lowrank_fx.generation.decode_graph import EXAMPLES
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


_BUILT: dict[str, object] = {}


def built(key: str, make):
    """One Family / one export per key for the whole module, whichever fixture asks first."""
    if key not in _BUILT:
        _BUILT[key] = make()
    return _BUILT[key]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return built(request.param, lambda: Family(request.param))


@pytest.fixture(scope="module")
def llama():
    return built("llama", lambda: Family("llama"))


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
    before = lfx.generate(llama.gm, ids, adapters="a", max_new_tokens=4, eos_token_id=[], output_logits=True)
    group = next(iter(llama.gm.lowrank_fx["a"].values()))
    param = next(iter(group.units.values())).lora_B
    saved = param.detach().clone()
    with torch.no_grad():
        param.mul_(3.0)  # what an optimizer step on the training graph does
    try:
        after = lfx.generate(llama.gm, ids, adapters="a", max_new_tokens=4, eos_token_id=[], output_logits=True)
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


def test_length_dependent_rope_is_refused(llama):
    # sliding-window models, refused here before, now generate (tests/test_sliding_window.py)
    model = tiny("phi3", max_position_embeddings=256, original_max_position_embeddings=64,
                 rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
                                  "long_factor": [2.0] * 4, "original_max_position_embeddings": 64})
    with pytest.raises(ModelTypeError, match="longrope"):  # refused from the model alone, before any capture
        lfx.generate(llama.gm, prompts(0)[0], model=model, max_new_tokens=2)
    with pytest.raises(ModelTypeError, match="longrope"):
        lfx.export_generation(model, llama.gm, "unused")


def test_recurrent_models_are_refused(llama):
    mamba = transformers.MambaForCausalLM(transformers.MambaConfig(hidden_size=32, num_hidden_layers=2,
                                                                   vocab_size=VOCAB, state_size=4))
    with pytest.raises(ModelTypeError, match="recurrent"):  # transformers >= 5.25 reports Mamba by its layer types
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
        got = lfx.generate(family.gm, ids, adapters=active(adapter), max_new_tokens=8, eos_token_id=[],
                           output_logits=True)
        want = hf_generate(family.merged[adapter], ids, max_new_tokens=8, eos_token_id=None)
        assert torch.equal(got.sequences, want.sequences)
        assert rel(got.logits, want.logits) < 1e-5
    assert lfx.active_adapters(family.gm) == before  # the active set is restored


def test_lorta_and_randlora_adapters_generate_like_their_fold(llama):
    example = {"input_ids": torch.randint(4, VOCAB, (2, 6)), "use_cache": False}
    gm = lfx.rewrite(llama.model, lfx.Spec(targets=["*.q_proj", "*.o_proj"], method=lfx.LoRTA(rank=4, init="nonzero")),
                     example_kwargs=example, adapter="t")
    gm = lfx.rewrite(gm, lfx.Spec(targets=["*.v_proj"], method=lfx.RandLoRA(rank=4, init="nonzero")), adapter="r")
    ids = prompts(13)[0]
    for adapter in ("t", "r"):
        lfx.set_active_adapters(gm, [adapter])
        want = hf_generate(lfx.load_merged(copy.deepcopy(llama.model), gm), ids, max_new_tokens=6, eos_token_id=None)
        got = lfx.generate(gm, ids, max_new_tokens=6, eos_token_id=[], output_logits=True)
        assert torch.equal(got.sequences, want.sequences)
        assert rel(got.logits, want.logits) < 1e-5


def test_eos_stops_rows_and_pads_them_like_transformers(family):
    ids = torch.cat([p for p in prompts(4, lengths=(4, 4, 4))])
    free = lfx.generate(family.gm, ids, adapters="a", max_new_tokens=8, eos_token_id=[])
    eos = int(free[0, 6])  # row 0 stops at its third new token; the others at that token or never
    got = lfx.generate(family.gm, ids, adapters="a", max_new_tokens=8, eos_token_id=eos, pad_token_id=PAD,
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
    got = lfx.generate(family.gm, ids, attention_mask=mask, adapters="b", max_new_tokens=6, eos_token_id=[])
    assert torch.equal(got[:, :width], ids)
    for i, row in enumerate(rows):
        alone = lfx.generate(family.gm, row, adapters="b", max_new_tokens=6, eos_token_id=[])
        assert torch.equal(got[i, width:], alone[0, row.shape[1]:])
    if side == "left":  # left padding is exactly transformers' generate
        want = hf_generate(family.merged["b"], ids, mask, max_new_tokens=6, eos_token_id=None)
        assert torch.equal(got, want.sequences)


def test_sampling(llama):
    ids = prompts(6)[0]
    options = {"max_new_tokens": 10, "eos_token_id": [], "do_sample": True, "temperature": 0.7, "top_k": 20,
               "top_p": 0.9, "adapters": "a"}
    one = lfx.generate(llama.gm, ids, seed=7, **options)
    assert torch.equal(one, lfx.generate(llama.gm, ids, seed=7, **options))
    assert not torch.equal(one, lfx.generate(llama.gm, ids, seed=8, **options))
    greedy = lfx.generate(llama.gm, ids, adapters="a", max_new_tokens=10, eos_token_id=[])
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
        lfx.generate(llama.gm, prompts(0)[0], adapters="c", max_new_tokens=2)


def test_generation_leaves_the_inactive_adapters_sites_out(llama):
    decode = decoder_for(llama.gm)
    examples = decode.meta[EXAMPLES]
    def sites(graph, role):
        return sorted(n.meta["lowrank_fx"]["adapter"] for n in graph.graph.nodes
                                           if n.meta.get("lowrank_fx", {}).get("role") == role)
    gates = llama.gm.lowrank_fx_gates
    try:
        lfx.set_active_adapters(llama.gm, "a")
        with torch.no_grad():
            gates.a.fill_(0.5)  # a gate that is neither on nor off still scales its adapter
        assert inactive_adapters(decode) == ("b",)
        pruned = without_adapters(decode, ("b",))
        kept = ["a"] * sites(decode, "add").count("a")
        assert sites(pruned, "add") == sites(pruned, "delta") == kept and "b" in sites(decode, "delta")
        with torch.no_grad():
            full, left = decode(**examples), pruned(**examples)
        assert torch.equal(full["logits"], left["logits"])  # 0 · Δy added exactly nothing
        with torch.no_grad():
            gates.a.fill_(0.0)
            base = decode(**examples)["logits"]
        assert not torch.equal(base, left["logits"])  # the kept adapter a did change the output
    finally:
        lfx.set_active_adapters(llama.gm, ["a", "b"])


def test_compiled_generation_matches_and_never_recompiles(llama):
    import torch._dynamo

    torch._dynamo.reset()
    rows = prompts(8, lengths=(5, 5))
    ids = torch.cat(rows)
    options = {"max_new_tokens": 6, "eos_token_id": [], "compile": "aot_eager"}
    # two tokens compile the prompt step and the token step; the later steps' caches (concatenated,
    # not attention's transposed output) must not compile again
    # each adapter set runs its own graph (the inactive adapters' sites left out): compiled once per set
    for adapter in ("b", [], "a"):
        warm = lfx.generate(llama.gm, ids, adapters=adapter, **{**options, "max_new_tokens": 2})
        assert torch.equal(warm, lfx.generate(llama.gm, ids, adapters=adapter, max_new_tokens=2, eos_token_id=[]))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for adapter, width, steps in (("b", 3, 9), ([], 7, 4), ("a", 2, 12)):  # other prompt lengths, adapters
            got = lfx.generate(llama.gm, ids[:, :width], adapters=adapter, **{**options, "max_new_tokens": steps},
                               output_logits=True)
            want = hf_generate(llama.merged[adapter if isinstance(adapter, str) else None], ids[:, :width],
                               max_new_tokens=steps, eos_token_id=None)
            assert torch.equal(got.sequences, want.sequences)
            assert rel(got.logits, want.logits) < 1e-5


def test_compiled_generation_matches_transformers_on_every_family(family):
    import torch._dynamo

    torch._dynamo.reset()
    ids = torch.cat(prompts(9, lengths=(4, 4)))
    for adapter in ("a", None):
        got = lfx.generate(family.gm, ids, adapters=active(adapter), max_new_tokens=4, eos_token_id=[],
                           compile="aot_eager", output_logits=True)
        want = hf_generate(family.merged[adapter], ids, max_new_tokens=4, eos_token_id=None)
        assert torch.equal(got.sequences, want.sequences)
        assert rel(got.logits, want.logits) < 1e-5
    torch._dynamo.reset()


# -- export_generation, GenerationSession, onnxruntime-genai ---------------------------------------


def word_tokenizer():
    """A tiny word-level tokenizer, built here (no download): <pad> <s> <unk> </s> w4 ... w127."""
    vocab = {"<pad>": PAD, "<s>": 1, "<unk>": 2, "</s>": EOS, **{f"w{i}": i for i in range(4, VOCAB)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>")


class Exported:
    """A family exported once, with adapters a and b: Llama from its graph and per row, Qwen2 from
    an adapter file, Phi-3 from {name: graph}, GPT-2 from its graph with a tokenizer."""

    def __init__(self, fam: Family, root):
        self.family = fam
        self.directory = root / fam.name
        tokenizer = None
        if fam.name == "qwen2":  # from one adapter file holding both
            path = lfx.save_adapters(fam.gm, root / f"{fam.name}.safetensors")
            adapters = {"a": path, "b": path}
        elif fam.name == "phi3":  # {name: graph}
            adapters = {"a": fam.gm, "b": fam.gm}
        else:  # the graph with all its adapters
            adapters = fam.gm
            tokenizer = word_tokenizer() if fam.name == "gpt2" else None
        self.result = lfx.export_generation(fam.model, adapters, self.directory, per_row=fam.name == "llama",
                                            tokenizer=tokenizer)
        self.session = lfx.GenerationSession(self.directory)
        self.genai = og.Model(str(self.directory))
        self.genai_adapters = og.Adapters(self.genai)
        for name, path in self.result.adapters.items():
            self.genai_adapters.load(str(path), name)


def export_of(fam: Family, tmp_path_factory) -> Exported:
    return built(f"export:{fam.name}", lambda: Exported(fam, tmp_path_factory.mktemp("generation")))


@pytest.fixture(scope="module")
def exported(family, tmp_path_factory):
    return export_of(family, tmp_path_factory)


def genai_generate(model, ids: torch.Tensor, new: int, adapters=None, adapter=None, inputs=None):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + new, do_sample=False, batch_size=ids.shape[0])
    generator = og.Generator(model, params)
    if adapter is not None:
        generator.set_active_adapter(adapters, adapter)
    for name, value in (inputs or {}).items():
        generator.set_model_input(name, value)
    generator.append_tokens(ids.numpy().astype("int32"))
    while not generator.is_done():
        generator.generate_next_token()
    return torch.stack([torch.as_tensor(generator.get_sequence(i), dtype=torch.long) for i in range(ids.shape[0])])


def test_export_writes_the_generation_directory(exported):
    import json

    import onnx

    result, name = exported.result, exported.family.name
    assert sorted(p.name for p in result.directory.glob("*.onnx")) == ["model.onnx"]  # the base, exported once
    assert {n: p.name for n, p in result.adapters.items()} == {"a": "a.onnx_adapter", "b": "b.onnx_adapter"}
    assert all(p.exists() for p in result.files)
    config = json.loads(result.config.read_text())
    assert config["model"]["type"] == {"llama": "llama", "qwen2": "qwen2", "phi3": "phi3", "gpt2": "decoder"}[name]
    assert config["search"]["past_present_share_buffer"] is False
    assert config["model"]["eos_token_id"] == EOS and config["model"]["vocab_size"] == VOCAB
    graph = onnx.load(str(result.model), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    outputs = [o.name for o in graph.output]
    assert outputs == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    for key in ("input_ids", "attention_mask", "position_ids", "past_key_values.1.value"):
        assert key in inputs
    past = inputs["past_key_values.0.key"]
    decoder = config["model"]["decoder"]
    assert isinstance(past[0], str) and isinstance(past[2], str)  # batch and past length are dynamic
    assert past[1] == decoder["num_key_value_heads"] and past[3] == decoder["head_size"] == 8
    assert (result.per_row is not None) == (name == "llama")


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_session_and_genai_match_transformers(exported, adapter):
    fam = exported.family
    for ids in prompts(9):
        want = hf_generate(fam.merged[adapter], ids, max_new_tokens=8, eos_token_id=None)
        got = exported.session.generate(ids, adapter=adapter, max_new_tokens=8, eos_token_id=[], output_logits=True)
        assert torch.equal(got.sequences, want.sequences)
        assert rel(got.logits, want.logits) < 1e-5
        genai = genai_generate(exported.genai, ids, 8, exported.genai_adapters, adapter)
        assert torch.equal(genai, want.sequences)


def test_session_switches_adapters_per_call_without_reloading(exported):
    ids = prompts(10)[0]
    alone = {a: exported.session.generate(ids, adapter=a, max_new_tokens=6, eos_token_id=[]) for a in ADAPTERS}
    ort_session = exported.session._main.session
    for adapter in ["b", None, "a", "a", "b", None]:
        assert torch.equal(exported.session.generate(ids, adapter=adapter, max_new_tokens=6, eos_token_id=[]),
                           alone[adapter])
    assert exported.session._main.session is ort_session


def test_session_pads_and_stops_like_lfx_generate(exported):
    fam = exported.family
    rows = prompts(11, lengths=(2, 5, 4))
    ids = torch.full((3, 5), PAD)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, 5 - row.shape[1]:], mask[i, 5 - row.shape[1]:] = row[0], 1
    torch_tokens = lfx.generate(fam.gm, ids, attention_mask=mask, adapters="a", max_new_tokens=7, eos_token_id=[])
    eos = int(torch_tokens[1, 7])
    want = hf_generate(fam.merged["a"], ids, mask, max_new_tokens=7, eos_token_id=eos)
    got = exported.session.generate(ids, attention_mask=mask, adapter="a", max_new_tokens=7, eos_token_id=eos,
                                    pad_token_id=PAD)
    assert torch.equal(got, want.sequences)
    right = torch.full((3, 5), PAD)
    right_mask = torch.zeros_like(right)
    for i, row in enumerate(rows):
        right[i, :row.shape[1]], right_mask[i, :row.shape[1]] = row[0], 1
    got = exported.session.generate(right, attention_mask=right_mask, adapter="a", max_new_tokens=7, eos_token_id=[])
    assert torch.equal(got, lfx.generate(fam.gm, right, attention_mask=right_mask, adapters="a", max_new_tokens=7,
                                         eos_token_id=[]))
    genai = genai_generate(exported.genai, right, 7, exported.genai_adapters, "a")  # genai reads right padding
    assert torch.equal(genai, got)


def test_per_row_generation_gives_each_row_its_adapter(llama, tmp_path_factory):
    exported = export_of(llama, tmp_path_factory)
    ids = torch.cat(prompts(12, lengths=(4, 4, 4)))
    rows = ["a", None, "b"]
    want = torch.stack([exported.session.generate(ids[i:i + 1], adapter=a, max_new_tokens=6, eos_token_id=[])[0]
                        for i, a in enumerate(rows)])
    assert torch.equal(exported.session.generate(ids, rows=rows, max_new_tokens=6, eos_token_id=[]), want)
    genai = og.Model(str(exported.result.per_row.parent))
    ids_input = exported.session._per_row().row_ids(rows)
    assert torch.equal(genai_generate(genai, ids, 6, inputs={"adapter_ids": ids_input}), want)
    with pytest.raises(ValueError, match="one name"):
        exported.session.generate(ids, rows=["a"], max_new_tokens=2)


def test_unknown_adapter_gets_a_did_you_mean(exported):
    with pytest.raises(lfx.AdapterFileError, match="did you mean 'a'"):
        exported.session.generate(prompts(0)[0], adapter="a_", max_new_tokens=2)


def test_an_adapter_file_for_another_model_is_refused_before_any_run(llama, tmp_path_factory):
    session = lfx.GenerationSession(export_of(llama, tmp_path_factory).directory)
    other = export_of(built("gpt2", lambda: Family("gpt2")), tmp_path_factory).result.adapters["a"]
    with pytest.raises(lfx.AdapterFileError, match="for another model"):
        session.add_adapter("gpt2", other)
    assert session.adapters == ["a", "b"]


def test_export_refuses_an_eos_outside_the_vocabulary(llama, tmp_path):
    model = tiny("llama", eos_token_id=VOCAB + 5)
    with pytest.raises(lfx.ExportError, match=r"eos_token_id=\[133\] lies outside the vocabulary \[0, 128\)"):
        lfx.export_generation(model, llama.gm, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_export_refuses_a_model_with_an_adapter_merged_into_it(llama, tmp_path):
    with pytest.raises(lfx.ExportError, match="merged into this model"):
        lfx.export_generation(llama.merged["a"], {"a": llama.gm}, tmp_path / "out")


def test_export_writes_the_tokenizer(tmp_path_factory):
    gpt2 = built("gpt2", lambda: Family("gpt2"))
    result = export_of(gpt2, tmp_path_factory).result
    assert "tokenizer.json" in {p.name for p in result.tokenizer}
    again = tokenizers.Tokenizer.from_file(str(result.directory / "tokenizer.json"))
    assert again.encode("w10 w20 w30").ids == [10, 20, 30]
    ids = torch.tensor([[10, 20, 30]])
    want = lfx.generate(gpt2.gm, ids, adapters="a", max_new_tokens=5, eos_token_id=[])
    assert torch.equal(result.session().generate(ids, adapter="a", max_new_tokens=5, eos_token_id=[]), want)


# -- the command line ------------------------------------------------------------------------------


def test_cli_exports_a_generation_directory_and_generates(tmp_path, capsys):
    from lowrank_fx.cli.main import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\nadapters are small\n")
    assert main(["train", "--data", str(corpus), "--steps", "2", "--targets", "q_proj", "v_proj", "--rank", "4",
                 "--adapter", "b", "--out", str(tmp_path / "b.safetensors")]) == 0
    out = tmp_path / "gen"
    assert main(["export", "--adapters", str(tmp_path / "b.safetensors"), "--generation", str(out)]) == 0
    captured = capsys.readouterr()
    assert "torchvision" not in captured.err and "Failed to load" not in captured.err
    session = lfx.GenerationSession(out)
    for adapter in ("b", None):
        argv = ["generate", str(out), "--prompt-ids", "1", "2", "3", "--max-new-tokens", "6"]
        assert main(argv + (["--adapter", adapter] if adapter else [])) == 0
        printed = [int(t) for t in capsys.readouterr().out.split()]
        assert printed == session.generate([[1, 2, 3]], adapter=adapter, max_new_tokens=6)[0].tolist()
    assert main(["generate", str(out), "--prompt-ids", "1", "2", "3", "--max-new-tokens", "6", "--num-beams", "3"]) == 0
    printed = [int(t) for t in capsys.readouterr().out.split()]
    assert printed == session.generate([[1, 2, 3]], max_new_tokens=6, num_beams=3)[0].tolist()
    assert main(["generate", str(out), "--prompt-ids", "1", "--adapter", "bb"]) == 2
    assert "did you mean 'b'" in capsys.readouterr().err


def test_cli_says_a_missing_data_file_is_missing(capsys):
    from lowrank_fx.cli.main import main

    assert main(["train", "--data", "missing.txt", "--out", "x.safetensors"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--data missing.txt: no such file" in err and "import" not in err and len(err.splitlines()) == 1


def test_old_spellings_of_generation_warn_and_generate_the_same(llama, tmp_path_factory):
    """Options passed positionally and generate's `adapter=` still work for one release, with a warning."""
    from lowrank_fx.deprecation import LowRankFxDeprecationWarning

    exported = export_of(llama, tmp_path_factory)
    ids, mask = torch.full((2, 5), PAD), torch.zeros(2, 5, dtype=torch.long)
    for i, row in enumerate(prompts(12, lengths=(3, 5))):  # row 0 left-padded
        ids[i, 5 - row.shape[1]:], mask[i, 5 - row.shape[1]:] = row[0], 1
    options = {"max_new_tokens": 4, "eos_token_id": []}
    want = lfx.generate(llama.gm, ids, attention_mask=mask, adapters="a", **options)
    with pytest.warns(LowRankFxDeprecationWarning, match="generate: pass attention_mask, adapters as keyword arguments"):
        assert torch.equal(lfx.generate(llama.gm, ids, mask, "a", **options), want)
    with pytest.warns(LowRankFxDeprecationWarning, match="generate: adapter= is now adapters="):
        assert torch.equal(lfx.generate(llama.gm, ids, attention_mask=mask, adapter="a", **options), want)
    assert torch.equal(exported.session.generate(ids, attention_mask=mask, adapter="a", **options), want)
    with pytest.warns(LowRankFxDeprecationWarning, match="GenerationSession.generate: pass attention_mask, adapter as"):
        assert torch.equal(exported.session.generate(ids, mask, "a", **options), want)
    with pytest.warns(LowRankFxDeprecationWarning, match="GenerationSession: pass providers as keyword argument"):
        session = lfx.GenerationSession(exported.directory, ["CPUExecutionProvider"])
    assert torch.equal(session.generate(ids, attention_mask=mask, adapter="a", **options), want)
    with pytest.warns(LowRankFxDeprecationWarning, match="export_generation: pass example_inputs, dtype as keyword"):
        with pytest.raises(SpecError, match="dtype must be a floating torch.dtype"):  # reached the dtype parameter
            lfx.export_generation(llama.model, llama.gm, tmp_path_factory.mktemp("old"), None, "float16")
