"""Real-sized models (issue 18): what a user waits for, and the memory it takes, on a 0.5B-1B model.

Models from their real configs with random weights, fp32: Qwen2.5-0.5B (494M parameters) and
Llama-3.2-1B (1.24B). Each stage runs in a fresh process (what a user's script sees), after the
model is built; the process times the stage alone and reads its peak resident memory above the
resident memory just before it (the kernel's high-water mark is reset first). Ours and PEFT's
configurations of a stage are interleaved round by round, so both see the same machine load.

Stages (ours | PEFT or the floor):
  wrap       lfx.rewrite(model, Spec("all-linear", LoRA(rank=16)))  | peft get_peft_model
  wrap_cached  lfx.rewrite with a warm disk cache (another process stored it)
  merge      lfx.merge(gm)                                          | PeftModel.merge_adapter()
  merge_inplace  lfx.merge(gm, inplace=True)                        | (the same PEFT run)
  state      lfx.merged_state_dict(gm)
  onnx_merged / onnx_adapters   lfx.export_onnx(gm, mode=...)
  genai      lfx.export_generation(model, gm, dir)
  generate   first lfx.generate(gm, ids, max_new_tokens=8)          | PEFT model.generate (unmerged)
  nf4_wrap   quantize_base(model, "nf4") then lfx.rewrite           | get_peft_model on the same base
Depth growth: wrap and onnx_merged of the Qwen2.5-0.5B shape at 4, 8, 16, 24 layers (a PNG).

    python benchmarks/bench_real_scale.py --stages wrap,merge --rounds 2
    python benchmarks/bench_real_scale.py --depth                # the growth with depth
    python benchmarks/bench_real_scale.py --model llama-1b --stages onnx_merged
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results_md import replace_section  # noqa: E402

SECTION = "## Real-sized models (issue 18)"
MODELS = {
    "qwen-0.5b": dict(family="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                      max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                      bos_token_id=151643, eos_token_id=151643),
    "llama-1b": dict(family="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                     max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, head_dim=64,
                     bos_token_id=128000, eos_token_id=128001,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
PAIRS = {  # stage -> (ours, theirs or None)
    "wrap": ("wrap", "peft_wrap"), "wrap_cached": ("wrap_cached", None), "merge": ("merge", "peft_merge"),
    "state": ("state", None), "onnx_merged": ("onnx_merged", None), "onnx_adapters": ("onnx_adapters", None),
    "genai": ("genai", None), "generate": ("generate", "peft_generate"), "nf4_wrap": ("nf4_wrap", "peft_nf4_wrap"),
    "onnx_run": ("onnx_run", None), "merge_inplace": ("merge_inplace", None),
}
SAME_PEER = {"merge_inplace": "peft_merge"}  # compared with the peer another stage ran


# ---------------------------------------------------------------- worker (one stage, one process)

def _build(name: str, layers: int | None):
    import torch
    import transformers

    options = dict(MODELS[name])
    family = options.pop("family")
    if layers:
        options["num_hidden_layers"] = layers
    config_class, model_class = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                                 "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[family]
    torch.manual_seed(0)
    with torch.device("meta"):
        model = model_class(config_class(**options))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # its inv_freq, which to_empty lost
    model.tie_weights()  # to_empty gave lm_head a tensor of its own
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model.eval()


def _rss() -> tuple[int, int]:
    """(current, peak) resident bytes of this process."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _ids(model, batch=1, seq=16):
    import torch

    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))


def _spec():
    import lowrank_fx as lfx

    return lfx.Spec("all-linear", lfx.LoRA(rank=16))


def _peft(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))


def _examples(model):
    return {"input_ids": _ids(model, 2, 16), "use_cache": False}


def _onnx_examples(model):
    return {"input_ids": _ids(model, 2, 16)}


def _prepare(stage: str, model, scratch: Path):
    """What the stage needs before its clock starts; returns the timed callable."""
    import lowrank_fx as lfx

    if stage == "wrap":
        return lambda: lfx.rewrite(model, _spec(), example_kwargs=_examples(model), cache_dir=False)
    if stage == "wrap_cached":
        return lambda: lfx.rewrite(model, _spec(), example_kwargs=_examples(model), cache_dir=scratch / "cache")
    if stage == "peft_wrap":
        return lambda: _peft(model)
    if stage == "nf4_wrap":
        lfx.quantize_base(model, "nf4")
        return lambda: lfx.rewrite(model, _spec(), example_kwargs=_examples(model), cache_dir=False)
    if stage == "peft_nf4_wrap":
        lfx.quantize_base(model, "nf4")
        return lambda: _peft(model)
    if stage == "peft_merge":
        peft_model = _peft(model)
        return peft_model.merge_adapter
    if stage == "peft_generate":
        peft_model, ids = _peft(model), _ids(model)
        return lambda: peft_model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    gm = lfx.rewrite(model, _spec(), example_kwargs=_examples(model), cache_dir=False)
    if stage == "merge":
        return lambda: lfx.merge(gm)
    if stage == "merge_inplace":
        return lambda: lfx.merge(gm, inplace=True)
    if stage == "state":
        return lambda: lfx.merged_state_dict(gm)
    if stage == "onnx_merged":
        return lambda: lfx.export_onnx(gm, scratch / "merged.onnx", mode="merged", example_kwargs=_onnx_examples(model))
    if stage == "onnx_adapters":
        return lambda: lfx.export_onnx(gm, scratch / "adapters.onnx", mode="adapters",
                                       example_kwargs=_onnx_examples(model))
    if stage == "genai":
        return lambda: lfx.export_generation(model, gm, scratch / "genai")
    if stage == "generate":
        ids = _ids(model)
        return lambda: lfx.generate(gm, ids, max_new_tokens=8)
    if stage == "onnx_run":
        return lambda: _onnx_run(gm, model, scratch / "run.onnx")
    raise SystemExit(f"unknown stage {stage!r}")


def _onnx_run(gm, model, path: Path) -> dict:
    """Export merged, load the file in ONNX Runtime and compare its logits with the graph's."""
    import torch

    import lowrank_fx as lfx

    ids = _ids(model, 2, 16)
    export = lfx.export_onnx(gm, path, mode="merged", example_kwargs={"input_ids": ids})
    with torch.no_grad():
        want = gm(input_ids=ids)["logits"]
    start = time.perf_counter()
    got = torch.from_numpy(export.session().run({"input_ids": ids.numpy()})["logits"])
    return {"ort_seconds": time.perf_counter() - start, "files_bytes": sum(f.stat().st_size for f in export.files),
            "max_rel_error": float((got - want).abs().max() / want.abs().max())}


def worker(stage: str, name: str, layers: int | None, scratch: Path) -> dict:
    import torch

    torch.manual_seed(0)
    model = _build(name, layers)
    run = _prepare(stage, model, scratch)
    before, _ = _rss()
    _reset_peak()
    start = time.perf_counter()
    extra = run()
    seconds = time.perf_counter() - start
    _, peak = _rss()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"stage": stage, "seconds": seconds, "extra_peak_bytes": max(0, peak - before),
            "model_bytes": model_bytes, **(extra if stage == "onnx_run" else {})}


# ---------------------------------------------------------------- driver

def _run(stage: str, name: str, layers: int | None, scratch: Path) -> dict:
    command = [sys.executable, __file__, "--worker", stage, "--model", name, "--scratch", str(scratch)]
    if layers:
        command += ["--layers", str(layers)]
    env = dict(os.environ, LOWRANK_FX_QUIET="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"{stage} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} / {five:.1f}"


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen-0.5b", choices=list(MODELS))
    parser.add_argument("--stages", default=",".join(PAIRS))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--depth", action="store_true", help="wrap and onnx_merged at 4, 8, 16, 24 layers")
    parser.add_argument("--worker", default=None)
    parser.add_argument("--scratch", default=None)
    parser.add_argument("--write", action="store_true", help="write the table into RESULTS.md")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.layers, Path(args.scratch))))
        return
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        text = _depth(args.model, scratch) if args.depth else _stages(args, scratch)
    print(text)
    if args.write:
        replace_section(HERE / "RESULTS.md", SECTION + f" — {args.model}" + (" depth" if args.depth else ""),
                        text)


def _machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}")


def _stages(args, scratch: Path) -> str:
    stages = [s for s in args.stages.split(",") if s]
    if "wrap_cached" in stages:
        _run("wrap_cached", args.model, args.layers, scratch)  # stores the cache entry
    results: dict[str, list[dict]] = {}
    loads = []
    for _ in range(args.rounds):
        for stage in stages:
            for config in PAIRS[stage]:
                if config is None:
                    continue
                loads.append(_load())
                result = _run(config, args.model, args.layers, scratch)
                results.setdefault(config, []).append(result)
                print(f"  {config}: {result['seconds']:.1f} s, +{result['extra_peak_bytes'] / 2**30:.2f} GiB",
                      file=sys.stderr, flush=True)
    model_bytes = next(iter(results.values()))[0]["model_bytes"]
    rows = [f"{SECTION} — {args.model}" + (f" ({args.layers} layers)" if args.layers else ""), "",
            f"{_machine()}; model {model_bytes / 2**30:.2f} GiB fp32; {args.rounds} round(s), interleaved; "
            f"load average (1 / 5 min) during the run: {', '.join(sorted(set(loads)))}.", "",
            "| stage | ours (s) | ours peak extra (GiB) | PEFT (s) | PEFT peak extra (GiB) | ours / PEFT |",
            "|---|---|---|---|---|---|"]
    for stage in stages:
        ours, theirs = PAIRS[stage]
        theirs = theirs or (SAME_PEER.get(stage) if SAME_PEER.get(stage) in results else None)
        mine = results[ours]
        t_ours = _median([r["seconds"] for r in mine])
        m_ours = _median([r["extra_peak_bytes"] for r in mine]) / 2**30
        if theirs:
            t_theirs = _median([r["seconds"] for r in results[theirs]])
            m_theirs = _median([r["extra_peak_bytes"] for r in results[theirs]]) / 2**30
            rows.append(f"| {stage} | {t_ours:.2f} | {m_ours:.2f} | {t_theirs:.2f} | {m_theirs:.2f} | "
                        f"{t_ours / t_theirs:.2f}x |")
        else:
            rows.append(f"| {stage} | {t_ours:.2f} | {m_ours:.2f} | — | — | — |")
    for result in results.get("onnx_run", [])[:1]:
        rows += ["", f"onnx_run: export + ONNX Runtime load and one run of 2 x 16 tokens; files "
                     f"{result['files_bytes'] / 2**30:.2f} GiB, ORT load + run {result['ort_seconds']:.1f} s, "
                     f"logits vs the PyTorch graph: max relative error {result['max_rel_error']:.1e}."]
    return "\n".join(rows) + "\n"


def _depth(name: str, scratch: Path) -> str:
    depths = [4, 8, 16, 24]
    results = {}
    for depth in depths:
        for stage in ("wrap", "peft_wrap", "onnx_merged"):
            results[(stage, depth)] = _run(stage, name, depth, scratch)["seconds"]
            print(f"  {stage} @ {depth}: {results[(stage, depth)]:.1f} s", file=sys.stderr, flush=True)
    rows = [f"{SECTION} — {name} depth", "", f"{_machine()}; load {_load()} at the end.", "",
            "| layers | rewrite (s) | get_peft_model (s) | export_onnx merged (s) |", "|---|---|---|---|"]
    for depth in depths:
        rows.append(f"| {depth} | {results[('wrap', depth)]:.2f} | {results[('peft_wrap', depth)]:.2f} | "
                    f"{results[('onnx_merged', depth)]:.2f} |")
    growth = {stage: results[(stage, 24)] / results[(stage, 4)] for stage in ("wrap", "onnx_merged")}
    rows += ["", f"Growth 4 -> 24 layers (6x the blocks): rewrite {growth['wrap']:.2f}x, "
                 f"export {growth['onnx_merged']:.2f}x."]
    _plot(depths, results, HERE / "real_scale_depth.png")
    rows += ["", "![time against depth](real_scale_depth.png)"]
    return "\n".join(rows) + "\n"


def _plot(depths, results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for stage, label in (("wrap", "lfx.rewrite"), ("peft_wrap", "get_peft_model"), ("onnx_merged", "export_onnx merged")):
        axis.plot(depths, [results[(stage, d)] for d in depths], marker="o", label=label)
    axis.set_xlabel("decoder layers (Qwen2.5-0.5B shape)")
    axis.set_ylabel("seconds")
    axis.set_title("Time against depth")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
