"""lfx.Trainer against torch's own training pieces, and the inputs it must refuse or report.

The oracle is a hand loop of torch.optim.AdamW (LoRA+ groups), torch.optim.lr_scheduler,
clip_grad_norm_ and torch.autocast; passes over the batches, partial accumulation steps, a
one-shot iterator that runs out, resuming in a later pass; bad models, losses and lengths;
an error of loss_fn under compile; memory_budget's effect on the saved activations.
"""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as S

import lowrank_fx as lfx
from lowrank_fx.passes.fuse_sites import fuse_sites

LR, RATIO, DECAY = 1e-2, 16.0, 0.01


@pytest.fixture(scope="module")
def graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    spec = lfx.Spec(targets=["0", "2"], method=lfx.LoRA(rank=2, init="nonzero"))
    return lfx.rewrite(model, spec, example_inputs=(torch.randn(4, 8),))


def _batches(n=6, rows=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 8, generator=g), torch.randn(rows, 4, generator=g)) for _ in range(n)]


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _adapters(gm):
    return {k: v.detach().clone() for k, v in gm.lowrank_fx.state_dict().items()}


def _close(got, want, tol=1e-6):
    return all((got[k] - w).abs().max() <= tol * max(w.abs().max(), 1.0) for k, w in want.items())


def _trainer(gm, loss_fn=mse, **kw):
    options = dict(lr=LR, loraplus_ratio=RATIO, weight_decay=DECAY, compile=False, progress=False)
    return lfx.Trainer(gm, loss_fn, **{**options, **kw})


def _torch_schedule(optimizer, name, warmup, total, min_ratio):
    """The schedule from torch's schedulers: LinearLR warm-up, then CosineAnnealingLR / LinearLR."""
    base = optimizer.param_groups[0]["lr"]
    main = {"cosine": lambda: S.CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=min_ratio * base),
            "linear": lambda: S.LinearLR(optimizer, 1.0, min_ratio, total_iters=total - warmup),
            "constant": lambda: S.ConstantLR(optimizer, factor=1.0, total_iters=0)}[name]
    if not warmup:
        return main()
    first = S.LinearLR(optimizer, 1 / warmup, 1.0, total_iters=warmup - 1)
    return S.SequentialLR(optimizer, [first, main()], milestones=[warmup])


def _hand_loop(gm, steps, total, schedule="cosine", warmup=0, min_ratio=0.0, max_norm=None, autocast=False):
    """AdamW on LoRA+ groups (one optimizer per group: each gets its own torch scheduler, whose
    eta_min is absolute), one step per list of micro-batches in `steps`, on their mean loss.
    Under autocast the forward is fuse_sites(gm), the graph Trainer trains (its sites round
    to bf16 where gm's stay fp32). Returns (the loss of each step, the gradient norms before clipping)."""
    model = fuse_sites(gm) if autocast else gm
    params = dict(gm.lowrank_fx.named_parameters())
    fast = [p for n, p in params.items() if n.endswith("lora_B")]
    slow = [p for n, p in params.items() if not n.endswith("lora_B")]
    optimizers = [torch.optim.AdamW(group, lr=lr, weight_decay=DECAY) for group, lr in ((slow, LR), (fast, LR * RATIO))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # SequentialLR's note on its inner step(epoch)
        schedulers = [_torch_schedule(o, schedule, warmup, total, min_ratio) for o in optimizers]
    gm.train()
    losses, norms = [], []
    for group in steps:
        loss_sum = 0.0
        for batch in group:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = mse(model, batch)
            (loss / len(group)).backward()
            loss_sum += loss.item()
        losses.append(loss_sum / len(group))
        if max_norm is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(slow + fast, max_norm)))
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for scheduler in schedulers:
                scheduler.step()
    return losses, norms


@pytest.mark.parametrize("schedule, warmup, min_ratio", [("cosine", 2, 0.1), ("linear", 1, 0.2), ("constant", 2, 0.0),
                                                         ("cosine", 0, 0.0)])
def test_steps_are_a_hand_loop_of_torch_adamw_schedulers_and_clipping(graph, schedule, warmup, min_ratio):
    """6 micro-batches, accumulate=4, steps=5: the list is read again and again, each pass is a
    step of 4 and a partial step of 2, and each step is the hand loop's on their mean loss."""
    batches = _batches()
    passes = [batches[:4], batches[4:]]
    want_gm, gm = copy.deepcopy(graph), copy.deepcopy(graph)
    want_losses, norms = _hand_loop(want_gm, (passes * 3)[:5], 5, schedule, warmup, min_ratio, max_norm=0.5)
    assert max(norms) > 0.5  # clipping is at work
    result = _trainer(gm, accumulate=4, schedule=schedule, warmup_steps=warmup, min_lr_ratio=min_ratio,
                      max_grad_norm=0.5).fit(batches, steps=5)
    assert (result["step"], result["batches"]) == (5, 16)
    assert result["epochs"] == pytest.approx(16 / 6)
    assert result["losses"] == pytest.approx(want_losses, rel=1e-6) and result["loss"] == result["losses"][-1]
    assert _close(_adapters(gm), _adapters(want_gm))


def test_epochs_set_the_passes_and_the_schedule_length(graph):
    batches = _batches()
    passes = [batches[:4], batches[4:]]
    want_gm, gm = copy.deepcopy(graph), copy.deepcopy(graph)
    want_losses, _ = _hand_loop(want_gm, passes * 2, 4, "cosine", 1, 0.1)  # 2 passes of 2 steps
    result = _trainer(gm, accumulate=4, warmup_steps=1, min_lr_ratio=0.1).fit(batches, epochs=2)
    assert (result["step"], result["batches"], result["epochs"]) == (4, 12, 2.0)
    assert result["losses"] == pytest.approx(want_losses, rel=1e-6)
    assert _close(_adapters(gm), _adapters(want_gm))
    one = _trainer(copy.deepcopy(graph), accumulate=4).fit(batches)  # neither: one pass
    assert (one["step"], one["epochs"]) == (2, 1.0)


def test_a_one_shot_iterator_that_runs_out_warns_and_reports_what_ran(graph):
    batches = _batches()
    want_gm, gm = copy.deepcopy(graph), copy.deepcopy(graph)
    want_losses, _ = _hand_loop(want_gm, [batches[:4], batches[4:]], 5)  # the schedule planned for 5
    message = r"stopped early: the batches ran out after 6 micro-batches, at step 2 of 5: a list_iterator is read once"
    with pytest.warns(UserWarning, match=message):
        result = _trainer(gm, accumulate=4).fit(iter(batches), steps=5)
    assert (result["step"], result["batches"], result["epochs"]) == (2, 6, 1.0)
    assert result["losses"] == pytest.approx(want_losses, rel=1e-6)
    assert _close(_adapters(gm), _adapters(want_gm))


class SharedIterator:
    """Looks re-iterable (no __next__) but every iter() gives the same iterator."""

    def __init__(self, batches):
        self.iterator = iter(batches)

    def __iter__(self):
        return self.iterator


def test_a_pass_that_gives_no_batch_warns(graph):
    with pytest.warns(UserWarning, match=r"ran out after 3 micro-batches, at step 3 of 5: a pass over the "
                                         "SharedIterator gave no batch"):
        result = _trainer(copy.deepcopy(graph)).fit(SharedIterator(_batches(3)), steps=5)
    assert (result["step"], result["epochs"], len(result["losses"])) == (3, 1.0, 3)


class Killed(Exception):
    pass


class Reread:
    """A re-iterable without len(); raises Killed at micro-batch `die_at` (0-based, over all passes)."""

    def __init__(self, batches, die_at=None):
        self.batches, self.die_at, self.read = batches, die_at, 0

    def __iter__(self):
        for batch in self.batches:
            if self.read == self.die_at:
                raise Killed
            self.read += 1
            yield batch


@pytest.mark.parametrize("sized", [True, False])
def test_resuming_in_a_later_pass_equals_the_uninterrupted_run(graph, tmp_path, sized):
    """5 micro-batches, accumulate=2: passes of 3 steps; killed early in the third pass, resumed from
    step 6 (10 micro-batches: two whole passes skipped, by len() or by reading them)."""
    batches = _batches(5)
    whole = copy.deepcopy(graph)
    _trainer(whole, accumulate=2).fit(batches, steps=7)
    gm = copy.deepcopy(graph)
    with pytest.raises(Killed):
        _trainer(gm, accumulate=2, checkpoint_dir=tmp_path, checkpoint_every=2).fit(Reread(batches, 11), steps=7)
    resumed = _trainer(copy.deepcopy(graph), accumulate=2, checkpoint_dir=tmp_path)
    assert (resumed.step, resumed.batches) == (6, 10)
    result = resumed.fit(batches if sized else Reread(batches), steps=7)
    assert (result["step"], result["batches"], len(result["losses"])) == (7, 12, 1)
    assert result["epochs"] == pytest.approx(12 / 5)
    expected = _adapters(whole)
    assert all(torch.equal(v, expected[k]) for k, v in _adapters(resumed.gm).items())


@pytest.mark.parametrize("batches, options, message", [
    (lambda: [], {"steps": 10}, "batches is empty"),
    (lambda: iter([]), {"steps": 10}, "batches is empty"),
    (_batches, {"steps": 0}, "steps must be a positive integer, got 0"),
    (_batches, {"steps": -5}, "steps must be a positive integer, got -5"),
    (_batches, {"steps": 2.5}, "steps must be a positive integer"),
    (_batches, {"epochs": 0}, "epochs must be a positive integer"),
    (_batches, {"steps": 3, "epochs": 1}, "not both"),
    (lambda: iter(_batches()), {"epochs": 2}, "can be read once"),
    (lambda: None, {"steps": 1}, "must be an iterable"),
])
def test_nothing_to_train_on_is_refused(graph, batches, options, message):
    gm = copy.deepcopy(graph)
    before = _adapters(gm)
    trainer = _trainer(gm, schedule="constant")
    with pytest.raises(lfx.SpecError, match=message):
        trainer.fit(batches(), **options)
    assert trainer.step == 0 and all(torch.equal(v, before[k]) for k, v in _adapters(gm).items())


def test_a_model_that_is_not_a_rewritten_graph_is_refused():
    model = nn.Sequential(nn.Linear(8, 4))
    for wrong in (model, torch.fx.symbolic_trace(model)):
        with pytest.raises(lfx.ModelTypeError, match=r"graph from lfx.rewrite.*lfx.rewrite\(model, spec"):
            lfx.Trainer(wrong, mse, compile=False)


@pytest.mark.parametrize("loss_fn, message", [
    (lambda m, b: mse(m, b).item(), "returned a float; it must return a scalar tensor"),
    (lambda m, b: (m(b[0]) - b[1]).square().mean(1), r"shape \(4,\); it must return a scalar"),
    (lambda m, b: mse(m, b).detach(), "does not depend on the adapters"),
])
def test_a_loss_that_is_not_a_scalar_tensor_of_the_output_is_refused(graph, loss_fn, message):
    gm = copy.deepcopy(graph)
    before = _adapters(gm)
    trainer = _trainer(gm, loss_fn)
    with pytest.raises(lfx.TrainingError, match=message):
        trainer.fit(_batches(), steps=2)
    assert trainer.step == 0 and all(torch.equal(v, before[k]) for k, v in _adapters(gm).items())


class LossBug(Exception):
    pass


@pytest.mark.parametrize("calls_model", [True, False])
def test_an_error_of_loss_fn_propagates_once_under_compile(graph, calls_model):
    calls = []

    def loss_fn(model, batch):
        calls.append(batch)
        if calls_model:
            model(batch[0])  # compiles, then the bug
        raise LossBug("a bug in the loss")

    torch._dynamo.reset()
    trainer = _trainer(copy.deepcopy(graph), loss_fn, compile="aot_eager")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no "torch.compile failed" warning
            with pytest.raises(LossBug, match="^a bug in the loss$"):
                trainer.fit(_batches(), steps=2)
    finally:
        torch._dynamo.reset()
    assert len(calls) == 1 and trainer.compiled


def test_autocast_is_a_hand_loop_under_torch_autocast(graph):
    batches = _batches()
    steps = [[b] for b in batches[:4]]
    want_gm, plain_gm, gm = copy.deepcopy(graph), copy.deepcopy(graph), copy.deepcopy(graph)
    want_losses, _ = _hand_loop(want_gm, steps, 4, "linear", 1, autocast=True)
    _hand_loop(plain_gm, steps, 4, "linear", 1)
    result = _trainer(gm, autocast=True, schedule="linear", warmup_steps=1).fit(batches[:4], steps=4)
    assert result["losses"] == pytest.approx(want_losses, rel=1e-6)
    want = _adapters(want_gm)
    assert _close(_adapters(gm), want)
    assert not _close(_adapters(plain_gm), want, 1e-4)  # autocast changes the steps: the check has teeth


def _saved_activations(gm, **options):
    """The shapes of the tensors autograd saved (no parameters or buffers) over one compiled step."""
    own = {id(t) for t in [*gm.parameters(), *gm.buffers()]}
    saved = []

    def pack(tensor):
        if id(tensor) not in own:
            saved.append(tuple(tensor.shape))
        return tensor

    def loss_fn(model, batch):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            return mse(model, batch)

    torch._dynamo.reset()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # it must compile, not fall back
            trainer = _trainer(gm, loss_fn, compile="aot_eager", schedule="constant", **options)
            trainer.fit(_batches(1, rows=64), steps=1)
    finally:
        torch._dynamo.reset()
    return sorted(saved)


def test_memory_budget_changes_the_saved_activations(graph):
    """Budget 1 saves what compile saves by default, hidden (64, 16) activations among them;
    budget 0 recomputes all it can and saves no hidden activation. The steps are the eager ones."""
    eager = copy.deepcopy(graph)
    _trainer(eager, schedule="constant").fit(_batches(1, rows=64), steps=1)
    saved = {}
    for budget in (None, 1.0, 0.0):
        gm = copy.deepcopy(graph)
        saved[budget] = _saved_activations(gm, **({} if budget is None else {"memory_budget": budget}))
        assert _close(_adapters(gm), _adapters(eager), 1e-5)
    assert saved[1.0] == saved[None] and (64, 16) in saved[1.0]
    assert (64, 16) not in saved[0.0] and len(saved[0.0]) < len(saved[1.0]) / 2
