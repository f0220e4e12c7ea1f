"""The small models of PEFT's custom-model test matrix, rebuilt for our tests.

Each has the module names and shapes PEFT's matrix uses (lin0, emb, conv1d, conv2d, mha...)
so that its rows' `target_modules` apply unchanged. `INPUTS[name]()` gives an example batch.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return torch.log_softmax(self.lin1(self.drop(torch.relu(self.lin0(x)))), dim=-1)


class EmbConv1D(nn.Module):
    """An embedding, then Hugging Face's Conv1D (weight stored (in, out))."""

    def __init__(self):
        super().__init__()
        self.emb, self.conv1d, self.lin0 = nn.Embedding(100, 5), Conv1D(1, 5), nn.Linear(10, 2)

    def forward(self, ids):
        h = torch.relu(self.conv1d(self.emb(ids))).flatten(1)
        return torch.log_softmax(self.lin0(h), dim=-1)


class ConvNet(nn.Module):
    """One conv of any dimension (named conv1d / conv2d / conv3d) between a reshape of the input
    and a linear head."""

    def __init__(self, conv: nn.Module, view: tuple[int, ...], head_in: int):
        super().__init__()
        self.conv_name = f"conv{len(view) - 1}d"
        self.add_module(self.conv_name, conv)
        self.lin0 = nn.Linear(head_in, 2)
        self.view = view

    def forward(self, x):
        x = torch.relu(getattr(self, self.conv_name)(x.reshape(-1, *self.view))).flatten(1)
        return torch.log_softmax(self.lin0(x), dim=-1)


class Conv2dGroups(nn.Module):
    """A linear feeding a grouped conv (16 channels, groups=8); the whole batch is one input."""

    def __init__(self):
        super().__init__()
        self.lin0, self.conv2d, self.lin1 = nn.Linear(90, 288), nn.Conv2d(16, 16, 3, groups=8), nn.Linear(16, 2)

    def forward(self, x):
        h = self.lin0(x.flatten()).reshape(2, 16, 3, 3)
        return torch.log_softmax(self.lin1(torch.relu(self.conv2d(h)).flatten(1)), dim=-1)


class Conv2dGroups2(nn.Module):
    """A padded grouped conv (16 -> 32 channels, groups=2) on an input of its own."""

    def __init__(self):
        super().__init__()
        self.conv2d, self.lin0 = nn.Conv2d(16, 32, 3, padding=1, groups=2), nn.Linear(32 * 4 * 4, 2)

    def forward(self, x):
        h = x.reshape(-1, 16, 4, 4)
        return torch.log_softmax(self.lin0(torch.relu(self.conv2d(h)).flatten(1)), dim=-1)


class Mha(nn.Module):
    """nn.MultiheadAttention on an unbatched sequence (L, E), then a linear head."""

    def __init__(self):
        super().__init__()
        self.mha, self.lin0 = nn.MultiheadAttention(10, 2), nn.Linear(10, 2)

    def forward(self, x):
        h, _ = self.mha(x, x, x)
        return torch.log_softmax(self.lin0(h), dim=-1)


class _ParameterLinear(nn.Module):
    """x @ W + b with a bare parameter W (in, out): no nn.Linear to find by module type."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class MlpUsingParameters(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = _ParameterLinear(10, 20), _ParameterLinear(20, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin1(torch.relu(self.lin0(x))), dim=-1)


BUILDERS = {
    "MLP": Mlp,
    "EmbConv1D": EmbConv1D,
    "Conv1d": lambda: ConvNet(nn.Conv1d(1, 1, 2), (1, 10), 9),
    "Conv2d": lambda: ConvNet(nn.Conv2d(5, 10, 3), (5, 3, 3), 10),
    "Conv2dGroups": Conv2dGroups,
    "Conv2dGroups2": Conv2dGroups2,
    "Conv3d": lambda: ConvNet(nn.Conv3d(5, 10, 3), (5, 3, 3, 3), 10),
    "MHA": Mha,
    "MlpUsingParameters": MlpUsingParameters,
}

INPUTS = {
    "MLP": lambda: torch.randn(9, 10),
    "EmbConv1D": lambda: torch.randint(0, 100, (9, 10)),
    "Conv1d": lambda: torch.randn(9, 10),
    "Conv2d": lambda: torch.randn(9, 45),
    "Conv2dGroups": lambda: torch.randn(9, 10),
    "Conv2dGroups2": lambda: torch.randn(9, 256),
    "Conv3d": lambda: torch.randn(9, 135),
    "MHA": lambda: torch.randn(9, 10),
    "MlpUsingParameters": lambda: torch.randn(9, 10),
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[name]().eval()
