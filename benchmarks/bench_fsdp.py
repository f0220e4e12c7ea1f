"""FSDP2 per layer against DDP and one process: per-rank memory and step time (issue 14).

Model: bench_train.py's Llama (its builder, imported) with 8 layers: hidden 256, 4 heads of 64,
MLP 704, vocabulary 1024; global batch 4 x 128 tokens, next-token cross entropy; LoRA rank 8
(alpha 16) on q/k/v/o/gate/up/down of every layer, rewritten with layers="auto" (one block per
decoder layer), trained by lfx.Trainer with AdamW (lr 1e-4, one rate for A and B), eager
(compile=False), one intra-op thread per process (OMP_NUM_THREADS=1).

Configurations, each in fresh processes:
  - single: one process on the global batch (Trainer without `distributed`);
  - ddp:    2 gloo ranks under torchrun, each on half the batch (distributed="ddp");
  - fsdp:   2 gloo ranks under torchrun, each on half the batch (distributed="fsdp":
            fully_shard per layer block, then the root).
Every process (rank) measures:
  - base-weight bytes: the frozen parameters it holds (for FSDP2 the local shards,
    `p.to_local().numel() * element_size()`), unique storages;
  - RSS: after imports, after building (model, rewrite, Trainer: sharded for FSDP), and the
    peak while training (VmHWM of /proc/self/status, reset to the current RSS by writing 5 to
    /proc/self/clear_refs just before training), with its growth over the built RSS;
    also the process's lifetime VmHWM;
  - step time: median of `--steps` optimizer steps after `--warmup` steps (the time between
    consecutive batches that Trainer.fit takes from its iterator).
The parent runs the configurations round-robin `--rounds` times (so the load of the machine
falls on all of them alike) and takes per-rank medians over rounds; it names the machine
(cpu, cores, load average before and after) and writes the "FSDP2 per layer (issue 14)"
section of RESULTS.md.

    python benchmarks/bench_fsdp.py            # ~5 minutes on 2 shared CPU cores
    python benchmarks/bench_fsdp.py --quick    # 2 small layers: checks that everything runs
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_train import SIZES, TARGETS  # noqa: E402

SECTION = "## FSDP2 per layer (issue 14)"
LORA_RANK = 8
CONFIGS = ["single", "ddp", "fsdp"]
MIB = 2**20


def size_of(quick: bool) -> dict:
    return dict(SIZES["quick"], layers=2) if quick else dict(SIZES["full"], layers=8)


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    """VmHWM back to the current RSS (Linux >= 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def base_bytes(*modules) -> tuple[int, int]:
    """(bytes held by this process, full bytes) of the frozen parameters, unique storages."""
    held, full, seen = 0, 0, set()
    for module in modules:
        for param in module.parameters():
            if param.requires_grad:
                continue
            local = param.to_local() if hasattr(param, "to_local") else param
            key = local.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            held += local.numel() * local.element_size()
            full += param.numel() * param.element_size()
    return held, full


def worker(mode: str, quick: bool, steps: int, warmup: int) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from bench_train import build_model

    import lowrank_fx as lfx

    torch.set_num_threads(1)
    rss_imported = status_kib("VmRSS")
    rank, world = 0, 1
    if mode != "single":
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    size = size_of(quick)
    shard = size["batch"] // world
    g = torch.Generator().manual_seed(1)
    every = [torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=g) for _ in range(warmup + steps)]
    mine = [b[rank * shard:(rank + 1) * shard] for b in every]

    spec = lfx.Spec(targets=[f"*.{t}" for t in TARGETS], method=lfx.LoRA(rank=LORA_RANK, alpha=2.0 * LORA_RANK))
    gm = lfx.rewrite(build_model(size), spec, example_inputs=(mine[0],), example_kwargs={"use_cache": False},
                     layers="auto").train()  # build_model seeds 0: every rank starts from the same weights

    def loss_fn(model, ids):
        logits = model(ids, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    trainer = lfx.Trainer(gm, loss_fn, lr=1e-4, loraplus_ratio=1.0, compile=False, progress=False,
                          distributed={"single": False, "ddp": "ddp", "fsdp": "fsdp"}[mode])
    held, full = base_bytes(gm, trainer.train_graph)
    trainable = sum(p.numel() for p in trainer.params)
    if mode != "single":
        dist.barrier()
    rss_built = status_kib("VmRSS")
    lifetime_before = status_kib("VmHWM")
    reset = reset_peak()
    stamps: list[float] = []

    def timed(batches):
        for batch in batches:
            stamps.append(time.perf_counter())
            yield batch

    out = trainer.fit(timed(mine), steps=warmup + steps)
    stamps.append(time.perf_counter())
    peak = status_kib("VmHWM")
    times = [b - a for a, b in itertools.pairwise(stamps)][warmup:]
    if mode != "single":
        dist.barrier()
        dist.destroy_process_group()
    return {"mode": mode, "rank": rank, "world": world, "rank_batch": shard, "trainable": trainable,
            "base_held": held, "base_full": full, "rss_imported_mib": rss_imported / 1024,
            "rss_built_mib": rss_built / 1024, "peak_mib": peak / 1024, "growth_mib": (peak - rss_built) / 1024,
            "peak_reset": reset, "lifetime_hwm_mib": max(lifetime_before, peak) / 1024,
            "step_s": statistics.median(times), "step_min_s": min(times), "steps": len(times),
            "loss": out["loss"]}


def launch(mode: str, args) -> list[dict]:
    """One configuration in fresh processes; each rank's result."""
    import tempfile

    where = tempfile.mkdtemp(prefix="bench_fsdp-")
    tail = ["--worker", mode, "--steps", str(args.steps), "--warmup", str(args.warmup), "--result-dir", where] + (
        ["--quick"] if args.quick else [])
    if mode == "single":
        command = [sys.executable, __file__, *tail]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, *tail]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH":
           os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=HERE.parent)
    if out.returncode:
        sys.exit(f"{mode} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    found = [json.loads(path.read_text()) for path in sorted(Path(where).glob("rank*.json"))]
    for path in Path(where).glob("rank*.json"):
        path.unlink()
    os.rmdir(where)
    expected = 1 if mode == "single" else 2
    if len(found) != expected:
        sys.exit(f"{mode}: {len(found)} results, expected {expected}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return sorted(found, key=lambda r: r["rank"])


def combine(runs: list[list[dict]]) -> list[dict]:
    """Per rank: the median over rounds of every number (exact ones are equal in every round)."""
    ranks = []
    for per_rank in zip(*runs):
        merged = dict(per_rank[0])
        for key, value in merged.items():
            if isinstance(value, float):
                merged[key] = statistics.median(r[key] for r in per_rank)
        merged["step_s_rounds"] = [r["step_s"] for r in per_rank]
        ranks.append(merged)
    return ranks


def report(results: dict, size: dict, info: dict, loads: list[float], args, seconds: float) -> str:
    one = results["single"][0]
    names = {"single": "one process, global batch", "ddp": "DDP, half the batch per rank",
             "fsdp": "FSDP2 per layer, half the batch per rank"}
    rows = ["| configuration | ranks | base weights held per rank | vs one process | peak RSS per rank, training "
            "(growth over built) "
            "| vs one process (growth) | RSS built per rank | step median (min) | vs one process |",
            "|---|---|---|---|---|---|---|---|---|"]
    for mode in CONFIGS:
        ranks = results[mode]
        held = max(r["base_held"] for r in ranks)
        peak = max(r["peak_mib"] for r in ranks)
        growth = max(r["growth_mib"] for r in ranks)
        built = max(r["rss_built_mib"] for r in ranks)
        step = max(r["step_s"] for r in ranks)
        step_min = max(r["step_min_s"] for r in ranks)
        rows.append(f"| {names[mode]} | {len(ranks)} | {held / MIB:.2f} MiB | {held / one['base_held']:.2f}x | "
                    f"{peak:.0f} ({growth:.1f}) MiB | {peak / one['peak_mib']:.2f}x "
                    f"({growth / one['growth_mib']:.2f}x) | "
                    f"{built:.0f} MiB | {1000 * step:.0f} ({1000 * step_min:.0f}) ms | {step / one['step_s']:.2f}x |")
    fsdp, ddp = results["fsdp"], results["ddp"]
    per_rank = "; ".join(f"{mode} " + " / ".join(f"{r['base_held'] / MIB:.2f}" for r in results[mode]) for mode in ("ddp", "fsdp"))
    steps_rounds = "; ".join(f"{mode} " + ", ".join(f"{1000 * max(v):.0f}" for v in zip(*[r["step_s_rounds"] for r in results[mode]]))
                             for mode in CONFIGS)
    fsdp_held = max(r["base_held"] for r in fsdp)
    fsdp_peak, ddp_peak = max(r["peak_mib"] for r in fsdp), max(r["peak_mib"] for r in ddp)
    reset_ok = all(r["peak_reset"] for mode in CONFIGS for r in results[mode])
    lines = [SECTION, "",
             f"Machine: {info['cpu']}, {info['cores']} cores (shared with other work), torch {info['torch']}"
             + (f", {info['cuda']}" if info["cuda"] else " (CPU)") + f", Python {info['python']}; load average (1 min) "
             f"{loads[0]:.2f} before, {loads[-1]:.2f} after (over the runs: {', '.join(f'{x:.2f}' for x in loads)}); "
             f"the whole run took {seconds:.0f} s. `benchmarks/bench_fsdp.py`: Llama hidden {size['hidden']}, "
             f"{size['layers']} layers, {size['heads']} heads, MLP {size['ff']}, vocabulary {size['vocab']}, global "
             "batch "
             f"{size['batch']} x {size['seq']}, LoRA rank {LORA_RANK} on q/k/v/o/gate/up/down ({one['trainable']:,} "
             f"trainable), graph rewritten with layers=\"auto\", lfx.Trainer with AdamW, eager, one thread per process "
             f"(OMP_NUM_THREADS=1); the 2-rank runs are torchrun subprocesses with gloo on this one host. Each "
             f"configuration ran {args.rounds} time(s) round-robin in fresh processes; per rank the median over "
             "rounds, "
             f"in the table the larger rank's value. Step: median of {args.steps} steps after {args.warmup} warm-up. "
             f"Peak RSS: VmHWM while training"
             + (" (reset to the current RSS just before the first step)" if reset_ok else " (lifetime: the reset was "
                                                                                          "refused)")
             + "; built: RSS after the model, the rewrite and the Trainer (sharded for FSDP2). An import-only process "
             f"has RSS {one['rss_imported_mib']:.0f} MiB.", "", *rows, "",
             "- Base weights held per rank (frozen parameters, FSDP2's local shards; MiB, rank 0 / rank 1): "
             f"{per_rank}; "
             f"the whole base is {one['base_full'] / MIB:.2f} MiB. FSDP2 holds "
             f"{max(r['base_held'] for r in fsdp) / one['base_held']:.2f}x of it per rank, DDP "
             f"{max(r['base_held'] for r in ddp) / one['base_held']:.2f}x (a full replica per rank).",
             f"- Step medians per round (ms, larger rank): {steps_rounds}.",
             "- Lifetime VmHWM per rank (includes capturing the graph before sharding): "
             + "; ".join(f"{mode} {max(r['lifetime_hwm_mib'] for r in results[mode]):.0f} MiB" for mode in CONFIGS) + ".",
             f"- What 2 gloo ranks on one host with 2 shared CPU cores can show is the split of the frozen weights "
             f"(FSDP2 holds {fsdp_held / one['base_held']:.2f}x of them per rank, DDP a full replica); at "
             f"{one['base_full'] / MIB:.1f} MiB in all they are small next to the {one['rss_built_mib']:.0f} MiB a "
             "built "
             f"process has resident, and here FSDP2's per-rank peak RSS is {abs(fsdp_peak - ddp_peak):.1f} MiB "
             f"{'above' if fsdp_peak > ddp_peak else 'below'} DDP's (its per-layer all-gather and reduce-scatter "
             "buffers, "
             "allocator and gloo-thread overheads are not broken down here); what it cannot show is speed, since both "
             "ranks share the same 2 cores with other work and gloo's collectives go through local memory, so these "
             "step times say nothing about FSDP2 across devices with a real interconnect.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 small layers: checks that everything runs")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=2, help="round-robin rounds over the configurations")
    parser.add_argument("--timeout", type=int, default=300, help="seconds one run may take")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--no-md", action="store_true", help="do not write RESULTS.md")
    parser.add_argument("--from-json", help="no runs: write the report from a --json file of an earlier run")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args.quick, args.steps, args.warmup)
        # a file per rank: ranks printing at once would interleave on torchrun's shared stdout
        (Path(args.result_dir) / f"rank{result['rank']}.json").write_text(json.dumps(result))
        return
        return
    from bench_train import machine

    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        for key in ("rounds", "steps", "warmup", "quick"):
            setattr(args, key, saved["args"][key])
        write(report(saved["results"], saved["size"], saved["machine"], saved["load_1min"], args, saved["seconds"]), args)
        return
    started = time.perf_counter()
    info = machine()
    loads, runs = [os.getloadavg()[0]], {mode: [] for mode in CONFIGS}
    for round_ in range(args.rounds):
        for mode in CONFIGS:
            runs[mode].append(launch(mode, args))
            loads.append(os.getloadavg()[0])
            print(f"round {round_ + 1} {mode}: " + json.dumps(runs[mode][-1]), flush=True)
    results = {mode: combine(runs[mode]) for mode in CONFIGS}
    size = size_of(args.quick)
    if args.json:
        seconds = time.perf_counter() - started
        Path(args.json).write_text(json.dumps({
            "machine": info, "size": size, "load_1min": loads, "seconds": seconds, "runs": runs, "results": results,
            "args": {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "quick": args.quick}}, indent=1))
    write(report(results, size, info, loads, args, time.perf_counter() - started), args)


def write(text: str, args) -> None:
    if not args.no_md and not args.quick:
        from results_md import replace_section

        replace_section(HERE / "RESULTS.md", SECTION, text)
    print(text)


if __name__ == "__main__":
    main()
