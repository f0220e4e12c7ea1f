"""Trained modules (`Spec(train=[...])`, PEFT's modules_to_save) on a tiny BERT classifier.

Oracles: PEFT with the same LoRA and classifier weights (and its merge_and_unload); a graph
holding only one adapter; the original model for the base and for merged state dicts; a fresh
process for files; ONNX Runtime for exports. fp32, relative error ≤ 1e-5.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers as T
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import lowrank_fx as lfx
from lowrank_fx.adapt.capture import capture

TOL = 1e-5
VOCAB = 64
REPO = Path(__file__).resolve().parents[1]


def config(**overrides) -> T.BertConfig:
    options = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
               "intermediate_size": 64, "max_position_embeddings": 32, "num_labels": 3}
    return T.BertConfig(**{**options, **overrides})


def spec(**overrides) -> lfx.Spec:
    options = {"targets": ["query", "value"], "method": lfx.LoRA(rank=4, alpha=8.0, init="nonzero"),
               "train": ["classifier"]}
    return lfx.Spec(**{**options, **overrides})


def logits(module, ids) -> torch.Tensor:
    with torch.no_grad():
        return module(ids).logits


def rel_err(ours, ref) -> float:
    ours, ref = torch.as_tensor(ours), torch.as_tensor(ref)
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def bert():
    """(model, ids (3, 8), its captured base graph): copy the graph before rewriting it."""
    torch.manual_seed(0)
    model = T.BertForSequenceClassification(config()).eval()
    ids = torch.randint(0, VOCAB, (3, 8))
    return model, ids, capture(model, (ids,))


def add_heads(gm, adapters):
    """Rewrite `gm` with one adapter per (name, seed): LoRA on query/value and its own classifier,
    moved off the base so that the heads differ."""
    for name, seed in adapters:
        torch.manual_seed(seed)
        gm = lfx.rewrite(gm, spec(), adapter=name)
        with torch.no_grad():
            for param in gm.lowrank_fx[name]["trained"].parameters():
                param.add_(torch.randn_like(param))
    return gm


@pytest.fixture(scope="module")
def heads(bert):
    """A graph with adapters a and b (each with its own head), and each adapter alone in a graph."""
    _, _, base = bert
    both = add_heads(copy.deepcopy(base), [("a", 1), ("b", 2)])
    alone = {name: add_heads(copy.deepcopy(base), [(name, seed)]) for name, seed in (("a", 1), ("b", 2))}
    for name in alone:  # the same adapter values in both graphs
        for key, value in alone[name].lowrank_fx[name].state_dict().items():
            assert torch.equal(value, both.lowrank_fx[name].state_dict()[key])
    return both, alone


def active(gm, ids, adapters) -> torch.Tensor:
    """The logits with exactly `adapters` active (the graph's own choice restored afterwards)."""
    before = lfx.active_adapters(gm)
    lfx.set_active_adapters(gm, adapters)
    try:
        return logits(gm, ids)
    finally:
        lfx.set_active_adapters(gm, before)


# --- the graph: copies, switching, compile, gradients ------------------------------------------------


def test_trained_copies_belong_to_the_adapter(heads, bert):
    model, _, _ = bert
    both, _ = heads
    group = both.lowrank_fx["a"]["trained"]
    assert list(group.units) == ["classifier"]
    trainable = {name for name, p in both.named_parameters() if p.requires_grad}
    assert "lowrank_fx.b.trained.units.classifier.weight" in trainable  # the newest adapter trains
    assert not both.get_parameter("classifier.weight").requires_grad  # the base stays frozen
    assert torch.equal(both.get_parameter("classifier.weight"), model.classifier.weight)
    assert not torch.equal(group.units["classifier"].weight, both.lowrank_fx["b"]["trained"].units["classifier"].weight)


def test_two_heads_switch_and_each_equals_its_own_graph(heads, bert):
    model, ids, _ = bert
    both, alone = heads
    for name in ("a", "b"):
        ours = active(both, ids, [name])
        assert rel_err(ours, logits(alone[name], ids)) <= TOL
        assert rel_err(ours, logits(model, ids)) > 1e-3
    assert rel_err(active(both, ids, ["a"]), active(both, ids, ["b"])) > 1e-3
    assert torch.equal(active(both, ids, []), logits(model, ids))  # inactive: the base head, bit for bit


def test_compiled_graph_switches_heads_without_recompiling(heads, bert):
    _, ids, _ = bert
    both, alone = heads
    compiled = torch.compile(both, fullgraph=True, dynamic=True, backend="aot_eager")
    try:
        lfx.set_active_adapters(both, ["a"])
        with torch.no_grad():
            first = compiled(ids).logits
        with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
            lfx.set_active_adapters(both, ["b"])
            second = compiled(ids).logits
        assert rel_err(first, logits(alone["a"], ids)) <= TOL
        assert rel_err(second, logits(alone["b"], ids)) <= TOL
    finally:
        lfx.set_active_adapters(both, ["a", "b"])
        torch._dynamo.reset()


def test_only_the_active_copy_gets_gradients(bert):
    _, ids, base = bert
    gm = add_heads(copy.deepcopy(base), [("a", 1), ("b", 2)])
    for param in gm.lowrank_fx.parameters():
        param.requires_grad_(True)
    lfx.set_active_adapters(gm, ["a"])
    gm(ids).logits.square().sum().backward()
    a, b = (gm.lowrank_fx[name]["trained"].units["classifier"].weight for name in ("a", "b"))
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert b.grad is None or b.grad.abs().sum() == 0
    assert gm.get_parameter("classifier.weight").grad is None


def test_newest_active_adapter_wins_and_merge_folds_what_the_graph_computes(heads, bert):
    model, ids, _ = bert
    both, _ = heads
    for adapters in (["a"], ["b"], [], ["a", "b"]):
        lfx.set_active_adapters(both, adapters)
        ours = logits(both, ids)
        assert rel_err(logits(lfx.merge(both), ids), ours) <= TOL
        restored = copy.deepcopy(model)
        restored.load_state_dict(lfx.merged_state_dict(both))
        assert rel_err(logits(restored, ids), ours) <= TOL
    lfx.set_active_adapters(both, ["a", "b"])
    heads_b = both.lowrank_fx["b"]["trained"].units["classifier"]
    merged = lfx.merged_state_dict(both)
    assert torch.equal(merged["classifier.weight"], heads_b.weight)  # both active: the newest adapter's copy
    assert torch.equal(merged["classifier.bias"], heads_b.bias)
    assert not any(n.op == "call_function" and "select_trained" in str(n.target) for n in lfx.merge(both).graph.nodes)


# --- PEFT ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_adapter(bert, tmp_path_factory):
    """A PEFT LoRA adapter on query/value with a trained classifier (modules_to_save), saved by PEFT."""
    model, _, _ = bert
    directory = tmp_path_factory.mktemp("peft")
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"],
                        init_lora_weights=False, task_type="SEQ_CLS")
    peft_model = get_peft_model(copy.deepcopy(model), config).eval()
    with torch.no_grad():
        for param in peft_model.base_model.model.classifier.modules_to_save["default"].parameters():
            param.add_(torch.randn_like(param))
    peft_model.save_pretrained(directory)
    return peft_model, directory


def test_peft_modules_to_save_load_and_match(peft_adapter, bert):
    model, ids, base = bert
    peft_model, directory = peft_adapter
    assert "classifier" in json.loads((directory / "adapter_config.json").read_text())["modules_to_save"]
    gm = lfx.load_peft(copy.deepcopy(base), directory)
    theirs = logits(peft_model, ids)
    assert rel_err(logits(gm, ids), theirs) <= TOL
    assert rel_err(logits(gm, ids), logits(model, ids)) > 1e-3
    copy_ = gm.lowrank_fx["default"]["trained"].units["classifier"]
    assert torch.equal(copy_.weight, peft_model.base_model.model.classifier.modules_to_save["default"].weight)
    assert torch.equal(gm.get_parameter("classifier.weight"), model.classifier.weight)
    # merging: ours as a graph and as the original model's state, against PEFT's merge_and_unload
    restored = copy.deepcopy(model)
    restored.load_state_dict(lfx.merged_state_dict(gm))
    peft_merged = copy.deepcopy(peft_model).merge_and_unload()
    assert rel_err(logits(lfx.merge(gm), ids), logits(peft_merged, ids)) <= TOL
    assert rel_err(logits(restored, ids), logits(peft_merged, ids)) <= TOL


def test_peft_directory_lacking_a_saved_module_is_refused_whole(peft_adapter, bert, tmp_path):
    _, _, base = bert
    _, directory = peft_adapter
    tensors = safetensors.torch.load_file(directory / "adapter_model.safetensors")
    del tensors["base_model.model.classifier.bias"]
    safetensors.torch.save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text((directory / "adapter_config.json").read_text())
    gm = copy.deepcopy(base)
    with pytest.raises(lfx.AdapterFileError, match="trained.units.classifier.bias"):
        lfx.load_peft(gm, tmp_path)
    assert not hasattr(gm, "lowrank_fx")  # nothing was added


def test_save_peft_loads_in_peft(heads, bert, tmp_path):
    model, ids, _ = bert
    both, alone = heads
    lfx.save_peft(both, tmp_path, adapter="a")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    saved = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(saved)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    assert rel_err(logits(peft_model, ids), logits(alone["a"], ids)) <= TOL


# --- adapter files ------------------------------------------------------------------------------------

SCRIPT = textwrap.dedent("""
    import sys, safetensors.torch, torch, transformers as T
    import lowrank_fx as lfx
    work = sys.argv[1]
    model = T.BertForSequenceClassification(T.BertConfig.from_pretrained(work)).eval()
    model.load_state_dict(safetensors.torch.load_file(f"{work}/model.safetensors"))
    ids = safetensors.torch.load_file(f"{work}/ids.safetensors")["ids"]
    spec = lfx.Spec(targets=["query", "value"], method=lfx.LoRA(rank=4, alpha=8.0), train=["classifier"])
    torch.manual_seed(123)  # other initial values: every value must come from the file
    gm = lfx.rewrite(model, spec, example_inputs=(ids,), adapter="a")
    gm = lfx.rewrite(gm, spec, adapter="b")
    gm = lfx.load_adapters(gm, f"{work}/heads.safetensors")
    out = {}
    for name in ("a", "b"):
        lfx.set_active_adapters(gm, [name])
        with torch.no_grad():
            out[name] = lfx.merge(gm)(ids).logits.contiguous()
    safetensors.torch.save_file(out, f"{work}/out.safetensors")
""")


def test_saved_heads_load_in_a_new_process_and_merge(heads, bert, tmp_path):
    model, ids, _ = bert
    both, alone = heads
    lfx.save_adapters(both, tmp_path / "heads.safetensors")
    model.config.save_pretrained(tmp_path)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    safetensors.torch.save_file({"ids": ids}, tmp_path / "ids.safetensors")
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=240, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    out = safetensors.torch.load_file(tmp_path / "out.safetensors")
    for name in ("a", "b"):
        assert rel_err(out[name], logits(alone[name], ids)) <= TOL


def test_adapter_file_with_heads_is_all_or_nothing(heads, bert, tmp_path):
    _, _, base = bert
    both, _ = heads
    lfx.save_adapters(both, tmp_path / "heads.safetensors", adapters="a")
    plain = lfx.rewrite(copy.deepcopy(base), spec(train=()), adapter="a")  # same LoRA, no trained head
    before = {k: v.clone() for k, v in plain.lowrank_fx.state_dict().items()}
    with pytest.raises(lfx.AdapterFileError, match="trained"):
        lfx.load_adapters(plain, tmp_path / "heads.safetensors")
    after = plain.lowrank_fx.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --- ONNX Runtime -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_adapters(heads, bert, tmp_path_factory):
    _, ids, _ = bert
    both, _ = heads
    return lfx.export_onnx(both, tmp_path_factory.mktemp("onnx") / "model.onnx", example_inputs=(ids,),
                           mode="adapters")


def test_onnx_adapter_files_switch_the_head(onnx_adapters, heads, bert):
    model, ids, _ = bert
    _, alone = heads
    assert {"classifier.weight", "classifier.bias"} <= set(onnx_adapters.adapter_inputs)
    session = onnx_adapters.session()
    feeds = {"input_ids": ids.numpy()}
    for name in ("a", "b"):
        assert rel_err(session.run(feeds, adapter=name)["logits"], logits(alone[name], ids)) <= TOL
    assert rel_err(session.run(feeds)["logits"], logits(model, ids)) <= TOL  # no file: the base head


def test_onnx_per_row_heads(heads, bert, tmp_path):
    model, ids, _ = bert
    both, alone = heads
    result = lfx.export_onnx(both, tmp_path / "rows.onnx", example_inputs=(ids,), mode="per_row")
    out = result.session().run({"input_ids": ids.numpy()}, rows=["a", None, "b"])["logits"]
    expected = torch.stack([logits(alone["a"], ids)[0], logits(model, ids)[1], logits(alone["b"], ids)[2]])
    assert rel_err(out, expected) <= TOL


# --- spec decisions and refusals ----------------------------------------------------------------------


def test_pattern_matching_no_module_names_the_nearest(bert):
    _, _, base = bert
    with pytest.raises(lfx.SpecError, match=r"'clasifier'.*Nearest module names: classifier"):
        lfx.rewrite(copy.deepcopy(base), spec(train=["clasifier"]))
    with pytest.raises(lfx.SpecError, match="module patterns"):
        lfx.Spec(targets=["query"], train=["all-linear"])
    with pytest.raises(lfx.SpecError, match="empty"):
        lfx.Spec(targets=[])


def test_a_trained_module_is_not_also_a_target(bert):
    _, _, base = bert
    gm = lfx.rewrite(copy.deepcopy(base), spec(targets=["dense"], train=["pooler"]))  # pooler.dense is both
    assert list(gm.lowrank_fx["default"]["trained"].units) == ["bert-pooler-dense"]
    assert not any("pooler" in key for key in gm.lowrank_fx["default"]["lora"].units)
    assert any("attention-output-dense" in key for key in gm.lowrank_fx["default"]["lora"].units)
    with pytest.raises(lfx.SpecError, match="belongs to a module in Spec.train"):
        lfx.rewrite(copy.deepcopy(base), spec(targets=["classifier"]))


def test_train_only_adapter(bert, tmp_path):
    model, ids, base = bert
    gm = add_heads(copy.deepcopy(base), [])
    gm = lfx.rewrite(gm, spec(targets=[]))
    assert list(gm.lowrank_fx["default"]) == ["trained"]
    with torch.no_grad():
        gm.lowrank_fx["default"]["trained"].units["classifier"].bias.add_(1.0)
    assert rel_err(logits(gm, ids), logits(model, ids)) > 1e-3
    assert rel_err(logits(lfx.merge(gm), ids), logits(gm, ids)) <= TOL
    with pytest.raises(lfx.AdapterFileError, match="only trains whole modules"):
        lfx.save_peft(gm, tmp_path)


def test_a_module_trained_by_one_adapter_is_no_target_of_another(bert):
    _, _, base = bert
    trained = lfx.rewrite(copy.deepcopy(base), spec(), adapter="a")
    with pytest.raises(lfx.SpecError, match="adapter 'a' trains"):
        lfx.rewrite(trained, spec(targets=["classifier"], train=()), adapter="b")
    adapted = lfx.rewrite(copy.deepcopy(base), spec(targets=["classifier"], train=()), adapter="a")
    with pytest.raises(lfx.SpecError, match="another adapter of this graph adapts"):
        lfx.rewrite(adapted, spec(), adapter="b")
    assert "b" not in lfx.active_adapters(adapted)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.proj(self.emb(ids)))


def test_tied_weight_needs_every_use_trained():
    ids = torch.randint(0, 10, (2, 5))
    with pytest.raises(lfx.SpecError, match="tied to emb.weight"):
        lfx.rewrite(Tied(), lfx.Spec(targets=["proj"], train=["head"]), example_inputs=(ids,))
    model = Tied().eval()
    gm = lfx.rewrite(model, lfx.Spec(targets=["proj"], train=["head", "emb"]), example_inputs=(ids,))
    with torch.no_grad():
        for param in gm.lowrank_fx["default"]["trained"].parameters():
            param.add_(1.0)
        out = gm(ids)
    restored = Tied().eval()
    restored.load_state_dict(lfx.merged_state_dict(gm))
    assert rel_err(restored(ids), out) <= TOL


# --- training -----------------------------------------------------------------------------------------


def _task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random sequences whose first token is 2 + label (3 labels)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, 8), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    ids[:, 0] = 2 + labels
    return ids, labels


def test_training_the_head_beats_lora_with_a_frozen_random_head():
    """The encoder already represents the first token in its pooled output, as a pretrained
    encoder represents a task's features, and the classifier is random: what a new head on a
    pretrained model faces. (With the label's token anywhere in the sequence, a random tiny
    BERT shows no such gap: LoRA must learn the task itself either way.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and fair to the other tests
    try:
        torch.manual_seed(0)
        model = T.BertForSequenceClassification(config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
        x, y = _task(512, 1)
        x_test, y_test = _task(256, 2)
        base = capture(model.eval(), (x[:4],))
        batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 512, 32)] * 4

        def loss_fn(gm, batch):
            return F.cross_entropy(gm(batch[0]).logits, batch[1])

        accuracy = {}
        for train in ((), ("classifier",)):
            torch.manual_seed(0)
            gm = lfx.rewrite(copy.deepcopy(base), lfx.Spec(targets=["query", "value"], method=lfx.LoRA(rank=8),
                                                            train=train))
            lfx.Trainer(gm, loss_fn, lr=3e-3, compile=False, progress=False).fit(batches, steps=60)
            gm.eval()
            accuracy[train] = (logits(gm, x_test).argmax(-1) == y_test).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    lora, head = accuracy[()], accuracy[("classifier",)]
    print(f"held-out accuracy: LoRA alone {lora:.3f}, LoRA + trained classifier {head:.3f}")
    assert head >= 0.9, accuracy
    assert head >= lora + 0.1, accuracy
