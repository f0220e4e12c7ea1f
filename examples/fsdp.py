"""FSDP2 per layer: LoRA training with the base model's weights sharded across processes.

What it shows:
- `lfx.rewrite(..., layers="auto")`: each decoder layer becomes a block of the graph that owns
  its weights and adapters;
- `lfx.Trainer(gm, ..., distributed="fsdp")`: `fully_shard` per block, then on the rest, so each
  rank holds about 1/world of the frozen base weights; each rank trains on its part of every
  global batch and the adapters' gradients are averaged across ranks;
- `lfx.save_adapters` on every rank (a collective that gathers the shards; rank 0 writes);
- the check: rank 0 trains the same model unsharded, in one process, on the whole global
  batches, and compares its adapters with the file the sharded run wrote.

Run (one process per rank; gloo on CPU, nccl on GPUs):
    torchrun --standalone --nproc_per_node 2 examples/fsdp.py --tiny       # a 4-layer Llama, CPU
    torchrun --standalone --nproc_per_node 8 examples/fsdp.py --model meta-llama/Llama-3.2-1B --no-check

With --no-check rank 0 skips the unsharded run (which needs the whole model in one process).
The check compares trained adapters, so --tiny trains with plain SGD: its steps are linear in
the gradients, which is what sharding must not change. AdamW (the default otherwise) divides
each step by the gradient's running size, which magnifies rounding wherever a gradient is near
zero, so with AdamW the comparison allows 1e-3 instead of 1e-5.
Ends with a line "check: ... PASS" on rank 0, or exits non-zero.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers

import lowrank_fx as lfx

TEXT = [
    "The lighthouse keeper counted the ships that passed each night and wrote their names in a blue book.",
    "When the tide went out, the children searched the rocks for crabs, shells and bits of green glass.",
    "Every autumn the village held a market where farmers sold apples, honey, cheese and warm bread.",
    "The old clock in the square struck twelve, and the pigeons rose from the roofs all at once.",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama and random ids (used by CI)")
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B", help="a Hugging Face causal LM name or directory")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 3 tiny, 20 real)")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default=None,
                        help="default: sgd with --tiny (lr 0.5), else adamw (lr 1e-4)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--no-check", action="store_true", help="skip the unsharded single-process comparison")
    parser.add_argument("--out", default=None, help="where rank 0 writes adapters.safetensors (default: a temp folder)")
    return parser.parse_args()


def global_batches(args, steps: int, vocab: int, world: int) -> list[torch.Tensor]:
    """The same global batches, of 2 rows per rank, on every rank."""
    if args.tiny:
        g = torch.Generator().manual_seed(1)
        return [torch.randint(3, vocab, (2 * world, 10), generator=g) for _ in range(steps)]
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    lines = [TEXT[i % len(TEXT)] for i in range(2 * world)]
    rows = [tokenizer(line)["input_ids"] for line in lines]
    ids = torch.tensor([row[:min(map(len, rows))] for row in rows])  # cut to the shortest line: no padding
    return [ids] * steps


def adapted_model(args, device: torch.device, example: torch.Tensor):
    """The model with LoRA, as layer blocks; seeded, so every rank (and the check) starts equal."""
    torch.manual_seed(0)
    if args.tiny:
        config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(config)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = model.to(device).eval()  # capture on the device you train on
    torch.manual_seed(0)
    spec = lfx.Spec(targets=["*.q_proj", "*.v_proj", "*.down_proj"], method=lfx.LoRA(rank=8))
    return lfx.rewrite(model, spec, example_kwargs={"input_ids": example.to(device), "use_cache": False},
                       layers="auto")


def loss_fn(model, ids):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def train(gm, batches, steps: int, distributed, args):
    sgd = args.optimizer == "sgd"
    trainer = lfx.Trainer(gm, loss_fn, lr=args.lr or (0.5 if sgd else 1e-4), loraplus_ratio=16.0, warmup_steps=1,
                          optimizer_cls=torch.optim.SGD if sgd else torch.optim.AdamW, compile=False,
                          autocast=False, distributed=distributed, progress=False)
    return trainer.fit(batches, steps=steps)


def base_bytes(gm) -> tuple[int, int]:
    """Bytes of frozen base weights this rank holds, and their full size."""
    held = full = 0
    for param in gm.parameters():
        if not param.requires_grad:
            local = param.to_local() if hasattr(param, "to_local") else param  # an FSDP2 shard is a DTensor
            held += local.numel() * local.element_size()
            full += param.numel() * param.element_size()
    return held, full


def main() -> int:
    args = parse_args()
    args.optimizer = args.optimizer or ("sgd" if args.tiny else "adamw")
    tolerance = 1e-5 if args.optimizer == "sgd" else 1e-3
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    steps = args.steps or (3 if args.tiny else 20)
    vocab = 128 if args.tiny else transformers.AutoConfig.from_pretrained(args.model).vocab_size
    every = global_batches(args, steps, vocab, world)
    mine = [b[2 * rank:2 * rank + 2].to(device) for b in every]  # this rank's rows of each global batch

    gm = adapted_model(args, device, every[0][:2])
    result = train(gm, mine, steps, "fsdp", args)
    held, full = base_bytes(gm)
    print(f"rank {rank}/{world}: loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}; holds "
          f"{held / 1024:.0f} of {full / 1024:.0f} KiB of base weights ({held / full:.0%})", flush=True)

    out = Path(args.out) if args.out else Path(tempfile.gettempdir()) / "lowrank-fx-fsdp-example"
    path = lfx.save_adapters(gm, out / "adapters.safetensors")  # every rank calls it; rank 0 writes
    dist.barrier()
    failure = None
    if rank == 0 and not args.no_check:
        single = adapted_model(args, device, every[0][:2])  # one process, the whole global batches
        train(single, [b.to(device) for b in every], steps, False, args)
        reference = lfx.save_adapters(single, out / "single.safetensors")
        sharded, whole = safetensors.torch.load_file(path), safetensors.torch.load_file(reference)
        err = max((((sharded[k] - whole[k]).abs().max() / whole[k].abs().max().clamp_min(1e-12)).item()
                   for k in whole.keys() & sharded.keys()), default=float("inf"))
        print(f"rank 0: adapters in {path} vs one unsharded process: max relative diff {err:.2e}")
        if sharded.keys() != whole.keys():
            failure = f"the files hold other tensors: {sorted(sharded.keys() ^ whole.keys())}"
        elif err > tolerance:
            failure = f"the FSDP2 adapters differ from one process on the global batches: rel {err:.2e}"
        elif world > 1 and held > 0.75 * full:
            failure = f"rank 0 holds {held / full:.0%} of the base weights; FSDP2 should shard them"
        else:
            print(f"check: FSDP2 on {world} ranks == one process (rel {err:.1e}), base sharded "
                  f"({held / full:.0%} per rank): PASS")
    dist.barrier()
    dist.destroy_process_group()
    if failure:
        print(f"FAIL: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
