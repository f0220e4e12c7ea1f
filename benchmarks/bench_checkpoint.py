"""Activation checkpointing (issue 14): saved activations and step time, ours against PEFT's.

Model: bench_train.py's Llama (its builder, imported) with 8 layers: hidden 256, 4 heads of 64,
MLP 704, vocabulary 1024; batch 4 x 128 tokens; LoRA rank 8 on q/k/v/o/gate/up/down; AdamW.
Configurations, all in this one process:

  - ours, eager: the graph rewritten with layers="auto", without and with lfx.checkpoint_layers;
  - ours, compiled (inductor, fullgraph, dynamic): without checkpointing, with checkpoint_layers,
    and without blocks at compile's activation memory budget 0.5 and 0.25
    (torch._functorch.config.activation_memory_budget, set while compiling);
  - PEFT (LoraConfig, same targets), eager, without and with
    model.gradient_checkpointing_enable(use_reentrant=False).

Saved activations: what autograd keeps for backward in one step (saved_tensors_hooks; unique
storages that are not parameters or buffers; for compiled graphs what the compiled function
saves). Step time: zero_grad, forward, loss, backward, AdamW step; after two warm-up steps
(the first compiles), the steps are interleaved round-robin over the configurations, so load
on the machine falls on all of them alike; the median is reported.

    OMP_NUM_THREADS=1 python benchmarks/bench_checkpoint.py           # ~10 minutes on 2 CPU cores
    OMP_NUM_THREADS=1 python benchmarks/bench_checkpoint.py --quick   # smaller model, a smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_train import SIZES, TARGETS, build_model, machine, saved_bytes  # noqa: E402
from results_md import replace_section  # noqa: E402

SECTION = "## Checkpointing (issue 14)"
LORA_RANK = 8


def configurations(size: dict, ids) -> dict:
    """Name -> (the model a step calls, the module whose parameters train)."""
    import peft
    import torch

    import lowrank_fx as lfx

    spec = lfx.Spec(targets=[f"*.{t}" for t in TARGETS], method=lfx.LoRA(rank=LORA_RANK, alpha=2.0 * LORA_RANK))
    kw = dict(example_inputs=(ids,), example_kwargs={"use_cache": False})

    def ours(layers="auto", checkpoint=False):
        gm = lfx.rewrite(build_model(size), spec, layers=layers, **kw).train()
        if checkpoint:
            lfx.checkpoint_layers(gm)
        return gm

    def compiled(gm, budget=None):
        run = torch.compile(gm, fullgraph=True, dynamic=True)
        if budget is None:
            return run
        return lambda *a, **k: _with_budget(run, budget, a, k)

    def peft_model(checkpoint):
        model = peft.get_peft_model(build_model(size), peft.LoraConfig(
            r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=TARGETS, lora_dropout=0.0))
        if checkpoint:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    found = {}
    gm = ours()
    found["ours eager"] = (gm, gm)
    gm = ours(checkpoint=True)
    found["ours eager, checkpoint_layers"] = (gm, gm)
    gm = ours()
    found["ours compiled"] = (compiled(gm), gm)
    gm = ours(checkpoint=True)
    found["ours compiled, checkpoint_layers"] = (compiled(gm), gm)
    for budget in (0.5, 0.25):
        gm = ours(layers=None)
        found[f"ours compiled, memory budget {budget}"] = (compiled(gm, budget), gm)
    for checkpoint in (False, True):
        model = peft_model(checkpoint)
        found["PEFT eager" + (", gradient checkpointing" if checkpoint else "")] = (model, model)
    return found


def _with_budget(run, budget, args, kwargs):
    import torch

    with torch._functorch.config.patch(activation_memory_budget=budget):
        return run(*args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small model: checks that everything runs")
    parser.add_argument("--steps", type=int, default=7, help="timed rounds")
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F

    size = dict(SIZES["quick" if args.quick else "full"], layers=2 if args.quick else 8)
    torch.manual_seed(0)
    ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]))
    configs = configurations(size, ids)
    steps = {}
    for name, (run, module) in configs.items():
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)

        def step(run=run, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            logits = run(ids, use_cache=False).logits
            F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
            optimizer.step()

        start = time.perf_counter()
        step()
        print(f"{name}: first step {time.perf_counter() - start:.1f} s", flush=True)
        steps[name] = step
    results = {name: {"saved_mib": saved_bytes(configs[name][1], step) / 2**20, "times": []}
               for name, step in steps.items()}
    for _ in range(args.steps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            results[name]["times"].append(time.perf_counter() - start)
    for r in results.values():
        r["step_s"] = statistics.median(r["times"])
    (HERE / "bench_checkpoint.json").write_text(json.dumps({"machine": machine(), "size": size, "results": results}, indent=2))
    if not args.quick:
        replace_section(HERE / "RESULTS.md", SECTION, report(results, size))
    print(report(results, size))


def report(results: dict, size: dict) -> str:
    info = machine()
    off = results["ours eager"]["saved_mib"]
    rows = ["| configuration | saved activations | vs ours eager | step median |", "|---|---|---|---|"]
    rows += [f"| {name} | {r['saved_mib']:.1f} MiB | {r['saved_mib'] / off:.2f}x | {1000 * r['step_s']:.0f} ms |"
             for name, r in results.items()]
    peft_ckpt = results["PEFT eager, gradient checkpointing"]
    lines = [SECTION, "",
             f"Machine: {info['cpu']}, {info['cores']} cores, {info['threads']} intra-op thread(s), torch "
             f"{info['torch']}"
             + (f", {info['cuda']}" if info["cuda"] else " (CPU)") + ". `benchmarks/bench_checkpoint.py`: Llama "
             f"hidden {size['hidden']}, {size['layers']} layers, batch {size['batch']} x {size['seq']}, LoRA rank "
             f"{LORA_RANK} on q/k/v/o/gate/up/down, AdamW; steps interleaved round-robin in one process, medians.",
             "", *rows, ""]

    def goal(text, value, limit):
        lines.append(f"- {text}: {value:.2f} (goal ≤ {limit}) **{'met' if value <= limit else 'not met'}**")

    for mode in ("eager", "compiled"):
        r = results[f"ours {mode}, checkpoint_layers"]
        goal(f"saved activations with checkpoint_layers / without ({mode})",
             r["saved_mib"] / results[f"ours {mode}"]["saved_mib"], 0.35)
        goal(f"our step with checkpoint_layers ({mode}) / PEFT's with gradient checkpointing",
             r["step_s"] / peft_ckpt["step_s"], 1.0)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
