"""One rank of the FSDP2 test (tests/test_fsdp.py), launched by torchrun:

    torchrun --standalone --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR fsdp
    python tests/fsdp_worker.py OUT_DIR single      # one process, the whole global batches
    python tests/fsdp_worker.py OUT_DIR resume      # one process, resuming fsdp's step-2 checkpoint

Every rank captures the same tiny Llama with layer blocks and the same LoRA init. `fsdp`
trains 2 steps with lfx.Trainer(distributed="fsdp", compile="aot_eager") on each rank's half of the global batches
(checkpointing at the end; rank 0 copies the checkpoint to OUT_DIR/ckpt-copy), then a fresh
graph and an eager Trainer resume it sharded to step 3; it writes OUT_DIR/fsdp.safetensors (gathered,
by rank 0) and OUT_DIR/rank<r>.json with the base-weight bytes the rank holds, plus the merged state
(fsdp-merged.safetensors) and a PEFT directory (fsdp-peft). `single` writes the same as
single*; `resume` continues the copied checkpoint unsharded in one process
and writes OUT_DIR/resumed.safetensors.
"""

import json
import os
import shutil
import sys
import warnings

import safetensors.torch
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models

import lowrank_fx as lfx

STEPS, GLOBAL_BATCH, SEQ = 3, 4, 10


def loss_fn(model, ids):
    logits = model(ids, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def graph():
    case = models.build("llama")
    torch.manual_seed(0)
    return lfx.rewrite(case.model, lfx.Spec(targets=["*.q_proj", "*.v_proj", "*.down_proj"], method=lfx.LoRA(rank=4)),
                       example_inputs=case.args, example_kwargs=case.kwargs, layers="auto")


def batches(rank: int, world: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    every = [torch.randint(0, models.VOCAB, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(STEPS)]
    shard = GLOBAL_BATCH // world
    return [b[rank * shard:(rank + 1) * shard] for b in every]


def trainer(gm, compile=False, **options):
    return lfx.Trainer(gm, loss_fn, lr=1e-2, warmup_steps=1, progress=False, compile=compile, **options)


def base_bytes(gm) -> dict:
    """Bytes of the frozen (base) weights this rank holds, and their full size."""
    held = full = 0
    for param in gm.parameters():
        if not param.requires_grad:
            local = param.to_local() if hasattr(param, "to_local") else param
            held += local.numel() * local.element_size()
            full += param.numel() * param.element_size()
    return {"held": held, "full": full}


def save(gm, out: str, name: str) -> None:
    """Adapters, the merged state and a PEFT directory, each gathered when sharded (rank 0 writes)."""
    lfx.save_adapters(gm, os.path.join(out, f"{name}.safetensors"))
    merged = lfx.merged_state_dict(gm)
    if not dist.is_initialized() or dist.get_rank() == 0:
        safetensors.torch.save_file({k: v.contiguous() for k, v in merged.items()},
                                    os.path.join(out, f"{name}-merged.safetensors"))
    lfx.save_peft(gm, os.path.join(out, f"{name}-peft"))


def main(out: str, mode: str) -> None:
    torch.set_num_threads(1)
    if mode == "single":
        gm = graph()
        trainer(gm).fit(batches(0, 1), steps=STEPS)
        save(gm, out, "single")
        return
    if mode == "resume":
        gm = graph()
        trainer(gm, checkpoint_dir=os.path.join(out, "ckpt-copy")).fit(batches(0, 1), steps=STEPS)
        lfx.save_adapters(gm, os.path.join(out, "resumed.safetensors"))
        return
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = batches(rank, world)
    ckpt = os.path.join(out, "ckpt")
    first = graph()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(first, compile="aot_eager", distributed="fsdp", checkpoint_dir=ckpt).fit(mine, steps=STEPS - 1)
    fell_back = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    assert not fell_back, fell_back  # it trained compiled
    dist.barrier()
    if rank == 0:
        shutil.copytree(ckpt, os.path.join(out, "ckpt-copy"))
    dist.barrier()
    gm = graph()
    resumed = trainer(gm, distributed="fsdp", checkpoint_dir=ckpt)
    assert resumed.step == STEPS - 1, resumed.step
    resumed.fit(mine, steps=STEPS)
    save(gm, out, "fsdp")
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(base_bytes(gm), f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
