"""Generation with adapters in onnxruntime-genai, ONNX Runtime and PyTorch: the same tokens.

What it shows:
- two adapters of different rank in one graph, each trained a few steps;
- `lfx.export_generation(model, gm, directory=...)`: the KV-cache decoder exported once
  (`model.onnx`), one `.onnx_adapter` per adapter and `genai_config.json`;
- onnxruntime-genai (`pip install 'lowrank-fx[genai]'`): `og.Adapters` loads both files and
  `generator.set_active_adapter` picks one per generator, with no reload;
- `lfx.GenerationSession`: the same directory in plain ONNX Runtime;
- `lfx.generate`: PyTorch, from the training graph with the adapters unmerged.
The three must give the same greedy token ids, for each adapter and for the base model.

Run:
    python examples/generate_genai.py --tiny                       # a 2-layer Llama from a config
    python examples/generate_genai.py --model Qwen/Qwen2.5-0.5B    # downloaded by transformers; the
                                                                   # export takes minutes at this size

Ends with a line "check: ... PASS" or exits non-zero.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import onnxruntime_genai as og
import torch
import torch.nn.functional as F
import transformers

import lowrank_fx as lfx


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama (used by CI)")
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B", help="a Hugging Face causal LM name or directory")
    parser.add_argument("--steps", type=int, default=3, help="training steps per adapter")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--out", default=None, help="the generation directory (default: a temporary folder)")
    return parser.parse_args()


def load(args):
    """The model, a tokenizer (None when tiny) and a prompt of shape (1, length)."""
    if args.tiny:
        config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return transformers.LlamaForCausalLM(config), None, torch.tensor([[5, 17, 42, 9, 77]])
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    return model, tokenizer, tokenizer(["The old clock in the square"], return_tensors="pt")["input_ids"]


def train(gm, vocab: int, steps: int, seed: int) -> None:
    """A few steps of the newest adapter (the only trainable one) on random next-token data."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    gm.train()
    for _ in range(steps):
        ids = torch.randint(3, vocab, (2, 12), generator=g)
        logits = gm(input_ids=ids).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    gm.eval()


def genai_generate(model, adapters, name: str | None, prompt: torch.Tensor, new: int) -> list[int]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + new, do_sample=False)
    generator = og.Generator(model, params)
    if name is not None:
        generator.set_active_adapter(adapters, name)
    generator.append_tokens(prompt.numpy().astype("int32"))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(token) for token in generator.get_sequence(0)]


def main() -> int:
    args = parse_args()
    torch.manual_seed(0)
    model, tokenizer, prompt = load(args)
    model.eval()
    vocab = model.config.vocab_size
    kwargs = {"input_ids": torch.randint(3, vocab, (2, 12)), "use_cache": False}

    spec = lfx.Spec(targets=["*.q_proj", "*.v_proj", "*.o_proj"], method=lfx.LoRA(rank=8))
    gm = lfx.rewrite(model, spec, example_kwargs=kwargs, adapter="a")
    train(gm, vocab, args.steps, seed=1)
    gm = lfx.rewrite(gm, lfx.Spec(targets=spec.targets, method=lfx.LoRA(rank=4, alpha=8.0)), adapter="b")
    train(gm, vocab, args.steps, seed=2)

    directory = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="generate-genai-"))
    exported = lfx.export_generation(model, gm, directory=directory, tokenizer=tokenizer)
    print(f"wrote {directory}: {sorted(p.name for p in exported.files if p.parent == directory)}")

    genai = og.Model(str(directory))
    adapters = og.Adapters(genai)
    for name, path in exported.adapters.items():
        adapters.load(str(path), name)
    session = lfx.GenerationSession(directory)

    new, start, results = args.new_tokens, prompt.shape[1], {}
    for name in ("a", "b", None):
        theirs = genai_generate(genai, adapters, name, prompt, new)
        ort_ids = session.generate(prompt, adapter=name, max_new_tokens=new)[0].tolist()
        torch_ids = lfx.generate(gm, prompt, adapters=[] if name is None else name, max_new_tokens=new)[0].tolist()
        results[name] = (theirs, ort_ids, torch_ids)
        print(f"adapter {name!s:4s}  genai {theirs[start:]}  GenerationSession {ort_ids[start:]}  "
              f"lfx.generate {torch_ids[start:]}")

    for name, (theirs, ort_ids, torch_ids) in results.items():
        assert theirs == ort_ids == torch_ids, (
            f"adapter {name}: genai {theirs}, GenerationSession {ort_ids}, lfx.generate {torch_ids}")
    assert results["a"][0] != results[None][0] or results["b"][0] != results[None][0], (
        "neither adapter changed the generated tokens; the comparison would not show the adapters are applied")
    print("check: genai == GenerationSession == lfx.generate for adapters a, b and none: PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
