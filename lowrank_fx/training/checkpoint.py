"""Training checkpoints: adapters, optimizer state and trainer position, atomic as a whole.

Layout under a checkpoint directory `root`:

    root/step-00000100/adapters.safetensors   lfx.save_adapters (spec, checksum, values)
    root/step-00000100/trainer.safetensors    optimizer state tensors (optimizer.<i>.<name>)
                                              and RNG states (rng.cpu, rng.cuda.<k>); its
                                              JSON metadata holds the step, the number of
                                              batches consumed, the optimizer's param groups
                                              and non-tensor state
    root/latest.json                          {"step": 100, "dir": "step-00000100"}

A checkpoint exists once `latest.json` names it, and `latest.json` is replaced atomically
only after both files of the step are written and fsync'ed. A run killed at any moment
therefore leaves the previous checkpoint whole and named. Directories of older steps
beyond `keep` are deleted afterwards. Nothing is pickled: tensors go to safetensors,
everything else to JSON.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from ..errors import TrainingError
from ..files.adapter_file import load_adapters, save_adapters
from ..files.atomic import write_atomic
from ..graph.dtensors import gathered, is_dtensor, like_slot, writes_files

LATEST = "latest.json"
ADAPTERS = "adapters.safetensors"
STATE = "trainer.safetensors"
META_KEY = "lowrank_fx.trainer"


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state_dict split into tensors (for safetensors) and the rest (JSON)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = gathered(value).detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(values) for i, values in meta["scalars"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = [{k: _tuples(v) for k, v in group.items()} for group in meta["param_groups"]]
    for group in groups:
        group["params"] = list(group["params"])
    return {"state": state, "param_groups": groups}


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update((f"rng.cuda.{k}", s) for k, s in enumerate(torch.cuda.get_rng_state_all()))
    return tensors


def _restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(root: str | Path, gm, optimizer: torch.optim.Optimizer, position: dict,
                    keep: int = 2) -> Path:
    """Write the checkpoint of step `position["step"]` under `root`; returns its directory."""
    root = Path(root)
    step_dir = root / f"step-{position['step']:08d}"
    writes = writes_files(any(map(is_dtensor, gm.parameters())))  # FSDP2: every rank gathers, rank 0 writes
    if writes:
        step_dir.mkdir(parents=True, exist_ok=True)
    save_adapters(gm, step_dir / ADAPTERS)
    tensors, meta = _optimizer_parts(optimizer)
    if not writes:
        return step_dir
    tensors.update(_rng_tensors())
    meta.update(position)
    data = safetensors.torch.save(tensors, metadata={META_KEY: json.dumps(meta)})
    write_atomic(step_dir / STATE, data)
    write_atomic(root / LATEST, json.dumps({"step": position["step"], "dir": step_dir.name}).encode())
    steps = sorted(p for p in root.glob("step-*") if p.is_dir() and p != step_dir)
    for old in steps[: max(len(steps) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return step_dir


def latest_checkpoint(root: str | Path) -> Path | None:
    """The directory `latest.json` names, or None when `root` has no checkpoint yet."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    try:
        step_dir = Path(root) / json.loads(pointer.read_text())["dir"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise TrainingError(f"{pointer} is not a lowrank_fx checkpoint pointer ({err}); "
                            "point checkpoint_dir at a fresh directory to start over") from None
    if not (step_dir / ADAPTERS).exists() or not (step_dir / STATE).exists():
        raise TrainingError(f"{pointer} names {step_dir}, which lacks {ADAPTERS} or {STATE}; "
                            "the checkpoint directory was changed by hand")
    return step_dir


def load_checkpoint(step_dir: Path, gm, optimizer: torch.optim.Optimizer) -> dict:
    """Load adapters, optimizer state and RNG state from `step_dir`; returns the position."""
    load_adapters(gm, step_dir / ADAPTERS)
    with safetensors.safe_open(str(step_dir / STATE), framework="pt") as file:
        meta = json.loads((file.metadata() or {})[META_KEY])
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    state = _optimizer_state(tensors, meta)
    params = [param for group in optimizer.param_groups for param in group["params"]]
    for index, entries in state["state"].items():  # FSDP2: this rank's shard of each moment
        for name, value in entries.items():
            if isinstance(value, torch.Tensor) and index < len(params) and value.shape == params[index].shape:
                entries[name] = like_slot(params[index], value)
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as err:
        raise TrainingError(
            f"the optimizer state in {step_dir} does not fit this optimizer ({err}); resume with the "
            "same adapters, optimizer and LoRA+ ratio, or use a fresh checkpoint_dir"
        ) from None
    _restore_rng(tensors)
    return {key: meta[key] for key in ("step", "batches")}
