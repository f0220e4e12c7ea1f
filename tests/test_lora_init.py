"""LoRA's other initialisations (gaussian, orthogonal, PiSSA, OLoRA) against PEFT 0.21.

With the same model and the same seed, our A, B, the graph's base weight (the residual
W − s·B A for PiSSA / OLoRA) and the outputs equal PEFT's (max-relative error ≤ 1e-5, fp32).
The user's model keeps W. Folding gives W + ΔW of training; PEFT directories round-trip both
ways, including PEFT's conversion of PiSSA / OLoRA to a plain rank-2r LoRA.
"""

from __future__ import annotations

import copy
import json

import models
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import lowrank_fx as lfx

RANK, ALPHA, SEED, TOL = 4, 8, 7, 1e-5
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max |want| (exact equality asked of an all-zero `want`)."""
    got, want = got.detach().double(), want.detach().double()
    scale = want.abs().max()
    if scale == 0:
        return float((got - want).abs().max())
    return float((got - want).abs().max() / scale)


@pytest.fixture(scope="module")
def cases():
    """Each family's model, its weights and its outputs before any rewrite."""
    built = {family: models.build(family) for family in TARGETS}
    for case in built.values():
        case.weights = {k: v.clone() for k, v in case.model.state_dict().items()}
        case.base = _out(case, case.model)
    return built


def _ours(case, family, init, dora=False):
    """Our graph over the case's own model: every rewrite reuses one capture, and none changes
    the model (which the tests check)."""
    torch.manual_seed(SEED)
    spec = lfx.Spec(targets=TARGETS[family], method=lfx.LoRA(rank=RANK, alpha=ALPHA, init=init, dora=dora))
    return lfx.rewrite(case.model, spec, example_inputs=case.args, example_kwargs=case.kwargs)


def _peft(case, family, init, dora=False):
    torch.manual_seed(SEED)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS[family], init_lora_weights=init,
                        use_dora=dora, fan_in_fan_out=family == "gpt2")
    return get_peft_model(copy.deepcopy(case.model), config)


def _layers(peft_model) -> dict:
    return {name: module for name, module in peft_model.get_base_model().named_modules()
            if hasattr(module, "lora_A") and "default" in module.lora_A}


def _group(gm):
    adapter = gm.lowrank_fx.default
    return adapter["dora"] if "dora" in adapter else adapter["lora"]


def _out(case, model, args=None):
    with torch.no_grad():
        return case.output(model(*(args or case.args), **case.kwargs))


def _train(gm, peft_model=None, seed=1):
    """The same small step on both: every factor moves by the same random amount."""
    group = _group(gm)
    layers = _layers(peft_model) if peft_model is not None else {}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for target in group.target_names:
            unit = group.unit(target)
            for name in ("lora_A", "lora_B"):
                step = torch.randn(getattr(unit, name).shape, generator=generator) * 0.05
                getattr(unit, name).add_(step)
                if target in layers:
                    getattr(layers[target], name)["default"].weight.add_(step)


PARITY = [("llama", "gaussian", False), ("llama", "orthogonal", False), ("llama", "pissa", False),
          ("llama", "pissa_niter_2", False), ("llama", "olora", False), ("gpt2", "pissa", False),
          ("gpt2", "pissa_niter_2", False), ("llama", "pissa", True), ("llama", "olora", True)]


@pytest.mark.parametrize("family,init,dora", PARITY, ids=[f"{f}-{i}{'-dora' if d else ''}" for f, i, d in PARITY])
def test_peft_parity(cases, family, init, dora):
    case = cases[family]
    model = case.model
    gm = _ours(case, family, init, dora)
    peft_model = _peft(case, family, init, dora)
    layers = _layers(peft_model)
    group = _group(gm)
    assert sorted(layers) == sorted(group.target_names)
    changed = 0
    for target, layer in layers.items():
        unit = group.unit(target)
        assert err(unit.lora_A, layer.lora_A["default"].weight) <= TOL, target
        assert err(unit.lora_B, layer.lora_B["default"].weight) <= TOL, target
        base = gm.get_parameter(f"{target}.weight")
        assert err(base, layer.base_layer.weight) <= TOL, target
        if dora:
            assert err(unit.lora_magnitude, layer.lora_magnitude_vector["default"].weight) <= TOL, target
        changed += not torch.equal(base, model.get_parameter(f"{target}.weight"))
    assert changed == (len(layers) if init in ("pissa", "pissa_niter_2", "olora") else 0)
    assert err(_out(case, gm), _out(case, peft_model)) <= TOL
    # the user's model keeps W: its weights and outputs are the original ones
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in case.weights.items())
    assert err(_out(case, model), case.base) == 0


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_fold_gives_the_trained_dense_weight(cases, init):
    case = cases["llama"]
    model = case.model
    gm = _ours(case, "llama", init)
    assert err(_out(case, gm), _out(case, model)) <= TOL  # W_res + s·B₀A₀ = W
    group = _group(gm)
    initial = {t: (group.unit(t).lora_A.detach().clone(), group.unit(t).lora_B.detach().clone())
               for t in group.target_names}
    _train(gm)
    want = _out(case, gm)
    state = lfx.merged_state_dict(gm)
    scale = ALPHA / RANK
    for target, (a0, b0) in initial.items():  # W + s·(B A − B₀ A₀), the update of training on W
        unit = group.unit(target)
        dense = model.get_parameter(f"{target}.weight") + scale * (unit.lora_B @ unit.lora_A - b0 @ a0)
        assert err(state[f"{target}.weight"], dense) <= TOL, target
    fresh = copy.deepcopy(case.model)
    fresh.load_state_dict(state)
    assert err(_out(case, fresh), want) <= TOL
    assert err(_out(case, lfx.merge(gm)), want) <= TOL
    loaded = lfx.load_merged(copy.deepcopy(case.model), gm)
    assert err(_out(case, loaded), want) <= TOL


def test_onnx_merged_pissa(cases, tmp_path):
    case = cases["llama"]
    gm = _ours(case, "llama", "pissa")
    _train(gm)
    result = lfx.export_onnx(gm, tmp_path / "pissa.onnx", example_inputs=case.args, example_kwargs=case.kwargs,
                             mode="merged", optimize=False)
    got = result.session().run({"input_ids": case.other_args[0]})["logits"]
    want = _out(case, gm, case.other_args)
    assert err(torch.from_numpy(np.asarray(got)), want) <= 1e-4


@pytest.mark.parametrize("init", ["pissa", "olora", "orthogonal"])
def test_peft_directories_both_ways(cases, tmp_path, init):
    case = cases["llama"]
    gm, peft_model = _ours(case, "llama", init), _peft(case, "llama", init)
    if init != "orthogonal":  # PEFT's conversion reads the initial adapter from a directory
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(tmp_path / "initial")
        peft_model.peft_config["default"].init_lora_weights = init
    _train(gm, peft_model)
    want = _out(case, gm)
    assert err(want, _out(case, peft_model)) <= TOL

    lfx.save_peft(gm, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["init_lora_weights"] == init
    theirs = PeftModel.from_pretrained(copy.deepcopy(case.model), tmp_path / "ours")  # redoes the init on W
    assert err(_out(case, theirs), want) <= TOL

    peft_model.save_pretrained(tmp_path / "peft")
    loaded = lfx.load_peft(case.model, tmp_path / "peft", example_inputs=case.args,
                           example_kwargs=case.kwargs)
    assert err(_out(case, loaded), want) <= TOL
    if init == "orthogonal":
        return
    # a graph whose adapter kept the original base cannot take PiSSA / OLoRA values
    with pytest.raises(lfx.AdapterFileError, match=f"init='{init}' in the file"):
        lfx.load_peft(_ours(case, "llama", "default"), tmp_path / "peft")

    lfx.save_peft(gm, tmp_path / "plain", as_plain_lora=True)
    peft_model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ours, peft = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("plain", "converted"))
    assert sorted(ours) == sorted(peft)
    assert max(err(ours[key], peft[key]) for key in peft) <= TOL
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (2 * RANK, 2 * ALPHA, True)
    plain = PeftModel.from_pretrained(copy.deepcopy(case.model), tmp_path / "plain")  # on the ORIGINAL base
    assert err(_out(case, plain), want) <= TOL


BAD = [
    (dict(init="pisa"), "init must be one of"),
    (dict(init="pissa_niter_x"), "init must be one of"),
    (dict(init=True), "init must be one of"),
    (dict(init="loftq_2bit"), "init must be one of"),
    (dict(init="loftq_iter_0"), "init must be one of"),
    (dict(init="eva", bias=True), "only allowed with the default init"),
    (dict(init="corda", alpha=-8), "positive scale"),
    (dict(init="orthogonal", rank=3), "needs an even rank"),
    (dict(init="pissa", bias=True), "only allowed with the default init"),
    (dict(init="olora", dora=True, bias=True), "only allowed with the default init"),
    (dict(init="pissa", alpha=-8), "positive scale"),
]


@pytest.mark.parametrize("options,message", BAD, ids=[str(o) for o, _ in BAD])
def test_bad_options(options, message):
    with pytest.raises(lfx.SpecError, match=message):
        lfx.LoRA(**options)


def test_bad_targets(cases, tmp_path):
    case = cases["llama"]
    model = case.model
    with pytest.raises(lfx.SpecError, match="at most min"):
        lfx.rewrite(model, lfx.Spec(targets=["q_proj"], method=lfx.LoRA(rank=64, init="pissa")),
                    example_inputs=case.args, example_kwargs=case.kwargs)
    with pytest.raises(lfx.SpecError, match="linear layers only"):
        lfx.rewrite(model, lfx.Spec(targets=["embed_tokens"], method=lfx.LoRA(init="olora")),
                    example_inputs=case.args, example_kwargs=case.kwargs)
    gpt2 = cases["gpt2"]
    with pytest.raises(lfx.SpecError, match="also used outside"):  # GPT-2's head is tied to its embedding
        lfx.rewrite(gpt2.model, lfx.Spec(targets=["lm_head"], method=lfx.LoRA(init="pissa")),
                    example_inputs=gpt2.args, example_kwargs=gpt2.kwargs)
    torch.manual_seed(0)
    quantized = lfx.quantize_base(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                                      torch.nn.Linear(64, 64)), "int8")
    with pytest.raises(lfx.SpecError, match="already quantized"):
        lfx.rewrite(quantized, lfx.Spec(targets=["2"], method=lfx.LoRA(init="loftq")),
                    example_inputs=(torch.randn(2, 64),))
    gm = _ours(case, "llama", "gaussian")
    with pytest.raises(lfx.AdapterFileError, match="converts PiSSA / OLoRA"):
        lfx.save_peft(gm, tmp_path / "x", as_plain_lora=True)


def test_in_place_merge_writes_the_model():
    """merge(inplace=True) promises the model W + ΔW: a PiSSA target's folded weight goes back
    into the model's own tensor; an inactive PiSSA adapter leaves the model alone."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)
    original = [model[0].weight, model[2].weight]
    values = [w.detach().clone() for w in original]
    spec = lfx.Spec(targets=["0", "2"], method=lfx.LoRA(rank=2, init="pissa"))
    gm = lfx.rewrite(model, spec, example_inputs=(x,))
    _train(gm)
    want = gm(x)
    assert all(torch.equal(w, v) for w, v in zip(original, values))  # untouched until asked
    lfx.merge(gm, inplace=True)
    assert model[0].weight is original[0] and not torch.equal(original[0], values[0])
    assert gm.get_parameter("0.weight") is original[0]
    assert err(model(x), want) <= TOL and err(gm(x), want) <= TOL

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    base = model(x)
    gm = lfx.rewrite(model, spec, example_inputs=(x,))
    lfx.set_active_adapters(gm, [])
    lfx.merge(gm, inplace=True)
    assert err(model(x), base) == 0


def _peft_loftq(weight: torch.Tensor, bits: int, rank: int, iters: int):
    """PEFT's loftq_init loop on the CPU: bitsandbytes' own NF4 / int8 round trips (what PEFT calls,
    on a GPU) and PEFT's own low-rank split. Returns (Q, A, B)."""
    import bitsandbytes.functional as bnbf
    from peft.utils.loftq_utils import _low_rank_decomposition

    def round_trip(value):
        if bits == 4:
            packed, state = bnbf.quantize_4bit(value, blocksize=64, compress_statistics=False, quant_type="nf4")
            return bnbf.dequantize_4bit(packed, state)
        data, stats, _ = bnbf.int8_vectorwise_quant(value)
        return bnbf.int8_vectorwise_dequant(data, stats)

    residual = weight
    for step in range(iters):
        base = round_trip(residual)
        split = _low_rank_decomposition(weight - base, reduced_rank=rank)
        if step + 1 < iters:
            residual = weight - split["L"] @ split["R"]
    return base, split["R"], split["L"]


@pytest.fixture(scope="module")
def mlp():
    """An MLP whose layers take 64 and 128 inputs: bitsandbytes' CPU NF4 kernel, the oracle here,
    agrees with its GPU kernel (PEFT's) only when a row is a whole number of 64-value blocks."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).eval()
    x = torch.randn(5, 64)
    with torch.no_grad():
        return model, x, model(x), {k: v.clone() for k, v in model.state_dict().items()}


def _rewrite_mlp(mlp, init, alpha):
    torch.manual_seed(SEED)
    return lfx.rewrite(mlp[0], lfx.Spec(targets=["0", "2"], method=lfx.LoRA(rank=RANK, alpha=alpha, init=init)),
                       example_inputs=(mlp[1],))


@pytest.mark.parametrize("init,bits,iters", [("loftq", 4, 1), ("loftq_8bit_iter_2", 8, 2), ("loftq_iter_3", 4, 3)])
def test_loftq_matches_peft(mlp, init, bits, iters):
    """At alpha = r (s = 1) our A, B and base are PEFT's; the model starts at Q + B A ≈ W."""
    model, x, base_out, weights = mlp
    gm = _rewrite_mlp(mlp, init, RANK)
    group = _group(gm)
    for target in group.target_names:
        weight = model.get_parameter(f"{target}.weight").detach()
        base, a, b = _peft_loftq(weight, bits, RANK, iters)
        ours, unit = gm.get_parameter(f"{target}.weight"), group.unit(target)
        assert err(ours, base) <= TOL, target
        assert err(unit.lora_A, a) <= TOL and err(unit.lora_B, b) <= TOL, target
        # the factors take up part of what quantizing lost: Q + B A is nearer W than Q alone
        assert (ours + unit.lora_B @ unit.lora_A - weight).norm() < 0.99 * (ours - weight).norm()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    with torch.no_grad():
        assert err(gm(x), base_out) > 0  # the graph runs on Q + B A, not on W


def test_loftq_scale_and_files(mlp, tmp_path):
    """At alpha ≠ r the factors carry 1/√s, so Q + s · B A is still the low-rank fit; the PEFT
    directory says loftq with its loftq_config, and loading it redoes Q on the original weights."""
    model, x, _, _ = mlp
    gm = _rewrite_mlp(mlp, "loftq_8bit", ALPHA)
    group = _group(gm)
    for target in group.target_names:
        _, a, b = _peft_loftq(model.get_parameter(f"{target}.weight").detach(), 8, RANK, 1)
        unit = group.unit(target)
        assert err(unit.scale * unit.lora_B @ unit.lora_A, b @ a) <= TOL, target
    _train(gm)
    with torch.no_grad():
        want = gm(x)
    lfx.save_peft(gm, tmp_path / "loftq")
    config = json.loads((tmp_path / "loftq" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "loftq" and config["loftq_config"] == {"loftq_bits": 8, "loftq_iter": 1}
    loaded = lfx.load_peft(model, tmp_path / "loftq", example_inputs=(x,))
    with torch.no_grad():
        assert err(loaded(x), want) <= TOL
    with pytest.raises(lfx.AdapterFileError, match="quantized base Q is not"):
        lfx.save_peft(gm, tmp_path / "plain", as_plain_lora=True)


def _peft_corda():
    """PEFT's CorDA module; it imports `attr.dataclass` (the attrs package, not installed here),
    which for its one plain record class is the standard dataclass."""
    import dataclasses
    import sys
    import types
    sys.modules.setdefault("attr", types.SimpleNamespace(dataclass=dataclasses.dataclass))
    from peft.tuners.lora import corda
    return corda


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_matches_peft(cases, tmp_path, method):
    """CorDA from the same calibration samples (PEFT's hook reads batches of one): A, B, base and
    outputs are PEFT's; save_peft writes corda and its method, load_peft refuses it (the data pass
    would be needed again) and the plain-LoRA conversion loads into PEFT on the original model."""
    from peft.tuners.lora.config import CordaConfig
    corda = _peft_corda()
    case = cases["llama"]
    generator = torch.Generator().manual_seed(3)
    samples = [torch.randint(0, models.VOCAB, (1, 9), generator=generator) for _ in range(6)]
    init = "corda" if method == "ipm" else "corda_kpm"
    torch.manual_seed(SEED)
    gm = lfx.rewrite(case.model, lfx.Spec(targets=TARGETS["llama"], method=lfx.LoRA(rank=RANK, alpha=ALPHA, init=init)),
                     example_inputs=case.args, example_kwargs=case.kwargs,
                     calibration=lambda graph: [graph(ids, **case.kwargs) for ids in samples])
    reference = copy.deepcopy(case.model)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS["llama"], init_lora_weights="corda",
                        corda_config=CordaConfig(corda_method=method))
    corda.preprocess_corda(reference, config, run_model=lambda: [reference(ids, **case.kwargs) for ids in samples])
    torch.manual_seed(SEED)
    peft_model = get_peft_model(reference, config)
    group = _group(gm)
    for target, layer in _layers(peft_model).items():
        assert err(group.unit(target).lora_A, layer.lora_A["default"].weight) <= TOL, target
        assert err(group.unit(target).lora_B, layer.lora_B["default"].weight) <= TOL, target
        assert err(gm.get_parameter(f"{target}.weight"), layer.base_layer.weight) <= TOL, target
    assert err(_out(case, gm), _out(case, peft_model)) <= TOL
    assert all(torch.equal(v, case.model.state_dict()[k]) for k, v in case.weights.items())
    assert "_record" not in gm.code  # no recording node is left
    _train(gm)
    want = _out(case, gm)
    lfx.save_peft(gm, tmp_path / "corda")
    config = json.loads((tmp_path / "corda" / "adapter_config.json").read_text())
    assert (config["init_lora_weights"], config["corda_config"]) == ("corda", {"corda_method": method})
    with pytest.raises(lfx.AdapterFileError, match="init_lora_weights='corda'"):
        lfx.load_peft(case.model, tmp_path / "corda", example_inputs=case.args, example_kwargs=case.kwargs)
    lfx.save_peft(gm, tmp_path / "plain", as_plain_lora=True)
    plain = PeftModel.from_pretrained(copy.deepcopy(case.model), tmp_path / "plain")
    assert err(_out(case, plain), want) <= TOL


def test_corda_needs_a_calibration_run(mlp):
    model, x, _, _ = mlp
    spec = lfx.Spec(targets=["0", "2"], method=lfx.LoRA(rank=RANK, init="corda"))
    with pytest.raises(lfx.SpecError, match="calibration=run"):
        lfx.rewrite(model, spec, example_inputs=(x,))
    with pytest.raises(lfx.SpecError, match="never reached 0, 2"):
        lfx.rewrite(model, spec, example_inputs=(x,), calibration=lambda graph: None)
    with pytest.raises(ZeroDivisionError):  # the user's own error goes through; later captures are clean
        lfx.rewrite(model, spec, example_inputs=(x,), calibration=lambda graph: 1 / 0)
    gm = lfx.rewrite(model, lfx.Spec(targets=["0"], method=lfx.LoRA(rank=RANK)), example_inputs=(x,))
    assert "_record" not in gm.code


def test_generate_runs_on_the_residual_base(cases):
    """lfx.generate's KV-cache graph shares the adapter and reads the graph's residual base:
    greedy tokens equal transformers' generate on the folded model."""
    case = cases["llama"]
    gm = _ours(case, "llama", "pissa")
    _train(gm, seed=2)
    ids = case.args[0][:1]
    got = lfx.generate(gm, ids, max_new_tokens=6, eos_token_id=[])
    merged = lfx.load_merged(copy.deepcopy(case.model), gm)
    want = merged.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(got, want)
    assert all(torch.equal(v, case.model.state_dict()[k]) for k, v in case.weights.items())
