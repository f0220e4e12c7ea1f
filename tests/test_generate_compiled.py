"""Compiled `lfx.generate`: one compile serves every batch size, and tokens stay transformers'.

Oracle: transformers' `generate()` on a copy of the model with the adapter folded in, as in
test_generation.py (whose tiny Llama and helpers this file reuses). The no-recompile check is
torch._dynamo's own: `error_on_recompile` raises on any second compile of a frame.
"""

from __future__ import annotations

import torch
import torch._dynamo

import lowrank_fx as lfx
from test_generation import Family, built, hf_generate, prompts, rel


def _llama():
    return built("llama", lambda: Family("llama"))


def _check(gm, merged, ids, steps):
    got = lfx.generate(gm, ids, adapter="a", max_new_tokens=steps, eos_token_id=[], compile="aot_eager",
                       output_logits=True)
    want = hf_generate(merged, ids, max_new_tokens=steps, eos_token_id=None)
    assert torch.equal(got.sequences, want.sequences)
    assert rel(got.logits, want.logits) < 1e-5


def test_batch_one_then_four_compiles_nothing_new():
    llama = _llama()
    torch._dynamo.reset()
    ids = torch.cat(prompts(21, lengths=(6, 6, 6, 6)))
    try:
        _check(llama.gm, llama.merged["a"], ids[:1], 4)  # compiles the prompt step and the token step
        with torch._dynamo.config.patch(error_on_recompile=True):
            for rows, width, steps in ((4, 6, 5), (3, 4, 3), (1, 5, 6), (2, 6, 2)):
                _check(llama.gm, llama.merged["a"], ids[:rows, :width], steps)
    finally:
        torch._dynamo.reset()
