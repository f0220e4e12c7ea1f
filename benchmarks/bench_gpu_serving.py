"""Serving on a GPU: ONNX Runtime's CUDA provider, merged vs unmerged adapters, and KV-cache
generation through GenerationSession (ONNX Runtime) on CUDA.

The narrow Llama of bench_limit.py (hidden 256, 4 layers), LoRA r=16 on 7 projections. Latency
is the median of `--repeats` runs after warm-up, configurations interleaved; batch 8 x 64 for
the forward, 4 prompts of 16 tokens and 32 new tokens for generation. Needs onnxruntime-gpu
(CUDAExecutionProvider); without it the script says so and writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_limit import RANK, SHAPES  # noqa: E402
from bench_train import TARGETS, build_model  # noqa: E402
from results_md import replace_section  # noqa: E402

SECTION = "## Serving on a GPU (issue 13)"


def _median_ms(fn, repeats: int) -> float:
    fn(), fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main() -> None:
    import onnxruntime as ort
    import torch

    import lowrank_fx as lfx

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu); nothing measured")
    size = SHAPES["narrow"]
    torch.manual_seed(0)
    ids = torch.randint(0, size["vocab"], (8, 64))
    spec = lfx.Spec(targets=[f"*.{t}" for t in TARGETS], method=lfx.LoRA(rank=RANK, alpha=2.0 * RANK, init="nonzero"))
    model = build_model(size).eval()
    gm = lfx.rewrite(model, spec, example_inputs=(ids,), example_kwargs={"use_cache": False})
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        kwargs = dict(example_inputs=(ids,), example_kwargs={"use_cache": False})
        merged = lfx.export_onnx(gm, Path(tmp) / "merged.onnx", mode="merged", **kwargs).session(providers=cuda)
        unmerged = lfx.export_onnx(gm, Path(tmp) / "unmerged.onnx", mode="adapters", **kwargs).session(providers=cuda)
        feeds = {"input_ids": ids.numpy()}
        timings = {"merged": lambda: merged.run(feeds), "unmerged, adapter active": lambda: unmerged.run(feeds, adapter="default")}
        results = {name: _median_ms(fn, args.repeats) for name, fn in timings.items()}
        rows += [f"| ORT CUDA forward, batch 8 x 64, {name} | {ms:.2f} ms |" for name, ms in results.items()]
        rows.append(f"| unmerged / merged | {results['unmerged, adapter active'] / results['merged']:.2f}x |")
        export = lfx.export_generation(model, gm, Path(tmp) / "generation")
        session = lfx.GenerationSession(export.directory, providers=cuda)
        prompts = torch.randint(0, size["vocab"], (4, 16))
        ms = _median_ms(lambda: session.generate(prompts, adapter="default", max_new_tokens=32), max(5, args.repeats // 10))
        rows.append(f"| GenerationSession (ORT CUDA), 4 prompts x 16, 32 new tokens | {ms:.1f} ms |")
        try:
            import onnxruntime_genai as og
            rows.append(f"| onnxruntime-genai {og.__version__} | installed; run lfx's genai example with provider cuda "
                        "|")
        except ImportError:
            rows.append("| onnxruntime-genai | not installed: not measured |")
    text = "\n".join([SECTION, "", "`benchmarks/bench_gpu_serving.py`, GPU "
                                   f"{torch.cuda.get_device_name() if torch.cuda.is_available() else '?'}, "
                      f"onnxruntime {ort.__version__}.", "", "| figure | value |", "|---|---:|", *rows]) + "\n"
    print(text)
    replace_section(args.results, SECTION, text)


if __name__ == "__main__":
    main()
