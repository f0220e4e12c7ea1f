"""PEFT's trained biases (LoraConfig bias="all" / "lora_only") <-> trained single parameters.

With bias="all" PEFT trains every parameter named `*.bias` and stores each one; with
"lora_only" it trains and stores the biases of the modules it adapts. A bias of an adapted
module is stored under the module's base layer (`base_model.model.lin0.base_layer.bias`),
any other under its own name (`base_model.model.norm.bias`); a LoRA bias (`lora_B.bias`,
lora_bias=True) is the adapter's own tensor, not one of these.

Here a trained bias is a trained single parameter of the adapter (`Spec(train=["*.bias"])`,
passes/train_modules.py): a full copy the graph reads instead of the base bias, folded by
replacing it, so merging equals PEFT's merge_and_unload. Loading: each stored bias becomes one
`train` pattern and its value that copy. Saving: "all" when the adapter trains every bias, or
one that is not an adapted target's; else "lora_only". Either way every bias of that set is
written (the untrained ones as the base values, which PEFT then trains from).
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import fx

from ..errors import AdapterFileError
from ..graph.record import Record
from ..passes.train_modules import base_readers, resolve_trained, trained_group
from ..spec import Spec
from .peft_base import split_stored

TRAINED_BIASES = ("all", "lora_only")  # LoraConfig.bias values that load


def split_biases(config: dict, tensors: dict[str, torch.Tensor], prefix: str, suffixes) -> tuple[dict, dict]:
    """({bias path in the model: tensor} of the trained biases, the other tensors); none with bias="none"."""
    if config.get("bias", "none") not in TRAINED_BIASES:
        return {}, tensors
    return split_stored(tensors, prefix, suffixes, ".bias")


def unwrap_saved(saved: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(the modules_to_save copies, {parameter path: base value}) from `split_saved`'s tensors.
    With bias="all" PEFT also stores the biases inside its modules_to_save wrapper: the copy's
    (`lin1.modules_to_save.bias`, the same tensor as `lin1.bias`) and the original module's
    (`lin1.original_module.bias`, the base, which must be the model's: peft_base.py)."""
    copies, base = {}, {}
    for path, value in saved.items():
        if ".original_module." in path:
            base[path.replace(".original_module.", ".")] = value
        elif ".modules_to_save." in path:
            plain = path.replace(".modules_to_save.", ".")
            if plain in saved and not torch.equal(saved[plain], value):
                copies[path] = value  # two different copies of one parameter: reported as a tensor too many
            else:
                copies.setdefault(plain, value)
        else:
            copies[path] = value
    return copies, base


def with_biases(spec: Spec, biases: dict[str, torch.Tensor]) -> Spec:
    """`spec` also training each of these biases, as a single parameter."""
    if not biases:
        return spec
    return dataclasses.replace(spec, train=(*spec.train, *("re:^" + re.escape(path) + "$" for path in biases)))


def _names(gm: fx.GraphModule) -> dict[str, list[str]]:
    """{graph name of a parameter the graph reads: its original names}."""
    record = Record.require(gm, "lfx.save_peft")
    found = {}
    for nodes in base_readers(gm).values():
        name = nodes[0].target
        found[name] = list(dict.fromkeys(record.aliases.get(name, [name]) + [n.target for n in nodes]))
    return found


def bias_config_and_tensors(gm: fx.GraphModule, adapter: str, modules: dict[str, str], prefix: str) -> tuple[str, dict]:
    """(LoraConfig bias, {PEFT key: tensor}) for the trained single parameters of `adapter`;
    ("none", {}) if it has none. `modules`: {adapted target: its PEFT module path}."""
    trained = resolve_trained(gm, Record.require(gm, "lfx.save_peft").adapters[adapter].spec)
    if not trained.single:
        return "none", {}
    others = [name for name in trained.single if not name.endswith(".bias")]
    if others:
        raise AdapterFileError(
            f"adapter {adapter!r} trains single parameters that are not biases ({', '.join(others[:5])}); PEFT "
            "trains single parameters only as biases (bias='all' / 'lora_only'): train whole modules "
            "(modules_to_save) or biases instead"
        )
    copies = trained_group(gm, adapter).copies()
    names = {graph_name: aliases for graph_name, aliases in _names(gm).items()  # modules_to_save writes those
             if not any(a.startswith(m + ".") for a in aliases for m in trained.modules)}
    adapted = {f"{target}.bias" for target in modules}
    every = {a for aliases in names.values() for a in aliases if a.endswith(".bias")}
    single = set(trained.single)
    setting = "lora_only" if single <= adapted and not every <= single else "all"
    biases = {}  # every bias of the chosen set: {original name: value}
    for graph_name, aliases in names.items():
        name = next((a for a in aliases if a.endswith(".bias") and (setting == "all" or a in adapted)), None)
        if name is not None:
            biases[name] = copies.get(graph_name, gm.get_parameter(graph_name))
    tensors = {}
    for name, value in biases.items():
        owner = name.removesuffix(".bias")
        key = f"{modules[owner]}.base_layer.bias" if owner in modules else name
        tensors[prefix + key] = value
    return setting, tensors
