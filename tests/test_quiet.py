"""Quiet by default (lowrank_fx/logs.py, lowrank_fx/noise.py): third-party notices a user cannot
act on are silenced within lowrank_fx's calls only, never process-wide; the library's own
messages are log records on "lowrank_fx", which the logger's level silences."""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import lowrank_fx as lfx
from lowrank_fx import logs, noise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEAFSPEC = "isinstance(treespec, LeafSpec)"
NOISE = (LEAFSPEC, "torchvision is not installed", "Failed to load", "register_constant() on Enum subclasses")
MARK = "--- outside lowrank_fx ---"

# A fresh interpreter, as a user's script: rewrite, export_onnx and quantize_base (which imports
# torchao for the first time), every warning shown; then, after MARK, the same third-party
# operations called directly.
SCRIPT = f"""
import copy, os, sys, tempfile, warnings
import torch
import lowrank_fx as lfx
warnings.simplefilter("always")
x = torch.randn(2, 64)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
gm = lfx.rewrite(model, lfx.Spec(targets=["0", "2"], method=lfx.LoRA(rank=2)), example_inputs=(x,))
lfx.export_onnx(gm, os.path.join(tempfile.mkdtemp(), "m.onnx"), example_inputs=(x,))
lfx.quantize_base(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)), "nf4")
print({MARK!r}, flush=True)
print({MARK!r}, file=sys.stderr, flush=True)
copy.deepcopy(gm.graph)
torch.onnx.export(torch.nn.Linear(4, 4), (torch.randn(2, 4),), dynamo=True, verbose=False)
"""


def _mlp_graph():
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    return lfx.rewrite(model, lfx.Spec(targets=["0", "2"], method=lfx.LoRA(rank=2)),
                       example_inputs=(torch.randn(4, 8),))


def _mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _batches(n=3):
    return [(torch.randn(4, 8), torch.randn(4, 4)) for _ in range(n)]


@pytest.fixture
def loud(monkeypatch):
    monkeypatch.delenv(logs.QUIET, raising=False)
    yield
    logs.configure()  # the suite's own setup again: no default handler left behind


def test_a_users_script_sees_no_third_party_noise_from_our_calls_but_sees_it_from_its_own():
    env = {k: v for k, v in os.environ.items() if k != logs.QUIET}
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ours_err, theirs_err = done.stderr.split(MARK + "\n")
    ours_out = done.stdout.split(MARK + "\n")[0]
    for phrase in NOISE:
        assert phrase not in ours_err and phrase not in ours_out, (phrase, ours_err)
    assert "lowrank_fx: capturing the model (torch.export): done in " in ours_err  # our own lines stay
    assert LEAFSPEC in theirs_err  # torch's pytree warning, from the script's own deepcopy
    if importlib.util.find_spec("torchvision") is None:  # torch.onnx's notice on every export
        assert "torchvision is not installed" in theirs_err


def test_the_pytree_warning_of_a_capture_is_silenced_there_and_shown_outside():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        gm = _mlp_graph()
        inside = [str(w.message) for w in seen]
        copy.deepcopy(gm.graph)  # the same torch code, called by the application itself
        outside = [str(w.message) for w in seen[len(inside):]]
    assert not [m for m in inside if LEAFSPEC in m]
    assert [m for m in outside if LEAFSPEC in m]


def test_a_known_noise_record_is_dropped_inside_only(caplog):
    caplog.set_level(logging.WARNING)
    torchao_log = logging.getLogger("torchao")
    with noise.quiet_third_party():
        torchao_log.warning("Failed to load /x/_C_mxfp8.so: Could not load this library")
        torchao_log.warning("a torchao warning that is not noise")
    torchao_log.warning("Failed to load /x/_C_mxfp8.so: Could not load this library")
    assert [r.getMessage() for r in caplog.records if r.name == "torchao"] == [
        "a torchao warning that is not noise", "Failed to load /x/_C_mxfp8.so: Could not load this library"]


def test_warnings_and_logger_filters_are_restored_after_an_error_inside_a_call():
    class Broken(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
                return x
            return -x

    before = list(warnings.filters)
    loggers = {name: list(logging.getLogger(name).filters) for name in noise.RECORDS}
    with pytest.raises(lfx.CaptureError):
        lfx.rewrite(Broken(), lfx.Spec(targets=["*"], method=lfx.LoRA(rank=2)), example_inputs=(torch.randn(2, 3),))
    with pytest.raises(KeyError), noise.quiet_third_party():
        assert len(warnings.filters) == len(before) + len(noise.WARNINGS)
        raise KeyError("inside")
    assert warnings.filters == before
    assert {name: list(logging.getLogger(name).filters) for name in noise.RECORDS} == loggers


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("lowrank_fx")]


def test_the_first_compiled_step_logs_that_it_compiles_and_later_steps_do_not(loud, caplog):
    caplog.set_level(logging.INFO, logger="lowrank_fx")
    trainer = lfx.Trainer(_mlp_graph(), _mse, compile="aot_eager", progress=False)
    caplog.clear()
    trainer.fit(_batches(), steps=3)
    compiling = [line for line in _lines(caplog) if "compiling the training step" in line]
    assert compiling[0] == "compiling the training step with torch.compile (first step only) ..."
    assert compiling[1].startswith("compiling the training step with torch.compile (first step only): done in ")
    assert len(compiling) == 2
    caplog.clear()
    trainer.fit(_batches(), steps=5)
    assert not [line for line in _lines(caplog) if "compiling" in line]


def test_the_compile_line_reaches_stderr_without_logging_configured(loud, monkeypatch, capfd):
    trainer = lfx.Trainer(_mlp_graph(), _mse, compile="aot_eager", progress=False)
    with monkeypatch.context() as patched:
        patched.setattr(logging.getLogger(), "handlers", [])
        trainer.fit(_batches(1), steps=1)
    assert "lowrank_fx: compiling the training step with torch.compile (first step only) ...\n" in capfd.readouterr().err


def test_the_logger_level_silences_our_records(loud, caplog):
    caplog.set_level(logging.WARNING, logger="lowrank_fx")
    trainer = lfx.Trainer(_mlp_graph(), _mse, compile="aot_eager", progress=False)
    trainer.fit(_batches(1), steps=1)
    assert not _lines(caplog)


def test_compiled_generation_says_once_that_it_compiles(loud, caplog):
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    gm = lfx.rewrite(model, lfx.Spec(targets=["q_proj", "v_proj"], method=lfx.LoRA(rank=2)),
                     example_kwargs={"input_ids": torch.randint(3, 64, (2, 6)), "use_cache": False})
    caplog.set_level(logging.INFO, logger="lowrank_fx")
    ids = torch.randint(3, 64, (1, 5))
    lfx.generate(gm, ids, max_new_tokens=2, eos_token_id=[], compile="aot_eager")
    lfx.generate(gm, ids, max_new_tokens=2, eos_token_id=[], compile="aot_eager")
    notes = [line for line in _lines(caplog) if "compil" in line]
    assert notes == [("compiling the decode step with torch.compile on its first calls "
                      "(later calls with these adapters reuse it)")]
