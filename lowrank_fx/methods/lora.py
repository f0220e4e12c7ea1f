"""The LoRA method config: rank, alpha, rsLoRA, dropout, DoRA, LoRA bias, PEFT's grouped-conv
layout (mixed_groups); its units are in lora_unit.py (the math) and dora.py.
"""

from __future__ import annotations

import math

from ..errors import SpecError
from ..graph.experts import ExpertsKind
from ..graph.op_kinds import ConvKind, EmbeddingKind
from ..options import flag, options, set_options
from . import lora_init
from .base import AdapterGroup, Method, adapter_dtype, check_common
from .dora import DoRAUnit
from .lora_eva import eva_settings
from .lora_experts import ExpertsLoRAUnit, check_experts
from .lora_unit import LoRAUnit


@options
class LoRA(Method):
    """Low-rank adaptation: W + (alpha / r) · B A with A (r, in), B (out, r); DoRA with dora=True.

    Args:
        rank: r, the rank of the update (an int >= 1).
        alpha: the scale's numerator: ΔW = (alpha / r) · B A (finite, not 0).
        dropout: dropout on the adapter's input x, in [0, 1).
        rslora: scale by alpha / √r instead (rank-stabilised LoRA).
        init: "default" (B = 0, A Kaiming-uniform, as PEFT), "nonzero", "gaussian",
            "orthogonal", or a weight- or data-based init: "pissa", "pissa_niter_N", "olora",
            "loftq", "corda", "corda_kpm", "eva" (methods/lora_init.py).
        dora: DoRA: W' = m · (W + ΔW) / ‖W + ΔW‖, with a trained magnitude m (out,).
        bias: also train a bias update Δb (out,), folded into the base bias (PEFT's lora_bias).
        shared_experts: on an expert stack, one A, B for every expert (lora_experts.py).
        mixed_groups: grouped convs only: PEFT's factor layout, A over every input channel
            (lora_unit.py); runs unmerged, never folds.
        eva_config: init="eva" only: PEFT's EvaConfig as a dict (rho, tau, whiten,
            adjust_scaling_factors; lora_eva.py).
        loftq_weights: init="loftq" over bitsandbytes 4-bit layers only: the float model's
            weights (a safetensors file), whose difference from the quantized base the factors
            take (lora_loftq_quantized.py).

    Raises:
        SpecError: an option out of range or a combination that cannot work (the message
            names the option and what is valid).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "default"
    dora: bool = False
    bias: bool = False
    shared_experts: bool = False  # expert stacks (lora_experts.py): one A, B for every expert
    # grouped convs only: PEFT's factor layout, A over every input channel (lora_unit.py); runs unmerged, never folds
    mixed_groups: bool = False
    # init="eva" only: PEFT's EvaConfig as a dict (rho, tau, whiten, adjust_scaling_factors; lora_eva.py)
    eva_config: object = None
    # init="loftq" over bitsandbytes 4-bit layers only: the float model's weights (a safetensors file),
    # whose difference from the quantized base the factors take (lora_loftq_quantized.py)
    loftq_weights: object = None

    kind = "lora"

    def __post_init__(self):
        check_common(self, lora_init.check_name)
        for option in ("rslora", "dora", "bias", "shared_experts", "mixed_groups"):
            flag("LoRA", option, getattr(self, option))
        if self.dora and self.mixed_groups:
            raise SpecError("LoRA(dora=True, mixed_groups=True): DoRA's norm is that of the adapted grouped kernel "
                            "W + ΔW, and PEFT's grouped-conv factors (A over every input channel) give no such "
                            "kernel (PEFT's own DoRA there takes the norm of another matrix); use mixed_groups=False, "
                            "lowrank_fx's grouped LoRA, for DoRA on grouped convs")
        lora_init.check_method(self)
        set_options(self, eva_config=eva_settings(self.init, self.eva_config),
                    loftq_weights=lora_init.loftq_weights_path(self.init, self.loftq_weights))

    @property
    def scale(self) -> float:
        """The update's scale s.

        Returns:
            alpha / r, or alpha / √r with rslora.
        """
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def build(self, targets: list) -> dict[str, AdapterGroup]:
        units = {}
        for t in targets:
            if isinstance(t.kind, ExpertsKind):
                check_experts(self, t)
                units[t.name] = ExpertsLoRAUnit(t, self.rank, self.scale, self.dropout, adapter_dtype(t.dtype),
                                                self.init, shared_experts=self.shared_experts)
                continue
            self._check(t)
            if self.loftq_weights is not None and not t.quantized:
                raise SpecError(f"LoRA(loftq_weights=...) adapts layers already quantized with bitsandbytes, but "
                                f"{t.name} is a float layer; for float layers drop loftq_weights (init='loftq' "
                                "then quantizes the graph's own base), or exclude it from this spec")
            unit_class = DoRAUnit if self.dora else LoRAUnit
            units[t.name] = unit_class(t, self.rank, self.scale, self.dropout, adapter_dtype(t.dtype), self.init,
                                       bias=self.bias, **({"mixed_groups": True} if self.mixed_groups else {}),
                                       **({"over_quantized": True} if self.loftq_weights is not None else {}))
        return {"dora" if self.dora else "lora": AdapterGroup(units)}

    def _check(self, t) -> None:
        kind = t.kind
        if isinstance(kind, ConvKind) and self.rank % kind.groups:
            raise SpecError(
                f"LoRA rank {self.rank} on {t.name}, a {kind.name} with groups={kind.groups}: the rank must be "
                f"a multiple of the groups (each group gets rank / groups); use rank={kind.groups * max(1, self.rank // kind.groups)}"
            )
        if self.bias and isinstance(kind, EmbeddingKind):
            raise SpecError(f"LoRA(bias=True) cannot adapt {t.name}: an embedding has no bias to fold into; "
                            "use bias=False for embeddings (a mixed spec can give them their own LoRA)")
        if self.bias and t.bias is None:
            raise SpecError(f"LoRA(bias=True) adds to the base bias of {t.name}, which has none (or a different "
                            "one per call site), so the update could not be folded; use bias=False there")
        if self.dora and self.bias:
            raise SpecError("LoRA(dora=True, bias=True): DoRA rescales the whole output, so a LoRA bias "
                            "has no fixed place in it (PEFT refuses it too); choose one of them")
        if self.dora and any(rows is not None for rows in t.rows):
            raise SpecError(f"LoRA(dora=True) cannot adapt {t.name}: its call sites use slices of the weight "
                            "(MultiheadAttention's packed in_proj on separate query/key/value), and DoRA's norm "
                            "is of the whole weight; use dora=False for it")
