"""Run a grouped capture's expert matmuls on torch's grouped kernel where it serves.

Under torch.export, transformers sends fp32 expert stacks to its fallback op
(`transformers::grouped_mm_fallback`: one matmul per expert, after a device sync), because
inductor lowers torch's grouped matmul for bf16 only. Eagerly, torch's kernel serves fp32 on the
CPU too, one call for every expert, as transformers uses it when the model runs as itself. This
pass makes each fallback node `lowrank_fx::grouped_mm`, an op opaque to torch.compile (as the
fallback is) that calls torch's kernel on the CPU (torch >= 2.11) and the fallback otherwise
(a GPU capture of bf16 weights has torch's kernel already), with the same backward:

    y = x W_g          per group g of rows (offsets)        x (S, in), W (E, in, out)
    dx = dy W_gᵀ,  dW_g = x_gᵀ dy_g
"""

from __future__ import annotations

import torch
from torch import fx

FALLBACK = "transformers.grouped_mm_fallback.default"


# torch's CPU grouped kernel: none before 2.9, 16-byte aligned operands only before 2.11
_CPU_KERNEL = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 11)


def _kernel_serves(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and _CPU_KERNEL  # a GPU's kernel may need bf16 and a recent one: the fallback


@torch.library.custom_op("lowrank_fx::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if _kernel_serves(x):
        return torch._grouped_mm(x, weight, offs=offs)
    return torch.ops.transformers.grouped_mm_fallback(x, weight, offs)


@grouped_mm.register_fake
def _(x, weight, offs):
    return x.new_empty(x.shape[0], weight.shape[-1])


@torch.library.custom_op("lowrank_fx::grouped_mm_weight_grad", mutates_args=())
def _weight_grad(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor, experts: int) -> torch.Tensor:
    """dW (E, in, out): dW_g = x_gᵀ dy_g."""
    if _kernel_serves(x):
        return torch._grouped_mm(x.t(), grad, offs=offs)
    out = x.new_zeros(experts, x.shape[1], grad.shape[1])
    start = 0
    for g, end in enumerate(offs.tolist()):
        out[g] = x[start:end].t() @ grad[start:end]
        start = end
    return out


@_weight_grad.register_fake
def _(x, grad, offs, experts):
    return x.new_empty(experts, x.shape[1], grad.shape[1])


def _setup(ctx, inputs, output):
    x, weight, offs = inputs
    ctx.save_for_backward(x, weight, offs)


def _backward(ctx, grad):
    x, weight, offs = ctx.saved_tensors
    grad = grad.contiguous()
    dx = grouped_mm(grad, weight.transpose(-2, -1).contiguous(), offs)
    dw = _weight_grad(x, grad, offs, weight.shape[0])
    return dx, dw, None


grouped_mm.register_autograd(_backward, setup_context=_setup)


def use_grouped_kernel(gm: fx.GraphModule) -> int:
    """Make every transformers fallback node of `gm` a `lowrank_fx::grouped_mm`; how many."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target) == FALLBACK]
    for node in nodes:
        node.target = torch.ops.lowrank_fx.grouped_mm.default
    if nodes:
        gm.graph.lint()
        gm.recompile()
    return len(nodes)
