"""Base-model tensors in a PEFT file, checked against the model's own.

With its default save_embedding_layers="auto", PEFT stores an adapted embedding's base table
beside the factors (`base_model.model.model.embed_tokens.base_layer.weight`), and whole
embedding tables (`...embed_tokens.weight`, `lm_head.weight`) when the vocabulary was resized
or with save_embedding_layers=True; PEFT's loader writes them over the model's. lowrank_fx
never changes base weights when it loads an adapter, so each stored table must equal the
model's bit for bit (after a cast to the model's dtype); otherwise loading is refused with the
largest difference. The same holds for the base biases PEFT stores with bias="all" inside a
modules_to_save wrapper (`lin1.original_module.bias`, peft_bias.py).
"""

from __future__ import annotations

import torch
from torch import fx

from ..errors import AdapterFileError
from ..graph.record import Record
from ..passes.train_modules import base_readers


def split_stored(tensors: dict[str, torch.Tensor], prefix: str, suffixes, ending: str) -> tuple[dict, dict]:
    """({parameter path in the model: tensor} of the stored model tensors whose name ends in
    `ending`, the other tensors): `<module>.base_layer<ending>`, or an `<ending>` that is no
    adapter tensor (none of `suffixes`)."""
    stored, rest = {}, {}
    for key, value in tensors.items():
        path = key[len(prefix):] if key.startswith(prefix) else None
        if path is not None and path.endswith(ending) and not any(path.endswith("." + s) for s in suffixes):
            stored[path.replace(".base_layer.", ".")] = value
        else:
            rest[key] = value
    return stored, rest


def split_base(tensors: dict[str, torch.Tensor], prefix: str, suffixes) -> tuple[dict, dict]:
    """({parameter path in the model: tensor} of the stored base weights, the other tensors)."""
    return split_stored(tensors, prefix, suffixes, ".weight")


def check_base(gm: fx.GraphModule, base: dict[str, torch.Tensor], source: str) -> None:
    """AdapterFileError naming every stored base weight that is not the model's, with the largest difference."""
    record = Record.require(gm, "lfx.load_peft")
    tensor_of = {}  # any name of a parameter the graph reads -> the parameter
    for nodes in base_readers(gm).values():
        param = gm.get_parameter(nodes[0].target)
        for alias in record.aliases.get(nodes[0].target, []) + [n.target for n in nodes]:
            tensor_of.setdefault(alias, param)
    problems = []
    for path, value in base.items():
        param = tensor_of.get(path)
        if param is None:
            problems.append(f"{path}: stored as a base weight, but the model has no such parameter")
        elif value.shape != param.shape:
            problems.append(f"{path}: stored {tuple(value.shape)}, the model's is {tuple(param.shape)}")
        elif not torch.equal(value.to(param.device, param.dtype), param.detach()):
            wide = torch.promote_types(param.dtype, torch.float32)
            gap = (value.to(param.device, wide) - param.detach().to(wide)).abs().max()
            problems.append(f"{path}: differs from the model's by up to {float(gap):.3g}")
    if problems:
        raise AdapterFileError(
            f"{source} stores base weights that are not this model's (PEFT saves embedding tables with "
            "save_embedding_layers, and with bias='all' the original module beside a modules_to_save copy), "
            "and lowrank_fx does not overwrite base weights when it loads an adapter; "
            "nothing was loaded:\n" + "\n".join(f"  - {p}" for p in problems)
            + "\nUse the model the adapter was trained on; if its vocabulary was resized for training, resize "
              "this model the same way and copy the stored tables into it first"
        )
