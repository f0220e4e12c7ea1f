"""RandLoRA's compute forms (issue 13): training step time of ours, form="auto" | "factored" |
"dense", against PEFT's RandLoRA (RandLoraConfig), eager and compiled, on Llama-shaped models.

Sizes (transformers LlamaForCausalLM from a config, random weights; bench_train.build_model):
  (a) hidden 256, 4 layers, 4 heads, MLP 704, vocabulary 1024, batch 4 x 128 (bench_train's model);
  (b) hidden 512, 1 layer, 8 heads, MLP 1408, vocabulary 1024, batch 4 x 1024: 4096 tokens per
      call, far more than any width (one layer keeps a step near 2 s on one core).
Targets q/k/v/o/gate/up/down of every layer, for ours and PEFT alike; the rank whose trainable
count is closest to LoRA rank 8's (bench_train.randlora_rank), alpha 20·r (PEFT's ratio).
Step: zero_grad, forward, next-token cross entropy, backward, AdamW (lr 1e-4).

All configurations of a size live in one process and are timed round-robin, one step of each
per round for `--rounds` rounds, so load from other jobs on a shared machine hits all alike;
step time is the median. Ours runs as lfx.Trainer trains it: fuse_sites(gm), whose RandLoRA
sites compute x (W + g·ΔW)ᵀ + b in one product (form "dense"; "auto" per pass, merged or the base
product plus the factored Δy; "factored" keeps the rewritten site). Compiled: ours as lfx.Trainer
compiles it (torch.compile(fuse_sites(gm), fullgraph=True, dynamic=True), inductor), PEFT's model with torch.compile(model) (its default:
static shapes, graph breaks allowed); each is compiled and warmed up before the timed rounds.

Beside the times, a multiply-add model of the linear layers (randlora_forms.merged_costs for
ours, the base's own products included; PEFT's factored products, which keep x·Bc for a wide target's backward, for PEFT; the
base's own forward and input-gradient products, and lm_head's, for both) gives the ratio the
forms can reach at best: the base products are the same for every configuration.

    OMP_NUM_THREADS=1 python benchmarks/bench_randlora.py           # ~10 min on 2 cores at load 5, cold
    OMP_NUM_THREADS=1 python benchmarks/bench_randlora.py --quick   # tiny sizes: a smoke test

One intra-op thread, as bench_train.py explains. A full run rewrites the "RandLoRA forms
(issue 13)" section of benchmarks/RESULTS.md and benchmarks/bench_randlora.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

from bench_train import SIZES as TRAIN_SIZES  # benchmarks/ is on sys.path when a script runs
from bench_train import TARGETS, adapted, build_model, machine, randlora_rank
from results_md import replace_section

HERE = Path(__file__).resolve().parent
SECTION = "## RandLoRA forms (issue 13)"
SIZES = {"a": TRAIN_SIZES["full"],
         "b": dict(hidden=512, layers=1, heads=8, ff=1408, vocab=1024, batch=4, seq=1024)}
QUICK = {"a": TRAIN_SIZES["quick"], "b": dict(hidden=64, layers=1, heads=4, ff=128, vocab=256, batch=2, seq=256)}
ROUNDS = {"a": 10, "b": 5}
GOALS = {"a": 0.8, "b": 0.5}  # ours(auto) / best PEFT step
# (library, form, compiled)
CONFIGS = [("ours", "auto", False), ("ours", "factored", False), ("ours", "dense", False), ("ours", "auto", True),
           ("ours", "factored", True), ("ours", "dense", True), ("peft", "-", False), ("peft", "-", True)]


def label(config) -> str:
    lib, form, compiled = config
    return f"{lib}{'' if lib == 'peft' else ' ' + form}, {'compiled' if compiled else 'eager'}"


def target_shapes(size: dict) -> list[tuple[str, int, int]]:
    """(name, out, in) of the targets of one layer."""
    h, ff = size["hidden"], size["ff"]
    return [(n, h, h) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [("gate_proj", ff, h), ("up_proj", ff, h),
                                                                           ("down_proj", h, ff)]


def flop_model(size: dict, rank: int) -> dict:
    """Multiply-adds per step of the linear layers (every target's dx counted): lm_head's products
    (forward and dx, the same for all) and each way of computing the target sites, their base
    products included, plus which form "auto" takes per target for forward / backward."""
    from lowrank_fx.methods.randlora_forms import merged_costs

    tokens, layers = size["batch"] * size["seq"], size["layers"]
    macs = {"lm_head": 2 * tokens * size["hidden"] * size["vocab"], "auto": 0, "factored": 0, "dense": 0, "peft": 0}
    picks = {}
    for name, out, in_ in target_shapes(size):
        big, small, tall = max(out, in_), min(out, in_), out >= in_
        cols = math.ceil(small / rank) * rank
        passes = [merged_costs(tokens, big, small, cols, tall), merged_costs(tokens, big, small, cols, tall, True)]
        macs["factored"] += layers * sum(p[0] for p in passes)
        macs["dense"] += layers * sum(p[1] for p in passes)
        macs["auto"] += layers * sum(min(p) for p in passes)
        # base forward and dx 2·T·D·d, adapter forward T·R(D + d), backward T·R(D + 2d)
        macs["peft"] += layers * tokens * (2 * big * small + cols * (2 * big + 3 * small))
        picks[f"{name} {out}x{in_}"] = " / ".join("merged" if p[1] < p[0] else "factored" for p in passes)
    return {"macs": macs, "auto_picks": picks}


def build(config, size: dict, rank: int, ids):
    """The trainable model of one configuration and what a step calls."""
    import torch

    import lowrank_fx as lfx
    from lowrank_fx.passes.fuse_sites import fuse_sites

    lib, form, compiled = config
    if lib == "peft":
        model = adapted("peft", "randlora", size, ids)[0]
        return model, (torch.compile(model) if compiled else model)
    method = lfx.RandLoRA(rank=rank, alpha=20.0 * rank, form=form)
    gm = lfx.rewrite(build_model(size), lfx.Spec(targets=[f"*.{t}" for t in TARGETS], method=method),
                     example_inputs=(ids,), example_kwargs={"use_cache": False}).train()
    fused = fuse_sites(gm)  # the training form lfx.Trainer trains: merged-product sites unless factored
    return gm, (torch.compile(fused, fullgraph=True, dynamic=True) if compiled else fused)


def stepper(model, run, ids):
    import torch
    import torch.nn.functional as F

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = run(ids, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        optimizer.step()

    return step, sum(p.numel() for p in params)


def time_size(size: dict, rounds: int) -> dict:
    import torch

    torch.manual_seed(0)
    ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]))
    rank = randlora_rank(size)
    steps, trainable, first = {}, {}, {}
    for config in CONFIGS:
        model, run = build(config, size, rank, ids)
        steps[config], trainable[config] = stepper(model, run, ids)
        started = time.perf_counter()
        steps[config]()  # compiles, when compiled
        first[config] = time.perf_counter() - started
        steps[config]()
    times = {config: [] for config in CONFIGS}
    load = [os.getloadavg()[0]]
    for _ in range(rounds):
        for config, step in steps.items():
            started = time.perf_counter()
            step()
            times[config].append(time.perf_counter() - started)
        load.append(os.getloadavg()[0])
    return {"size": size, "rank": rank, "rounds": rounds, "load_1min": load, "flops": flop_model(size, rank),
            "results": [{"config": label(c), "lib": c[0], "form": c[1], "compiled": c[2], "trainable": trainable[c],
                         "step_s": statistics.median(times[c]), "step_min_s": min(times[c]),
                         "first_step_s": first[c]} for c in CONFIGS]}


def section(report: dict) -> str:
    m = report["machine"]
    lines = [SECTION, "",
             f"`OMP_NUM_THREADS=1 python benchmarks/bench_randlora.py` (raw numbers: `bench_randlora.json`; the run "
             f"took {report['seconds']:.0f} s). Machine: {m['platform']}, {m['cpu']}, {m['cores']} CPUs (shared with "
             f"other jobs), no GPU, {m['threads']} intra-op thread, torch {m['torch']}, Python {m['python']}. "
             "Model, targets, step and timing as the script's docstring says: every configuration of a size in one "
             "process, round-robin, median step; ours compiled with fullgraph=True, dynamic=True; PEFT compiled "
             "with its default torch.compile(model).", ""]
    for name, run in report["sizes"].items():
        s, flops = run["size"], run["flops"]
        best_peft = min(r["step_s"] for r in run["results"] if r["lib"] == "peft")
        lines += [f"### ({name}) hidden {s['hidden']}, {s['layers']} layer(s), MLP {s['ff']}, batch {s['batch']} x "
                  f"{s['seq']} ({s['batch'] * s['seq']} tokens per call), rank {run['rank']}", "",
                  f"{run['rounds']} rounds; 1-minute load average during them "
                  f"{min(run['load_1min']):.2f} to {max(run['load_1min']):.2f}.", "",
                  "| configuration | trainable | step median (min) | ÷ best PEFT | first step |",
                  "|---|---:|---:|---:|---:|"]
        for r in run["results"]:
            lines.append(f"| {r['config']} | {r['trainable']:,} | {1e3 * r['step_s']:.0f} "
                         f"({1e3 * r['step_min_s']:.0f}) ms"
                         f" | {r['step_s'] / best_peft:.2f} | {r['first_step_s']:.1f} s |")
        ours = {(r["form"], r["compiled"]): r["step_s"] for r in run["results"] if r["lib"] == "ours"}
        best_auto = min(ours[("auto", False)], ours[("auto", True)])
        ratio, goal = best_auto / best_peft, GOALS[name]
        macs = flops["macs"]
        bound = (macs["lm_head"] + macs["auto"]) / (macs["lm_head"] + macs["peft"])
        lines += ["", f"- Goal: ours(auto) ÷ best PEFT ≤ {goal}: **{ratio:.2f}** "
                      f"({'met' if ratio <= goal else 'not met'}; best of our eager and compiled auto, "
                      f"{1e3 * best_auto:.0f} ms, over PEFT's best, {1e3 * best_peft:.0f} ms).",
                  f"- Multiply-adds per step in the linear layers (GMAC): lm_head {macs['lm_head'] / 1e9:.1f} "
                  f"(the same for all); target sites, base products included: PEFT {macs['peft'] / 1e9:.1f}, ours "
                  f"factored {macs['factored'] / 1e9:.1f}, merged (dense) {macs['dense'] / 1e9:.1f}, auto "
                  f"{macs['auto'] / 1e9:.1f}. So ours(auto) ÷ PEFT is at best {bound:.2f} on these products, before "
                  "attention, norms and the optimizer, which are the same for both.",
                  "- auto's form per target (forward / backward): "
                  + "; ".join(f"{k}: {v}" for k, v in flops["auto_picks"].items()) + ".", ""]
    lines += [("Ours is the form lfx.Trainer trains, fuse_sites(gm): with \"dense\" (and \"auto\" past the "
               "break-evens) each site is one product with W + g·ΔW (methods/randlora_merged.py), 3·T·D·d per "
               "target with dx plus building ΔW twice (2·D·d·R), against PEFT's base products and factored "
               "adapter, T·(2·D·d + R·(2D + 3d)) ≈ 7·T·D·d for a square target with R ≈ d."), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds: checks that everything runs")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    started = time.time()
    sizes = QUICK if args.quick else SIZES
    report = {"machine": {**machine(), "platform": platform.platform()}, "sizes": {}}
    for name, size in sizes.items():
        report["sizes"][name] = time_size(size, 2 if args.quick else ROUNDS[name])
        torch._dynamo.reset()
        for r in report["sizes"][name]["results"]:
            print(name, r["config"], f"{1e3 * r['step_s']:.0f} ms", flush=True)
    report["seconds"] = time.time() - started
    text = section(report)
    print(text)
    if not args.quick:
        (HERE / "bench_randlora.json").write_text(json.dumps(report, indent=1, default=str))
        replace_section(HERE / "RESULTS.md", SECTION, text)


if __name__ == "__main__":
    main()
