"""Causal language model: LoRA fine-tuning with the LoRA+ optimizer, PEFT files, generation.

What it shows:
- LoRA on every linear layer (`"all-linear"`: attention and MLP, not the LM head) of a Llama /
  Qwen2-shaped decoder (`lfx.rewrite` with `use_cache=False`);
- `lfx.Trainer` with LoRA+ (`loraplus_ratio=16`: the B factors learn 16x faster than A);
- `lfx.save_adapters` (lowrank_fx's file) and `lfx.save_peft` (a PEFT directory), checked by
  loading the directory into PEFT (`PeftModel.from_pretrained`) on a copy of the base model;
- `lfx.generate` from the graph with the adapter unmerged, against transformers' `generate` on
  the original model with the adapter folded in (`lfx.load_merged`): the same tokens.

Run:
    python examples/causal_lm.py --tiny                       # a 2-layer Llama from a config, seconds
    python examples/causal_lm.py --model Qwen/Qwen2.5-0.5B    # downloaded by transformers (about 1 GB)
    python examples/causal_lm.py --model meta-llama/Llama-3.2-1B --steps 100 --compile

With --tiny the model learns a counting rule (each token is the previous one plus one); otherwise it
learns a few lines of text written into this script. Ends with "check: ... PASS" or exits non-zero.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

import lowrank_fx as lfx

TEXT = [
    "The lighthouse keeper counted the ships that passed each night and wrote their names in a blue book.",
    "When the tide went out, the children searched the rocks for crabs, shells and bits of green glass.",
    "Every autumn the village held a market where farmers sold apples, honey, cheese and warm bread.",
    "The old clock in the square struck twelve, and the pigeons rose from the roofs all at once.",
]
VOCAB, CYCLE = 128, 16


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama and synthetic data (used by CI)")
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B", help="a Hugging Face causal LM name or directory")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="base learning rate (default: 3e-3 tiny, 2e-4 real)")
    parser.add_argument("--compile", action="store_true", help="train through torch.compile (slow first step)")
    parser.add_argument("--out", default=None, help="output folder (default: a temporary folder)")
    return parser.parse_args()


def tiny_model_and_data():
    """A 2-layer Llama with random weights; sequences that count up by one through 16 token ids."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, CYCLE, (8, 1), generator=g)  # 8 sequences of 16 tokens
    ids = 3 + (starts + torch.arange(16)) % CYCLE  # ids 3 .. 3 + CYCLE - 1 (0..2 are special tokens)
    batches = list(ids.split(4))
    prompt = torch.tensor([[5, 6, 7, 8], [14, 15, 16, 17]])
    return model, batches, prompt


def real_model_and_data(name: str):
    tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    rows = [tokenizer(line)["input_ids"] for line in TEXT]
    ids = torch.tensor([line[:min(map(len, rows))] for line in rows])  # cut to the shortest line: no padding
    prompt = tokenizer(["The lighthouse keeper counted"], return_tensors="pt")["input_ids"]
    return model, list(ids.split(2)), prompt


def loss_fn(model, ids):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def peft_logits(base, directory: Path, ids) -> torch.Tensor | None:
    """Logits of PEFT's own model loaded from `directory` on `base`; None without peft installed."""
    try:
        import peft
    except ImportError:
        return None
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(base, str(directory)).eval()(input_ids=ids).logits


def main() -> int:
    args = parse_args()
    torch.manual_seed(0)
    model, batches, prompt = tiny_model_and_data() if args.tiny else real_model_and_data(args.model)
    steps = args.steps
    lr = args.lr or (3e-3 if args.tiny else 2e-4)
    model.eval()
    base_copy = copy.deepcopy(model)  # PEFT's oracle loads the saved directory onto this

    spec = lfx.Spec(targets="all-linear", method=lfx.LoRA(rank=args.rank, alpha=2.0 * args.rank))
    gm = lfx.rewrite(model, spec, example_kwargs={"input_ids": batches[0], "use_cache": False})
    trainer = lfx.Trainer(gm, loss_fn, lr=lr, loraplus_ratio=16.0, warmup_steps=2, compile=args.compile,
                          progress=False)
    result = trainer.fit(batches, steps=steps)
    first, last = result["losses"][0], result["losses"][-1]
    print(f"LoRA+ training: loss {first:.3f} -> {last:.3f} in {steps} steps")
    gm.eval()

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="causal-lm-"))
    adapter_file = lfx.save_adapters(gm, out / "adapter.safetensors")
    lfx.save_peft(gm, out / "peft")
    print(f"saved {adapter_file} and the PEFT directory {out / 'peft'}")

    ids = batches[0]
    with torch.no_grad():
        adapted = gm(input_ids=ids).logits
    from_peft = peft_logits(base_copy, out / "peft", ids)
    peft_err = None if from_peft is None else ((from_peft - adapted).abs().max() / adapted.abs().max()).item()
    print("PEFT not installed: its check is skipped" if peft_err is None
          else f"PEFT's model from the saved directory: max relative diff {peft_err:.2e}")

    new = 8
    ours = lfx.generate(gm, prompt, max_new_tokens=new)  # the adapter unmerged, KV cache, greedy
    lfx.load_merged(model, gm)  # fold the adapter into the original model
    with torch.no_grad():
        theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False)
    print(f"lfx.generate:            {ours[0, prompt.shape[1]:].tolist()}")
    print(f"transformers (folded):   {theirs[0, prompt.shape[1]:].tolist()}")

    assert last < first, f"training did not lower the loss ({first:.3f} -> {last:.3f})"
    assert peft_err is None or peft_err <= 1e-5, f"PEFT's model from save_peft differs by {peft_err:.2e} (relative)"
    assert torch.equal(ours, theirs), f"lfx.generate gave {ours.tolist()}, transformers {theirs.tolist()}"
    print(f"check: loss {first:.2f} -> {last:.2f}, PEFT == graph, lfx.generate == transformers (folded): PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
