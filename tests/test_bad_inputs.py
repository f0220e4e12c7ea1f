"""A catalogue of bad inputs through the public API, as a new user makes them.

Each row is one wrong call. It must raise a `LowRankFxError` (so a caller can catch every
refusal with one class) whose message names what was wrong, and leave the graph's weights
as they were. A row that raises anything else is a raw error; one that returns is silent.
Rows of other files (capture, trainer, CLI, option validation, damaged files) are not
repeated here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowrank_fx as lfx
from lowrank_fx.passes.fuse_sites import fuse_sites


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.q_proj = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, ids):
        return self.fc(self.q_proj(self.embed(ids)))


IDS = torch.randint(0, 16, (2, 5))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Small()


@pytest.fixture(scope="module")
def gm(model):  # the model stays alive with it, as a user's does (generate looks it up)
    return lfx.rewrite(model, lfx.Spec(["q_proj", "fc"], lfx.LoRA(rank=2)), example_inputs=(IDS,))


@pytest.fixture(scope="module")
def saved(gm, tmp_path_factory):
    return lfx.save_adapters(gm, tmp_path_factory.mktemp("adapter") / "a.safetensors")


def _write(path, text):
    path.write_text(text)
    return path


# (id, call(gm, saved, tmp_path), fragment the message must contain; {tmp} is tmp_path)
CASES = [
    ("rewrite-not-a-module", lambda gm, f, t: lfx.rewrite("gpt2", lfx.Spec()), "nn.Module"),
    ("rewrite-spec-is-a-string", lambda gm, f, t: lfx.rewrite(Small(), "q_proj", example_inputs=(IDS,)), "Spec"),
    ("rewrite-examples-not-tensors", lambda gm, f, t: lfx.rewrite(Small(), lfx.Spec(["q_proj"]), example_inputs=[[1, 2]]),
     "must be Tensor"),
    ("rewrite-adapter-name-with-dot", lambda gm, f, t: lfx.rewrite(Small(), lfx.Spec(["q_proj"]), example_inputs=(IDS,),
                                                                  adapter="a.b"), "a.b"),
    ("rewrite-empty-adapter-name", lambda gm, f, t: lfx.rewrite(Small(), lfx.Spec(["q_proj"]), example_inputs=(IDS,),
                                                               adapter=""), "adapter"),
    ("rewrite-bad-layers", lambda gm, f, t: lfx.rewrite(Small(), lfx.Spec(["q_proj"]), example_inputs=(IDS,),
                                                       layers="nonsense"), "layers"),
    ("rewrite-twice-same-name", lambda gm, f, t: lfx.rewrite(gm, lfx.Spec(["q_proj"]), example_inputs=(IDS,)),
     "default"),
    ("spec-empty-targets", lambda gm, f, t: lfx.Spec([]), "targets"),
    ("spec-method-not-a-method", lambda gm, f, t: lfx.Spec(["q_proj"], "lora"), "method"),
    ("spec-mapping-value-not-a-method", lambda gm, f, t: lfx.Spec({"q_proj": 4}), "q_proj"),
    ("spec-bad-regex", lambda gm, f, t: lfx.rewrite(Small(), lfx.Spec(["q_proj("]), example_inputs=(IDS,)), "q_proj("),
    ("lora-rank-string", lambda gm, f, t: lfx.LoRA(rank="8"), "rank"),
    ("lora-alpha-nan", lambda gm, f, t: lfx.LoRA(alpha=math.nan), "alpha"),
    ("lora-alpha-zero", lambda gm, f, t: lfx.LoRA(alpha=0), "alpha"),
    ("lora-dropout-one", lambda gm, f, t: lfx.LoRA(dropout=1.0), "dropout"),
    ("lora-unknown-init", lambda gm, f, t: lfx.LoRA(init="xavier"), "init"),
    ("randlora-unknown-form", lambda gm, f, t: lfx.RandLoRA(form="fast"), "form"),
    ("randlora-negative-seed", lambda gm, f, t: lfx.RandLoRA(seed=-1), "seed"),
    ("lorta-head-dim-zero", lambda gm, f, t: lfx.LoRTA(head_dim=0), "head_dim"),
    ("tokens-negative-index", lambda gm, f, t: lfx.TrainableTokens(indices=[-1]), "indices"),
    ("merge-not-a-graph", lambda gm, f, t: lfx.merge(Small()), "lfx.rewrite returned"),
    ("merge-negative-tolerance", lambda gm, f, t: lfx.merge(gm, tolerance=-1.0), "tolerance"),
    ("merged-state-dict-plain-module", lambda gm, f, t: lfx.merged_state_dict(Small()), "lfx.rewrite returned"),
    ("load-merged-other-model", lambda gm, f, t: lfx.load_merged(nn.Linear(3, 3), gm), "weight"),
    ("save-adapters-unknown-adapter", lambda gm, f, t: lfx.save_adapters(gm, t / "x.safetensors", adapters="nope"),
     "nope"),
    ("save-adapters-plain-module", lambda gm, f, t: lfx.save_adapters(Small(), t / "x.safetensors"), "adapter"),
    ("save-adapters-path-is-a-folder", lambda gm, f, t: lfx.save_adapters(gm, t), "{tmp}"),
    ("load-adapters-missing-file", lambda gm, f, t: lfx.load_adapters(gm, t / "missing.safetensors"), "missing"),
    ("load-adapters-not-safetensors", lambda gm, f, t: lfx.load_adapters(gm, _write(t / "a.safetensors", "hello")),
     "a.safetensors"),
    ("load-adapters-unknown-name", lambda gm, f, t: lfx.load_adapters(gm, f, adapters="nope"), "nope"),
    ("load-adapters-other-model", lambda gm, f, t: lfx.load_adapters(nn.Sequential(nn.Linear(8, 8)), f,
                                                                     example_inputs=(torch.randn(2, 8),)), "q_proj"),
    ("load-peft-missing-folder", lambda gm, f, t: lfx.load_peft(Small(), t / "nope", example_inputs=(IDS,)), "nope"),
    ("load-peft-folder-without-config", lambda gm, f, t: lfx.load_peft(Small(), t, example_inputs=(IDS,)),
     "adapter_config.json"),
    ("load-peft-config-not-json", lambda gm, f, t: (_write(t / "adapter_config.json", "{oops"),
                                                    lfx.load_peft(Small(), t, example_inputs=(IDS,))), "adapter_config"),
    ("save-peft-unknown-adapter", lambda gm, f, t: lfx.save_peft(gm, t / "p", adapter="nope"), "nope"),
    ("set-active-unknown", lambda gm, f, t: lfx.set_active_adapters(gm, "nope"), "nope"),
    ("set-active-number", lambda gm, f, t: lfx.set_active_adapters(gm, 3), "3"),
    ("active-adapters-plain-module", lambda gm, f, t: lfx.active_adapters(Small()), "lfx.rewrite returned"),
    ("export-onnx-bad-mode", lambda gm, f, t: lfx.export_onnx(gm, t / "m.onnx", example_inputs=(IDS,), mode="fast"),
     "mode"),
    ("export-onnx-unknown-adapter", lambda gm, f, t: lfx.export_onnx(gm, t / "m.onnx", example_inputs=(IDS,),
                                                                     mode="adapters",
                                                                     adapters=["nope"]), "nope"),
    ("export-onnx-path-is-a-folder", lambda gm, f, t: lfx.export_onnx(gm, t, example_inputs=(IDS,)), "{tmp}"),
    ("export-onnx-adapter-unknown", lambda gm, f, t: lfx.export_onnx_adapter(gm, t / "a.onnx_adapter", adapter="nope"),
     "nope"),
    ("session-missing-model", lambda gm, f, t: lfx.AdapterSession(t / "missing.onnx"), "missing.onnx"),
    ("session-missing-adapter-file", lambda gm, f, t: lfx.AdapterSession(
        lfx.export_onnx(gm, t / "m.onnx", example_inputs=(IDS,), mode="adapters").path,
        adapters={"a": t / "missing.onnx_adapter"}),
     "missing.onnx_adapter"),
    ("generation-session-missing-folder", lambda gm, f, t: lfx.GenerationSession(t / "nope"), "nope"),
    ("generate-non-decoder", lambda gm, f, t: lfx.generate(gm, IDS, max_new_tokens=2), "causal"),
    ("generate-zero-tokens", lambda gm, f, t: lfx.generate(gm, IDS, max_new_tokens=0), "max_new_tokens"),
    ("quantize-unknown-scheme", lambda gm, f, t: lfx.quantize_base(Small(), "int3"), "int3"),
    ("quantize-not-a-module", lambda gm, f, t: lfx.quantize_base("model", "int8"), "nn.Module"),
    ("loraplus-negative-lr", lambda gm, f, t: lfx.loraplus_optimizer(gm, lr=-1.0), "lr"),
    ("loraplus-plain-module", lambda gm, f, t: lfx.loraplus_optimizer(Small(), lr=1e-3), "lfx.rewrite returned"),
    ("trainer-unknown-schedule", lambda gm, f, t: lfx.Trainer(gm, lambda out, b: out.sum(), schedule="step"),
     "schedule"),
    ("trainer-accumulate-zero", lambda gm, f, t: lfx.Trainer(gm, lambda out, b: out.sum(), accumulate=0), "accumulate"),
    ("trainer-negative-lr", lambda gm, f, t: lfx.Trainer(gm, lambda out, b: out.sum(), lr=-1.0), "lr"),
    ("trainer-loss-fn-not-callable", lambda gm, f, t: lfx.Trainer(gm, "mse"), "loss_fn"),
    ("trainer-min-lr-ratio-above-one", lambda gm, f, t: lfx.Trainer(gm, lambda out, b: out.sum(), min_lr_ratio=2.0),
     "min_lr_ratio"),
    ("trainer-max-grad-norm-zero", lambda gm, f, t: lfx.Trainer(gm, lambda out, b: out.sum(), max_grad_norm=0.0),
     "max_grad_norm"),
    ("checkpoint-layers-plain-module", lambda gm, f, t: lfx.checkpoint_layers(Small()), "lfx.rewrite returned"),
    # flags given as strings ("yes", "no" are truthy) or numbers are refused, not read as True
    ("rewrite-dynamic-not-a-bool", lambda gm, f, t: lfx.rewrite(Small(), lfx.Spec(["q_proj"]), example_inputs=(IDS,),
                                                               dynamic="yes"), "dynamic"),
    ("rewrite-trace-blocks-not-a-bool", lambda gm, f, t: lfx.rewrite(Small(), lfx.Spec(["q_proj"]),
                                                                    example_inputs=(IDS,), trace_blocks="no"),
     "trace_blocks"),
    ("rewrite-cache-dir-is-a-file", lambda gm, f, t: lfx.rewrite(Small(), lfx.Spec(["q_proj"]), example_inputs=(IDS,),
                                                                cache_dir=_write(t / "cache", "x")), "is a file"),
    ("merge-inplace-not-a-bool", lambda gm, f, t: lfx.merge(gm, inplace="yes"), "inplace"),
    ("merged-state-dict-untie-not-a-bool", lambda gm, f, t: lfx.merged_state_dict(gm, untie="yes"), "untie"),
    ("load-merged-model-not-a-module", lambda gm, f, t: lfx.load_merged("model", gm), "nn.Module"),
    ("save-adapters-path-none", lambda gm, f, t: lfx.save_adapters(gm, None), "file path"),
    ("save-adapters-include-buffers-not-a-bool", lambda gm, f, t: lfx.save_adapters(gm, t / "x.safetensors",
                                                                                  include_buffers="yes"),
     "include_buffers"),
    ("fuse-sites-plain-module", lambda gm, f, t: fuse_sites(Small()), "lfx.rewrite returned"),
    ("quantize-exclude-not-patterns", lambda gm, f, t: lfx.quantize_base(Small(), "int8", exclude=3), "exclude"),
    ("loraplus-optimizer-not-a-class", lambda gm, f, t: lfx.loraplus_optimizer(gm, lr=1e-3, optimizer_cls="adam"),
     "optimizer_cls"),
    ("trainer-optimizer-not-a-class", lambda gm, f, t: lfx.Trainer(gm, lambda out, b: out.sum(), optimizer_cls="adamw"),
     "optimizer_cls"),
    ("trainer-optimizer-unknown-option", lambda gm, f, t: lfx.Trainer(gm, lambda out, b: out.sum(), betas_typo=(0.9, 0.9)),
     "betas_typo"),
    ("trainer-unknown-backend", lambda gm, f, t: lfx.Trainer(gm, lambda out, b: out.sum(), compile="fastest"),
     "not a torch.compile backend"),
    ("trainer-autocast-not-a-bool", lambda gm, f, t: lfx.Trainer(gm, lambda out, b: out.sum(), autocast="bf16"),
     "autocast"),
    ("fit-loss-not-from-the-model", lambda gm, f, t: lfx.Trainer(
        gm, lambda model, b: torch.tensor(1.0, requires_grad=True), compile=False, progress=False).fit([IDS], steps=1),
     "leaf tensor"),
    ("export-onnx-opset-too-old", lambda gm, f, t: lfx.export_onnx(gm, t / "m.onnx", example_inputs=(IDS,), opset=3),
     "opset"),
    ("export-onnx-external-data-not-a-bool", lambda gm, f, t: lfx.export_onnx(gm, t / "m.onnx", example_inputs=(IDS,),
                                                                             external_data="yes"), "external_data"),
    ("export-onnx-folder-not-writable", lambda gm, f, t: lfx.export_onnx(gm, _write(t / "file", "x") / "m.onnx",
                                                                         example_inputs=(IDS,)),
     "cannot write {tmp}/file/m.onnx"),
    ("quantize-groups-fit-no-layer", lambda gm, f, t: lfx.quantize_base(Small(), "int4", group_size=7),
     "int4 groups (7) do not divide its 8 inputs'}; choose a scheme"),
    ("save-adapters-under-a-file", lambda gm, f, t: lfx.save_adapters(gm, _write(t / "file", "x") / "a.safetensors"),
     "{tmp}/file is a file, not a folder"),
    ("call-with-another-input-dtype", lambda gm, f, t: gm(IDS.float()), "captured with int64 ids"),
    ("export-onnx-adapter-model-missing", lambda gm, f, t: lfx.export_onnx_adapter(gm, t / "a.onnx_adapter",
                                                                                   model_path=t / "none.onnx"),
     "none.onnx"),
]


@pytest.mark.parametrize("call,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(gm, saved, tmp_path, call, fragment):
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    active = lfx.active_adapters(gm)
    with pytest.raises(lfx.LowRankFxError) as info:
        call(gm, saved, tmp_path)
    fragment = fragment.replace("{tmp}", str(tmp_path))
    assert fragment in str(info.value), f"the message does not name {fragment!r}: {info.value}"
    after = gm.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert lfx.active_adapters(gm) == active


class Wrapped(nn.Module):
    """One linear layer straight under the root, fed by the graph input (its width a fixed SymInt)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 32)

    def forward(self, x):
        return self.lin(x)


def test_a_quantized_layer_fed_by_the_input_is_a_target():
    """Its input width is a SymInt the capture fixed to 64; it used to be taken for a varying size, so
    the layer was not found and LoRA on it was refused as 'not a linear-like op'."""
    torch.manual_seed(0)
    model = lfx.quantize_base(Wrapped(), "int8")
    x = torch.randn(2, 3, 64)
    gm = lfx.rewrite(model, lfx.Spec(["lin"], lfx.LoRA(rank=2, init="nonzero")), example_inputs=(x,))
    unit = gm.lowrank_fx["default"]["lora"].units["lin"]
    dense = model.lin.weight.dequantize()  # torchao's own decoding of the int8 weight
    want = x @ dense.T + model.lin.bias + unit.scale * (x @ unit.lora_A.T) @ unit.lora_B.T
    got = gm(x)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
