"""QLoRA-style training: LoRA over a frozen quantized base, then folding with and without requantizing.

What it shows:
- `lfx.quantize_base(model, "nf4" | "int8" | "int4")`: the model's linear layers (not the head)
  become torchao quantized tensors, in place (needs `pip install 'lowrank-fx[quant]'`);
- `lfx.rewrite` finds the quantized layers as targets under their usual names ("all-linear");
- a plain training loop with `lfx.loraplus_optimizer` (fp32 adapters, frozen integer base);
- `lfx.merge(gm)`: dense weights W = dequantize(Q) + ΔW, checked against the adapted graph, and
  `lfx.merged_state_dict(gm)` loaded into the plain (unquantized) architecture;
- `lfx.merge(gm, requantize=True)`: W + ΔW quantized again in the base's format, with the
  output error that rounding costs (`merged.requantize_report`), checked by measuring it here.

Run:
    python examples/qlora.py --tiny                          # a 2-layer Llama from a config, nf4
    python examples/qlora.py --tiny --scheme int8
    python examples/qlora.py --model Qwen/Qwen2.5-0.5B       # downloaded by transformers (about 1 GB)

Ends with a line "check: ... PASS" or exits non-zero.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
import transformers

import lowrank_fx as lfx

TEXT = [
    "The lighthouse keeper counted the ships that passed each night and wrote their names in a blue book.",
    "When the tide went out, the children searched the rocks for crabs, shells and bits of green glass.",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama and synthetic data (used by CI)")
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B", help="a Hugging Face causal LM name or directory")
    parser.add_argument("--scheme", default="nf4", choices=["nf4", "int8", "int4"], help="the base's quantization")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 10 tiny, 30 real)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="base learning rate (default: 1e-2 tiny, 2e-4 real)")
    return parser.parse_args()


def tiny_model_and_data():
    """A 2-layer Llama with random weights (sizes multiples of 64, as nf4's blocks need); random ids."""
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    g = torch.Generator().manual_seed(0)
    return transformers.LlamaForCausalLM(config), [torch.randint(3, 128, (2, 12), generator=g) for _ in range(2)]


def real_model_and_data(name: str):
    tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    rows = [tokenizer(line)["input_ids"] for line in TEXT]
    ids = torch.tensor([line[:min(map(len, rows))] for line in rows])  # cut to the shortest line: no padding
    return model, list(ids.split(1))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main() -> int:
    args = parse_args()
    torch.manual_seed(0)
    model, batches = tiny_model_and_data() if args.tiny else real_model_and_data(args.model)
    steps = args.steps or (10 if args.tiny else 30)
    lr = args.lr or (1e-2 if args.tiny else 2e-4)
    model.eval()
    config = model.config

    lfx.quantize_base(model, args.scheme)
    print(f"quantized the base with {args.scheme}; left dense: {model.lowrank_fx_quantized['left_dense'] or 'none'}")
    spec = lfx.Spec(targets="all-linear", method=lfx.LoRA(rank=args.rank, alpha=2.0 * args.rank))
    kwargs = {"input_ids": batches[0], "use_cache": False}
    gm = lfx.rewrite(model, spec, example_kwargs=kwargs)
    print(lfx.plan(model, spec, example_kwargs=kwargs))

    optimizer = lfx.loraplus_optimizer(gm, lr=lr, ratio=16.0)
    gm.train()
    losses = []
    for step in range(steps):
        ids = batches[step % len(batches)]
        logits = gm(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    gm.eval()
    print(f"trained {steps} steps over the {args.scheme} base: loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    ids = batches[0]
    with torch.no_grad():
        adapted = gm(input_ids=ids).logits
        dense = lfx.merge(gm)  # dequantize(Q) + ΔW in fp32: a dense graph
        dense_err = relative(dense(input_ids=ids).logits, adapted)
        plain = transformers.AutoModelForCausalLM.from_config(config).eval()  # the unquantized architecture
        plain.load_state_dict(lfx.merged_state_dict(gm))
        plain_err = relative(plain(input_ids=ids).logits, adapted)
        requantized = lfx.merge(gm, requantize=True, tolerance=1.0)  # back to the base's format
        report = requantized.requantize_report
        requant_err = relative(requantized(input_ids=ids).logits, adapted)
    print(f"merge (dense):         relative error {dense_err:.2e}")
    print(f"merged_state_dict into {type(plain).__name__}(config): relative error {plain_err:.2e}")
    print(f"merge(requantize=True): {report}")
    print(f"                        measured here: relative error {requant_err:.2e}")

    assert losses[-1] < losses[0], f"training did not lower the loss ({losses[0]:.3f} -> {losses[-1]:.3f})"
    assert dense_err <= 1e-5, f"the dense fold differs from the adapted graph by {dense_err:.2e} (relative)"
    assert plain_err <= 1e-5, f"the plain model with the merged state differs by {plain_err:.2e} (relative)"
    assert report.targets > 0, "requantize=True requantized no target"
    assert abs(requant_err - report.output_error) <= 1e-3 * max(report.output_error, 1e-6) + 1e-6, (
        f"the requantize report says {report.output_error:.3e}, measured {requant_err:.3e}")
    print(f"check: dense fold == adapted (rel {max(dense_err, plain_err):.1e}), requantized error "
          f"{requant_err:.1e} as reported: PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
