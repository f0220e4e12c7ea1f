"""Vision-language: LoRA on a tiny LLaVA (a CLIP vision tower, a projector, a Llama language
model, random weights from configs), each part selectable by its module path.

Oracles (fp32, 1e-5 norm-relative, oracles.py): the original model with the folded weights
(lfx.load_merged), PEFT's LoRA with the same factors, eager PyTorch for a compiled training
step, and ONNX Runtime on the merged export. One capture serves every test (capture memo).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers as T
from oracles import assert_grads_match, rel
from torch._dynamo.testing import CompileCounterWithBackend

import lowrank_fx as lfx

IMAGE, PATCH, IMAGE_TOKEN = 16, 4, 127
TOKENS_PER_IMAGE = (IMAGE // PATCH) ** 2
UNREAD = "model.vision_tower.encoder.layers.1.*"  # vision_feature_layer=-2: the last layer is not read
TOWERS = {
    "language": ["model.language_model.*"],
    "vision": ["model.vision_tower.*"],
    "projector": ["model.multi_modal_projector.*"],
}
TOWERS["all"] = [pattern for patterns in TOWERS.values() for pattern in patterns]


def _spec(tower: str, rank: int = 4) -> lfx.Spec:
    return lfx.Spec(targets=TOWERS[tower], exclude=[UNREAD], method=lfx.LoRA(rank=rank, alpha=8.0, init="nonzero"))


def _inputs(images: int, seq: int, at: int, batch: int | None = None) -> dict:
    """`images` images of 16x16, one per row of input_ids (batch rows, `images` by default),
    each row's 16 image tokens at positions at .. at+15."""
    generator = torch.Generator().manual_seed(seq * 31 + at)
    ids = torch.randint(0, IMAGE_TOKEN, (batch or images, seq), generator=generator)
    ids[:images, at:at + TOKENS_PER_IMAGE] = IMAGE_TOKEN
    return {"input_ids": ids, "pixel_values": torch.randn(images, 3, IMAGE, IMAGE, generator=generator)}


@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    vision = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=IMAGE, patch_size=PATCH, projection_dim=32)
    text = T.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config = T.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    return T.LlavaForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def examples():
    return {**_inputs(images=2, seq=24, at=2), "use_cache": False}


@pytest.fixture(scope="module")
def graphs(llava, examples):
    """{tower: rewritten graph}, all from one capture."""
    return {tower: lfx.rewrite(llava, _spec(tower), example_kwargs=examples).eval() for tower in TOWERS}


def _logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _folded(llava, gm):
    return lfx.load_merged(copy.deepcopy(llava), gm)


@pytest.mark.parametrize("tower", list(TOWERS))
def test_each_tower_is_selectable_and_folds_into_the_original_model(llava, graphs, tower):
    """The targets are exactly the tower's weights the logits depend on; the graph's logits at
    another sequence length and image position equal the original model's with folded weights."""
    gm = graphs[tower]
    targets = set(gm.meta["lowrank_fx"].adapters["default"].groups)
    prefixes = tuple(pattern[:-1] for pattern in TOWERS[tower])
    layers = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)  # the vision embeddings: conv, embedding
    expected = {name for name, module in llava.named_modules() if isinstance(module, layers)
                and name.startswith(prefixes) and not name.startswith(UNREAD[:-1])}
    assert targets == expected
    inputs = _inputs(images=2, seq=30, at=7)
    got = _logits(gm, inputs)
    want = _logits(_folded(llava, gm), {**inputs, "use_cache": False})
    assert rel(got, _logits(llava, {**inputs, "use_cache": False})) > 1e-3  # the adapters change the logits
    assert rel(got, want) <= 1e-5
    assert rel(_logits(lfx.merge(gm), inputs), want) <= 1e-5


def test_peft_lora_with_the_same_factors(llava, graphs, tmp_path):
    """save_peft, then PEFT's own LoRA on a copy of the model: the same logits."""
    from peft import PeftModel

    gm = graphs["all"]
    lfx.save_peft(gm, tmp_path / "peft")
    reference = PeftModel.from_pretrained(copy.deepcopy(llava), tmp_path / "peft").eval()
    inputs = {**_inputs(images=2, seq=30, at=7), "use_cache": False}
    want = _logits(reference, inputs)
    assert rel(want, _logits(llava, inputs)) > 1e-3  # PEFT loaded the (non-zero) factors
    assert rel(_logits(gm, inputs), want) <= 1e-5


def test_compiled_training_step_equals_eager(graphs):
    """torch.compile(fullgraph=True, dynamic=True) of the graph with every tower adapted: the
    loss and every adapter gradient of a training step equal eager's, at two text lengths
    (image tokens elsewhere), compiled once."""
    gm = graphs["all"]
    gm.train()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(gm, backend=counter, fullgraph=True, dynamic=True)

    def step(module, inputs):
        gm.zero_grad(set_to_none=True)
        loss = module(**inputs).logits.square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad}

    try:
        for inputs in (_inputs(images=2, seq=30, at=7), _inputs(images=2, seq=19, at=0)):
            loss, grads = step(compiled, inputs)
            want_loss, want_grads = step(gm, inputs)
            assert rel(loss, want_loss) <= 1e-5
            assert_grads_match(grads, want_grads)
    finally:
        gm.eval()
        torch._dynamo.reset()
    assert counter.frame_count == 1


def test_merged_onnx_equals_the_folded_model(llava, graphs, examples, tmp_path):
    gm = graphs["all"]
    result = lfx.export_onnx(gm, tmp_path / "llava.onnx", example_kwargs=examples, mode="merged", optimize=False)
    assert result.inputs == ["input_ids", "pixel_values"] and result.outputs[0] == "logits"
    folded = _folded(llava, gm)
    session = result.session()
    for inputs in (_inputs(images=2, seq=30, at=7), _inputs(images=2, seq=19, at=0, batch=3)):
        got = torch.from_numpy(session.run(inputs)["logits"])
        assert rel(got, _logits(folded, {**inputs, "use_cache": False})) <= 1e-5


def test_image_count_is_fixed_at_capture_and_token_count_checked(graphs):
    with pytest.raises(lfx.CaptureError, match=r"pixel_values\.size\(\)\[0\] == 2"):
        graphs["language"](**_inputs(images=3, seq=30, at=7))
    inputs = _inputs(images=2, seq=30, at=7)
    inputs["input_ids"][0, 7] = 3  # one image token short
    with pytest.raises(lfx.InputError, match="image token per image feature"):
        graphs["language"](**inputs)


def test_adapting_an_unread_vision_layer_warns(llava, examples):
    """vision_feature_layer=-2: layer 1's output never reaches the logits."""
    spec = lfx.Spec(targets=["model.vision_tower.encoder.layers.*.mlp.fc1"], method=lfx.LoRA(rank=2))
    with pytest.warns(UserWarning, match=r"vision layer\(s\) \[1\].*vision_feature_layer=-2.*no gradient"):
        lfx.rewrite(llava, spec, example_kwargs=examples)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*vision layer")
        lfx.rewrite(llava, lfx.Spec(targets=["model.vision_tower.encoder.layers.0.mlp.fc1"]), example_kwargs=examples)
