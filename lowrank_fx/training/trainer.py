"""`lfx.Trainer`: a small training loop for adapted graphs, with no framework around it.

    trainer = lfx.Trainer(gm, loss_fn, lr=1e-4, checkpoint_dir="ckpt", checkpoint_every=100)
    trainer.fit(batches, steps=1000)          # loss_fn(model, batch) -> scalar loss tensor
    trainer.fit(batches, epochs=3)            # or passes over the batches

One optimizer step = `accumulate` micro-batches: each runs loss_fn(model, batch) / accumulate
and backward, then the optimizer steps, the schedule sets every group's rate to
base rate · f(step) (schedule.py) and the gradients are cleared. With equal-sized
micro-batches and a mean loss this is the step on their concatenation.
`batches` (batches.py): a list or DataLoader is read pass after pass until `steps`; a step
never spans two passes, and a pass's last, partial step is taken on the mean of its
micro-batches. A one-shot iterator (a generator) is one pass: running out before `steps`
warns, and fit returns what ran (steps, the loss of each, micro-batches, passes).

- model: `fuse_sites(gm)` (passes/fuse_sites.py: the same adapters, LoRA sites that share an
  input computed together, scale and gate folded into B), compiled with
  `torch.compile(..., fullgraph=True, dynamic=True)` (compile=True: inductor; or a
  torch.compile backend, e.g. "aot_eager"; compile=False: eager);
  if compiling fails on the first batch (torch.compile's own errors), a warning says why and
  training goes on eagerly; an error of loss_fn propagates as it is.
  `distributed="ddp"` (or True) wraps it in DistributedDataParallel; `distributed="fsdp"`
  shards it per layer block with FSDP2 (fsdp.py; a graph rewritten with layers="auto"),
  trained as it is (without fuse_sites' copy, whose root tensors FSDP would not shard) and
  compiled with fullgraph=False (torch.compile breaks the graph at FSDP's hooks), and every
  rank takes part in checkpoints (rank 0 writes). Call
  torch.distributed.init_process_group first; see README "Several processes".
- checkpoint_activations=True: `lfx.checkpoint_layers(gm)` (in place), so each layer block
  recomputes in backward (a graph rewritten with layers="auto"); `memory_budget` (0 to 1)
  sets torch.compile's activation memory budget (`torch._functorch.config.activation_memory_budget`)
  while compiling: the partitioner recomputes the cheapest activations until what it saves
  is that fraction of what it would save otherwise (compiled training only).
- optimizer: LoRA+ (`loraplus_param_groups`) with `loraplus_ratio` (1.0 = one rate for all).
- autocast: bf16 autocast on CUDA by default (adapters and the loss stay fp32 where they are).
- checkpoints (checkpoint.py): every `checkpoint_every` steps and at the end, atomically.
  With `resume=True` (default) a Trainer whose checkpoint_dir holds a checkpoint continues
  from it: adapters, optimizer, schedule position, RNG, and the number of batches consumed.
  Pass the SAME batches in the same order: the ones already consumed are skipped (whole
  passes without reading them when len(batches) is known).
- a NaN/inf loss raises TrainingError naming the step; the last checkpoint stays as it was.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..deprecation import api_options
from ..errors import ModelTypeError, SpecError, TrainingError
from ..graph.record import Record
from ..noise import quiet_third_party
from ..options import compile_backend, flag, integer, number
from ..passes.checkpoint_layers import checkpoint_layers
from ..passes.fuse_sites import fuse_sites
from ..progress import stage
from .batches import Passes, check_fit, one_shot, total_steps
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .fsdp import shard_layers
from .loraplus import loraplus_param_groups, make_optimizer
from .meter import Meter
from .schedule import check_schedule, lr_factor

# what compiling can raise on the first call (BackendCompilerFailed, InductorError, Unsupported,
# TorchRuntimeError, ...); anything else comes from the user's code and propagates as it is
COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException,)


def _count_tokens(batch) -> int:
    """Tokens in a batch: the elements of its first integer tensor (token ids), else the
    first dimension of its first tensor."""
    leaves = [x for x in torch.utils._pytree.tree_leaves(batch) if isinstance(x, torch.Tensor)]
    ids = [x for x in leaves if not x.is_floating_point()]
    if ids:
        return ids[0].numel()
    return leaves[0].shape[0] if leaves and leaves[0].dim() else 1


def _check_graph(gm) -> None:
    if not isinstance(gm, fx.GraphModule) or Record.find(gm) is None:
        raise ModelTypeError(f"lfx.Trainer trains the adapters of a graph from lfx.rewrite, got a {type(gm).__name__}; "
                             "pass gm = lfx.rewrite(model, spec, example_inputs=...)")


def _checked_loss(loss) -> torch.Tensor:
    """`loss` if it is what loss_fn must return: a one-element tensor computed from the model's output."""
    if not isinstance(loss, torch.Tensor):
        raise TrainingError(f"loss_fn returned a {type(loss).__name__}; it must return a scalar tensor computed "
                            "from the model's output, e.g. F.cross_entropy(model(x), y) (not loss.item())")
    if loss.numel() != 1:
        raise TrainingError(f"loss_fn returned a tensor of shape {tuple(loss.shape)}; it must return a scalar: "
                            "reduce it, e.g. loss.mean()")
    if not loss.requires_grad:
        raise TrainingError("loss_fn returned a tensor that does not depend on the adapters (requires_grad=False); "
                            "compute it from the model's output, outside torch.no_grad() and without .detach()")
    if loss.grad_fn is None:
        raise TrainingError("loss_fn returned a leaf tensor (one it made itself, e.g. torch.tensor(..., "
                            "requires_grad=True)), not one computed from the model's output, so the adapters "
                            "would get no gradient; return e.g. F.cross_entropy(model(x), y)")
    return loss


def _check_budget(budget: float | None, compile) -> float | None:
    if budget is None:
        return None
    if not compile:
        raise SpecError("memory_budget applies to compiled training; pass compile=True (or a backend), "
                        "or checkpoint_activations=True for eager training")
    if not hasattr(torch._functorch.config, "activation_memory_budget"):
        raise SpecError(f"this torch ({torch.__version__}) has no activation memory budget; "
                        "use checkpoint_activations=True instead")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 <= budget <= 1.0:
        raise SpecError(f"memory_budget must be a fraction between 0 and 1 (e.g. 0.5), got {budget!r}")
    return float(budget)


def _check_distributed(distributed) -> str | None:
    """None, "ddp" or "fsdp" for the `distributed` option (True means "ddp")."""
    if distributed not in (False, True, "ddp", "fsdp"):
        raise SpecError(f"distributed must be False, 'ddp' (or True) or 'fsdp', got {distributed!r}")
    if distributed and not torch.distributed.is_initialized():
        raise SpecError(f"distributed={distributed!r} needs torch.distributed.init_process_group(...) first "
                        "(torchrun sets the environment it reads)")
    return {True: "ddp", "ddp": "ddp", "fsdp": "fsdp"}.get(distributed)


def _check_options(loss_fn, min_lr_ratio, max_grad_norm, checkpoint_every, keep, resume, progress, autocast,
                   compile) -> None:
    """SpecError for a Trainer option outside its range (lr and the LoRA+ options: loraplus.py)."""
    if not callable(loss_fn):
        raise SpecError("loss_fn must be a function loss_fn(model, batch) -> scalar tensor, got "
                        f"{type(loss_fn).__name__}")
    number("Trainer", "min_lr_ratio", min_lr_ratio, "a fraction in [0, 1]", lambda v: 0.0 <= v <= 1.0,
           "the schedule ends at min_lr_ratio * lr")
    if max_grad_norm is not None:
        number("Trainer", "max_grad_norm", max_grad_norm, "None or a positive number", lambda v: v > 0,
               "gradients are clipped to this norm; None turns clipping off")
    if checkpoint_every is not None:
        integer("Trainer", "checkpoint_every", checkpoint_every)
    integer("Trainer", "keep_checkpoints", keep)
    flag("Trainer", "resume", resume)
    flag("Trainer", "progress", progress)
    if autocast is not None:
        flag("Trainer", "autocast", autocast)
    if not isinstance(compile, bool) and not callable(compile):
        if not isinstance(compile, str):
            raise SpecError(f"Trainer compile must be True, False or a torch.compile backend name, got {compile!r}")
        compile_backend("Trainer", "compile", compile)


class Trainer:
    """Trains the adapters of `gm` (see the module docstring for each feature).

    Args:
        gm: a graph from lfx.rewrite. Its adapters train in place (the trained values are
            `gm`'s own parameters); `checkpoint_activations=True` also changes its layer calls.
        loss_fn: loss_fn(model, batch) -> scalar tensor computed from the model's output;
            `model` is the compiled (and, with distributed, DDP-wrapped) graph.
        lr: the base learning rate (LoRA+ output-side factors get loraplus_ratio · lr).
        loraplus_ratio: LoRA+'s rate multiple for the output-side factors (1.0: one rate).
        weight_decay: the optimizer's weight decay.
        optimizer_cls: the optimizer class, called as optimizer_cls(groups, lr=lr, **optimizer_kwargs).
        accumulate: micro-batches per optimizer step.
        schedule: the rate over steps: "cosine", "linear" or "constant" (schedule.py).
        warmup_steps: steps of linear warmup from 0.
        min_lr_ratio: the schedule's final rate as a fraction of lr.
        max_grad_norm: clip the gradients' total norm to this (None: no clipping).
        compile: True (inductor), a torch.compile backend name, or False (eager).
        autocast: bf16 autocast (None: on for CUDA).
        distributed: False, "ddp" (or True: DistributedDataParallel) or "fsdp" (FSDP2 per
            layer block; a graph rewritten with layers="auto").
        checkpoint_activations: recompute each layer block in backward (`lfx.checkpoint_layers`).
        memory_budget: torch.compile's activation memory budget, in [0, 1] (compiled only).
        checkpoint_dir: where checkpoints go (None: none are written).
        checkpoint_every: write a checkpoint every this many steps (and at the end).
        keep_checkpoints: how many checkpoints to keep.
        resume: continue from the newest checkpoint in `checkpoint_dir`, if there is one.
        progress: show a progress bar and the loss.
        tokens: tokens(batch) -> int, for the tokens/s shown (default: the elements of the
            batch's first integer tensor).
        **optimizer_kwargs: further options of `optimizer_cls`.

    Raises:
        ModelTypeError: `gm` is not a graph from lfx.rewrite.
        SpecError: a bad option (the message names it and what is valid).
        TrainingError: a checkpoint in `checkpoint_dir` that cannot be resumed.
    """

    @api_options(positional=3)
    def __init__(self, gm: fx.GraphModule, loss_fn: Callable[[nn.Module, Any], torch.Tensor], *,
                 lr: float = 1e-4, loraplus_ratio: float = 16.0, weight_decay: float = 0.0,
                 optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW, accumulate: int = 1,
                 schedule: str = "cosine", warmup_steps: int = 0, min_lr_ratio: float = 0.0,
                 max_grad_norm: float | None = None, compile: bool | str = True,
                 autocast: bool | None = None, distributed: bool | str = False,
                 checkpoint_activations: bool = False, memory_budget: float | None = None,
                 checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int | None = None,
                 keep_checkpoints: int = 2, resume: bool = True, progress: bool = True,
                 tokens: Callable[[Any], int] = _count_tokens, **optimizer_kwargs: Any) -> None:
        _check_graph(gm)
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise SpecError(f"accumulate must be a positive integer, got {accumulate!r}")
        if checkpoint_every is not None and checkpoint_dir is None:
            raise SpecError("checkpoint_every needs checkpoint_dir=... (where checkpoints go)")
        check_schedule(schedule, warmup_steps, 0)
        _check_options(loss_fn, min_lr_ratio, max_grad_norm, checkpoint_every, keep_checkpoints, resume, progress,
                       autocast, compile)
        self.gm, self.loss_fn, self.tokens = gm, loss_fn, tokens
        self.accumulate, self.max_grad_norm = accumulate, max_grad_norm
        self.schedule, self.warmup, self.min_lr_ratio = schedule, warmup_steps, min_lr_ratio
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every, self.keep, self.progress = checkpoint_every, keep_checkpoints, progress
        self.sharded = _check_distributed(distributed) == "fsdp"
        if self.sharded:
            shard_layers(gm)  # before the optimizer: FSDP2 makes the parameters DTensors
        groups = loraplus_param_groups(gm, lr, ratio=loraplus_ratio, weight_decay=weight_decay)
        for group in groups:
            group["lfx_base_lr"] = group["lr"]
        self.optimizer = make_optimizer(optimizer_cls, groups, lr, optimizer_kwargs)
        self.params = [p for group in groups for p in group["params"]]
        device = self.params[0].device
        self.autocast = device.type == "cuda" and torch.cuda.is_bf16_supported() if autocast is None else autocast
        self.device_type = device.type
        self.memory_budget = _check_budget(memory_budget, compile)
        if checkpoint_activations:
            checkpoint_layers(gm)
        self.model = self._model(compile, distributed)
        self.step, self.batches = 0, 0
        self.last_checkpoint: Path | None = None
        if resume and self.checkpoint_dir is not None:
            found = latest_checkpoint(self.checkpoint_dir)
            if found is not None:
                position = load_checkpoint(found, gm, self.optimizer)
                self.step, self.batches, self.last_checkpoint = position["step"], position["batches"], found

    def _model(self, compile: bool | str, distributed: bool):
        self.compiled, self.compile_checked = bool(compile), False
        self.distributed = distributed
        model = self.train_graph = self.gm if self.sharded else fuse_sites(self.gm)  # sites in training form
        if compile:
            backend = "inductor" if compile is True else compile
            model = torch.compile(self.train_graph, backend=backend, fullgraph=not self.sharded, dynamic=True)
        return self._ddp(model) if distributed and not self.sharded else model

    def _ddp(self, model):
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.cuda.current_device()] if self.device_type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def _compiling(self) -> contextlib.AbstractContextManager:
        """Around the first compiled micro-batch (torch.compile compiles the forward on its call,
        the backward on its first backward): a progress line with the seconds it took, and
        third-party noise quieted (noise.py). Nothing around the others."""
        if not self.compiled or self.compile_checked:
            return contextlib.nullcontext()
        around = contextlib.ExitStack()
        around.enter_context(stage("compiling the training step with torch.compile (first step only)"))
        around.enter_context(quiet_third_party())
        return around

    def _loss(self, batch) -> torch.Tensor:
        context = (torch.autocast(self.device_type, dtype=torch.bfloat16) if self.autocast
                   else contextlib.nullcontext())
        budget = (torch._functorch.config.patch(activation_memory_budget=self.memory_budget)
                  if self.memory_budget is not None else contextlib.nullcontext())
        with context, budget:  # the budget is read while compiling, on a call
            if not self.compiled or self.compile_checked:
                return self.loss_fn(self.model, batch)
            try:
                loss = self.loss_fn(self.model, batch)
                self.compile_checked = True  # compiled on this first call; later errors are real ones
                return loss
            except COMPILE_ERRORS as err:  # compiling failed: say why once and continue eagerly
                warnings.warn(f"torch.compile failed ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); "
                              "training continues without compiling (pass compile=False to skip trying)",
                              stacklevel=3)
                self.compiled = False
                if self.distributed and not self.sharded:
                    self.model.module = self.train_graph  # the same DDP wrapper (and gradient hooks), eager inside
                else:
                    self.model = self.train_graph
                return self.loss_fn(self.model, batch)

    def _set_lr(self, total: int | None) -> None:
        factor = lr_factor(self.step, self.schedule, self.warmup, total, self.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = group["lfx_base_lr"] * factor

    def _checkpoint(self) -> None:
        if self.checkpoint_dir is None:
            return
        if not self.sharded and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return  # DDP: rank 0 holds everything; FSDP: every rank gathers, rank 0 writes
        self.last_checkpoint = save_checkpoint(self.checkpoint_dir, self.gm, self.optimizer,
                                               {"step": self.step, "batches": self.batches}, self.keep)

    def _nan_error(self, loss: torch.Tensor) -> TrainingError:
        where = (f"the last checkpoint, {self.last_checkpoint} (step {self._checkpoint_step()}), is untouched"
                 if self.last_checkpoint else "no checkpoint was written")
        return TrainingError(
            f"the loss is {loss.item()} at step {self.step + 1} (micro-batch {self.batches + 1}); "
            f"training stopped before updating the adapters with it, and {where}. Lower the learning "
            "rate, add warmup_steps or max_grad_norm, or check that batch for bad values."
        )

    def _checkpoint_step(self) -> int | None:
        if self.last_checkpoint is None:
            return None
        return int(self.last_checkpoint.name.split("-")[1])

    @api_options(positional=2)
    def fit(self, batches: Iterable[Any], *, steps: int | None = None, epochs: int | None = None) -> dict[str, Any]:
        """Train on `batches` (batches.py), updating the graph's adapters in place.

        A step never spans two passes; a pass's last, partial step (fewer than `accumulate`
        micro-batches) is taken on their mean. A one-shot iterator that runs out before `steps`
        warns and returns what ran.

        Args:
            batches: what loss_fn takes, one micro-batch at a time: a list or DataLoader (read
                pass after pass) or a one-shot iterator (one pass).
            steps: train until this many optimizer steps in all (counting resumed ones).
            epochs: or for this many passes in all (default, with neither: one).

        Returns:
            {"step": steps in all, "loss": the last step's, "losses": every step's of this
            call, "batches": micro-batches consumed in all, "epochs": passes in all
            (micro-batches / pass length; None while unknown), "tokens_per_s": over the steps
            after the first of this call, which compiles}.

        Raises:
            SpecError: bad `steps` / `epochs`, both given, or empty `batches`.
            TrainingError: a NaN or inf loss (the last checkpoint stays as it was).
        """
        check_fit(batches, steps, epochs)
        if steps is None:
            epochs = epochs or 1
        total = total_steps(batches, steps, epochs, self.accumulate)
        check_schedule(self.schedule, self.warmup, total)
        self.gm.train()
        passes, started_at = Passes(batches, self.batches), self.batches
        meter, ran_out = Meter(self.progress, total, self.step), False
        losses: list[float] = []
        try:
            while not ((steps is not None and self.step >= steps) or (epochs is not None and passes.index >= epochs)):
                micro = passes.open()
                if micro is None:  # a one-shot iterator, already read
                    ran_out = True
                    break
                read, ended = self._train_pass(micro, steps, total, losses, meter)
                if ended and not passes.end(read):  # the pass gave no batch
                    if not losses and not started_at:
                        raise SpecError("batches is empty: fit needs at least one batch")
                    ran_out = True
                    break
        finally:
            meter.close()
        if ran_out:
            why = (f"a {type(batches).__name__} is read once; pass a list or a DataLoader to read it pass "
                   "after pass, or fewer steps" if one_shot(batches) else
                   f"a pass over the {type(batches).__name__} gave no batch")
            of = f" of {total}" if total else ""
            warnings.warn(f"fit stopped early: the batches ran out after {self.batches} micro-batches, at step "
                          f"{self.step}{of}: {why}", stacklevel=2)
        if self.last_checkpoint is None or self._checkpoint_step() != self.step:
            self._checkpoint()
        return {"step": self.step, "loss": losses[-1] if losses else float("nan"), "losses": losses,
                "batches": self.batches, "epochs": passes.epochs(self.batches), "tokens_per_s": meter.rate()}

    def _train_pass(self, micro, steps, total, losses, meter) -> tuple[int, bool]:
        """Steps over one pass: (micro-batches read, whether the pass ended rather than `steps`)."""
        group, read = [], 0
        for batch in micro:
            group.append(self._backward(batch))
            meter.micro_batch(self.tokens(batch))
            read += 1
            if len(group) == self.accumulate:
                self._optimizer_step(group, total, losses, meter)
                group = []
                if steps is not None and self.step >= steps:
                    return read, False
        if group:
            self._optimizer_step(group, total, losses, meter)
        return read, True

    def _backward(self, batch) -> torch.Tensor:
        """loss_fn on one micro-batch, its gradient / accumulate added; the loss, detached."""
        with self._compiling():
            loss = _checked_loss(self._loss(batch))
            if not torch.isfinite(loss.detach()).all():
                raise self._nan_error(loss.detach())
            (loss / self.accumulate).backward()
        self.batches += 1
        return loss.detach()

    def _optimizer_step(self, group: list[torch.Tensor], total, losses: list[float], meter) -> None:
        """One optimizer step on the gradients of `group`'s micro-batches: their mean (a partial
        group's gradients, summed over accumulate, are scaled up to it)."""
        if len(group) < self.accumulate:
            for param in self.params:
                if param.grad is not None:
                    param.grad.mul_(self.accumulate / len(group))
        self._set_lr(total)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        losses.append(float(sum(group) / len(group)))
        meter.step(losses[-1])
        if self.checkpoint_every and self.step % self.checkpoint_every == 0:
            self._checkpoint()
