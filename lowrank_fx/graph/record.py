"""What lowrank_fx remembers about a GraphModule, kept in `gm.meta["lowrank_fx"]`.

The graph itself is the source of truth for what was injected: every node the inject pass
adds carries `node.meta["lowrank_fx"] = {"adapter", "target", "role"}`. The record holds
what the graph cannot: the original model's names for its tensors and each adapter's spec.
"""

from __future__ import annotations

import dataclasses
import keyword
from typing import TYPE_CHECKING

from torch import fx, nn

from ..errors import ModelTypeError, SpecError

if TYPE_CHECKING:
    from ..spec import Spec

KEY = "lowrank_fx"
CONTAINER = "lowrank_fx"  # gm.lowrank_fx[adapter][group] holds the adapter modules


@dataclasses.dataclass
class AdapterInfo:
    spec: Spec  # the Spec it was made from
    groups: dict[str, str]  # target name -> group name inside gm.lowrank_fx[adapter]
    max_rank: int | None = None  # a hot-swap slot's padded rank (adapt/hotswap.py)


@dataclasses.dataclass
class Record:
    aliases: dict[str, list[str]]  # tensor name -> every name of that tensor in the model
    state_keys: list[str]  # the original model's state_dict keys, in order
    adapters: dict[str, AdapterInfo] = dataclasses.field(default_factory=dict)

    @staticmethod
    def find(gm: fx.GraphModule) -> Record | None:
        return getattr(gm, "meta", {}).get(KEY)

    @staticmethod
    def require(gm: fx.GraphModule, call: str) -> Record:
        """The record of `gm`; ModelTypeError naming `call` if `gm` was not made by lfx.rewrite."""
        record = Record.find(gm)
        if record is None:
            raise ModelTypeError(f"{call} takes the graph lfx.rewrite returned; this {type(gm).__name__} has no "
                                 "lowrank_fx record. Pass gm = lfx.rewrite(model, spec, example_inputs=...)")
        return record

    @staticmethod
    def attach(gm: fx.GraphModule, aliases, state_keys) -> Record:
        record = Record(aliases=aliases, state_keys=state_keys)
        gm.meta[KEY] = record
        return record


def require_graph(gm, call: str) -> None:
    """Refuse anything but a GraphModule (what lfx.rewrite returns) given to `call`."""
    if not isinstance(gm, fx.GraphModule):
        raise ModelTypeError(f"{call} takes the graph lfx.rewrite returned, got a {type(gm).__name__}; "
                             "pass gm = lfx.rewrite(model, spec, example_inputs=...)")


def check_adapter_name(name, what: str = "adapter name") -> None:
    """SpecError unless `name` can name an adapter: a Python identifier, not a keyword, and not an
    attribute every module has (`half`, `eval`, ...), as it keys the adapter's ModuleDict."""
    if (not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name)
            or hasattr(nn.ModuleDict(), name)):
        raise SpecError(f"{what} must be a Python identifier that is neither a keyword nor an attribute of "
                        f"torch modules (such as 'half' or 'eval'), e.g. 'default'; got {name!r}")


def tag(node: fx.Node, adapter: str, target: str, role: str) -> None:
    node.meta[KEY] = {"adapter": adapter, "target": target, "role": role}


def tagged(gm: fx.GraphModule, role: str | None = None) -> list[fx.Node]:
    """Nodes added by lowrank_fx, optionally only those of one role ("delta" or "add")."""
    return [n for n in gm.graph.nodes if KEY in n.meta and (role is None or n.meta[KEY]["role"] == role)]
