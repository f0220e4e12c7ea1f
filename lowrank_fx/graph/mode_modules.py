"""Modules that a captured graph calls so that it follows `.train()` / `.eval()`.

`passes/mode_aware.py` replaces ops whose training flag torch.export baked in with calls to
these; each reads `self.training` at run time.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

DROPOUT_FUNCTIONS = {
    "dropout": F.dropout,
    "feature_dropout": F.dropout2d,
    "alpha_dropout": F.alpha_dropout,
    "feature_alpha_dropout": F.feature_alpha_dropout,
}


class ModeDropout(nn.Module):
    """dropout(x, p) while training, identity in eval."""

    def __init__(self, p: float, kind: str):
        super().__init__()
        self.p = p
        self.kind = kind

    def forward(self, x):
        return DROPOUT_FUNCTIONS[self.kind](x, self.p, self.training)


class ModeBatchNorm(nn.Module):
    """Batch statistics (updating the running ones) while training, running statistics in eval."""

    def __init__(self, momentum: float, eps: float):
        super().__init__()
        self.momentum = momentum
        self.eps = eps

    def forward(self, x, weight, bias, running_mean, running_var):
        use_batch = self.training or running_mean is None
        return F.batch_norm(x, running_mean, running_var, weight, bias, use_batch, self.momentum, self.eps)


class ModeCounter(nn.Module):
    """counter += step while training (batch norm's num_batches_tracked); nothing in eval."""

    _is_impure = True  # an in-place update whose result may be unused: keep it through DCE

    def forward(self, counter, step):
        if self.training:
            counter.add_(step)
        return counter


class ModeAttention(nn.Module):
    """scaled_dot_product_attention with dropout_p while training, 0 in eval."""

    def __init__(self, dropout_p: float, options: dict):
        super().__init__()
        self.dropout_p = dropout_p
        self.options = options  # is_causal, scale, enable_gqa as captured

    def forward(self, query, key, value, attn_mask=None):
        p = self.dropout_p if self.training else 0.0
        return F.scaled_dot_product_attention(query, key, value, attn_mask, p, **self.options)
