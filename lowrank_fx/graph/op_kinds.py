"""Op families that are linear in their weight, and the matrix view every method works in.

Every target is y = f(x, W) with f linear in W. Methods build their updates for a matrix
ΔW (out, in); the op kind says how that matrix maps to the stored weight and how an update
applies to an activation without a bias:

    linear      W (out, in) or, layout "in_out", (in, out)      f = x Wᵀ
    conv1/2/3d  W (out, in/g, k...)  matrix (out, in/g · Πk)    f = conv(x, W; stride, padding, dilation, g)
    embedding   W (num, dim)         matrix (dim, num)          f = W[ids]  (one_hot(ids) · Wᵀ_matrix)

A 3-D mixture-of-experts stack is an `ExpertsKind` (graph/experts.py), matrix view (E, out, in).

`apply(x, ΔW)` is f(x, ΔW): the fallback any method can use, with ΔW built once per call.

A linear layer whose weight is quantized (graph/quantized.py) is a `QuantizedLinearKind`: a
linear kind (methods use their factored forms) whose matrix view is (out, in) and whose
`apply(x, ΔW)` is F.linear, but whose stored weight is no plain matrix: its dense values come
from running the layer's own region of the graph (`graph.quantized.dequantized`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .experts import ExpertsKind

_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclasses.dataclass(frozen=True)
class LinearKind:
    name = "linear"

    def apply(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(delta.dtype), delta).to(x.dtype)

    def to_weight(self, matrix: torch.Tensor, layout: str, shape) -> torch.Tensor:
        return matrix if layout == "out_in" else matrix.t()

    def to_matrix(self, weight: torch.Tensor, layout: str) -> torch.Tensor:
        return weight if layout == "out_in" else weight.t()


@dataclasses.dataclass(frozen=True)
class ConvKind:
    dims: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int

    @property
    def name(self) -> str:
        return f"conv{self.dims}d"

    def conv(self, x: torch.Tensor, kernel: torch.Tensor, **overrides) -> torch.Tensor:
        options = {"stride": self.stride, "padding": self.padding, "dilation": self.dilation,
                   "groups": self.groups, **overrides}
        return _CONVS[self.dims](x, kernel, None, **options)

    def apply(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        kernel = delta.reshape(delta.shape[0], -1, *self.kernel)
        return self.conv(x.to(delta.dtype), kernel).to(x.dtype)

    def to_weight(self, matrix: torch.Tensor, layout: str, shape) -> torch.Tensor:
        return matrix.reshape(shape)

    def to_matrix(self, weight: torch.Tensor, layout: str) -> torch.Tensor:
        return weight.flatten(1)

    @property
    def kernel_size(self) -> int:
        return math.prod(self.kernel)


@dataclasses.dataclass(frozen=True)
class EmbeddingKind:
    padding_idx: int | None

    name = "embedding"

    def lookup(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """table[ids] with the base's padding_idx (whose row gets no gradient), as nn.Embedding."""
        return F.embedding(ids, table, self.padding_idx)

    def apply(self, ids: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.lookup(ids, delta.t())

    def to_weight(self, matrix: torch.Tensor, layout: str, shape) -> torch.Tensor:
        return matrix.t()

    def to_matrix(self, weight: torch.Tensor, layout: str) -> torch.Tensor:
        return weight.t()


@dataclasses.dataclass(frozen=True)
class QuantizedLinearKind(LinearKind):
    """A linear layer whose weight is stored quantized (`scheme`: "int8", "nf4", "int4", ...).

    Updates are dense (out, in) matrices applied with F.linear beside the quantized base; the
    base weight is never converted in place. `to_matrix` refuses: its dense values are the
    region's output on the identity (graph/quantized.py), which needs the graph."""

    scheme: str = ""

    def to_matrix(self, weight: torch.Tensor, layout: str) -> torch.Tensor:
        raise TypeError(
            f"a {self.scheme} quantized weight has no plain matrix view; dequantize it with "
            "lowrank_fx.graph.quantized.dequantized(gm, target)"
        )

    def to_weight(self, matrix: torch.Tensor, layout: str, shape) -> torch.Tensor:
        return matrix


LINEAR = LinearKind()
OpKind = LinearKind | ConvKind | EmbeddingKind | QuantizedLinearKind | ExpertsKind
