"""Hot-swap slots (`rewrite(..., max_rank=R)`) and per-row adapters in PyTorch (`lfx.adapter_rows`).

Oracles: PEFT 0.21 with identical weights — `prepare_model_for_compiled_hotswap` /
`hotswap_adapter` for hot-swapping, `adapter_names=[...]` for mixed batches — and, for per-row
training and generation, each row run alone with its adapter active. Compiled runs use the
aot_eager backend under `error_on_recompile`: swapping adapters or row mixes must not recompile.
One tiny Llama (hidden 32, 1 layer) shared by the module.
"""

from __future__ import annotations

import copy

import peft
import pytest
import safetensors.torch
import torch
import transformers
from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

import lowrank_fx as lfx
from lowrank_fx.errors import AdapterFileError, InputError, SpecError
from lowrank_fx.export.adapter_graph import adapter_tensors
from lowrank_fx.generation.torch_generate import decoder_for
from lowrank_fx.graph.gates import ungate
from lowrank_fx.passes.fuse_sites import fuse_sites
from lowrank_fx.passes.row_gates import row_weight

VOCAB = 128
TARGETS = ["q_proj", "v_proj"]


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=3, pad_token_id=0,
                                      bos_token_id=1)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(4, VOCAB, (4, 7), generator=torch.Generator().manual_seed(1))


def logits(out) -> torch.Tensor:
    return out["logits"] if isinstance(out, dict) else out.logits


def peft_adapter(model, directory, rank, alpha, seed, targets=TARGETS, **options):
    """A PEFT LoRA adapter with random (non-zero) factors, saved to `directory`; returns the PeftModel."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                             **options)
    peft_model = peft.get_peft_model(copy.deepcopy(model), config).eval()
    peft_model.save_pretrained(directory)
    return peft_model


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory):
    """PEFT adapters of ranks 4, 8, 2, 2/6 (rank_pattern) and 6 (rsLoRA), other alphas, on the same targets."""
    root = tmp_path_factory.mktemp("hotswap")
    made = {}
    for name, rank, alpha, seed, options in [("a", 4, 8, 1, {}), ("b", 8, 3, 2, {}), ("c", 2, 5, 3, {}),
                                           ("p", 2, 4, 8, {"rank_pattern": {"v_proj": 6}}),
                                           ("r", 6, 5, 7, {"use_rslora": True})]:
        made[name] = (root / name, peft_adapter(model, root / name, rank, alpha, seed, **options))
    return made


def slot_graph(model, ids, max_rank=8, **options):
    spec = lfx.Spec(targets=[f"*.{t}" for t in TARGETS], method=lfx.LoRA(rank=4, alpha=8, **options))
    return lfx.rewrite(model, spec, example_inputs=(ids,), example_kwargs={"use_cache": False}, max_rank=max_rank)


@pytest.fixture(scope="module")
def slot(model, ids):
    """One slot graph (max_rank 8) shared by the hot-swap tests; each loads the adapter it needs first."""
    return slot_graph(model, ids).eval()


def rel(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max())


# -- hot-swap ------------------------------------------------------------------------------------


def test_hotswap_equals_peft_hotswap_and_never_recompiles(model, slot, ids, adapters):
    gm = lfx.load_peft(slot, adapters["a"][0])
    ours = torch.compile(gm, backend="aot_eager", dynamic=False)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), adapters["a"][0]).eval()
    prepare_model_for_compiled_hotswap(theirs, target_rank=8)  # padded as for compiling (run eagerly here)
    errors = {}
    with torch.no_grad():
        errors["a"] = rel(logits(ours(ids)), logits(theirs(ids)))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for name in ("b", "c", "a"):
                lfx.load_peft(gm, adapters[name][0])
                hotswap_adapter(theirs, str(adapters[name][0]), adapter_name="default")
                got, want = logits(ours(ids)), logits(theirs(ids))
                errors[name] = rel(got, want)
                assert rel(got, logits(adapters[name][1](ids))) < 1e-5  # and PEFT's own, uncompiled
            # against PEFT's own model: its hotswap refuses another use_rslora, and scales rank_pattern
            # modules by alpha / r (it looks the pattern up by tensor name), where PEFT's model uses their own rank
            for name in ("r", "p"):
                lfx.load_peft(gm, adapters[name][0])
                errors[name] = rel(logits(ours(ids)), logits(adapters[name][1](ids)))
    assert max(errors.values()) < 1e-5, errors


def test_a_slot_saves_the_adapter_it_holds(model, slot, ids, adapters, tmp_path):
    gm = lfx.load_peft(slot, adapters["c"][0])
    lfx.save_peft(gm, tmp_path / "back")
    original = safetensors.torch.load_file(adapters["c"][0] / "adapter_model.safetensors")
    saved = safetensors.torch.load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(original)
    assert all(torch.equal(saved[k], original[k]) for k in original)  # rank 2, not padded to 8
    onnx_inputs = adapter_tensors(gm, "default")  # an .onnx_adapter file's content: the scale is an input
    assert float(onnx_inputs["model.layers.0.self_attn.q_proj.scale"]) == 5 / 2
    lfx.save_adapters(gm, tmp_path / "c.safetensors")
    spec = lfx.files.adapter_file.read_manifest(tmp_path / "c.safetensors")["adapters"]["default"]["spec"]
    assert {rule["method"]["rank"] for rule in spec["rules"]} == {2}
    plain = lfx.load_adapters(model, tmp_path / "c.safetensors", example_inputs=(ids,),
                              example_kwargs={"use_cache": False})  # an ordinary graph, rank 2
    with torch.no_grad():
        assert rel(logits(plain(ids)), logits(adapters["c"][1](ids))) < 1e-5
        state = {k: v.clone() for k, v in gm.state_dict().items()}
        for p in gm.lowrank_fx.parameters():
            p.zero_()
        gm.load_state_dict(state)  # factors trimmed to rank 2 are padded back
        assert rel(logits(gm(ids)), logits(adapters["c"][1](ids))) < 1e-5
        lfx.load_peft(gm, adapters["b"][0])
        with pytest.raises(InputError, match="has rank 2, but this hot-swap slot holds an adapter of rank 8"):
            gm.load_state_dict(state)
        lfx.load_adapters(gm, tmp_path / "c.safetensors")  # a lowrank_fx file swaps in as a PEFT directory does
        assert rel(logits(gm(ids)), logits(adapters["c"][1](ids))) < 1e-5


def test_a_slot_trains_like_the_unpadded_adapter(model, ids):
    slot = slot_graph(model, ids, init="nonzero")
    plain = lfx.rewrite(model, lfx.Spec(targets=[f"*.{t}" for t in TARGETS], method=lfx.LoRA(rank=4, alpha=8)),
                        example_inputs=(ids,), example_kwargs={"use_cache": False})
    unit = slot.lowrank_fx.default.lora.units["model-layers-0-self_attn-q_proj"]
    with torch.no_grad():
        for (name, p), (_, q) in zip(slot.lowrank_fx.default.named_parameters(), plain.lowrank_fx.default.named_parameters()):
            q.copy_(p.narrow(0 if name.endswith("lora_A") else 1, 0, 4))
    for graph in (slot, plain):
        logits(graph(ids)).pow(2).mean().backward()
    assert unit.lora_A.shape == (8, 32)
    for (name, p), (_, q) in zip(slot.lowrank_fx.default.named_parameters(), plain.lowrank_fx.default.named_parameters()):
        axis = 0 if name.endswith("lora_A") else 1
        assert rel(p.grad.narrow(axis, 0, 4), q.grad) < 1e-5
        assert not p.grad.narrow(axis, 4, 4).any()  # the padding stays zero


def test_the_training_form_of_a_slot_follows_swaps(model, slot, ids, adapters):
    gm = lfx.load_peft(slot, adapters["b"][0])
    fused = fuse_sites(gm)  # built once; the slot's scale is read from its buffer, not baked in
    with torch.no_grad():
        for name in ("c", "a"):
            lfx.load_peft(gm, adapters[name][0])
            assert rel(logits(fused(ids)), logits(adapters[name][1](ids))) < 1e-5


def test_hotswap_refusals_leave_the_slot_as_it_was(model, slot, ids, adapters, tmp_path):
    gm = lfx.load_peft(slot, adapters["a"][0])
    with torch.no_grad():
        before = logits(gm(ids))
    peft_adapter(model, tmp_path / "big", 16, 8, 4)
    peft_adapter(model, tmp_path / "other", 4, 8, 5, targets=["q_proj", "k_proj"])
    peft_adapter(model, tmp_path / "dora", 4, 8, 6, use_dora=True)
    with pytest.raises(AdapterFileError, match="rank 16, above the slot's max_rank 8"):
        lfx.load_peft(gm, tmp_path / "big")
    with pytest.raises(AdapterFileError, match="exactly the slot's targets.*k_proj"):
        lfx.load_peft(gm, tmp_path / "other")
    with pytest.raises(AdapterFileError, match="DoRA; hot-swap supports plain LoRA"):
        lfx.load_peft(gm, tmp_path / "dora")
    with torch.no_grad():
        assert torch.equal(logits(gm(ids)), before)
    spec = lfx.Spec(targets=["*.q_proj"], method=lfx.LoRA(rank=4))
    for method, message in [(lfx.LoRA(rank=4, dora=True), "uses DoRA"), (lfx.RandLoRA(rank=4), "uses RandLoRA"),
                            (lfx.LoRA(rank=16), "rank 16 > max_rank 8")]:
        with pytest.raises(SpecError, match=message):
            lfx.rewrite(gm, lfx.Spec(targets=["*.k_proj"], method=method), adapter="second", max_rank=8)
    for bad in (0, 2.5, True):
        with pytest.raises(SpecError, match="max_rank must be a positive int"):
            lfx.rewrite(gm, spec, adapter="second", max_rank=bad)
    assert lfx.active_adapters(gm) == ["default"]


# -- per-row adapters ----------------------------------------------------------------------------

MIX = ["one", "two", None, "one"]


@pytest.fixture(scope="module")
def two(model, ids, tmp_path_factory):
    """PEFT adapters one (rank 4 on q, v) and two (rank 2 on q, v, down), and a graph holding both."""
    root = tmp_path_factory.mktemp("rows")
    torch.manual_seed(11)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False), adapter_name="one")
    theirs.add_adapter("two", peft.LoraConfig(r=2, lora_alpha=3, target_modules=[*TARGETS, "down_proj"],
                                            init_lora_weights=False))
    theirs.save_pretrained(root)  # adapters other than "default" go to root / name
    gm = lfx.load_peft(model, root / "one", adapter="one", example_inputs=(ids,), example_kwargs={"use_cache": False})
    gm = lfx.load_peft(gm, root / "two", adapter="two").eval()
    return gm, theirs.eval()


def single(gm, x, adapter):
    """Logits of `x` with only `adapter` (None: none) active."""
    lfx.set_active_adapters(gm, [] if adapter is None else [adapter])
    try:
        return logits(gm(x))
    finally:
        lfx.set_active_adapters(gm, ["one", "two"])


def test_rows_equal_peft_adapter_names_and_each_rows_own_run(two, ids):
    gm, theirs = two
    with torch.no_grad():
        before = logits(gm(ids))
        with lfx.adapter_rows(gm, MIX):
            got = logits(gm(ids))
        want = theirs(ids, adapter_names=["one", "two", "__base__", "one"]).logits
        assert rel(got, want) < 1e-5
        for row, adapter in enumerate(MIX):
            assert float((got[row] - single(gm, ids[row:row + 1], adapter)[0]).abs().max()) < 1e-6
        assert lfx.active_adapters(gm) == ["one", "two"]  # restored: every row gets both adapters again
        assert torch.equal(logits(gm(ids)), before)


def test_rows_on_flattened_activations_gpt2(ids, tmp_path):
    """GPT-2's Conv1D runs addmm on (batch · seq, in): each row's weight is repeated seq times."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4,
                                                                 bos_token_id=1, eos_token_id=3)).eval()
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False, fan_in_fan_out=True),
        adapter_name="one")
    theirs.add_adapter("two", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn"], init_lora_weights=False,
                                              fan_in_fan_out=True))
    theirs.save_pretrained(tmp_path)
    gm = lfx.load_peft(model, tmp_path / "one", adapter="one", example_inputs=(ids,), example_kwargs={"use_cache": False})
    gm = lfx.load_peft(gm, tmp_path / "two", adapter="two").eval()
    with torch.no_grad():
        with lfx.adapter_rows(gm, MIX):
            got = logits(gm(ids))
        assert rel(got, theirs.eval()(ids, adapter_names=["one", "two", "__base__", "one"]).logits) < 1e-5
        for row, adapter in enumerate(MIX):
            assert float((got[row] - single(gm, ids[row:row + 1], adapter)[0]).abs().max()) < 1e-6


def test_rows_compiled_do_not_recompile_across_mixes(two, ids):
    gm, _ = two
    compiled = torch.compile(gm, backend="aot_eager", dynamic=False)
    with torch.no_grad():
        with lfx.adapter_rows(gm, MIX):
            compiled(ids)  # the first per-row call compiles
        with torch._dynamo.config.patch(error_on_recompile=True):
            for mix in (["two", "two", "one", None], [None] * 4, ["one", None, "two", "two"]):
                with lfx.adapter_rows(gm, mix):
                    got = logits(compiled(ids))
                with lfx.adapter_rows(gm, mix):
                    want = logits(gm(ids))
                assert float((got - want).abs().max()) < 1e-6
                for row, adapter in enumerate(mix):
                    assert float((got[row] - single(gm, ids[row:row + 1], adapter)[0]).abs().max()) < 1e-6


def test_a_mixed_batch_trains_each_adapter_on_its_own_rows(two, ids):
    gm, _ = two
    params = dict(gm.lowrank_fx.named_parameters())
    gm.train()
    try:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        with lfx.adapter_rows(gm, MIX):
            logits(gm(ids)).pow(2).sum().backward()
        mixed = {name: p.grad.clone() for name, p in params.items()}
        for p in params.values():
            p.grad = None
        for row, adapter in enumerate(MIX):
            single(gm, ids[row:row + 1], adapter).pow(2).sum().backward()
        for name, p in params.items():
            assert rel(mixed[name], p.grad) < 1e-5, name
        assert all(p.grad.abs().max() > 0 for p in params.values())  # both adapters had rows to learn from
    finally:
        gm.eval()
        for p in params.values():
            p.grad = None


def test_generate_rows_equal_each_rows_own_generation(two, ids):
    gm, _ = two
    prompts = ids[:, :5]
    together = lfx.generate(gm, prompts, rows=MIX, max_new_tokens=6, eos_token_id=[])
    for row, adapter in enumerate(MIX):
        alone = lfx.generate(gm, prompts[row:row + 1], adapters=[] if adapter is None else [adapter],
                             max_new_tokens=6, eos_token_id=[])
        assert torch.equal(together[row], alone[0])
    assert lfx.active_adapters(gm) == ["one", "two"]


def test_bad_rows_are_refused(two, ids):
    gm, _ = two
    for rows, message in [(["one", "three", None, "one"], "'three', not adapters of this graph"),
                          ("one", "one adapter name"), ([], "non-empty list")]:
        with pytest.raises(InputError, match=message), lfx.adapter_rows(gm, rows):
            pass
    with pytest.raises(InputError, match="names 3 rows, but the batch has 4"), torch.no_grad():
        with lfx.adapter_rows(gm, ["one", "two", None]):
            gm(ids)
    assert lfx.active_adapters(gm) == ["one", "two"]  # restored after the error
    with pytest.raises(InputError, match="either adapters= .* or rows="):
        lfx.generate(gm, ids, adapters="one", rows=MIX, max_new_tokens=1)
    with pytest.raises(InputError, match="rows names 2 adapters for 4 prompts"):
        lfx.generate(gm, ids, rows=["one", None], max_new_tokens=1)


def test_generation_follows_a_swap_without_a_new_decode_graph(model, slot, ids, adapters):
    gm = lfx.load_peft(slot, adapters["a"][0])
    prompt = ids[:2, :4]
    lfx.generate(gm, prompt, max_new_tokens=1)
    decode = decoder_for(gm)
    lfx.load_peft(gm, adapters["b"][0])
    got = lfx.generate(gm, prompt, max_new_tokens=5, eos_token_id=[])
    assert decoder_for(gm) is decode  # no new capture: the slot's modules were written in place
    with torch.no_grad():
        want = adapters["b"][1].generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                         do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=5)
    assert torch.equal(got, want)


def test_a_slot_refuses_inits_that_change_the_base(model, slot):
    try:
        method = lfx.LoRA(rank=4, init="pissa")
    except SpecError:
        pytest.skip("this LoRA has no base-changing init")
    with pytest.raises(SpecError, match="init='pissa', which goes with a changed base weight"):
        lfx.rewrite(slot, lfx.Spec(targets=["*.k_proj"], method=method), adapter="second", max_rank=8)
    assert "second" not in lfx.active_adapters(slot)


def test_rows_refuse_trained_modules_and_layer_blocks(model, ids):
    kwargs = {"example_inputs": (ids,), "example_kwargs": {"use_cache": False}}
    trains = lfx.rewrite(model, lfx.Spec(targets=["*.q_proj"], train=["lm_head"]), **kwargs)
    with pytest.raises(SpecError, match="train whole modules"), lfx.adapter_rows(trains, ["default"] * 4):
        pass
    blocks = lfx.rewrite(model, lfx.Spec(targets=["*.q_proj"]), layers=["model.layers.*"], **kwargs)
    with pytest.raises(SpecError, match="needs a flat graph"), lfx.adapter_rows(blocks, ["default"] * 4):
        pass
    assert not hasattr(trains, "lowrank_fx_row_gates") and not hasattr(blocks, "lowrank_fx_row_gates")


def test_exports_drop_the_row_weights(two, ids):
    """ONNX exports ungate the graph (every exported adapter applied): a converted graph's row
    weights go with the gates, so the exported graph is the one an unconverted graph gives."""
    gm, _ = two
    with lfx.adapter_rows(gm, MIX):
        pass
    graph = copy.deepcopy(gm.graph)
    ungate(graph)
    graph.lint()
    left = [node.name for node in graph.nodes if node.target is row_weight
            or (node.op == "get_attr" and node.target.startswith(("lowrank_fx_gates.", "lowrank_fx_row_gates.")))]
    assert not left
