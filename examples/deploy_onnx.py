"""Deploying with ONNX Runtime: one merged model, and one base model with swappable adapters.

What it shows:
- two adapters in one graph (`lfx.rewrite(gm, spec, adapter="b")` adds the second), each trained
  a few steps;
- `lfx.export_onnx(lfx.merge(gm), ...)`: adapter "a" folded into dense weights, run with plain
  `onnxruntime.InferenceSession`;
- `lfx.export_onnx(gm, ..., mode="adapters")`: the base exported once, one `.onnx_adapter` file
  per adapter, switched per call in one `lfx.AdapterSession` (no adapter: the base model);
- `lfx.export_onnx_adapter`: a third adapter trained after the export gets its file, added to
  the running session with `add_adapter`.
Every ONNX Runtime output is compared with the PyTorch graph under the same adapter.

Run:
    python examples/deploy_onnx.py --tiny                        # a 2-layer Llama from a config
    python examples/deploy_onnx.py --model Qwen/Qwen2.5-0.5B     # downloaded by transformers; the
                                                                 # exports take minutes at this size

Ends with a line "check: ... PASS" or exits non-zero.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
import transformers

import lowrank_fx as lfx


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama (used by CI)")
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B", help="a Hugging Face causal LM name or directory")
    parser.add_argument("--steps", type=int, default=3, help="training steps per adapter")
    parser.add_argument("--out", default=None, help="output folder (default: a temporary folder)")
    return parser.parse_args()


def load(args):
    if args.tiny:
        config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return transformers.LlamaForCausalLM(config), 128
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    return model, model.config.vocab_size


def train(gm, batches, steps: int) -> None:
    """A few steps of the newest adapter (the only trainable one) on next-token loss."""
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    gm.train()
    for step in range(steps):
        ids = batches[step % len(batches)]
        logits = gm(input_ids=ids).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    gm.eval()


def torch_logits(gm, ids, adapter: str | None) -> np.ndarray:
    lfx.set_active_adapters(gm, [] if adapter is None else adapter)
    with torch.no_grad():
        return gm(input_ids=ids).logits.numpy()


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def main() -> int:
    args = parse_args()
    torch.manual_seed(0)
    model, vocab = load(args)
    model.eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, vocab, (2, 12), generator=g) for _ in range(2)]
    kw = {"example_kwargs": {"input_ids": batches[0], "use_cache": False}}
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="deploy-onnx-"))

    targets = ["*.q_proj", "*.v_proj"]
    gm = lfx.rewrite(model, lfx.Spec(targets=targets, method=lfx.LoRA(rank=8)), adapter="a", **kw)
    train(gm, batches, args.steps)
    gm = lfx.rewrite(gm, lfx.Spec(targets=targets, method=lfx.LoRA(rank=4, alpha=8.0)), adapter="b")
    train(gm, batches[::-1], args.steps)

    ids = torch.randint(3, vocab, (3, 7), generator=g)  # another batch and length than the export's example
    expected = {name: torch_logits(gm, ids, name) for name in ("a", "b", None)}
    errors = {}

    lfx.set_active_adapters(gm, "a")
    lfx.export_onnx(lfx.merge(gm), out / "merged_a.onnx", **kw)  # adapter a folded into dense weights
    dense = ort.InferenceSession(str(out / "merged_a.onnx"), providers=["CPUExecutionProvider"])
    errors["merged a"] = relative(dense.run(["logits"], {"input_ids": ids.numpy()})[0], expected["a"])

    lfx.set_active_adapters(gm, ["a", "b"])  # the swappable export writes every adapter either way
    result = lfx.export_onnx(gm, out / "model.onnx", mode="adapters", **kw)
    print(f"exported {result.path.name} with adapter files {[p.name for p in result.adapters.values()]}")
    session = lfx.AdapterSession(result.path)
    for name in ("a", "b", None):
        got = session.run({"input_ids": ids.numpy()}, adapter=name)["logits"]
        errors[f"adapter {name}"] = relative(got, expected[name])

    gm = lfx.rewrite(gm, lfx.Spec(targets=targets, method=lfx.LoRA(rank=6)), adapter="c")  # trained later
    train(gm, batches, args.steps)
    session.add_adapter("c", lfx.export_onnx_adapter(gm, out / "model.c.onnx_adapter", adapter="c"))
    errors["adapter c (added later)"] = relative(session.run({"input_ids": ids.numpy()}, adapter="c")["logits"],
                                                 torch_logits(gm, ids, "c"))

    for what, err in errors.items():
        print(f"ONNX Runtime vs PyTorch, {what:24s} max relative diff {err:.2e}")
    update = relative(expected["a"], expected[None])
    assert update > 1e-3, f"adapter a barely changes the logits ({update:.1e}); the comparison would prove nothing"
    bad = {what: err for what, err in errors.items() if err > 1e-5}
    assert not bad, f"ONNX Runtime differs from PyTorch beyond 1e-5 (relative): {bad}"
    print(f"check: ONNX Runtime == PyTorch for {len(errors)} cases (max rel {max(errors.values()):.1e}): PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
