"""The `lowrank-fx` command.

    lowrank-fx plan [--model tiny-llama] [--targets all-linear] [--rank 8]
    lowrank-fx demo [--steps 300]

Bad input exits with status 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from .errors import LowRankFxError

EXAMPLES = """examples:
  lowrank-fx plan                                   # LoRA r=8 on every linear of a tiny Llama
  lowrank-fx plan --model tiny-gpt2 --targets c_attn c_proj --rank 4
  lowrank-fx plan --targets 're:.*(q|v)_proj' --exclude 'model.layers.0.*'
  lowrank-fx demo                                   # train, fold and check a small Llama (< 3 min on 2 CPUs)
"""


def _plan(args) -> int:
    from . import LoRA, Spec, plan
    from .builtin_models import builtin

    built = builtin(args.model)
    spec = Spec(targets=args.targets, method=LoRA(rank=args.rank, alpha=args.alpha), exclude=args.exclude)
    print(plan(built.model, spec, built.example_inputs, built.example_kwargs))
    return 0


def _demo(args) -> int:
    from .demo import format_report, run_demo

    figures = run_demo(steps=args.steps, rank=args.rank, seed=args.seed, progress=not args.quiet)
    print(format_report(figures))
    return 0 if figures["fold_error"] < 1e-5 and figures["original_error"] < 1e-5 else 1


def parser() -> argparse.ArgumentParser:
    from .builtin_models import BUILTIN

    root = argparse.ArgumentParser(prog="lowrank-fx", description="Parameter-efficient fine-tuning as a torch.fx graph pass.",
                                   epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = root.add_subparsers(dest="command", required=True, metavar="{plan,demo}")

    plan = commands.add_parser("plan", help="list what a spec would adapt, with parameter counts",
                               epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("--model", default="tiny-llama", choices=sorted(BUILTIN), help="built-in model config (random weights)")
    plan.add_argument("--targets", nargs="+", default=["all-linear"], help="glob, re:<regex> or all-linear")
    plan.add_argument("--exclude", nargs="*", default=[], help="patterns to leave out")
    plan.add_argument("--rank", type=int, default=8)
    plan.add_argument("--alpha", type=float, default=16.0)
    plan.set_defaults(run=_plan)

    demo = commands.add_parser("demo", help="adapt, train, fold and check a small model",
                               epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--rank", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except LowRankFxError as err:
        print(f"lowrank-fx {args.command}: error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lowrank-fx {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
