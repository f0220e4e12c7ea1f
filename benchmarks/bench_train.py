"""Training step time, compile time and memory: lowrank_fx against PEFT, in the same run.

Model: a Llama built from a config (transformers LlamaForCausalLM, random weights): hidden
256, 4 layers, 4 heads of 64, MLP 704, vocabulary 1024; batch 4 x 128 tokens, next-token
cross entropy. Every configuration adapts the same targets, q/k/v/o/gate/up/down of every
layer, and trains with AdamW (lr 1e-4, torch's default foreach implementation).

  - LoRA: rank 8, alpha 16, ours and PEFT's (LoraConfig).
  - RandLoRA: ours and PEFT's (RandLoraConfig), at the rank whose trainable count is closest
    to LoRA rank 8's (alpha 20 · r, PEFT's default ratio).
  - LoRTA: ours only (PEFT has none), rank 8; compared with our LoRA.

Each configuration runs in a fresh process (so compiled code, caches and allocator state do
not carry over; inductor's on-disk caches are switched off, so every compile is a cold one):
  - step: zero_grad, forward, loss, backward, optimizer.step;
  - first step: wall time of the first step (compiles, when compiled);
  - step time: median of `--steps` steps after two more warm-up steps;
  - compile time: first step minus the median step;
  - memory: on CUDA torch.cuda.max_memory_allocated over the timed steps; on CPU the peak
    resident set size (RSS, sampled every 1 ms by a thread from /proc/self/statm) during the
    timed steps, absolute and as growth over the RSS just before the first step (model built
    and adapted). Every process imports torch, transformers, peft and lowrank_fx, so the
    libraries' share of the RSS is the same for all. Eager runs also count the activations
    autograd saves for backward in one step (saved_tensors_hooks; unique storages that are
    not parameters or buffers), the part of training memory that adapters change.
Ours is compiled as lfx.Trainer does: torch.compile(gm, fullgraph=True, dynamic=True);
PEFT's model with torch.compile(model) (its default, static shapes: one shape here), and
for LoRA also with dynamic=True (what serving every batch and sequence length takes).

    OMP_NUM_THREADS=1 python benchmarks/bench_train.py            # ~15 minutes on 2 CPU cores
    OMP_NUM_THREADS=1 python benchmarks/bench_train.py --quick    # smaller model, a smoke test

One intra-op thread: on a 2-core machine shared with other work, two OpenMP threads wait on
each other at every op (tens of ms per small matmul), which swamps what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK = 8
SIZES = {"full": dict(hidden=256, layers=4, heads=4, ff=704, vocab=1024, batch=4, seq=128),
         "quick": dict(hidden=64, layers=2, heads=4, ff=128, vocab=256, batch=2, seq=32)}
# (library, method, modes): "compiled" is ours with dynamic=True and PEFT with its default
# (static shapes); "dynamic" is PEFT compiled with dynamic=True, ours' setting.
CONFIGS = [("ours", "lora", ("eager", "compiled")), ("peft", "lora", ("eager", "compiled", "dynamic")),
           ("ours", "lorta", ("eager", "compiled")), ("ours", "randlora", ("eager", "compiled")),
           ("peft", "randlora", ("eager", "compiled"))]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak RSS while the block runs, sampled by a thread every millisecond."""

    def __enter__(self):
        self.peak, self.running = rss_bytes(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_bytes())


def build_model(size: dict):
    import torch
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["ff"],
                           num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                           num_key_value_heads=size["heads"], max_position_embeddings=2 * size["seq"])
    return T.LlamaForCausalLM(config).train()


def randlora_rank(size: dict) -> int:
    """The RandLoRA rank whose trainable count is closest to LoRA rank 8's, for these shapes."""
    import math

    shapes = [(size["hidden"], size["hidden"])] * 4 + [(size["ff"], size["hidden"])] * 2 + [(size["hidden"], size["ff"])]
    lora = sum(LORA_RANK * (o + i) for o, i in shapes)
    count = lambda r: sum(math.ceil(min(o, i) / r) * (r + min(o, i)) for o, i in shapes)  # noqa: E731
    return min(range(4, 65, 2), key=lambda r: abs(count(r) - lora))


def adapted(lib: str, method: str, size: dict, ids):
    import peft

    import lowrank_fx as lfx

    model = build_model(size)
    rank = randlora_rank(size) if method == "randlora" else LORA_RANK
    if lib == "peft":
        if method == "lora":
            config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0)
        else:
            config = peft.RandLoraConfig(r=rank, randlora_alpha=20 * rank, target_modules=TARGETS)
        return peft.get_peft_model(model, config), rank
    methods = {"lora": lfx.LoRA(rank=rank, alpha=2.0 * rank), "lorta": lfx.LoRTA(rank=rank),
               "randlora": lfx.RandLoRA(rank=rank, alpha=20.0 * rank)}
    spec = lfx.Spec(targets=[f"*.{t}" for t in TARGETS], method=methods[method])
    gm = lfx.rewrite(model, spec, example_inputs=(ids,), example_kwargs={"use_cache": False}).train()
    return gm, rank


def run_one(lib: str, method: str, mode: str, size_name: str, steps: int) -> dict:
    """Time one configuration in this process."""
    import peft  # noqa: F401  (imported in every process: same library RSS for all)
    import torch
    import torch.nn.functional as F

    size = SIZES[size_name]
    torch.manual_seed(0)
    ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]))
    model, rank = adapted(lib, method, size, ids)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    compiled = mode != "eager"
    if lib == "ours" and compiled:
        run = torch.compile(model, fullgraph=True, dynamic=True)
    elif compiled:
        run = torch.compile(model, dynamic=True) if mode == "dynamic" else torch.compile(model)
    else:
        run = model
    cuda = torch.cuda.is_available()

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = run(ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()

    before = rss_bytes()
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    step(), step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    with PeakRSS() as rss:
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    saved = None if compiled else saved_bytes(model, step)
    return {"lib": lib, "method": method, "compiled": compiled, "dynamic": compiled and (lib == "ours" or mode == "dynamic"),
            "rank": rank,
            "trainable": sum(p.numel() for p in params), "first_step_s": first, "step_s": median,
            "step_min_s": min(times), "compile_s": max(first - median, 0.0) if compiled else None,
            "peak_mib": (torch.cuda.max_memory_allocated() if cuda else rss.peak) / 2**20,
            "growth_mib": None if cuda else (rss.peak - before) / 2**20,
            "saved_mib": None if saved is None else saved / 2**20,
            "memory": "cuda max_memory_allocated" if cuda else "peak RSS"}


def saved_bytes(model, step) -> int:
    """Bytes autograd keeps for backward in one eager step: unique storages of saved tensors
    that are not parameters or buffers."""
    import torch

    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def table(results: list[dict]) -> str:
    rows = ["| library | method | rank | trainable | compiled (shapes) | step median (min) | first step | compile | "
            "peak RSS (growth) | saved activations |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        compile_s = f"{r['compile_s']:.1f} s" if r["compile_s"] is not None else "-"
        rows.append(f"| {r['lib']} | {r['method']} | {r['rank']} | {r['trainable']:,} | "
                    f"{('yes, dynamic' if r['dynamic'] else 'yes, static') if r['compiled'] else 'no'} | "
                    f"{1000 * r['step_s']:.0f} ({1000 * r['step_min_s']:.0f}) ms | {r['first_step_s']:.1f} s | "
                    f"{compile_s} | "
                    f"{r['peak_mib']:.0f} ({r['growth_mib']:.0f}) MiB | "
                    f"{'-' if r['saved_mib'] is None else format(r['saved_mib'], '.1f') + ' MiB'} |")
    return "\n".join(rows)


def ratios(results: list[dict]) -> list[str]:
    get = {(r["lib"], r["method"], r["compiled"]): r for r in results if not (r["lib"] == "peft" and r["dynamic"])}
    lines = []

    def line(goal, value, limit):
        lines.append(f"- {goal}: {value:.2f} (goal ≤ {limit}) **{'met' if value <= limit else 'not met'}**")

    ours = get[("ours", "lora", True)]
    best_peft = min(get[("peft", "lora", False)]["step_s"], get[("peft", "lora", True)]["step_s"])
    line("our compiled LoRA step / best PEFT LoRA step (eager or compiled)", ours["step_s"] / best_peft, 0.85)
    line("our first-step compile / PEFT's (LoRA, PEFT static)", ours["compile_s"] / get[("peft", "lora", True)]["compile_s"], 1.0)
    dynamic = next((r for r in results if r["lib"] == "peft" and r["dynamic"]), None)
    if dynamic is not None:
        line("our first-step compile / PEFT's (LoRA, both dynamic=True)", ours["compile_s"] / dynamic["compile_s"], 1.0)
    for compiled in (False, True):
        tag = "compiled" if compiled else "eager"
        lora = get[("ours", "lora", compiled)]["step_s"]
        line(f"our RandLoRA / our LoRA step ({tag})", get[("ours", "randlora", compiled)]["step_s"] / lora, 1.3)
        best = min(get[("peft", "randlora", c)]["step_s"] for c in (False, True))
        line(f"our RandLoRA ({tag}) / best PEFT RandLoRA step", get[("ours", "randlora", compiled)]["step_s"] / best, 0.5)
        line(f"our LoRTA / our LoRA step ({tag})", get[("ours", "lorta", compiled)]["step_s"] / lora, 1.1)
    for method in ("lora", "randlora"):
        for compiled in (False, True):
            value = get[("ours", method, compiled)]["peak_mib"] / get[("peft", method, compiled)]["peak_mib"]
            line(f"our peak RSS / PEFT's ({method}, {'compiled' if compiled else 'eager'})", value, 1.0)
        value = get[("ours", method, False)]["saved_mib"] / get[("peft", method, False)]["saved_mib"]
        line(f"our saved activations / PEFT's ({method}, eager)", value, 1.0)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small model: checks that everything runs")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--one", nargs=3, metavar=("LIB", "METHOD", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "bench_train.json"))
    args = parser.parse_args()
    size = "quick" if args.quick else "full"
    if args.one:
        lib, method, mode = args.one
        print(json.dumps(run_one(lib, method, mode, size, args.steps)))
        return
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1", "TOKENIZERS_PARALLELISM": "false"}
    results, loads = [], []
    for lib, method, modes in CONFIGS:
        for mode in modes:
            loads.append(os.getloadavg()[0])
            command = [sys.executable, __file__, "--one", lib, method, mode, "--steps", str(args.steps)]
            out = subprocess.run(command + (["--quick"] if args.quick else []), env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{lib} {method} {mode} failed:\n{out.stderr[-4000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    loads.append(os.getloadavg()[0])
    report = {"machine": machine(), "size": SIZES[size], "load_1min": loads, "results": results}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report["machine"]), f"load {min(loads):.2f}-{max(loads):.2f}")
    print(table(results))
    print("\n".join(ratios(results)))


if __name__ == "__main__":
    main()
