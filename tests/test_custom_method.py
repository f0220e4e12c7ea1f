"""A method defined outside the package: VeRA (Kopiczko et al. 2024) on the public base classes.

VeRA shares one pair of frozen random matrices A (r, in_max), B (out_max, r) across every target
and trains two vectors per target, d (r) and b (out):

    ΔW = diag(b) B[:out] diag(d) A[:, :in]        Δy = b ⊙ (B[:out] (d ⊙ (A[:, :in] x)))

Everything below uses `lowrank_fx`'s public names only (lfx.Method, lfx.Unit, lfx.AdapterGroup).
The checks: the adapted graph against the formula computed by hand, a training step that moves
only d and b, folding (lfx.merge equals the adapted graph), and an adapter file round trip.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import lowrank_fx as lfx


class VeRAUnit(lfx.Unit):
    """One target's trainable vectors d (r) and b (out)."""

    def __init__(self, out_features: int, in_features: int, rank: int, init_b: float):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.vera_d = nn.Parameter(torch.full((rank,), 0.1))
        self.vera_b = nn.Parameter(torch.full((out_features,), init_b))

    def linear_update(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        h = nn.functional.linear(x, A[:, :self.in_features].to(x.dtype)) * self.vera_d  # (..., r)
        return nn.functional.linear(h, B[:self.out_features].to(x.dtype)) * self.vera_b  # (..., out)

    def delta_weight(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        B_t, A_t = B[:self.out_features].float(), A[:, :self.in_features].float()
        return self.vera_b.float()[:, None] * (B_t * self.vera_d.float()) @ A_t  # (out, in)

    def output_side(self) -> list[nn.Parameter]:
        return [self.vera_b]


class VeRAGroup(lfx.AdapterGroup):
    """The units of one VeRA adapter and the random A, B they share (saved with the adapter)."""

    shared = ("vera_A", "vera_B")

    def __init__(self, units: dict[str, VeRAUnit], rank: int, in_max: int, out_max: int, seed: int):
        super().__init__(units)
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("vera_A", torch.randn(rank, in_max, generator=generator) / in_max ** 0.5)
        self.register_buffer("vera_B", torch.randn(out_max, rank, generator=generator) / rank ** 0.5)


@dataclasses.dataclass(frozen=True)
class VeRA(lfx.Method):
    """VeRA: ΔW = diag(b) B diag(d) A with frozen shared random A, B."""

    rank: int = 4
    seed: int = 0
    init_b: float = 0.0  # PEFT's VeRA starts b at 0 (ΔW = 0); the tests start it non-zero

    kind = "vera_test"

    def build(self, targets: list) -> dict[str, lfx.AdapterGroup]:
        in_max = max(t.in_features for t in targets)
        out_max = max(t.out_features for t in targets)
        units = {t.name: VeRAUnit(t.out_features, t.in_features, self.rank, self.init_b) for t in targets}
        return {"vera": VeRAGroup(units, self.rank, in_max, out_max, self.seed)}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 6)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _adapted():
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(5, 8)
    gm = lfx.rewrite(model, lfx.Spec(targets=["fc1", "fc2"], method=VeRA(rank=4, seed=3, init_b=0.5)),
                     example_inputs=(x,))
    return model, gm, x


def _oracle(model: Tiny, gm, x: torch.Tensor) -> torch.Tensor:
    """W x + bias + b ⊙ (B (d ⊙ (A x))) at each layer, with the graph's own A, B, d, b."""
    group = gm.lowrank_fx.default.vera
    A, B = group.vera_A, group.vera_B
    h = x
    for name, layer in (("fc1", model.fc1), ("fc2", model.fc2)):
        unit = group.unit(name)
        out, inp = layer.weight.shape
        update = unit.vera_b * ((unit.vera_d * (h @ A[:, :inp].T)) @ B[:out].T)
        h = h @ layer.weight.T + layer.bias + update
        if name == "fc1":
            h = torch.relu(h)
    return h


def test_adapted_graph_is_the_vera_formula():
    model, gm, x = _adapted()
    assert torch.allclose(gm(x), _oracle(model, gm, x), atol=1e-5)
    trainable = {name for name, p in gm.named_parameters() if p.requires_grad}
    assert trainable == {f"lowrank_fx.default.vera.units.{t}.vera_{v}" for t in ("fc1", "fc2") for v in "db"}


def test_a_training_step_moves_only_d_and_b():
    model, gm, x = _adapted()
    before = {name: t.detach().clone() for name, t in [*gm.named_parameters(), *gm.named_buffers()]}
    optimizer = lfx.loraplus_optimizer(gm, 1e-2)
    gm(x).pow(2).mean().backward()
    optimizer.step()
    moved = {name for name, t in [*gm.named_parameters(), *gm.named_buffers()] if not torch.equal(t, before[name])}
    assert moved == {f"lowrank_fx.default.vera.units.{t}.vera_{v}" for t in ("fc1", "fc2") for v in "db"}
    assert torch.allclose(gm(x), _oracle(model, gm, x), atol=1e-5)  # the formula holds after the step


def test_merge_equals_the_adapted_graph():
    _model, gm, x = _adapted()
    with torch.no_grad():
        gm.lowrank_fx.default.vera.unit("fc2").vera_d.add_(0.3)  # not the init values
        merged = lfx.merge(gm)
        assert not any("lowrank_fx" in name for name, _ in merged.named_parameters())
        assert torch.allclose(merged(x), gm(x), atol=1e-5)
        state = lfx.merged_state_dict(gm)
        fresh = Tiny()
        fresh.load_state_dict(state)
        assert torch.allclose(fresh(x), gm(x), atol=1e-5)


def test_adapter_file_round_trip(tmp_path):
    model, gm, x = _adapted()
    with torch.no_grad():
        gm.lowrank_fx.default.vera.unit("fc1").vera_b.mul_(-2.0)
    path = lfx.save_adapters(gm, tmp_path / "vera.safetensors")
    torch.manual_seed(0)
    again = Tiny()
    again.load_state_dict(model.state_dict())
    loaded = lfx.load_adapters(again, path, example_inputs=(x,))
    with torch.no_grad():
        assert torch.allclose(loaded(x), gm(x), atol=1e-6)
    assert loaded.lowrank_fx.default.vera.unit("fc1").vera_b.requires_grad


def test_a_method_that_is_not_a_frozen_dataclass_is_refused():
    class Loose(lfx.Method):
        kind = "loose_test"

    @dataclasses.dataclass
    class Mutable(lfx.Method):
        kind = "mutable_test"

    @dataclasses.dataclass(frozen=True)
    class Nameless(lfx.Method):
        rank: int = 1

    for method in (Loose(), Mutable(), Nameless()):
        with pytest.raises(lfx.SpecError, match=f"{type(method).__name__} is an lfx.Method, but a method must be "
                                                "a frozen dataclass with a class attribute kind"):
            lfx.Spec(targets=["fc1"], method=method)


def test_the_write_a_method_page_runs(tmp_path, monkeypatch):
    """docs/write_a_method.md's code blocks, run in order as one script (its asserts included)."""
    page = Path(__file__).resolve().parents[1] / "docs" / "write_a_method.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    module = types.ModuleType("write_a_method")  # dataclasses look their module up in sys.modules
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile("\n".join(blocks), str(page), "exec"), module.__dict__)
    gm = module.gm
    assert (tmp_path / "vera.safetensors").is_file()
    group = gm.lowrank_fx.default.vera
    assert not torch.equal(group.unit("2").vera_b, torch.zeros(4))  # trained: b moved off 0
