"""The graph's own base weight for inits that change it (PiSSA, OLoRA: methods/lora_init.py).

Such an init splits W into W_res + s · B A. The graph shares the model's tensors, so W_res goes
into a NEW parameter that replaces W under every name the graph holds it by; the user's model
keeps W. A weight that the graph also reads outside the target's call sites (an embedding tied
to the head) is refused: the other use must keep W.
"""

from __future__ import annotations

from torch import fx, nn

from ..errors import SpecError
from ..graph.targets import Target
from ..methods.lora_init import changes_base
from .fold_graph import GraphIndex, read_elsewhere, set_parameter


def base_changing(assignment: dict, targets: dict[str, Target]) -> list[str]:
    """Targets whose method's init changes the base weight."""
    return [name for name, method in assignment.items()
            if changes_base(getattr(method, "init", "default")) and not targets[name].quantized]


def check_untied(gm: fx.GraphModule, names: list[str], targets: dict[str, Target]) -> None:
    """SpecError for a base-changing target whose weight the graph reads elsewhere too."""
    if not names:
        return
    index = GraphIndex(gm)
    for name in names:
        if read_elsewhere(gm, index, targets[name]):
            raise SpecError(
                f"{name}'s weight {targets[name].weight} is also used outside {name} (a tied embedding?), and "
                "this init replaces the base weight by a residual, which the other use must not see; exclude "
                f"{name} from this spec or give it its own LoRA with init='default' (a mixed spec)")


def write_residuals(gm: fx.GraphModule, units: dict[str, nn.Module], targets: dict[str, Target]) -> None:
    """Give each target whose unit holds a residual (`unit.residual`, the weight as the graph stores
    it) a new frozen parameter with it, under every name of the old weight in `gm`."""
    names_of: dict[int, list[str]] = {}
    for path, param in gm.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(path)
    for name, unit in units.items():
        value = getattr(unit, "residual", None)
        if value is None:
            continue
        unit.residual = None
        old = gm.get_parameter(targets[name].weight)
        new = nn.Parameter(value.to(device=old.device, dtype=old.dtype).contiguous(), requires_grad=False)
        for path in names_of.get(id(old), [targets[name].weight]):
            set_parameter(gm, path, new)

