"""Compiled `lfx.generate`: compiles once for one row and once for larger batches, sees a changed
module, and its tokens stay transformers'.

Oracle: transformers' `generate()` on a copy of the model with the adapter folded in, as in
test_generation.py (whose tiny Llama and helpers this file reuses). The no-recompile check is
torch._dynamo's own: `error_on_recompile` raises on any second compile of a frame.
"""

from __future__ import annotations

import torch
import torch._dynamo
from test_generation import Family, built, hf_generate, prompts, rel

import lowrank_fx as lfx


def _llama():
    return built("llama", lambda: Family("llama"))


def _check(gm, merged, ids, steps):
    got = lfx.generate(gm, ids, adapters="a", max_new_tokens=steps, eos_token_id=[], compile="aot_eager",
                       output_logits=True)
    want = hf_generate(merged, ids, max_new_tokens=steps, eos_token_id=None)
    assert torch.equal(got.sequences, want.sequences)
    assert rel(got.logits, want.logits) < 1e-5


def test_batch_sizes_compile_once_each_way():
    """One row compiles its own prompt and token graphs (a matrix-vector step), every batch of 2
    and more shares another pair; after both, no batch size, prompt length or count compiles."""
    llama = _llama()
    torch._dynamo.reset()
    ids = torch.cat(prompts(21, lengths=(6, 6, 6, 6)))
    try:
        _check(llama.gm, llama.merged["a"], ids[:1], 4)
        _check(llama.gm, llama.merged["a"], ids[:2], 3)  # 2 rows, as many as the model's KV heads
        with torch._dynamo.config.patch(error_on_recompile=True):
            for rows, width, steps in ((4, 6, 5), (1, 5, 6), (3, 4, 3), (2, 6, 2)):
                _check(llama.gm, llama.merged["a"], ids[:rows, :width], steps)
    finally:
        torch._dynamo.reset()


def test_a_changed_module_attribute_compiles_again():
    """Dynamo's guards on module attributes are off (compile_options.py); the module check per call
    must see a unit's changed Python scale and give the eager graph's tokens, not the stale ones."""
    from lowrank_fx.methods.lora_unit import LoRAUnit

    llama = _llama()
    torch._dynamo.reset()
    ids = torch.cat(prompts(22, lengths=(5, 5)))
    units = [unit for unit in llama.gm.lowrank_fx["a"].modules() if isinstance(unit, LoRAUnit)]
    scales = [unit.scale for unit in units]
    options = {"adapters": "a", "max_new_tokens": 4, "eos_token_id": [], "output_logits": True}
    try:
        before = lfx.generate(llama.gm, ids, compile="aot_eager", **options)
        for unit in units:
            unit.scale = unit.scale * 40.0
        got = lfx.generate(llama.gm, ids, compile="aot_eager", **options)
        want = lfx.generate(llama.gm, ids, **options)
        assert rel(got.logits, want.logits) < 1e-5
        assert rel(got.logits, before.logits) > 1e-3  # the scale did change the logits
    finally:
        for unit, scale in zip(units, scales):
            unit.scale = scale
        torch._dynamo.reset()
