"""Teacher–student fit: LoRA, LoRTA and RandLoRA at equal trainable-parameter budgets, and
LoRA against LoRA+ (ratio 16). Also step time and memory per method on the same model.

Student: a small Llama-shaped stack (RMSNorm, causal multi-head attention with q/k/v/o,
SwiGLU MLP with gate/up/down; width 64, 4 heads of 16, MLP 128, 4 layers), random weights,
fed Gaussian inputs (batch 8 x 16 tokens), captured with torch.fx.symbolic_trace (so
LoRTA is given head_dim=16 rather than reading it from the graph). Teacher: the student with a full-rank Gaussian
ΔW added to every one of its 28 projections. Loss: MSE(student, teacher) divided by the
MSE of the un-adapted student, so every curve starts at 1. Every method adapts all 28
projections; budgets are matched to LoRA's (rank `--lora-rank`) by picking the LoRTA and
RandLoRA ranks whose trainable counts come closest. Each configuration is trained with
AdamW at every learning rate of `--lrs`; the best final loss is plotted.

Cost, each method in a fresh process: step time (median and minimum of 50 steps after 3
warm-up steps), the bytes autograd saves for backward in one step (saved_tensors_hooks, unique
storages that are not parameters or buffers), and peak memory: resource.getrusage's
ru_maxrss after the steps minus the RSS just before the first step.

    OMP_NUM_THREADS=2 python benchmarks/bench_methods.py          # ~3-5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import multiprocessing
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lowrank_fx as lfx

HERE = Path(__file__).resolve().parent
WIDTH, HEADS, FF, DEPTH, BATCH, TOKENS = 64, 4, 128, 4, 8, 16
HEAD_DIM = WIDTH // HEADS
STEPS_TIMED = 50
TARGETS = ["re:_proj$"]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(WIDTH), nn.RMSNorm(WIDTH)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(WIDTH, FF, bias=False), nn.Linear(WIDTH, FF, bias=False)
        self.down_proj = nn.Linear(FF, WIDTH, bias=False)

    def forward(self, x):
        b, t = x.shape[0], x.shape[1]
        def heads(y):
            return y.view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        h = self.norm1(x)
        a = F.scaled_dot_product_attention(heads(self.q_proj(h)), heads(self.k_proj(h)), heads(self.v_proj(h)),
                                           is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, WIDTH))
        h = self.norm2(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(DEPTH))

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def batch(step: int) -> torch.Tensor:
    return torch.randn(BATCH, TOKENS, WIDTH, generator=torch.Generator().manual_seed(1000 + step))


def make_teacher(student: nn.Module, scale: float) -> nn.Module:
    """The student plus a full-rank Gaussian ΔW (std `scale` x the weight's std) on every projection."""
    teacher = copy.deepcopy(student)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, weight in teacher.named_parameters():
            if name.endswith("_proj.weight"):
                delta = torch.randn(weight.shape, generator=generator) * weight.std() * scale
                assert torch.linalg.matrix_rank(delta) == min(weight.shape)
                weight += delta
    return teacher


def trainable(gm) -> int:
    return sum(p.numel() for p in gm.parameters() if p.requires_grad)


def matched_methods(student, lora_rank: int) -> dict[str, lfx.Method]:
    """LoRA at `lora_rank`, and the LoRTA / RandLoRA ranks whose budgets come closest to it."""
    def count(method):
        return lfx.plan(student, lfx.Spec(targets=TARGETS, method=method)).trainable
    budget = count(lfx.LoRA(rank=lora_rank))
    lorta = min(range(1, WIDTH + 1), key=lambda r: abs(count(lfx.LoRTA(rank=r, head_dim=HEAD_DIM)) - budget))
    randlora = min(range(1, WIDTH + 1), key=lambda r: abs(count(lfx.RandLoRA(rank=r)) - budget))
    return {"LoRA": lfx.LoRA(rank=lora_rank), "LoRTA": lfx.LoRTA(rank=lorta, head_dim=HEAD_DIM),
            "RandLoRA": lfx.RandLoRA(rank=randlora)}


def train(student, teacher, method, lr: float, steps: int, ratio: float | None, eval_every: int):
    """Eval-loss curve [(step, normalized loss)] of one run; ratio=None is plain AdamW."""
    torch.manual_seed(0)
    gm = lfx.rewrite(copy.deepcopy(student), lfx.Spec(targets=TARGETS, method=method))
    params = [p for p in gm.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if ratio is None
           else lfx.loraplus_optimizer(gm, lr=lr, ratio=ratio))
    held_out = batch(-1)
    with torch.no_grad():
        target = teacher(held_out)
        reference = F.mse_loss(student(held_out), target).item()
    curve = []
    for step in range(steps + 1):
        if step % eval_every == 0:
            with torch.no_grad():
                curve.append((step, F.mse_loss(gm(held_out), target).item() / reference))
        if step == steps:
            break
        x = batch(step)
        with torch.no_grad():
            y = teacher(x)
        loss = F.mse_loss(gm(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return curve


def best_run(student, teacher, method, lrs, steps, ratio, eval_every):
    runs = {lr: train(student, teacher, method, lr, steps, ratio, eval_every) for lr in lrs}
    lr = min(runs, key=lambda k: runs[k][-1][1])
    return {"lr": lr, "curve": runs[lr], "curves": {str(k): v for k, v in runs.items()},
            "final_by_lr": {str(k): v[-1][1] for k, v in runs.items()}}


def saved_bytes(gm, x) -> int:
    """Bytes autograd keeps for backward in one step, beyond parameters and buffers."""
    owned = {t.untyped_storage().data_ptr() for t in list(gm.parameters()) + list(gm.buffers())}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = gm(x).square().mean()
    loss.backward()
    return sum(storages.values())


def make_student() -> Student:
    torch.manual_seed(0)
    return Student().eval()


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def _measure(method, plain_autograd: bool, threads: int, queue) -> None:
    """Runs in a fresh process: step time, bytes saved for backward, peak RSS growth."""
    torch.set_num_threads(threads)
    gm = lfx.rewrite(make_student(), lfx.Spec(targets=TARGETS, method=method))
    if plain_autograd:
        _plain_autograd_randlora(gm)
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-3)
    x = batch(0)
    before = _rss_kib()
    times = []
    for step in range(3 + STEPS_TIMED):
        start = time.perf_counter()
        gm(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 3:  # the first steps allocate optimizer state
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"step_ms": 1000 * statistics.median(times), "min_step_ms": 1000 * min(times),
               "rss_growth_kib": peak - before,
               "saved_bytes": saved_bytes(gm, x)})


def _plain_autograd_randlora(gm) -> None:
    """Swap RandLoRA's custom backward for plain autograd (as PEFT computes it: Â is saved)."""
    from lowrank_fx.methods.randlora_ops import scaled_basis, sliced_bases

    def forward(unit, x, basis_A, basis_B):
        rank, n = unit.lam.shape
        A, Bc = sliced_bases(basis_A, basis_B, rank, n, unit.gamma.shape[1], unit.big)
        scaled = scaled_basis(A, unit.lam, unit.gamma)
        h = F.linear(F.linear(x, scaled), Bc) if unit.tall else F.linear(F.linear(x, Bc.t()), scaled.t())
        return h * unit.scale

    for group in gm.lowrank_fx.default.values():
        for unit in group.units.values():
            unit.forward = forward.__get__(unit)


def measure(method, threads: int, plain_autograd: bool = False) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(method, plain_autograd, threads, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def steps_to_reach(curve, level: float) -> int | None:
    return next((step for step, loss in curve if loss <= level), None)


def plot(results: dict, names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in names:
        r = results[name]
        steps, losses = zip(*r["curve"])
        ax.plot(steps, losses, label=f"{name} ({r['params']:,} params, lr {r['lr']:g})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out MSE / MSE of the base student")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cpu_model() -> str:
    """'model name (cpu family F, model M)' of the first CPU in /proc/cpuinfo."""
    fields = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if not key.strip() and fields:
            break
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", platform.processor() or "unknown CPU")
    return f"{name} (cpu family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def short(method) -> str:
    """The method with rank, alpha and any option that differs from its default."""
    shown = [f.name for f in dataclasses.fields(method)
             if f.name in ("rank", "alpha") or getattr(method, f.name) != f.default]
    return f"{type(method).__name__}(" + ", ".join(f"{k}={getattr(method, k)!r}" for k in shown) + ")"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lora-rank", type=int, default=2)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    parser.add_argument("--ratio", type=float, default=16.0)
    parser.add_argument("--teacher-scale", type=float, default=0.5)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()

    student = make_student()
    teacher = make_teacher(student, args.teacher_scale)
    methods = matched_methods(student, args.lora_rank)

    results = {}
    for name, method in methods.items():
        results[name] = best_run(student, teacher, method, args.lrs, args.steps, None, args.eval_every)
    results["LoRA+"] = best_run(student, teacher, methods["LoRA"], args.lrs, args.steps, args.ratio, args.eval_every)
    for name, r in results.items():
        method = methods["LoRA" if name == "LoRA+" else name]
        r["params"] = lfx.plan(student, lfx.Spec(targets=TARGETS, method=method)).trainable
        r["method"] = short(method)
        print(f"{name:9s} params {r['params']:6d}  lr {r['lr']:g}  final {r['curve'][-1][1]:.4f}  by lr "
              f"{r['final_by_lr']}")

    cost = {name: measure(method, args.threads) for name, method in methods.items()}
    cost["RandLoRA, plain autograd"] = measure(methods["RandLoRA"], args.threads, plain_autograd=True)
    for name, c in cost.items():
        print(f"{name:26s} {c}")

    plot(results, ["LoRA", "LoRTA", "RandLoRA"], HERE / "methods_equal_budget.png",
         f"Full-rank teacher, equal budgets (~{results['LoRA']['params']:,} params)")
    plot(results, ["LoRA", "LoRA+"], HERE / "lora_vs_loraplus.png", f"LoRA vs LoRA+ (ratio {args.ratio:g})")
    summary = {"results": results, "cost": cost, "seconds": time.time() - started, "threads": args.threads}
    (HERE / "bench_methods.json").write_text(json.dumps(summary, indent=1))
    write_results(args, summary)
    print(f"done in {summary['seconds']:.0f} s")


def write_results(args, summary) -> None:
    results, cost = summary["results"], summary["cost"]
    final = {name: r["curve"][-1][1] for name, r in results.items()}
    lora_final = final["LoRA"]
    reach = steps_to_reach(results["LoRA+"]["curve"], lora_final)
    ratio = None if reach is None else reach / args.steps
    reach_by_lr = {lr: steps_to_reach(curve, lora_final) for lr, curve in results["LoRA+"]["curves"].items()}
    lines = [
        "## Methods (issue 3)",
        "",
        f"`benchmarks/bench_methods.py` (defaults: {args.steps} steps, LoRA rank {args.lora_rank}, lrs "
        f"{args.lrs}, teacher scale {args.teacher_scale}). Machine: {cpu_model()}, "
        f"{multiprocessing.cpu_count()} cores, torch {torch.__version__}, {summary['threads']} thread(s); "
        f"the whole run took {summary['seconds']:.0f} s.",
        "",
        "Task: a 4-layer Llama-shaped student (width 64, 4 heads, SwiGLU 128) fits a teacher that is the "
        "student plus a full-rank Gaussian ΔW on all 28 projections. Loss: held-out MSE divided by the "
        "un-adapted student's, so 1.0 = no progress. Each method: best of the learning rates above.",
        "",
        "| method | options | trainable params | best lr | final loss | final loss per lr |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        by_lr = ", ".join(f"{float(k):g}: {v:.4g}" for k, v in r["final_by_lr"].items())
        options = r["method"] + (f", LoRA+ ratio {args.ratio:g}" if name == "LoRA+" else "")
        lines.append(f"| {name} | `{options}` | {r['params']:,} | {r['lr']:g} | {final[name]:.4f} | {by_lr} |")
    lines += [
        "",
        f"- RandLoRA ends {'lower' if final['RandLoRA'] < lora_final else 'higher'} than LoRA "
        f"({final['RandLoRA']:.4f} vs {lora_final:.4f}); LoRTA ends at {final['LoRTA']:.4f}.",
        (f"- LoRA+ reaches LoRA's final loss ({lora_final:.4f}) at step {reach} of {args.steps} "
         f"({ratio:.2f}x the steps): {'within' if ratio <= 0.6 else 'NOT within'} 0.6x."
         if reach is not None else
         f"- LoRA+ does not reach LoRA's final loss ({lora_final:.4f}) within {args.steps} steps "
         f"(its best final loss: {final['LoRA+']:.4f}).")
        + " Steps to LoRA's final loss at each LoRA+ lr: "
        + ", ".join(f"{float(lr):g}: {'never' if s is None else s}" for lr, s in reach_by_lr.items()) + ".",
        "- Plots: `benchmarks/methods_equal_budget.png`, `benchmarks/lora_vs_loraplus.png`.",
        "",
        "Cost per training step on the same student (batch 8 x 16 tokens, AdamW), each method in a fresh "
        f"process. Step time: median and minimum of {STEPS_TIMED} steps after 3 warm-up steps (at this size "
        "mostly per-op overhead, not arithmetic). Saved for backward: bytes of the unique storages autograd "
        "keeps between forward and backward (torch.autograd.graph.saved_tensors_hooks; parameters and buffers "
        f"excluded). Peak RSS growth: resource.getrusage ru_maxrss after the {3 + STEPS_TIMED} steps minus the "
        "RSS just before the first (coarse: page-granular and allocator-dependent).",
        "",
        "| method | step time, median / min (ms) | saved for backward (KiB) | peak RSS growth (KiB) |",
        "|---|---:|---:|---:|",
    ]
    for name, c in cost.items():
        lines.append(f"| {name} | {c['step_ms']:.1f} / {c['min_step_ms']:.1f} | {c['saved_bytes'] / 1024:.0f} "
                     f"| {c['rss_growth_kib']:,} |")
    lines += ["", "\"RandLoRA, plain autograd\" is the same update through ordinary autograd (as PEFT computes it), "
              "which keeps the scaled basis Â (N·r x d) of every target for backward; lowrank_fx's custom "
              "backward rebuilds it instead. One seed; the machine was shared with other jobs, so step times "
              "vary by tens of percent from run to run (losses and saved bytes are deterministic).", ""]
    _replace_section(args.results, "## Methods (issue 3)", "\n".join(lines))


def _replace_section(path: Path, header: str, text: str) -> None:
    """Put `text` in place of the section starting at `header` (up to the next '## '), else append."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    start = old.find(header)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(header))
        new = old[:start] + text + (old[end:] if end >= 0 else "")
    path.write_text(new.rstrip("\n") + "\n")


if __name__ == "__main__":
    main()
