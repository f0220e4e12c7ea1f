"""One rank of the DDP test (tests/test_distributed.py), launched by torchrun:

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUT_DIR {eager|aot_eager} [single]

Every rank captures the same tiny Llama with the same LoRA init, trains it with lfx.Trainer
(distributed=True, gloo) on its half of each global batch, and saves its adapters to
OUT_DIR/rank<r>.safetensors. With `single` (no torchrun) one process trains on the whole
global batches instead and writes OUT_DIR/single.safetensors.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models

import lowrank_fx as lfx

STEPS, GLOBAL_BATCH, SEQ = 3, 4, 10


def loss_fn(model, ids):
    logits = model(ids, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def main(out_dir: str, compile_mode: str, single: bool) -> None:
    torch.set_num_threads(1)
    rank, world = 0, 1
    if not single:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    case = models.build("llama")
    gm = lfx.rewrite(case.model, lfx.Spec(targets=["*.q_proj", "*.v_proj", "*.down_proj"], method=lfx.LoRA(rank=4)),
                     example_inputs=case.args, example_kwargs=case.kwargs)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, models.VOCAB, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(STEPS)]
    shard = GLOBAL_BATCH // world
    mine = [b[rank * shard:(rank + 1) * shard] for b in batches]
    trainer = lfx.Trainer(gm, loss_fn, lr=1e-2, warmup_steps=1, progress=False, distributed=not single,
                          compile=False if compile_mode == "eager" else compile_mode)
    trainer.fit(mine, steps=STEPS)
    lfx.save_adapters(gm, os.path.join(out_dir, "single.safetensors" if single else f"rank{rank}.safetensors"))
    if not single:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], len(sys.argv) > 3 and sys.argv[3] == "single")
