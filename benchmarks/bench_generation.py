"""Generation with adapters: prefill and decode latency per runtime, adapter, and switching.

Model: a Llama-shaped decoder with random weights, about 20M parameters (4 layers, hidden
512, 8 heads, 4 KV heads, SwiGLU 1408, vocabulary 8192), four LoRA adapters a, b, c, d of
rank 8 on q, k, v, o, gate, up, down (random non-zero factors). One `lfx.export_generation`
(adapters swappable, plus the per-row decoder).

Configurations, each a request of one prompt (64 tokens) and greedy decoding, EOS off:

  ORT none / a / switch   lfx.GenerationSession, no adapter, adapter a, a and b alternating per request
  genai none / a / switch onnxruntime-genai with og.Adapters, the same three
  rows 8x4 / 8x1          GenerationSession per-row export: 8 rows with adapters a,b,c,d,a,b,c,d / all a
  ORT a, batch 8          the swappable export, 8 rows, adapter a (reference for the per-row rows)
  torch eager / compiled  lfx.generate with the adapter unmerged (compiled: torch.compile, dynamic)

After the rounds, one compiled request is profiled: its per-token time split into the
compiled graph, dynamo's wrapper and guards, the loop's torch ops and Python.
  HF + PEFT               transformers generate on the PEFT model holding the same adapter a
  HF base                 transformers generate on the model without adapters: the frozen-base floor

Prefill ms = time of a request with 1 new token; decode ms/token = (time with N new tokens -
prefill) / (N - 1). Every configuration runs once per round, rounds repeat, medians are
reported: round-robin, so that load from other jobs hits all configurations alike. One
thread everywhere (torch, ORT intra-op, genai). The machine and its load average are named.

    python benchmarks/bench_generation.py            # ~10 minutes on 2 cores
    python benchmarks/bench_generation.py --quick    # fewer rounds, no RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import onnxruntime_genai as og
import peft
import torch
import transformers as T
from results_md import replace_section  # benchmarks/ is on sys.path when a script runs

import lowrank_fx as lfx

HERE = Path(__file__).resolve().parent
SECTION = "## Generation (KV cache, adapters unmerged)"
PROJECTIONS = ["re:(q|k|v|o|gate|up|down)_proj$"]
ADAPTERS = ["a", "b", "c", "d"]
VOCAB, PROMPT = 8192, 64


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                           eos_token_id=2, bos_token_id=1, pad_token_id=0)
    return T.LlamaForCausalLM(config).eval()


def adapted(model):
    ids = torch.randint(3, VOCAB, (2, 16))
    gm = None
    for name in ADAPTERS:
        spec = lfx.Spec(targets=PROJECTIONS, method=lfx.LoRA(rank=8, alpha=16.0, init="nonzero"))
        gm = lfx.rewrite(gm if gm is not None else model, spec, example_kwargs={"input_ids": ids, "use_cache": False},
                         adapter=name)
    return gm


def single_thread_genai(directory: Path) -> None:
    for config_path in [directory / "genai_config.json", directory / "per_row" / "genai_config.json"]:
        config = json.loads(config_path.read_text())
        config["model"]["decoder"]["session_options"].update({"intra_op_num_threads": 1, "inter_op_num_threads": 1})
        config_path.write_text(json.dumps(config, indent=1))


class Genai:
    def __init__(self, directory: Path):
        self.model = og.Model(str(directory))
        self.adapters = og.Adapters(self.model)
        for name in ("a", "b"):
            self.adapters.load(str(directory / f"{name}.onnx_adapter"), name)

    def run(self, ids: np.ndarray, new: int, adapter: str | None):
        params = og.GeneratorParams(self.model)
        length = ids.shape[1] + new
        params.set_search_options(max_length=length, min_length=length, do_sample=False, batch_size=ids.shape[0])
        generator = og.Generator(self.model, params)
        if adapter is not None:
            generator.set_active_adapter(self.adapters, adapter)
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()


def configurations(model, gm, export, genai, prompt: torch.Tensor):
    session = lfx.GenerationSession(export.directory, session_options=_ort_options())
    batch8 = prompt.repeat(8, 1)
    switch = {"ort": 0, "genai": 0}

    def alternate(key):
        switch[key] += 1
        return "ab"[switch[key] % 2]

    peft_dir = Path(tempfile.mkdtemp(prefix="bench_gen_peft_"))
    lfx.save_peft(gm, peft_dir, adapter="a")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(peft_dir)).eval()
    ids32 = prompt.numpy().astype(np.int32)

    def hf(new, generating=peft_model):
        with torch.no_grad():
            generating.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                min_new_tokens=new, do_sample=False, pad_token_id=0)

    def ort_run(adapter, ids=prompt, rows=None):
        return lambda new: session.generate(ids, adapter=adapter, rows=rows, max_new_tokens=new, eos_token_id=[])

    return {
        "ORT none": ort_run(None),
        "ORT a": ort_run("a"),
        "ORT switch": lambda new: session.generate(prompt, adapter=alternate("ort"), max_new_tokens=new, eos_token_id=[]),
        "genai none": lambda new: genai.run(ids32, new, None),
        "genai a": lambda new: genai.run(ids32, new, "a"),
        "genai switch": lambda new: genai.run(ids32, new, alternate("genai")),
        "rows 8x4": ort_run(None, batch8, ["a", "b", "c", "d"] * 2),
        "rows 8x1": ort_run(None, batch8, ["a"] * 8),
        "ORT a, batch 8": ort_run("a", batch8),
        "torch eager": lambda new: lfx.generate(gm, prompt, adapters="a", max_new_tokens=new, eos_token_id=[]),
        "torch compiled": lambda new: lfx.generate(gm, prompt, adapters="a", max_new_tokens=new, eos_token_id=[],
                                                   compile=True),
        "HF + PEFT": hf,
        "HF base": lambda new: hf(new, model),
    }


def _ort_options():
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def measure(configs: dict, rounds: int, new: int) -> dict:
    times = {name: {"prefill": [], "decode": []} for name in configs}
    for _ in range(rounds):
        for name, run in configs.items():
            start = time.perf_counter()
            run(1)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            run(new)
            total = time.perf_counter() - start
            times[name]["prefill"].append(prefill * 1e3)
            times[name]["decode"].append((total - prefill) * 1e3 / (new - 1))
    return {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}


WRAPPER = ("Torch-Compiled Region", "TorchDynamo Cache Lookup", "Pregraph bytecode")


def breakdown(gm, prompt: torch.Tensor, new: int) -> dict:
    """Where a compiled decoded token's time goes: one profiled request of 1 and one of `new`
    tokens, the difference per token, split into the compiled graph (its C++ wrapper runs the
    products and kernels inside one profiler region), dynamo's wrapper and guard check, the
    loop's own torch ops (sampling, mask, copies) and what none of them accounts for (Python);
    shares of the profiled time (the profiler slows the Python part more than the kernels)."""
    from torch.profiler import ProfilerActivity, profile

    def run(tokens):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            lfx.generate(gm, prompt, adapters="a", max_new_tokens=tokens, eos_token_id=[], compile=True)
            wall = time.perf_counter() - start
        parts = {"compiled graph": 0.0, "dynamo wrapper and guards": 0.0, "loop's torch ops": 0.0}
        for event in prof.key_averages():
            part = ("compiled graph" if event.key.startswith("## Call CompiledFxGraph") else
                    "dynamo wrapper and guards" if event.key.startswith(WRAPPER) else
                    "loop's torch ops" if event.key.startswith("aten::") else None)
            if part is not None:
                parts[part] += event.self_cpu_time_total / 1e6
        return wall, parts

    (wall1, parts1), (wall, parts) = run(1), run(new)
    per_token = {part: (parts[part] - parts1[part]) / (new - 1) for part in parts}
    total = (wall - wall1) / (new - 1)
    per_token["Python"] = total - sum(per_token.values())
    return {part: value / total for part, value in per_token.items()}


def machine() -> str:
    info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
    info = {key.strip(): value.strip() for key, value in info.items()}
    return (f"{info.get('model name', platform.processor())}, {os.cpu_count()} cores; torch {torch.__version__}, "
            f"transformers {T.__version__}, peft {peft.__version__}, ONNX Runtime {ort.__version__}, "
            f"onnxruntime-genai {og.__version__}, Python {platform.python_version()}")


def report(results: dict, setup: dict, load: tuple, rounds: int, new: int, total_s: float, params: int) -> str:
    base = results["ORT a"]["decode"]
    lines = [SECTION, "",
             f"`benchmarks/bench_generation.py`. Machine: {machine()}. One thread per runtime. Load average "
             f"(1, 5, 15 min) at start {load[0][0]:.2f}, {load[0][1]:.2f}, {load[0][2]:.2f}; at the end "
             f"{load[1][0]:.2f}, {load[1][1]:.2f}, {load[1][2]:.2f}: the machine was shared with other jobs, so "
             f"treat differences of ~10% as noise. The whole run took {total_s:.0f} s.", "",
             f"Model: Llama-shaped, {params / 1e6:.1f}M parameters (4 layers, hidden 512, 8 heads, 4 KV heads, SwiGLU "
             "1408, vocabulary 8192), random weights; four LoRA adapters a, b, c, d of rank 8 on q, k, v, o, gate, "
             f"up, down (28 targets). Prompt {PROMPT} tokens, greedy, {new} new tokens, EOS off. Medians of {rounds} "
             "round-robin rounds. Prefill: a request with one new token; decode: the further tokens' mean.", "",
             "| configuration | prefill ms | decode ms/token | decode vs ORT a |", "|---|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['prefill']:.1f} | {r['decode']:.2f} | {r['decode'] / base:.2f}x |")
    lines += ["",
              "- ORT: `lfx.GenerationSession` (plain ONNX Runtime, the KV cache kept in OrtValues); genai: "
              "onnxruntime-genai on the same directory; \"switch\" alternates adapters a and b on every request "
              "(each request a new generator / a different RunOptions, no reload).",
              "- rows 8x4: 8 rows, adapters a, b, c, d, a, b, c, d in one batch (per-row export); rows 8x1: the "
              "per-row export with every row on a; ORT a, batch 8: the swappable export, 8 rows of adapter a.",
              "- torch: `lfx.generate` (the decode graph shares the training graph's adapter modules); compiled: "
              "`compile=True` (inductor with its C++ wrapper, dynamic shapes, no guards on module attributes), "
              "compiled during the warm-up, no recompile while timed "
              f"(the warm-up of every configuration, the compile included, took {setup['compile_s']:.0f} s).",
              "- HF + PEFT: `PeftModel.generate` with adapter a (written by `lfx.save_peft`), unmerged; HF base: "
              "`generate` on the model without adapters (the frozen-base floor of an eager adapted decode).",
              f"- Export: `lfx.export_generation` took {setup['export_s']:.0f} s for the swappable and the per-row "
              f"decoders; {setup['files']}."]
    r = results
    lines += ["", "Summary: adapter a costs {:.2f}x the base's decode time in ORT and {:.2f}x in genai; switching "
              "adapters every request {:.2f}x / {:.2f}x of always a; 8 rows with 4 adapters {:.2f}x of 8 rows with 1 "
              "(per-row export) and {:.2f}x of the swappable export's batch of 8; compiled PyTorch {:.2f}x of "
              "eager.".format(r["ORT a"]["decode"] / r["ORT none"]["decode"],
                              r["genai a"]["decode"] / r["genai none"]["decode"],
                              r["ORT switch"]["decode"] / r["ORT a"]["decode"],
                              r["genai switch"]["decode"] / r["genai a"]["decode"],
                              r["rows 8x4"]["decode"] / r["rows 8x1"]["decode"],
                              r["rows 8x4"]["decode"] / r["ORT a, batch 8"]["decode"],
                              r["torch compiled"]["decode"] / r["torch eager"]["decode"])]
    ratio, floor = (r[name]["decode"] / r["HF + PEFT"]["decode"] for name in ("torch compiled", "HF base"))
    lines += ["", f"Goal `lfx.generate(compile=True)` ÷ HF + PEFT per decoded token ≤ 0.7: {ratio:.2f}, "
              f"{'met' if ratio <= 0.7 else 'not met'}; the frozen base alone (HF base) is {floor:.2f} of HF + PEFT."]
    compiled = r["torch compiled"]["decode"]
    lines += ["", "Compiled decode per token, one profiled request (shares of its time, and those shares of the "
              f"{compiled:.2f} ms measured above): " + "; ".join(
                  f"{part} {share:.0%} ({share * compiled:.2f} ms)" for part, share in setup["breakdown"].items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds; print only, do not write RESULTS.md")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 7)
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    started = time.perf_counter()
    model = build_model()
    params = sum(p.numel() for p in model.parameters())
    gm = adapted(model)
    directory = Path(tempfile.mkdtemp(prefix="bench_gen_"))
    t0 = time.perf_counter()
    export = lfx.export_generation(model, gm, directory, per_row=True)
    export_s = time.perf_counter() - t0
    sizes = {p.name: p.stat().st_size for p in export.files if p.suffix in (".onnx", ".onnx_adapter")}
    files = (f"model.onnx {sizes['model.onnx'] / 2**20:.1f} MiB, each .onnx_adapter "
             f"{sizes['a.onnx_adapter'] / 2**10:.0f} KiB")
    single_thread_genai(directory)
    genai = Genai(directory)
    prompt = torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    configs = configurations(model, gm, export, genai, prompt)
    t0 = time.perf_counter()
    for run in configs.values():  # warm-up (and the one compile)
        run(2)
    compile_s = time.perf_counter() - t0
    results = measure(configs, rounds, args.new_tokens)
    shares = breakdown(gm, prompt, args.new_tokens)
    text = report(results, {"export_s": export_s, "compile_s": compile_s, "files": files, "breakdown": shares},
                  (load_start, os.getloadavg()), rounds, args.new_tokens, time.perf_counter() - started, params)
    print(text)
    if not args.quick:
        replace_section(args.results, SECTION, text)


if __name__ == "__main__":
    main()
