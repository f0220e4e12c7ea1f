"""The `lowrank-fx` command: plan | train | merge | export | generate | demo.

Models come from a built-in name, `pkg.module:factory`, or a local transformers directory
or config (see sources.py); nothing is downloaded. Targets and method come from flags or a
JSON spec file (spec_file.py). Bad input exits with status 2 and one message on stderr, never
a traceback: one line, or a first line and the full list when the error lists differences.
Number flags and output paths are checked (checks.py) before any model is loaded.
Third-party notices a user cannot act on (torch.onnx's "torchvision is not installed") are
filtered out while a command runs, as in the API's calls (noise.py).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from ..errors import LowRankFxError, SpecError
from ..noise import quiet_third_party
from .checks import at_least, check_output_file, check_output_folder, positive_float

EXAMPLES = """examples:
  lowrank-fx plan                                       # LoRA r=8 on every linear of a tiny Llama
  lowrank-fx plan --model ./my-llama --targets q_proj v_proj --method lorta --rank 16
  lowrank-fx plan --model mypkg.models:build --spec spec.json
  lowrank-fx train --model ./my-llama --data corpus.txt --steps 200 --out run/adapter.safetensors
  lowrank-fx merge --model ./my-llama --adapters run/adapter.safetensors --out run/merged.safetensors
  lowrank-fx export --model ./my-llama --adapters run/a.safetensors run/b.safetensors --out run/model.onnx
  lowrank-fx export --model ./my-llama --adapters run/a.safetensors run/b.safetensors --generation run/gen
  lowrank-fx generate run/gen --prompt-ids 1 2 3 --adapter a --max-new-tokens 20
  lowrank-fx demo                                       # real MiniLM weights: two adapters, fold, ONNX Runtime
  lowrank-fx demo --synthetic                           # a small random Llama, < 1 minute

A spec file is JSON: {"targets": ["q_proj", "v_proj"], "method": {"method": "lora", "rank": 8},
"exclude": [], "train": ["classifier"]}, or {"targets": {"re:.*_proj": {"method": "lorta", "rank": 8}}} for
mixed methods; "train" (optional) names modules trained in full, as PEFT's modules_to_save.
"""


def _method(args):
    from ..files.serial import method_classes

    options = {"rank": args.rank}
    if args.alpha is not None:
        options["alpha"] = args.alpha
    return method_classes()[args.method](**options)


def _spec(args):
    from .. import Spec
    from .spec_file import read_spec

    if args.spec is None:
        return Spec(targets=args.targets, method=_method(args), exclude=args.exclude)
    return read_spec(args.spec)


def _source(args):
    from .sources import load_model

    return load_model(args.model)


def _adapted(args, source):
    """The model's graph with the adapters of --adapters loaded (all, under their saved names)."""
    from .. import load_adapters

    gm = source.model
    for path in args.adapters:
        gm = load_adapters(gm, path, example_inputs=source.example_inputs, example_kwargs=source.example_kwargs)
    return gm


def _plan(args) -> int:
    from .. import plan

    source = _source(args)
    print(plan(source.model, _spec(args), example_inputs=source.example_inputs, example_kwargs=source.example_kwargs))
    return 0


def _train(args) -> int:
    import torch

    from .. import Trainer, rewrite, save_adapters
    from .sources import factory_batches, text_batches

    if args.data is None:
        raise LowRankFxError("train needs --data: a text file (one text per line) or pkg.module:batches")
    if not Path(args.data).exists() and ":" not in args.data:
        raise LowRankFxError(
            f"--data {args.data}: no such file; give a text file (one training text per line) or "
            "pkg.module:batches (a callable returning batches)"
        )
    source = _source(args)
    if Path(args.data).exists():
        batches = text_batches(args.data, source, args.batch_size, args.seq_len, args.seed)
        first = next(batches)
        gm = rewrite(source.model, _spec(args), example_inputs=(first["input_ids"],),
                     example_kwargs=source.example_kwargs, adapter=args.adapter)

        def loss_fn(model, batch):  # next-token cross entropy
            ids = batch["input_ids"]
            logits = model(ids, **source.example_kwargs).logits
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    else:
        batches = factory_batches(args.data)
        first = next(batches)
        gm = rewrite(source.model, _spec(args), example_kwargs=first, adapter=args.adapter)

        def loss_fn(model, batch):
            loss = getattr(model(**batch), "loss", None)
            if loss is None:
                raise LowRankFxError("the model output has no .loss; have the batches include labels")
            return loss
    checkpoints = f"{args.out}.checkpoints" if args.save_every else None
    trainer = Trainer(gm, loss_fn, lr=args.lr, loraplus_ratio=args.loraplus_ratio, schedule="constant",
                      compile=args.compile, checkpoint_dir=checkpoints, checkpoint_every=args.save_every or None)
    trainer.fit(itertools.chain([first], batches), steps=args.steps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    path = save_adapters(gm, args.out)
    print(f"saved adapter {args.adapter!r} to {path}")
    return 0


def _merge(args) -> int:
    from safetensors.torch import save

    from .. import merged_state_dict
    from ..files.atomic import write_atomic

    source = _source(args)
    gm = _adapted(args, source)
    state = merged_state_dict(gm, untie=args.untie)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, save({k: v.contiguous() for k, v in state.items()}))
    print(f"wrote {len(state)} dense tensors (the original model's names) to {args.out}")
    return 0


def _export(args) -> int:
    from ..export import export_onnx

    if args.generation:
        return _export_generation(args)
    if not args.out:
        raise LowRankFxError("export needs --out FILE.onnx (or --generation DIR for a generation directory)")
    source = _source(args)
    gm = _adapted(args, source) if args.adapters else source.model
    mode = args.mode if args.adapters else "merged"
    result = export_onnx(gm, args.out, example_inputs=source.example_inputs, example_kwargs=source.example_kwargs,
                         mode=mode)
    for file in result.files:
        print(f"wrote {file}")
    return 0


def _export_generation(args) -> int:
    from ..files.adapter_file import read_manifest
    from ..generation import export_generation

    if not args.adapters:
        raise LowRankFxError("export --generation needs --adapters: the adapter files to serve")
    adapters: dict[str, str] = {}
    for path in args.adapters:
        for name in read_manifest(path)["adapters"]:
            if name in adapters:
                raise LowRankFxError(f"adapter {name!r} is in both {adapters[name]} and {path}; save them under other "
                                     "names")
            adapters[name] = path
    source = _source(args)
    example = source.example_inputs[0] if source.example_inputs else None
    result = export_generation(source.model, adapters, args.generation, example_inputs=example,
                               tokenizer=source.tokenizer, per_row=args.mode == "per_row")
    for file in result.files:
        print(f"wrote {file}")
    return 0


def _generate(args) -> int:
    from ..generation import GenerationSession

    session = GenerationSession(args.directory)
    tokens = session.generate([args.prompt_ids], adapter=args.adapter, max_new_tokens=args.max_new_tokens,
                              do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, num_beams=args.num_beams)
    print(" ".join(str(t) for t in tokens[0].tolist()))
    return 0


def _demo(args) -> int:
    if args.synthetic:
        from .demo_synthetic import format_report, run_demo

        figures = run_demo(steps=args.steps or 300, rank=args.rank, seed=args.seed, progress=not args.quiet)
        print(format_report(figures))
        agrees = figures["fold_error"] < 1e-5 and figures["original_error"] < 1e-5 and figures["generation_agrees"]
        return 0 if agrees else 1
    from .demo_minilm import run

    return 0 if run(out=args.out, steps=args.steps, progress=not args.quiet) else 1


def _add_model(p, default="tiny-llama"):
    p.add_argument("--model", default=default,
                   help="built-in name (tiny-llama, tiny-gpt2, tiny-bert), pkg.module:factory, or a local "
                        "transformers directory / config.json")


def _add_spec(p):
    p.add_argument("--targets", nargs="+", default=["all-linear"], help="glob, re:<regex> or all-linear")
    p.add_argument("--exclude", nargs="*", default=[], help="patterns to leave out")
    p.add_argument("--method", default="lora", choices=["lora", "lorta", "randlora"])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None, help="default: the method's own")
    p.add_argument("--spec", default=None, help="JSON spec file (overrides the flags above)")


class _Parser(argparse.ArgumentParser):
    """argparse with the command's one-line error format (the usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    root = _Parser(prog="lowrank-fx", description="Parameter-efficient fine-tuning as a torch.fx graph pass.",
                   epilog=EXAMPLES, formatter_class=formatter)
    commands = root.add_subparsers(dest="command", required=True, metavar="{plan,train,merge,export,generate,demo}")

    p = commands.add_parser("plan", help="list what a spec would adapt, with parameter counts", epilog=EXAMPLES,
                            formatter_class=formatter)
    _add_model(p)
    _add_spec(p)
    p.set_defaults(run=_plan)

    p = commands.add_parser("train", help="train adapters and save them", epilog=EXAMPLES, formatter_class=formatter)
    _add_model(p)
    _add_spec(p)
    p.add_argument("--data", help="text file (one text per line; causal LM) or pkg.module:batches")
    p.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    p.add_argument("--adapter", default="default", help="adapter name")
    p.add_argument("--steps", type=at_least(1), default=200)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--loraplus-ratio", type=float, default=16.0,
                   help="LoRA+ rate ratio for output-side factors (1 = plain)")
    p.add_argument("--batch-size", type=at_least(1), default=8)
    p.add_argument("--seq-len", type=at_least(2), default=64, help="tokens per row (the loss predicts tokens 2..N)")
    p.add_argument("--save-every", type=at_least(0), default=0,
                   help="checkpoint every N steps under <out>.checkpoints/ (atomic; a rerun resumes from it)")
    p.add_argument("--compile", action="store_true", help="train with torch.compile (fullgraph, dynamic shapes)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_train)

    p = commands.add_parser("merge", help="fold adapters into dense weights for the original model", epilog=EXAMPLES,
                            formatter_class=formatter)
    _add_model(p)
    p.add_argument("--adapters", nargs="+", required=True, help="adapter files (from train or save_adapters)")
    p.add_argument("--out", required=True, help="safetensors file of dense weights, keyed like the original model")
    p.add_argument("--untie", action="store_true",
                   help="allow folding one use of a tied weight (untie it in your model)")
    p.set_defaults(run=_merge)

    p = commands.add_parser("export", help="export to ONNX (merged, swappable adapters, or per-row)", epilog=EXAMPLES,
                            formatter_class=formatter)
    _add_model(p)
    p.add_argument("--adapters", nargs="*", default=[], help="adapter files; none exports the base model")
    p.add_argument("--mode", default="adapters", choices=["merged", "adapters", "per_row"],
                   help="with --generation: per_row also writes the per-row decoder (DIR/per_row)")
    p.add_argument("--out", help=".onnx file to write (adapter files go beside it)")
    p.add_argument("--generation", metavar="DIR", default=None,
                   help="write a KV-cache generation directory instead (ONNX Runtime and onnxruntime-genai)")
    p.set_defaults(run=_export)

    p = commands.add_parser("generate", help="generate tokens from a generation directory (export --generation)",
                            epilog=EXAMPLES, formatter_class=formatter)
    p.add_argument("directory", help="directory written by export --generation")
    p.add_argument("--prompt-ids", type=int, nargs="+", required=True, help="prompt token ids")
    p.add_argument("--adapter", default=None, help="adapter name (default: the base model)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=20)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-beams", type=at_least(1), default=1, help="beam search with this many beams (1: none)")
    p.set_defaults(run=_generate)

    p = commands.add_parser("demo", help="the main demo (real MiniLM weights), or --synthetic", epilog=EXAMPLES,
                            formatter_class=formatter)
    p.add_argument("--synthetic", action="store_true", help="small random Llama instead of MiniLM")
    p.add_argument("--steps", type=at_least(1), default=None)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for the loss curve, adapter and ONNX files "
                   "(default demo_out; not with --synthetic)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_demo)
    return root


def _check_outputs(args) -> None:
    """Refuse an output path that cannot be written, before any model is loaded."""
    if args.command == "train":
        check_output_file(args.out, "adapter.safetensors")
    elif args.command == "merge":
        check_output_file(args.out, "merged.safetensors")
    elif args.command == "export" and args.generation:
        check_output_folder(args.generation, "--generation")
    elif args.command == "export" and args.out:
        check_output_file(args.out, "model.onnx")
    elif args.command == "demo" and args.synthetic and args.out is not None:
        raise SpecError("demo --synthetic writes no files, so --out does nothing there; drop --out, "
                        "or run the MiniLM demo (without --synthetic) to get the adapter and ONNX files")
    elif args.command == "demo" and not args.synthetic:
        args.out = args.out or "demo_out"
        check_output_folder(args.out, "--out")


def main(argv: list[str] | None = None) -> int:
    """Run the command `argv` (default: sys.argv[1:]); returns the exit status."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as done:  # --help, or a bad flag (already reported on stderr)
        return int(done.code or 0)
    try:
        _check_outputs(args)
        with quiet_third_party():  # the same noise filter as the API's calls, around the command only
            return args.run(args)
    except LowRankFxError as err:
        print(f"lowrank-fx {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:
        print(f"lowrank-fx {args.command}: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lowrank-fx {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
