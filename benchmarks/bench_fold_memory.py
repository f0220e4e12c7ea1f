"""Folding without a second model (issue 18, item 2): time and peak memory of each way to fold,
against PEFT's in-place merge_adapter on the same model with the same LoRA weights.

Model: Qwen2.5-0.5B's shape from a config (hidden 896, MLP 4864, 24 layers, 14 heads, 2 KV
heads, vocabulary 151936, tied embeddings), fp32, random weights; `--layers N` makes it
smaller. LoRA rank 16, alpha 16 (s = 1) on every linear layer but the head: ours
`Spec("all-linear", LoRA(rank=16))`, PEFT `LoraConfig(r=16, target_modules="all-linear")`,
both 7 per layer. A and B are drawn from one seed per target name and written into both, so
both fold the same ΔW = B A.

Operations, each in a fresh subprocess (the model built and, for ours, captured first):
  merged_state_dict  lfx.merged_state_dict(gm)
  load_merged        lfx.load_merged(model, gm), into the model the graph was captured from
  merge              lfx.merge(gm), a new dense graph
  merge_inplace      lfx.merge(gm, inplace=True)
  peft_merge_adapter PeftModel.merge_adapter(), in place

Measured around the call only: wall time, and the process's peak resident memory growth
(VmHWM after the call, reset with /proc/self/clear_refs just before, minus VmRSS before);
"kept" is VmRSS after the call minus before (the new tensors the result holds), "transient"
peak minus kept. Workers run with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors go back
to the system at once (glibc would otherwise keep some, blurring kept and transient); all
operations alike. With `--repeats R` the operations are interleaved round-robin R times;
the table gives the median time and the largest peak. The checksum (float64 sum of every
folded weight) shows all five fold the same numbers.

    OMP_NUM_THREADS=2 python benchmarks/bench_fold_memory.py --layers 24   # a 2 GB model: minutes
    OMP_NUM_THREADS=2 python benchmarks/bench_fold_memory.py --layers 2    # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zlib

OPERATIONS = ["merged_state_dict", "load_merged", "merge", "merge_inplace", "peft_merge_adapter"]
RANK = 16
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_model(layers: int):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                                      num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                      tie_word_embeddings=True, max_position_embeddings=512)
    return transformers.Qwen2ForCausalLM(config).eval()


def lora_factors(name: str, out_features: int, in_features: int):
    """(A (r, in), B (out, r)) for target `name`, from a seed of its own."""
    import torch

    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    a = torch.randn(RANK, in_features, generator=generator) / in_features ** 0.5
    b = torch.randn(out_features, RANK, generator=generator) * 0.01
    return a, b


def targets(model) -> list[str]:
    return [name for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in PROJECTIONS]


def _memory_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _prepare(operation: str, layers: int, cache_dir: str):
    """(the call to measure, a function of its result giving the folded weights by target)."""
    import torch

    import lowrank_fx as lfx

    model = build_model(layers)
    names = targets(model)
    if operation == "peft_merge_adapter":
        import peft

        wrapped = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear"))
        with torch.no_grad():
            for name in names:
                layer = wrapped.base_model.model.get_submodule(name)
                a, b = lora_factors(name, layer.out_features, layer.in_features)
                layer.lora_A["default"].weight.copy_(a)
                layer.lora_B["default"].weight.copy_(b)
        folded = lambda _: {n: wrapped.base_model.model.get_submodule(n).base_layer.weight for n in names}  # noqa: E731
        return wrapped.merge_adapter, folded
    ids = torch.randint(0, 1000, (1, 8))
    gm = lfx.rewrite(model, lfx.Spec("all-linear", method=lfx.LoRA(rank=RANK, alpha=float(RANK))),
                     example_inputs=(ids,), example_kwargs={"use_cache": False}, cache_dir=cache_dir)
    group = gm.lowrank_fx.default.lora
    assert sorted(group.target_names) == sorted(names), "ours and PEFT adapt different layers"
    with torch.no_grad():
        for name in names:
            unit = group.unit(name)
            a, b = lora_factors(name, unit.lora_B.shape[0], unit.lora_A.shape[1])
            unit.lora_A.copy_(a)
            unit.lora_B.copy_(b)
    if operation == "merged_state_dict":
        return (lambda: lfx.merged_state_dict(gm)), (lambda state: {n: state[f"{n}.weight"] for n in names})
    if operation == "load_merged":
        return (lambda: lfx.load_merged(model, gm)), (lambda m: {n: m.get_parameter(f"{n}.weight") for n in names})
    if operation == "merge":
        return (lambda: lfx.merge(gm)), (lambda g: {n: g.get_parameter(f"{n}.weight") for n in names})
    if operation == "merge_inplace":
        return (lambda: lfx.merge(gm, inplace=True)), (lambda g: {n: g.get_parameter(f"{n}.weight") for n in names})
    raise ValueError(f"unknown operation {operation!r}; one of {OPERATIONS}")


def worker(operation: str, layers: int, cache_dir: str) -> dict:
    import gc

    import torch

    call, folded = _prepare(operation, layers, cache_dir)
    gc.collect()
    before = _memory_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    with torch.no_grad():
        result = call()
    seconds = time.perf_counter() - start
    peak, after = _memory_kb("VmHWM"), _memory_kb("VmRSS")
    weights = folded(result)
    checksum = sum(float(w.detach().double().sum()) for w in weights.values())
    largest = max(w.numel() * w.element_size() for w in weights.values())
    return {"operation": operation, "seconds": seconds, "peak_mb": (peak - before) / 1024,
            "kept_mb": (after - before) / 1024, "checksum": checksum, "largest_weight_mb": largest / 2 ** 20,
            "targets": len(weights)}


def _run_worker(operation: str, layers: int, cache_dir: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, __file__, "--worker", operation, "--layers", str(layers), "--cache-dir", cache_dir]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{operation} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict[str, list[dict]]) -> str:
    peft = results["peft_merge_adapter"]
    peft_time = statistics.median(r["seconds"] for r in peft)
    peft_peak = max(r["peak_mb"] for r in peft)
    rows = ["| operation | time (s) | time / PEFT | peak growth (MB) | kept (MB) | transient (MB) | "
            "peak / PEFT peak | checksum |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for operation in [op for op in OPERATIONS if op in results]:
        runs = results[operation]
        seconds = statistics.median(r["seconds"] for r in runs)
        worst = max(runs, key=lambda r: r["peak_mb"])
        ratio = f"{worst['peak_mb'] / peft_peak:.2f}x" if peft_peak > 1 else "n/a"
        rows.append(f"| {operation} | {seconds:.2f} | {seconds / peft_time:.2f}x | {worst['peak_mb']:.0f} | "
                    f"{worst['kept_mb']:.0f} | {worst['peak_mb'] - worst['kept_mb']:.0f} | {ratio} | "
                    f"{runs[0]['checksum']:.6e} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", nargs="*", choices=OPERATIONS, help="a subset of the operations (PEFT is always run)")
    parser.add_argument("--worker", choices=OPERATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.layers, args.cache_dir)))
        return
    chosen = [op for op in OPERATIONS if not args.only or op in args.only or op == "peft_merge_adapter"]
    results: dict[str, list[dict]] = {op: [] for op in chosen}
    with tempfile.TemporaryDirectory() as cache_dir:  # the exported program, shared by our workers
        for _ in range(args.repeats):
            for operation in chosen:
                result = _run_worker(operation, args.layers, cache_dir)
                results[operation].append(result)
                print(f"{operation}: {result['seconds']:.2f} s, peak +{result['peak_mb']:.0f} MB", file=sys.stderr)
    first = results["peft_merge_adapter"][0]
    print(f"Qwen2.5-0.5B shape, {args.layers} layers, fp32; LoRA r={RANK} on {first['targets']} linear layers; "
          f"largest folded weight {first['largest_weight_mb']:.1f} MB; {args.repeats} round(s)\n")
    print(table(results))


if __name__ == "__main__":
    main()
