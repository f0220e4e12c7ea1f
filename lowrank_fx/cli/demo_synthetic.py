"""The demo: adapt a small Llama with LoRA, train it, fold it, and check the fold.

Task: a tiny Llama with random base weights learns the rule "next token = token + 1
(mod V)" through LoRA adapters on q, k, v, o, gate, up, down and the output head only. It then folds the
adapters into dense weights and checks, at a batch and sequence length not used for
capture, that (1) the folded graph and (2) the original model loaded with the merged
state dict both reproduce the adapted graph's outputs. Last, it exports the model for
generation with the adapter unmerged (`export_generation`) and generates from it in ONNX
Runtime, which must give the tokens `lfx.generate` gives in PyTorch.
"""

from __future__ import annotations

import tempfile
import time

import torch
import torch.nn.functional as F

from .. import GenerationSession, LoRA, Spec, Trainer, export_generation, generate, load_merged, merge, rewrite
from .builtin_models import builtin


def _batch(vocab: int, batch: int, seq: int, generator: torch.Generator):
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    tokens = (start + torch.arange(seq + 1)) % vocab
    return tokens[:, :-1], tokens[:, 1:]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def run_demo(steps: int = 300, rank: int = 8, lr: float = 1e-2, batch: int = 16, seq: int = 32,
             seed: int = 0, progress: bool = True) -> dict:
    """Train, fold, check; returns the figures it prints."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    built = builtin("tiny-llama", seed=seed)
    model, vocab = built.model, built.vocab_size
    spec = Spec(targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
                method=LoRA(rank=rank, alpha=2.0 * rank))
    gm = rewrite(model, spec, example_inputs=built.example_inputs, example_kwargs=built.example_kwargs)
    generator = torch.Generator().manual_seed(seed)
    losses = []

    def loss_fn(model, pair):  # next-token cross entropy
        inputs, labels = pair
        loss = F.cross_entropy(model(inputs, use_cache=False).logits.reshape(-1, vocab), labels.reshape(-1))
        losses.append(loss.item())
        return loss

    batches = (_batch(vocab, batch, seq, generator) for _ in range(steps))
    Trainer(gm, loss_fn, lr=lr, loraplus_ratio=1.0, schedule="constant", compile=False,
            progress=progress).fit(batches, steps=steps)
    gm.eval()
    inputs, labels = _batch(vocab, 3, 45, generator)  # shapes not used for capture
    prompt, new = inputs[:, :6], 8
    in_torch = generate(gm, prompt, max_new_tokens=new)
    with tempfile.TemporaryDirectory() as directory:  # the base exported once, the adapter as a swappable file
        export_generation(model, gm, directory)
        in_ort = GenerationSession(directory).generate(prompt, adapter="default", max_new_tokens=new)
    wanted = (prompt[:, -1:] + torch.arange(1, new + 1)) % vocab
    with torch.no_grad():
        adapted = gm(inputs, use_cache=False).logits
        folded = merge(gm)(inputs, use_cache=False).logits
        load_merged(model, gm)
        original = model(inputs, use_cache=False).logits
    accuracy = float((adapted.argmax(-1) == labels).float().mean())
    return {
        "trainable": sum(p.numel() for p in gm.parameters() if p.requires_grad),
        "base": sum(p.numel() for p in model.parameters()),
        "first_loss": sum(losses[:10]) / 10,
        "last_loss": sum(losses[-10:]) / 10,
        "accuracy": accuracy,
        "fold_error": _relative(folded, adapted),
        "original_error": _relative(original, adapted),
        "generated_right": float((in_ort[:, prompt.shape[1]:] == wanted).float().mean()),
        "generation_agrees": bool(torch.equal(in_ort, in_torch)),
        "seconds": time.perf_counter() - started,
    }


def format_report(figures: dict) -> str:
    ok = figures["fold_error"] < 1e-5 and figures["original_error"] < 1e-5
    agrees = figures["generation_agrees"]
    return "\n".join([
        f"trainable parameters   {figures['trainable']:,} of {figures['base']:,}",
        f"loss                   {figures['first_loss']:.3f} -> {figures['last_loss']:.3f}",
        f"next-token accuracy    {figures['accuracy']:.1%} (held-out batch)",
        f"fold vs adapted        {figures['fold_error']:.2e} max relative error",
        f"original + merged sd   {figures['original_error']:.2e} max relative error",
        f"wall time              {figures['seconds']:.1f} s",
        "fold check             " + ("PASS" if ok else "FAIL"),
        f"generated (ORT)        {figures['generated_right']:.1%} of 8 new tokens per prompt follow the rule",
        "ORT = lfx.generate     " + ("PASS" if agrees else "FAIL"),
    ])
