"""Quantized bases in ONNX Runtime: file size and latency, merged (dense) against unmerged
(integer base, adapters as inputs).

Model: the Llama of bench_quantized.py's step-time runs (hidden 256, 4 layers, SwiGLU 704,
vocabulary 1024), every linear layer but lm_head quantized (lfx.quantize_base for int8, nf4
and int4; bitsandbytes Linear4bit for bnb-nf4), LoRA rank 8 on all 28 projections with
non-zero factors. Exports: `mode="merged"` (the dense fold) and `mode="adapters"` (each
quantized layer MatMulNBits / MatMulBnb4, export/quantized_ops.py), plus the fp32 model's
unmerged export for reference. Latency: ORT CPU, 1 intra-op thread, batch 4 x 64, median of
`--repeats` runs after warm-up, the sessions interleaved round-robin. Parity: max relative
error of the unmerged export's logits against the graph in PyTorch.

    OMP_NUM_THREADS=1 python benchmarks/bench_quantized_onnx.py --write      # ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_quantized import _ids, _model  # noqa: E402
from results_md import replace_section  # noqa: E402

SECTION = "## Quantized bases in ONNX Runtime (issue 12)"
BASES = ["fp32", "int8", "nf4", "int4", "bnb-nf4"]


def _size(files) -> int:
    return sum(f.stat().st_size for f in files if f.suffix in (".onnx", ".data"))


def main() -> None:
    import numpy as np
    import onnxruntime as ort
    import torch

    import lowrank_fx as lfx

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--write", action="store_true", help=f"write the section {SECTION!r} of RESULTS.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    ids = _ids()
    spec = lfx.Spec("all-linear", method=lfx.LoRA(rank=8, alpha=16.0, init="nonzero"))
    rows, runs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for base in BASES:
            gm = lfx.rewrite(_model(base).eval(), spec, example_inputs=(ids,), example_kwargs={"use_cache": False}).eval()
            with torch.no_grad():
                reference = gm(ids).logits.numpy()
            kwargs = dict(example_inputs=(ids,), example_kwargs={"use_cache": False})
            merged = lfx.export_onnx(gm, Path(tmp) / f"{base}-merged.onnx", mode="merged", **kwargs)
            unmerged = lfx.export_onnx(gm, Path(tmp) / f"{base}-unmerged.onnx", mode="adapters", **kwargs)
            sessions = {"merged": merged.session(session_options=options, providers=["CPUExecutionProvider"]),
                        "unmerged": unmerged.session(session_options=options, providers=["CPUExecutionProvider"])}
            got = sessions["unmerged"].run({"input_ids": ids.numpy()}, adapter="default")["logits"]
            rows[base] = {"merged_bytes": _size(merged.files), "unmerged_bytes": _size(unmerged.files),
                          "parity": float(np.abs(got - reference).max() / np.abs(reference).max())}
            runs[(base, "merged")] = lambda s=sessions["merged"]: s.run({"input_ids": ids.numpy()})
            runs[(base, "unmerged")] = lambda s=sessions["unmerged"]: s.run({"input_ids": ids.numpy()}, adapter="default")
        times = {key: [] for key in runs}
        for fn in runs.values():
            fn(), fn()
        load = [os.getloadavg()[0]]
        for _ in range(args.repeats):
            for key, fn in runs.items():
                started = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - started)
        load.append(os.getloadavg()[0])
    ms = {key: 1e3 * statistics.median(t) for key, t in times.items()}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    lines = [SECTION, "",
             f"`benchmarks/bench_quantized_onnx.py` (its docstring gives the model and the timing). Machine: {cpu}, "
             f"{os.cpu_count()} cores, onnxruntime {ort.__version__}, 1 intra-op thread; load average "
             f"{min(load):.2f}-{max(load):.2f}.", "",
             "| base | merged file | unmerged file | unmerged vs fp32 unmerged | merged latency | unmerged latency | "
             "unmerged / merged | unmerged parity vs PyTorch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for base in BASES:
        r = rows[base]
        lines.append(f"| {base} | {r['merged_bytes'] / 2**20:.2f} MiB | {r['unmerged_bytes'] / 2**20:.2f} MiB | "
                     f"{r['unmerged_bytes'] / rows['fp32']['unmerged_bytes']:.2f}x | {ms[(base, 'merged')]:.2f} ms | "
                     f"{ms[(base, 'unmerged')]:.2f} ms | {ms[(base, 'unmerged')] / ms[(base, 'merged')]:.2f}x | "
                     f"{r['parity']:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        replace_section(HERE / "RESULTS.md", SECTION, text)


if __name__ == "__main__":
    main()
