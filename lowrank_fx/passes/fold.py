"""Fold adapters into dense weights: W ← W + Σ_adapters gate · ΔW, computed in fp32 (float64 for
float64 weights or updates) and cast back to W's dtype. ΔW (out, in) goes back to the weight's
own shape through its op kind (a conv kernel, a transposed Conv1D or embedding table); a
unit with a bias update (LoRA bias) adds b ← b + gate · Δb.

`fold(gm)` returns a new GraphModule without adapter nodes or parameters; `gm` itself is
never modified. `fold(gm, inplace=True)` folds into gm's own tensors instead and makes gm the
dense graph (passes/fold_inplace.py). A weight that the graph also reads elsewhere (GPT-2's
lm_head is the token embedding) is folded into an untied copy, `lowrank_fx_untied.<target>`,
so the other use keeps the original values. NaN or inf updates are refused. Adapters whose
gate is 0 (made inactive by `lfx.set_active_adapters`) are left out: the folded graph computes
what `gm` computes. Trained modules (`Spec.train`) fold as the copy the graph reads: the
newest active adapter's that trains them (passes/train_modules.py).

Folding streams: one target's ΔW is built, added and dropped before the next
(passes/fold_updates.py), so besides what the result holds it needs one ΔW and one sum at a time.

Quantized targets (passes/quantized_fold.py) fold to dense layers: dequantized W + ΔW in fp32,
exact. `fold(gm, requantize=True)` quantizes W + ΔW again in the base's own format instead and
reports the measured output error (`folded.requantize_report`, a warning above `tolerance`).
"""

from __future__ import annotations

import copy
from typing import Any, cast

from torch import fx, nn

from ..deprecation import api_options
from ..errors import MergeError
from ..graph.folded import GroupMarks, carry_marks
from ..graph.record import KEY, Record, require_graph
from ..noise import quiet_third_party
from ..options import flag, number
from ..progress import stage
from .fold_graph import GraphIndex, fold_target, quantized_bias, remove_adapter_nodes, set_parameter
from .fold_inplace import fold_in_place
from .fold_updates import merged_bias, merged_weight, target_update, updates
from .layers import flat_view
from .quantized_fold import REPORT, fold_dense, fold_requantized, measure, regions_by_output
from .train_modules import fold_trained, trained_values


def shared_copy(gm: fx.GraphModule, every_tensor: bool = False) -> fx.GraphModule:
    """A deep copy of `gm` that shares every tensor not requiring grad (base weights, quantized
    ones included: torchao's NF4 tensors cannot be deep-copied, and none should be).

    `every_tensor=True` shares the trainable ones too: a pristine captured graph, whose
    tensors are all the model's own (adapt/capture_memo.py hands out such copies)."""
    memo = {id(t): t for t in [*gm.parameters(), *gm.buffers()] if every_tensor or not t.requires_grad}
    with quiet_third_party():  # torch's own pytree deprecation notice on deepcopy
        return copy.deepcopy(gm, memo)


@api_options(positional=1, name="merge")
@stage("folding adapters into the base weights")
def fold(gm: fx.GraphModule, *, requantize: bool = False, tolerance: float = 1e-2,
         inplace: bool = False) -> fx.GraphModule:
    """The dense graph: every active adapter folded into its target's weight, W + Σ gate · ΔW.

    Exported as `lfx.merge`. Default (`inplace=False`): a new GraphModule; `gm` and its tensors
    are unchanged. It shares every frozen tensor of `gm` (the weights that were not adapted,
    and the original model's, as `gm` does) and allocates one new tensor per folded weight and
    bias, the size of that weight (a quantized target: its dense (out, in) weight). Peak memory
    beyond that: one ΔW and one sum at a time. A graph with layer blocks (passes/layers.py)
    folds into a flat one.

    `inplace=True`, PEFT's merge_and_unload: W ← W + ΔW in W's own storage and `gm` itself becomes
    the dense graph (adapter nodes and parameters removed), returned. Since `gm` shares its
    weights with the model it was captured from, THE ORIGINAL MODEL'S WEIGHTS CHANGE TOO, as does
    every graph sharing them. Tied and quantized targets, and refusals: passes/fold_inplace.py.

    Args:
        gm: a graph from `lfx.rewrite`.
        requantize: (not with `inplace`) quantized targets are quantized again in their base's
            format rather than made dense, and `folded.requantize_report` (a RequantizeReport)
            gives the output error measured on the capture's examples; a RequantizeWarning says
            when it is above `tolerance`.
        tolerance: the largest requantization error accepted without a warning (>= 0).
        inplace: fold into `gm`'s own tensors (and the model's) instead of a copy.

    Returns:
        The dense GraphModule: a new one, or `gm` itself with `inplace=True`.

    Raises:
        MergeError: `gm` has no adapters, an update has NaN or inf values, or `requantize`
            was asked with `inplace`; `gm` and every tensor are then unchanged.
        ModelTypeError: `gm` is not a GraphModule.
        SpecError: a `requantize`, `tolerance` or `inplace` value of the wrong kind.
    """
    require_graph(gm, "lfx.merge")
    flag("lfx.merge", "inplace", inplace)
    flag("lfx.merge", "requantize", requantize)
    number("lfx.merge", "tolerance", tolerance, "a number >= 0 (0: warn on any error)", lambda v: v >= 0,
           "the largest requantization error accepted without a warning")
    if inplace:
        if requantize:
            raise MergeError(
                "requantize=True measures the folded graph against the adapted one, which an in-place "
                "merge replaces; use lfx.merge(gm, requantize=True) (a copy: gm keeps its adapters)"
            )
        return fold_in_place(gm)
    gm = flat_view(gm)
    _, found = updates(gm)
    trained = trained_values(gm)  # Spec.train: the active adapter's copies replace the base parameters
    quantized = [name for name, update in found.items() if update.target.quantized]
    regions = regions_by_output(gm) if quantized else {}
    folded = shared_copy(gm)
    marks = GroupMarks(gm)
    remove_adapter_nodes(folded)
    index = GraphIndex(folded)
    for update in found.values():
        target = update.target
        delta, bias_delta = target_update(gm, update)
        if target.quantized:
            weight = merged_weight(None, delta, target, gm)
            bias = quantized_bias(gm, target, regions, bias_delta) if bias_delta is not None else None
            step = fold_requantized if requantize else fold_dense
            step(folded, target, regions[target.sites[0]], weight, bias)
        else:
            weight = merged_weight(gm.get_parameter(target.weight), delta, target)
            carry_marks(weight, gm.get_parameter(target.weight), marks.of(update.parts))  # graph/folded.py
            fold_target(folded, index, target, weight)
            if bias_delta is not None:
                assert target.bias is not None, "LoRA(bias=True) refuses a target without a bias"
                bias = merged_bias(gm.get_parameter(target.bias), bias_delta)
                carry_marks(bias, gm.get_parameter(target.bias), marks.of(update.parts))
                set_parameter(folded, target.bias, nn.Parameter(bias, requires_grad=False))
        del delta, bias_delta
    fold_trained(folded, trained)
    source = Record.require(gm, "lfx.merge")
    folded.meta[KEY] = Record(aliases=dict(source.aliases), state_keys=list(source.state_keys))
    folded.graph.lint()
    folded.recompile()
    if requantize and quantized:
        report = measure(gm, folded, len(quantized), tolerance)
        folded.meta[REPORT] = report
        cast(Any, folded).requantize_report = report  # a plain attribute, beside the meta entry
    return folded
