"""ONNX export at scale (issue 18): time, peak memory and where the time goes.

Model: Qwen2.5-0.5B's shape from a config with random weights (hidden 896, MLP 4864, 14 heads,
2 KV heads, vocabulary 151936, tied embeddings; 24 layers = 494M parameters, 1.98 GB fp32),
`--layers N` for fewer. LoRA rank 16 on every linear layer ("all-linear"), captured with
use_cache=False on (2, 8) input ids. Configurations, each in a fresh subprocess:

  merged      lfx.export_onnx(gm, mode="merged")       adapters folded into the weights
  adapters    lfx.export_onnx(gm, mode="adapters")     + one .onnx_adapter file
  generation  lfx.export_generation(model, gm, dir)    KV-cache decoder + adapter + genai config

Peak memory: the process's VmHWM (/proc/self/status) during the export minus its resident
size before it (the model and the graph already in memory), next to the model's bytes.
Stages (exclusive: a stage inside another counts for the outer one): wall time inside torch.export (the exporter's trace of the graph; for generation
also the decode graph's capture), the exporter's decomposition (a second trace) and
translation, lowrank_fx's fold and graph clean-up (export/optimize.py), writing the files,
and the eager forward that names the outputs. `--latency` compares ONNX Runtime latency of
a small model (4 layers, hidden 256) exported with our clean-up, with onnxscript's full
optimizer and with none.

    python benchmarks/bench_onnx_scale.py                 # 24 layers, ~10 minutes on 2 cores
    python benchmarks/bench_onnx_scale.py --layers 4 --configs merged
    python benchmarks/bench_onnx_scale.py --latency
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = ("merged", "adapters", "generation")


def _status(field: str) -> float:
    """A /proc/self/status memory field in GiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {field} in /proc/self/status")


def build(layers: int, hidden: int = 896, mlp: int = 4864, heads: int = 14, vocab: int = 151936):
    import transformers as T

    torch.manual_seed(0)
    config = T.Qwen2Config(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=2, vocab_size=vocab,
                           tie_word_embeddings=True)
    return T.Qwen2ForCausalLM(config).eval()


_ACTIVE: list[str] = []  # the stage being timed: a stage called inside another counts for the outer one


def _timed(times: dict, label: str, owner, name: str) -> None:
    """Accumulate the wall time of owner.name(...) under `label` (unless inside another stage)."""
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        if _ACTIVE:
            return inner(*args, **kwargs)
        _ACTIVE.append(label)
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            times[label] = times.get(label, 0.0) + time.perf_counter() - start
            _ACTIVE.pop()

    setattr(owner, name, wrapper)


def _instrument(times: dict) -> None:
    from torch.onnx._internal.exporter import _core

    from lowrank_fx.export import onnx as onnx_export
    from lowrank_fx.generation import export as generation_export

    _timed(times, "torch.export", torch.export, "export")
    _timed(times, "decompose", _core, "_prepare_exported_program_for_export")
    _timed(times, "translate", _core, "_exported_program_to_onnx_program")
    for label, name in [("fold", "merged_graph"), ("clean-up", "optimize_graph"), ("write", "save"),
                        ("adapter files", "export_onnx_adapter"), ("eager forward", "_output_names")]:
        _timed(times, label, onnx_export, name)
    _timed(times, "decode capture", generation_export, "decode_graph")


def child(config: str, layers: int) -> dict:
    """Run one configuration in this process; the measurements as a dict."""
    import lowrank_fx as lfx

    model = build(layers)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    kwargs = {"input_ids": ids, "use_cache": False}
    gm = lfx.rewrite(model, lfx.Spec("all-linear", lfx.LoRA(rank=16)), example_kwargs=kwargs)
    times: dict[str, float] = {}
    _instrument(times)
    before = _status("VmRSS")
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        if config == "generation":
            lfx.export_generation(model, gm, directory)
        else:
            lfx.export_onnx(gm, Path(directory) / "model.onnx", example_kwargs=kwargs, mode=config)
        total = time.perf_counter() - start
        size = sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())
    return {"config": config, "layers": layers, "seconds": total, "peak_gib": _status("VmHWM") - before,
            "model_gib": model_bytes / 2**30, "files_gib": size / 2**30, "stages": times}


def latency() -> None:
    """ORT latency of a small model: our clean-up vs onnxscript's full optimizer vs none."""
    import numpy as np
    import onnx_ir as ir
    import onnxruntime as ort
    import onnxscript

    import lowrank_fx as lfx

    model = build(4, hidden=256, mlp=1024, heads=8, vocab=2048)
    ids = torch.randint(0, 2048, (2, 8), generator=torch.Generator().manual_seed(0))
    kwargs = {"input_ids": ids, "use_cache": False}
    gm = lfx.rewrite(model, lfx.Spec("all-linear", lfx.LoRA(rank=16, init="nonzero")), example_kwargs=kwargs)
    x = np.random.default_rng(0).integers(0, 2048, (4, 64)).astype(np.int64)
    sessions = {}
    with tempfile.TemporaryDirectory() as directory:
        for name in ("clean-up", "onnxscript full", "none"):
            path = Path(directory) / f"{name.replace(' ', '_')}.onnx"
            start = time.perf_counter()
            lfx.export_onnx(gm, path, example_kwargs=kwargs, mode="merged", optimize=name == "clean-up")
            if name == "onnxscript full":
                full = ir.load(path)
                onnxscript.optimizer.optimize_ir(full)
                ir.save(full, path)
            seconds = time.perf_counter() - start
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.log_severity_level = 3
            start = time.perf_counter()
            sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            print(f"{name}: export {seconds:.1f} s, {len(ir.load(path).graph)} nodes, "
                  f"session start {1e3 * (time.perf_counter() - start):.0f} ms")
    reference = sessions["onnxscript full"].run(None, {"input_ids": x})[0]
    runs: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(40):  # interleaved, so load from other processes hits every variant alike
        for name, session in sessions.items():
            start = time.perf_counter()
            out = session.run(None, {"input_ids": x})[0]
            runs[name].append(time.perf_counter() - start)
            assert np.abs(out - reference).max() <= 1e-4 * np.abs(reference).max()
    print("\n| graph | ORT latency (batch 4, seq 64, 1 thread) |\n|---|---|")
    for name, values in runs.items():
        print(f"| {name} | {1e3 * statistics.median(values):.2f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--latency", action="store_true", help="compare ORT latency of the clean-up and the full "
                                                               "optimizer")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers)))
        return
    if args.latency:
        latency()
        return
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {CONFIGS}")
    results = []
    for config in configs:
        run = subprocess.run([sys.executable, __file__, "--child", config, "--layers", str(args.layers)],
                             capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"{config} failed:\n{run.stderr[-3000:]}")
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(f"{config}: {results[-1]['seconds']:.1f} s", file=sys.stderr)
    print(f"\n{args.layers} layers, model {results[0]['model_gib']:.2f} GiB\n")
    print("| export | time | peak memory | peak / model | files |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['config']} | {r['seconds']:.1f} s | +{r['peak_gib']:.2f} GiB | "
              f"{r['peak_gib'] / r['model_gib']:.2f}x | {r['files_gib']:.2f} GiB |")
    stages = list(dict.fromkeys(s for r in results for s in r["stages"]))
    print("\n| stage | " + " | ".join(r["config"] for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for stage in stages:
        print(f"| {stage} | " + " | ".join(f"{r['stages'].get(stage, 0.0):.1f} s" for r in results) + " |")
    print("| other | " + " | ".join(f"{r['seconds'] - sum(r['stages'].values()):.1f} s" for r in results) + " |")


if __name__ == "__main__":
    main()
