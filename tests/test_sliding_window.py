"""Sliding-window, chunked and hybrid local/global attention in generation, and beam search.

Oracle: transformers' own `generate()` (greedy and `num_beams`) on a copy of the model with
the adapter folded in, for prompts longer than the window (4 tokens) and new tokens past it.
Tiny random models (hidden 32, 2 layers, vocabulary 128): Mistral (every layer sliding),
Qwen2 (use_sliding_window, layer 0 global by max_window_layers), Gemma-2 and Gemma-3
(alternating local and global layers) and Llama-4 (chunked attention; no ONNX: its RoPE is
complex-valued). The window matters: the same weights with a window of 4096 give other
logits. One ONNX export each for Mistral and Gemma-3 serves ONNX Runtime and onnxruntime-genai
(the genai configs of Qwen2 and Gemma-2 are checked without one: an export per family costs
~10 s, and the hybrid mask is the model's own in every runtime); captures and exports are
module-scoped.
"""

from __future__ import annotations

import copy
import json

import onnxruntime_genai as og
import pytest
import torch
import transformers

import lowrank_fx as lfx
from lowrank_fx.errors import InputError, ModelTypeError, SpecError

VOCAB, EOS, PAD, WINDOW = 128, 3, 0, 4
FAMILIES = ["mistral", "qwen2", "gemma2", "gemma3", "llama4"]
GENAI_TYPES = {"mistral": "mistral", "qwen2": "qwen2", "gemma2": "gemma2", "gemma3": "gemma3_text"}
ONNX_FAMILIES = ["mistral", "gemma3"]  # every layer local; local and global alternating, two RoPE tables


def tiny(family: str, window: int = WINDOW) -> torch.nn.Module:
    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": VOCAB, "eos_token_id": EOS, "pad_token_id": PAD,
              "bos_token_id": 1}
    if family == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=window, **common))
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(use_sliding_window=True, sliding_window=window,
                                                                       max_window_layers=1, **common))
    elif family == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(head_dim=8, sliding_window=window, **common))
    elif family == "gemma3":
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(head_dim=8, sliding_window=window,
                                                                             sliding_window_pattern=2, **common))
    else:
        model = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(
            head_dim=8, attention_chunk_size=window, intermediate_size_mlp=64, moe_layers=[], no_rope_layers=[1, 0],
            **common))
    return model.eval()


class Family:
    """A windowed model, its training graph with LoRA adapter `a`, the merged copy, and the merged
    weights under a window too wide to matter (the no-window result)."""

    def __init__(self, name: str):
        torch.manual_seed(0)
        self.name = name
        self.model = tiny(name)
        example = {"input_ids": torch.randint(4, VOCAB, (2, 6)), "use_cache": False}
        self.gm = lfx.rewrite(self.model, lfx.Spec(targets=["*.q_proj", "*.v_proj"],
                                                   method=lfx.LoRA(rank=2, init="nonzero")),
                              example_kwargs=example, adapter="a")
        self.merged = lfx.load_merged(copy.deepcopy(self.model), self.gm)
        self.wide = tiny(name, window=4096)
        self.wide.load_state_dict(self.merged.state_dict())


_BUILT: dict[str, object] = {}


def built(key: str, make):
    if key not in _BUILT:
        _BUILT[key] = make()
    return _BUILT[key]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return built(request.param, lambda: Family(request.param))


@pytest.fixture(scope="module")
def mistral():
    return built("mistral", lambda: Family("mistral"))


def batch(seed: int, lengths=(10, 7)) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts, every one longer than the window."""
    draw = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(4, VOCAB, (length,), generator=draw)
        mask[row, width - length:] = 1
    return ids, mask


def hf_generate(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, output_logits=True,
                              output_scores=True, return_dict_in_generate=True, **kwargs)


def rel(got, want) -> float:
    return max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want))


def check(got, want) -> None:
    """Same tokens; same logits (and beam scores) to fp32 rounding."""
    assert torch.equal(got.sequences, want.sequences)
    assert rel(got.logits, want.logits) < 1e-5
    if got.scores is not None:
        assert float((got.scores - want.sequences_scores).abs().max()) < 1e-5


def an_eos(fam: Family, ids, mask, **options) -> int:
    """A token row 0 produces as its third new token: an EOS that ends some beams early."""
    free = lfx.generate(fam.gm, ids, attention_mask=mask, adapters="a", max_new_tokens=6, eos_token_id=[], **options)
    return int(free[0, ids.shape[1] + 2])


# -- the window is applied ---------------------------------------------------------------------


def test_the_window_changes_what_transformers_generates(family):
    ids, mask = batch(1)
    with torch.no_grad():
        windowed = family.merged(input_ids=ids, attention_mask=mask).logits
        wide = family.wide(input_ids=ids, attention_mask=mask).logits
    assert rel([windowed[mask == 1]], [wide[mask == 1]]) > 1e-2  # the tests below would catch a lost window


# -- lfx.generate, eager and compiled ----------------------------------------------------------


def test_greedy_and_beams_match_transformers_past_the_window(family):
    ids, mask = batch(2)
    got = lfx.generate(family.gm, ids, attention_mask=mask, adapters="a", max_new_tokens=8, eos_token_id=[],
                       output_logits=True)
    check(got, hf_generate(family.merged, ids, mask, max_new_tokens=8, eos_token_id=None))
    eos = an_eos(family, ids, mask, num_beams=3)
    got = lfx.generate(family.gm, ids, attention_mask=mask, adapters="a", max_new_tokens=8, num_beams=3, eos_token_id=eos,
                       pad_token_id=PAD, output_logits=True)
    check(got, hf_generate(family.merged, ids, mask, max_new_tokens=8, num_beams=3, eos_token_id=eos))


@pytest.mark.parametrize("early_stopping, length_penalty", [(False, 1.0), (True, 1.0), ("never", 2.0), (False, -0.5)])
def test_beam_settings_match_transformers(mistral, early_stopping, length_penalty):
    ids, mask = batch(3, lengths=(9, 6, 8))
    eos = [an_eos(mistral, ids, mask, num_beams=4), EOS]
    options = {"max_new_tokens": 7, "num_beams": 4, "early_stopping": early_stopping, "length_penalty": length_penalty}
    got = lfx.generate(mistral.gm, ids, attention_mask=mask, adapters="a", eos_token_id=eos, pad_token_id=PAD,
                       output_logits=True, **options)
    want = hf_generate(mistral.merged, ids, mask, eos_token_id=eos, **options)
    check(got, want)
    if length_penalty < 0:  # short hypotheses win: rows end early, filled with the first EOS id (pad id 0)
        assert int((got.sequences[:, ids.shape[1]:] == eos[0]).sum(-1).max()) > 2


def test_beams_without_eos_fill_and_one_beam_is_greedy(mistral):
    ids, mask = batch(4)
    greedy = lfx.generate(mistral.gm, ids, attention_mask=mask, adapters="a", max_new_tokens=5, eos_token_id=[])
    assert torch.equal(lfx.generate(mistral.gm, ids, attention_mask=mask, adapters="a", max_new_tokens=5,
                                    eos_token_id=[], num_beams=1), greedy)
    got = lfx.generate(mistral.gm, ids, attention_mask=mask, adapters="a", max_new_tokens=5, eos_token_id=[],
                       num_beams=2, output_logits=True)
    check(got, hf_generate(mistral.merged, ids, mask, max_new_tokens=5, num_beams=2, eos_token_id=None))
    assert len(got.logits) == 5 and got.logits[0].shape == (2 * 2, VOCAB)  # one row per beam


def test_compiled_greedy_and_beams_match_transformers():
    import torch._dynamo

    fam = built("qwen2", lambda: Family("qwen2"))  # hybrid: layer 0 global, layer 1 local
    torch._dynamo.reset()
    ids, mask = batch(5)
    for beams in (1, 3):
        got = lfx.generate(fam.gm, ids, attention_mask=mask, adapters="a", max_new_tokens=7, eos_token_id=[],
                           num_beams=beams, compile="aot_eager", output_logits=True)
        check(got, hf_generate(fam.merged, ids, mask, max_new_tokens=7, num_beams=beams, eos_token_id=None))
    torch._dynamo.reset()


# -- export_generation, ONNX Runtime, onnxruntime-genai --------------------------------------------


class Exported:
    def __init__(self, fam: Family, root):
        self.family = fam
        self.result = lfx.export_generation(fam.model, fam.gm, root / fam.name)
        self.session = lfx.GenerationSession(self.result.directory)
        self.genai = og.Model(str(self.result.directory))
        self.genai_adapters = og.Adapters(self.genai)
        self.genai_adapters.load(str(self.result.adapters["a"]), "a")


@pytest.fixture(scope="module", params=ONNX_FAMILIES)
def exported(request, tmp_path_factory):
    fam = built(request.param, lambda: Family(request.param))
    return built(f"export:{fam.name}", lambda: Exported(fam, tmp_path_factory.mktemp("sliding")))


def genai_generate(exported: Exported, ids: torch.Tensor, new: int, beams: int = 1) -> torch.Tensor:
    """genai's tokens; min_length = max_length bars EOS until the end (transformers: min_new_tokens)."""
    params = og.GeneratorParams(exported.genai)
    params.set_search_options(max_length=ids.shape[1] + new, min_length=ids.shape[1] + new, do_sample=False,
                              batch_size=ids.shape[0], num_beams=beams, num_return_sequences=1, early_stopping=False)
    generator = og.Generator(exported.genai, params)
    generator.set_active_adapter(exported.genai_adapters, "a")
    generator.append_tokens(ids.numpy().astype("int32"))
    while not generator.is_done():
        generator.generate_next_token()
    return torch.stack([torch.as_tensor(generator.get_sequence(i), dtype=torch.long) for i in range(ids.shape[0])])


@pytest.mark.parametrize("name", list(GENAI_TYPES))
def test_genai_config_carries_the_window(name):
    from lowrank_fx.generation.decode_graph import LAYOUT
    from lowrank_fx.generation.genai_config import genai_config
    from lowrank_fx.generation.torch_generate import decoder_for

    fam = built(name, lambda: Family(name))
    config = genai_config(fam.model, decoder_for(fam.gm).meta[LAYOUT])["model"]
    assert config["type"] == GENAI_TYPES[name]
    assert config["decoder"]["sliding_window"] == {"window_size": WINDOW, "slide_key_value_cache": False,
                                                   "slide_inputs": False}


def test_session_and_genai_match_transformers_past_the_window(exported):
    """ONNX Runtime, padded batch; genai, row 0 alone (genai pads on the right), EOS barred until
    the end: genai's own beam scorer keeps other hypotheses than transformers' once an EOS enters
    the beams, which is no matter of the export."""
    fam = exported.family
    written = json.loads(exported.result.config.read_text())["model"]
    assert written["type"] == GENAI_TYPES[fam.name] and written["decoder"]["sliding_window"]["window_size"] == WINDOW
    ids, mask = batch(6)
    for beams in (1, 3):
        want = hf_generate(fam.merged, ids, mask, max_new_tokens=8, num_beams=beams, eos_token_id=None)
        check(exported.session.generate(ids, attention_mask=mask, adapter="a", max_new_tokens=8, eos_token_id=[],
                                        num_beams=beams, output_logits=True), want)
        alone = hf_generate(fam.merged, ids[:1], mask[:1], max_new_tokens=8, min_new_tokens=8, num_beams=beams,
                            eos_token_id=EOS).sequences  # row 0 has no pads
        assert torch.equal(genai_generate(exported, ids[:1], 8, beams), alone)
    short = ids[:, -3:]  # a prompt inside the window, crossing it while decoding
    want = hf_generate(fam.merged, short, torch.ones_like(short), max_new_tokens=8, eos_token_id=None)
    check(exported.session.generate(short, adapter="a", max_new_tokens=8, eos_token_id=[], output_logits=True), want)
    check(lfx.generate(fam.gm, short, adapters="a", max_new_tokens=8, eos_token_id=[], output_logits=True), want)


def test_session_beams_stop_at_eos_like_transformers(exported):
    fam = exported.family
    ids, mask = batch(7)
    eos = an_eos(fam, ids, mask, num_beams=3)
    got = exported.session.generate(ids, attention_mask=mask, adapter="a", max_new_tokens=8, num_beams=3,
                                    eos_token_id=eos, pad_token_id=PAD, early_stopping=True, output_logits=True)
    check(got, hf_generate(fam.merged, ids, mask, max_new_tokens=8, num_beams=3, eos_token_id=eos,
                           early_stopping=True))


# -- what stays refused --------------------------------------------------------------------------


def test_llama4_generates_but_is_not_exported(tmp_path):
    fam = built("llama4", lambda: Family("llama4"))
    with pytest.raises(ModelTypeError, match="complex-valued RoPE"):
        lfx.export_generation(fam.model, fam.gm, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_no_window_means_no_genai_sliding_window_entry():
    from lowrank_fx.generation.decoder import CacheLayout
    from lowrank_fx.generation.genai_config import genai_config

    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=VOCAB, eos_token_id=EOS, use_sliding_window=False, sliding_window=WINDOW))
    config = genai_config(model, CacheLayout(layers=1, kv_heads=1, head_dim=8, dtype=torch.float32))
    assert "sliding_window" not in config["model"]["decoder"]


@pytest.mark.parametrize("bad, error, message", [
    ({"num_beams": 0}, SpecError, "num_beams must be an int >= 1"),
    ({"num_beams": 2, "early_stopping": "sometimes"}, SpecError, "early_stopping must be True, False or 'never'"),
    ({"num_beams": 2, "length_penalty": "long"}, SpecError, "length_penalty must be a number"),
    ({"num_beams": 2, "do_sample": True}, SpecError, "do_sample=False"),
])
def test_bad_beam_arguments_say_what_is_wrong(mistral, bad, error, message):
    with pytest.raises(error, match=message):
        lfx.generate(mistral.gm, torch.tensor([[5, 6, 7]]), max_new_tokens=2, **bad)


def test_session_refuses_beams_with_per_row_adapters_and_right_padding(tmp_path_factory):
    fam = built("mistral", lambda: Family("mistral"))
    exported = built("export:mistral", lambda: Exported(fam, tmp_path_factory.mktemp("sliding")))
    with pytest.raises(InputError, match="rows= .one adapter per row. cannot be combined"):
        exported.session.generate(torch.tensor([[5, 6, 7], [8, 9, 10]]), rows=["a", None], num_beams=2)
    right = torch.tensor([[1, 1, 1], [1, 1, 0]])  # a pad after row 1's tokens would take a window slot
    for generate in (exported.session.generate, lambda *a, **k: lfx.generate(fam.gm, *a, **k)):
        with pytest.raises(InputError, match=r"rows \[1\] of attention_mask have padding after their tokens"):
            generate(torch.tensor([[5, 6, 7], [8, 9, PAD]]), attention_mask=right, max_new_tokens=2)
