"""Quantized bases: memory and step time of LoRA training over int8 / nf4 / int4 / bitsandbytes
nf4 bases against fp32, for lowrank_fx and for PEFT on the same base.

Models: Llama-shaped, random weights. Step time: 4 layers, hidden 256, 8 heads (4 KV), SwiGLU 704,
vocabulary 1024. Memory: the same shape at 6 layers, hidden 1024, 16 heads (8 KV), SwiGLU 2816
(85M parameters in the linear layers, 340 MB in fp32), large enough for RSS to show the base; every linear layer but lm_head quantized (lfx.quantize_base for torchao, bitsandbytes
Linear4bit nf4 for bnb). LoRA rank 8 on all 28 projections; AdamW; batch 4 x 64 tokens.

Memory, each configuration in a fresh process: the bytes the model's tensors occupy as stored
(quantized data, scales, norms, embeddings, lm_head), the process RSS once the model is built
(after gc and malloc_trim, so the fp32 weights it was quantized from are returned), and the peak
RSS over 3 training steps (VmHWM, reset after the build). The RSS of a process that only
imported everything is given too: subtract it for the model's share.

Step time, all configurations in one process, interleaved round-robin (`--rounds` rounds of
`--steps` steps of each configuration, eager and compiled in turn), so machine load hits them
alike: the median step (forward, cross-entropy, backward, AdamW, zero_grad) per configuration.
Compiled: torch.compile(backend=--backend); lowrank_fx graphs fullgraph=True, dynamic=True;
PEFT models as torch.compile takes them (graph breaks allowed).

    OMP_NUM_THREADS=2 python benchmarks/bench_quantized.py            # ~17 minutes on 2 cores
    python benchmarks/bench_quantized.py --write                      # also update benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = [("fp32", "lowrank_fx"), ("int8", "lowrank_fx"), ("nf4", "lowrank_fx"), ("int4", "lowrank_fx"),
           ("bnb-nf4", "lowrank_fx"), ("fp32", "peft"), ("int8", "peft"), ("bnb-nf4", "peft")]
BATCH, SEQ, VOCAB, RANK = 4, 64, 1024, 8


def _quiet():
    warnings.filterwarnings("ignore")
    import logging
    logging.disable(logging.WARNING)


SIZES = {"small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4),
         "large": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16,
                       num_key_value_heads=8)}


def _model(base: str, size: str = "small"):
    import torch
    import transformers

    import lowrank_fx as lfx
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=128, **SIZES[size])
    model = transformers.LlamaForCausalLM(config)
    if base in ("int8", "nf4", "int4"):
        lfx.quantize_base(model, base)
    elif base == "bnb-nf4":
        import bitsandbytes as bnb
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, quant_type="nf4")
                layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4")
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent), leaf, layer.to("cpu"))
    return model.train()


def _ids(seed=0):
    import torch
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _trainable(model, library: str):
    """(module to call as f(ids) -> logits, its trainable parameters, is it a lowrank_fx graph)."""
    if library == "lowrank_fx":
        import lowrank_fx as lfx
        gm = lfx.rewrite(model, lfx.Spec("all-linear", method=lfx.LoRA(rank=RANK, alpha=16.0)),
                         example_inputs=(_ids(),), example_kwargs={"use_cache": False}).train()
        return gm, [p for p in gm.parameters() if p.requires_grad], True
    import peft
    config = peft.LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.0,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = peft.get_peft_model(model, config).train()
    for p in peft_model.parameters():  # PEFT keeps LoRA factors in the base's dtype; fp32 here either way
        if p.requires_grad:
            p.data = p.data.float()
    return peft_model, [p for p in peft_model.parameters() if p.requires_grad], False


def _stepper(module, params, graph: bool):
    import torch
    import torch.nn.functional as F
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(ids):
        logits = module(ids).logits if graph else module(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)
    return step


def _stored_bytes(model) -> tuple[int, int]:
    """(bytes of all tensors as stored, bytes of the quantizable linear layers' weights as stored)."""
    from lowrank_fx.graph.quant_formats import stored_bytes
    seen, total, linear = set(), 0, 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size = stored_bytes(tensor)
        if getattr(tensor, "quant_state", None) is not None:  # bitsandbytes keeps scales beside the bytes
            state = tensor.quant_state
            size += sum(t.numel() * t.element_size() for t in [state.absmax, state.code] if t is not None)
            if state.nested:
                size += sum(t.numel() * t.element_size() for t in [state.state2.absmax, state.state2.code])
        total += size
        if name.endswith(".weight") and "_proj" in name:
            linear += size
    return total, linear


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _trim():
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory_child(base: str, library: str) -> dict:
    _quiet()
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import lowrank_fx  # noqa: F401
    if library == "peft":
        import peft  # noqa: F401
    if base == "imports":
        _trim()
        return {"rss_kib": _rss_kib("VmRSS")}
    model = _model(base, "large")
    _trim()
    total, linear = _stored_bytes(model)
    module, params, graph = _trainable(model, library)
    step = _stepper(module, params, graph)
    _trim()
    built = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for i in range(3):
        step(_ids(i))
    return {"stored_bytes": total, "linear_bytes": linear, "rss_built_kib": built,
            "rss_peak_kib": _rss_kib("VmHWM"), "trainable": sum(p.numel() for p in params)}


def _machine() -> dict:
    import torch
    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor())
    return {"cpu": name, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version()}


def timing(rounds: int, steps: int, backend: str) -> dict:
    _quiet()
    import torch
    runs = {}
    for base, library in CONFIGS:
        model = _model(base)
        module, params, graph = _trainable(model, library)
        compiled = torch.compile(module, backend=backend, fullgraph=graph, dynamic=True if graph else None)
        runs[(base, library)] = {"eager": _stepper(module, params, graph), "compiled": _stepper(compiled, params, graph)}
        started = time.perf_counter()
        runs[(base, library)]["compiled"](_ids(99))  # compile outside the timed steps
        runs[(base, library)]["compile_s"] = time.perf_counter() - started
        runs[(base, library)]["eager"](_ids(98))
    times = {key: {"eager": [], "compiled": []} for key in runs}
    load = [os.getloadavg()]
    for r in range(rounds):
        for key, fns in runs.items():
            for mode in ("eager", "compiled"):
                for s in range(steps):
                    started = time.perf_counter()
                    fns[mode](_ids(1000 * r + s))
                    times[key][mode].append(time.perf_counter() - started)
        load.append(os.getloadavg())
    return {f"{base}/{library}": {"eager_ms": 1e3 * statistics.median(t["eager"]),
                                  "compiled_ms": 1e3 * statistics.median(t["compiled"]),
                                  "compile_s": runs[(base, library)]["compile_s"]}
            for (base, library), t in times.items()}, [round(x[0], 2) for x in load]


def _table(result: dict) -> str:
    imports = result["memory"]["imports"]["rss_kib"]
    fp32 = result["memory"]["fp32/lowrank_fx"]
    lines = ["| base | library | linear weights stored (MiB) | vs fp32 | all tensors (MiB) | RSS built (MiB) | "
             "peak RSS, 3 steps (MiB) | eager step (ms) | vs fp32 | compiled step (ms) | vs fp32 | vs PEFT, same base "
             "(eager / compiled) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    t = result["timing"]
    for base, library in CONFIGS:
        key = f"{base}/{library}"
        m = result["memory"][key]
        ref = t[f"fp32/{library}"]
        peer = t.get(f"{base}/peft") if library == "lowrank_fx" else None
        versus = f"{t[key]['eager_ms'] / peer['eager_ms']:.2f}x / {t[key]['compiled_ms'] / peer['compiled_ms']:.2f}x" if peer else ""
        lines.append(
            f"| {base} | {library} | {m['linear_bytes'] / 2**20:,.1f} | "
            f"{m['linear_bytes'] / fp32['linear_bytes']:.2f}x | "
            f"{m['stored_bytes'] / 2**20:,.1f} | {m['rss_built_kib'] / 1024:,.0f} | {m['rss_peak_kib'] / 1024:,.0f} | "
            f"{t[key]['eager_ms']:.1f} | {t[key]['eager_ms'] / ref['eager_ms']:.2f}x | {t[key]['compiled_ms']:.1f} | "
            f"{t[key]['compiled_ms'] / ref['compiled_ms']:.2f}x | {versus} |")
    machine = result["machine"]
    head = (f"Memory on the large model, step time on the small one (see the script's docstring). "
            f"`benchmarks/bench_quantized.py` (rounds {result['rounds']}, {result['steps']} steps each, backend "
            f"{result['backend']}). Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
            f"{machine['threads']} thread(s), Python {machine['python']}; load average over the timed rounds "
            f"{result['load']}; the whole run took {result['seconds']:.0f} s. An import-only process has RSS "
            f"{imports / 1024:,.0f} MiB.")
    return head + "\n\n" + "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backend", default="aot_eager")
    parser.add_argument("--write", action="store_true", help="update the Quantized section of benchmarks/RESULTS.md")
    parser.add_argument("--timing-only", action="store_true",
                        help="measure step times again; take the memory figures from bench_quantized.json")
    parser.add_argument("--memory-child", nargs=2, metavar=("BASE", "LIBRARY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child)))
        return
    started = time.time()
    memory = json.loads((HERE / "bench_quantized.json").read_text())["memory"] if args.timing_only else {}
    for base, library in [] if args.timing_only else [("imports", "peft"), *CONFIGS]:
        out = subprocess.run([sys.executable, __file__, "--memory-child", base, library], capture_output=True,
                             text=True, check=True).stdout
        memory[base if base == "imports" else f"{base}/{library}"] = json.loads(out.strip().splitlines()[-1])
    times, load = timing(args.rounds, args.steps, args.backend)
    result = {"machine": _machine(), "rounds": args.rounds, "steps": args.steps, "backend": args.backend,
              "memory": memory, "timing": times, "load": load, "seconds": time.time() - started}
    (HERE / "bench_quantized.json").write_text(json.dumps(result, indent=1))
    table = _table(result)
    print(table)
    if args.write:
        path = HERE / "RESULTS.md"
        text = path.read_text()
        begin, end = "<!-- bench_quantized: begin -->", "<!-- bench_quantized: end -->"
        block = f"{begin}\n{table}\n{end}"
        if begin in text:
            text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
        else:
            text = text.rstrip() + "\n\n## Quantized bases\n\n" + block + "\n"
        path.write_text(text)


if __name__ == "__main__":
    main()
