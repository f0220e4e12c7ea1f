"""LoRA training step against the physical limit: the frozen-base floor and the FLOP-counted limit.

The floor is the same Llama with every weight frozen but the embedding table: its step is the
base's forward plus its backward down to the input (no weight gradients), and no adapter method
can be cheaper. The analytic limit adds the adapters' own matmuls to it:

    limit = floor × (1 + adapter MACs / base MACs)                         per training step
    base MACs per token    = fwd + bwd, fwd = L·(q,k,v,o + gate,up,down + 2·seq·h attention) + h·V,
                             bwd = the same linears (dL/dx only) + twice the attention products
    adapter MACs per token = Σ_sites 3·r·(in + out)   (forward x·Aᵀ·Bᵀ; backward dL/dx, dA, dB)

Configurations, all in one process and interleaved round-robin (`--rounds` rounds of `--steps`
steps each), so load hits them alike; each figure below is a ratio within this one run:
floor eager / compiled; PEFT LoRA eager / compiled (torch.compile default, static shapes);
ours eager / compiled (lfx.Trainer's form: `fuse_sites(gm)`, fullgraph, dynamic=True); ours
compiled without fuse_sites (the rewritten graph as it is), to show what the pass buys.
Compiled with inductor. LoRA r=16, alpha 32, on q/k/v/o/gate/up/down, AdamW.

    OMP_NUM_THREADS=1 python benchmarks/bench_limit.py --write      # ~15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_train import TARGETS, build_model  # noqa: E402
from results_md import replace_section  # noqa: E402
from round_robin import round_robin  # noqa: E402

RANK = 16
SHAPES = {"narrow": dict(hidden=256, layers=4, heads=4, ff=704, vocab=2000, batch=4, seq=128),
          "wide": dict(hidden=1024, layers=4, heads=16, ff=2816, vocab=2000, batch=2, seq=512)}
CONFIGS = ["floor eager", "floor compiled", "PEFT eager", "PEFT compiled", "ours eager", "ours compiled",
           "ours compiled, unfused"]
SECTION = "## Training against the limit (issue 13)"


def macs_per_token(size: dict) -> tuple[int, int]:
    """(base MACs, adapter MACs) per token of one training step (module docstring)."""
    h, ff, seq, layers = size["hidden"], size["ff"], size["seq"], size["layers"]
    linears = 4 * h * h + 3 * h * ff
    attention = 2 * seq * h
    base = layers * (2 * linears + 3 * attention) + 2 * h * size["vocab"]
    sites = [(h, h)] * 4 + [(h, ff)] * 2 + [(ff, h)]
    adapters = layers * sum(3 * RANK * (i + o) for i, o in sites)
    return base, adapters


def _configs(size: dict, ids, device: str):
    """{name: step function} for every configuration, each with its own model and optimizer."""
    import peft
    import torch
    import torch.nn.functional as F

    import lowrank_fx as lfx
    from lowrank_fx.passes.fuse_sites import fuse_sites

    cuda = device == "cuda"

    def stepper(module, params, graph):
        optimizer = torch.optim.AdamW(params, lr=1e-4)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):  # bf16 on a GPU, as lfx.Trainer
                logits = module(ids).logits if graph else module(input_ids=ids, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            if cuda:
                torch.cuda.synchronize()
        return step

    def model():
        return build_model(size).to(device)

    steps = {}
    floor = model()
    for name, p in floor.named_parameters():
        p.requires_grad_(name == "model.embed_tokens.weight")
    floor_params = [floor.model.embed_tokens.weight]
    steps["floor eager"] = stepper(floor, floor_params, False)
    steps["floor compiled"] = stepper(torch.compile(floor), floor_params, False)
    config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, lora_dropout=0.0)
    peft_model = peft.get_peft_model(model(), config).train()
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]
    steps["PEFT eager"] = stepper(peft_model, peft_params, False)
    steps["PEFT compiled"] = stepper(torch.compile(peft_model), peft_params, False)
    spec = lfx.Spec(targets=[f"*.{t}" for t in TARGETS], method=lfx.LoRA(rank=RANK, alpha=2.0 * RANK))
    gm = lfx.rewrite(model(), spec, example_inputs=(ids,), example_kwargs={"use_cache": False}).train()
    fused = fuse_sites(gm)
    ours_params = [p for p in gm.parameters() if p.requires_grad]
    steps["ours eager"] = stepper(fused, ours_params, True)
    steps["ours compiled"] = stepper(torch.compile(fused, fullgraph=True, dynamic=True), ours_params, True)
    plain = lfx.rewrite(model(), spec, example_inputs=(ids,), example_kwargs={"use_cache": False}).train()
    steps["ours compiled, unfused"] = stepper(torch.compile(plain, fullgraph=True, dynamic=True),
                                              [p for p in plain.parameters() if p.requires_grad], True)
    return steps


def run_shape(name: str, rounds: int, steps: int, device: str) -> dict:
    import torch

    size = SHAPES[name]
    torch.manual_seed(0)
    ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), device=device)
    fns = _configs(size, ids, device)
    medians, loads = round_robin(fns, rounds, steps)
    base, adapters = macs_per_token(size)
    return {"size": size, "medians": medians, "loads": loads, "base_macs": base, "adapter_macs": adapters}


def report(results: dict, device: str) -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    where = (f"GPU {torch.cuda.get_device_name()}, bf16 autocast" if device == "cuda" else "CPU only, fp32")
    lines = [SECTION + (" on a GPU" if device == "cuda" else ""), "",
             f"`benchmarks/bench_limit.py`. Machine: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} "
             "thread(s), "
             f"torch {torch.__version__}, Python {platform.python_version()}; {where}. Every ratio is within one run, "
             "configurations interleaved round-robin.", ""]
    goals = []
    for name, result in results.items():
        size, m = result["size"], result["medians"]
        floor = min(m["floor eager"], m["floor compiled"])
        limit = floor * (1 + result["adapter_macs"] / result["base_macs"])
        best_peft = min(m["PEFT eager"], m["PEFT compiled"])
        lines += [f"**{name}**: hidden {size['hidden']}, {size['layers']} layers, vocabulary {size['vocab']}, batch "
                  f"{size['batch']} x {size['seq']}; LoRA r={RANK} on 7 projections. Adapter / base MACs "
                  f"{result['adapter_macs'] / result['base_macs']:.3f}, so the limit is {limit / floor:.3f} x floor. "
                  f"Load average {min(result['loads']):.2f}-{max(result['loads']):.2f}.", "",
                  "| configuration | median step | / floor | / limit | / best PEFT |", "|---|---:|---:|---:|---:|"]
        for key in CONFIGS:
            lines.append(f"| {key} | {1e3 * m[key]:.1f} ms | {m[key] / floor:.3f} | {m[key] / limit:.3f} | "
                         f"{m[key] / best_peft:.3f} |")
        lines.append("")
        goals += [(f"our compiled LoRA step / best PEFT step, {name}", m["ours compiled"] / best_peft,
                   0.85 if device == "cuda" else 0.97),
                  (f"our compiled LoRA step / analytic limit, {name}", m["ours compiled"] / limit, 1.05),
                  (f"our eager LoRA step / PEFT eager, {name}", m["ours eager"] / m["PEFT eager"], 1.00)]
    lines += ["| goal | measured | target | |", "|---|---:|---:|---|"]
    lines += [f"| {goal} | {value:.3f} | ≤ {target} | {'met' if value <= target else 'not met'} |"
              for goal, value, target in goals]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--write", action="store_true", help=f"write the section {SECTION!r} of --results")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results = {name: run_shape(name, args.rounds, args.steps, args.device) for name in args.shapes}
    text = report(results, args.device)
    print(text)
    if args.write:
        replace_section(args.results, text.splitlines()[0], text)


if __name__ == "__main__":
    main()
