"""What "all-linear" leaves out, and why: output heads, and targets that are not linear layers.

"all-linear" means what PEFT's `target_modules="all-linear"` means: every linear layer except
the model's output head. PEFT (tuners_utils `_maybe_include_all_linear_layers`) takes every
nn.Linear and Conv1D, then drops the module `get_output_embeddings()` returns (the LM head) and,
for sequence classification, the model's top-level `classifier` or `score`; a layer before
the head, such as BERT's `pooler.dense` under the classifier, stays in. Here, from the graph:

  - a target that is not a linear op (a convolution, an embedding) is left out;
  - an LM head: a target tied to an embedding table (GPT-2's lm_head), or one as wide as an
    embedding table (a vocabulary) that feeds no other target and whose result is a model
    output (as below);
  - a classification head: a target whose name ends in `classifier`, `score` or `qa_outputs`
    and that feeds no other target;
  - any other output head: a target that feeds no other target and whose result reaches a
    model output through shape, activation, softmax, dropout or loss ops only (no residual
    add, no normalisation, no further linear op): nn.TransformerEncoder's own head, the
    last layer of an MLP, BertModel's `pooler.dense` (tanh -> `pooler_output`).

"Feeds no other target" keeps hidden layers in "all-linear" that merely look like heads: an
MLP layer as wide as a small vocabulary, T5's attention as wide as its position buckets, a
weight called twice in a row. `output_heads` names the heads (the spec's "all-linear" leaves
them out, beside the non-linear targets); `left_out` gives {target: reason} for both, for `plan`.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import fx, nn

from .fx_args import target_name
from .mode_modules import ModeDropout
from .record import KEY, Record
from .targets import Target, weight_source

aten = torch.ops.aten

HEAD_NAMES = ("classifier", "score", "qa_outputs")  # the last part of a classification head's name

# Ops a head's result may pass through on its way to a model output: shape and dtype changes,
# slicing, activations, softmax, dropout, losses, scaling by a constant. Anything else (a
# residual add, a normalisation, a matmul with another activation) means more model follows.
_PASS_ATEN = frozenset({
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "unsqueeze", "squeeze", "flatten",
    "unflatten", "contiguous", "clone", "_to_copy", "to", "alias", "detach", "select", "slice", "expand",
    "dropout", "native_dropout", "feature_dropout", "alpha_dropout",
    "tanh", "relu", "gelu", "sigmoid", "silu", "hardtanh", "leaky_relu", "elu", "selu", "softplus", "mish",
    "hardswish", "hardsigmoid", "softmax", "_softmax", "log_softmax", "_log_softmax",
    "cross_entropy_loss", "nll_loss", "nll_loss_nd", "nll_loss_forward", "nll_loss2d", "nll_loss2d_forward",
    "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
    "binary_cross_entropy_with_logits", "kl_div",
})
_SCALINGS = frozenset({"mul", "div"})  # passed through when the other operand is a constant
_PASS_FUNCTIONS = {
    operator.getitem, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose,
    torch.permute, torch.tanh, torch.relu, torch.sigmoid, torch.softmax, torch.log_softmax,
    F.relu, F.gelu, F.silu, F.tanh, F.sigmoid, F.softmax, F.log_softmax, F.dropout, F.cross_entropy,
    F.nll_loss, F.mse_loss, F.l1_loss, F.binary_cross_entropy_with_logits,
}
_PASS_METHODS = frozenset({
    "view", "reshape", "permute", "transpose", "t", "flatten", "squeeze", "unsqueeze", "contiguous",
    "clone", "detach", "float", "to", "type_as", "tanh", "relu", "sigmoid", "softmax", "log_softmax",
})
_PASS_MODULES = (ModeDropout, nn.Dropout, nn.Identity, nn.Flatten, nn.Tanh, nn.ReLU, nn.GELU, nn.SiLU,
                 nn.Sigmoid, nn.Softmax, nn.LogSoftmax, nn.CrossEntropyLoss, nn.NLLLoss, nn.MSELoss)


def _embedding_tables(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The weights that aten.embedding looks rows up in, by name."""
    tables: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.embedding.default:
            source = weight_source(node.args[0])
            if source is not None:
                tables[target_name(source[0])] = gm.get_parameter(target_name(source[0]))
    return tables


def _inner_targets(gm: fx.GraphModule, targets: dict[str, Target]) -> set[str]:
    """Targets whose result flows (through any ops) into a call site of a target.

    One reverse pass over the graph: `reaches[n]` says whether node n's value is read,
    directly or not, by some target's call site. (A graph is acyclic, so a site never
    feeds itself; a weight called twice in a row counts as inner, which it is.)
    """
    sites = {site for t in targets.values() for site in t.sites}
    reaches: dict[fx.Node, bool] = {}
    for node in reversed(list(gm.graph.nodes)):
        reaches[node] = any(user.name in sites or reaches[user] for user in node.users)
    nodes = {n.name: n for n in gm.graph.nodes}
    return {t.name for t in targets.values() if any(reaches[nodes[site]] for site in t.sites)}


def _output_names(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Each node the graph returns, by its name among the model's outputs ('logits', 'pooler_output')."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    leaves = pytree.tree_flatten_with_path(output.args[0])[0]
    paths = [path for path, _ in leaves]
    spec = getattr(gm, "_out_spec", None)  # an exported graph's outputs have the model's structure
    if spec is not None and getattr(spec, "num_leaves", None) == len(leaves):
        try:  # rebuild the structure around placeholders 0..n-1 and read each one's path
            rebuilt = pytree.tree_unflatten(list(range(len(leaves))), spec)
            paths = [path for path, _ in pytree.tree_flatten_with_path(rebuilt)[0]]
        except (TypeError, ValueError, KeyError, AttributeError):  # it does not rebuild: positions will do
            paths = [path for path, _ in leaves]

    def key(entry) -> str:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                return str(getattr(entry, attr))
        return str(entry)

    names: dict[fx.Node, str] = {}
    for path, (_, node) in zip(paths, leaves):
        if isinstance(node, fx.Node):
            names.setdefault(node, ".".join(key(entry) for entry in path) or "output")
    return names


def _passes_through(gm: fx.GraphModule, node: fx.Node, value: fx.Node) -> bool:
    """Whether `node`, reading `value`, only reshapes, activates, drops out, scores or scales it."""
    if node.meta.get(KEY, {}).get("role") == "add":  # an adapter's y + gate · Δy
        return True
    constant_other = all(not isinstance(a, fx.Node) or a is value for a in node.args[:2])
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            name = node.target.overloadpacket.__name__
            return name in _PASS_ATEN or (name in _SCALINGS and constant_other)
        if node.target in (operator.mul, operator.truediv):
            return constant_other
        return node.target in _PASS_FUNCTIONS
    if node.op == "call_method":
        return node.target in _PASS_METHODS or (node.target in ("mul", "div", "__mul__", "__truediv__")
                                                and constant_other)
    if node.op == "call_module":
        return isinstance(gm.get_submodule(target_name(node)), _PASS_MODULES)
    return False


def _reached_outputs(gm: fx.GraphModule, site: fx.Node, names: dict[fx.Node, str]) -> list[str]:
    """The model outputs that `site`'s result reaches through pass-through ops only."""
    found, stack, seen = [], [site], {site}
    while stack:
        node = stack.pop()
        for user in node.users:
            if user.op == "output":
                found.append(names.get(node, "output"))
            elif user not in seen and _passes_through(gm, user, node):
                seen.add(user)
                stack.append(user)
    return sorted(set(found), key=found.index)


def _kind(target: Target) -> str:
    return getattr(getattr(target, "kind", None), "name", "linear")


def _model_name(gm: fx.GraphModule, tensor: str, besides: str) -> str:
    """A name of `tensor` in the original model other than `besides`'s own (tied weights have several)."""
    record = Record.find(gm)
    names = record.aliases.get(tensor, [tensor]) if record is not None else [tensor]
    return next((n for n in names if not n.startswith(besides + ".")), tensor)


def _head_reasons(gm: fx.GraphModule, targets: dict[str, Target]) -> dict[str, str]:
    """{linear target that is an output head: why}, in graph order (see the module docstring)."""
    tables = _embedding_tables(gm)
    tied = {id(table): name for name, table in tables.items()}
    vocab = {int(table.shape[0]): name for name, table in reversed(tables.items())}
    inner = _inner_targets(gm, targets)
    nodes = {n.name: n for n in gm.graph.nodes}
    names = _output_names(gm)
    reasons: dict[str, str] = {}
    for t in targets.values():
        if _kind(t) != "linear":
            continue
        weight = gm.get_parameter(t.weight)
        leaf = t.name.rsplit(".", 1)[-1]
        if id(weight) in tied:
            reasons[t.name] = f"LM head tied to the embedding {_model_name(gm, tied[id(weight)], t.name)}"
            continue
        if t.name in inner:
            continue
        if leaf in HEAD_NAMES:
            reasons[t.name] = f"classification head (named {leaf!r}, as PEFT leaves out)"
            continue
        outputs = list(dict.fromkeys(o for site in t.sites for o in _reached_outputs(gm, nodes[site], names)))
        shown = ", ".join(repr(o) for o in outputs)
        if outputs and t.out_features in vocab:
            table = _model_name(gm, vocab[t.out_features], t.name)
            reasons[t.name] = (f"LM head: as wide as the embedding {table} (a vocabulary), "
                               f"its result is the model output {shown}")
        elif outputs:
            reasons[t.name] = f"output head: its result is the model output {shown} with no linear op after it"
    return reasons


def output_heads(gm: fx.GraphModule, targets: dict[str, Target]) -> set[str]:
    """The output heads among the linear targets (the names of `_head_reasons`)."""
    return set(_head_reasons(gm, targets))


ROUTER_HOPS = 6  # ops between a router's linear and its top-k (softmax, sigmoid, bias, grouping)


def _routes_experts(gm: fx.GraphModule, site: fx.Node) -> bool:
    """Whether the site's output reaches an aten.topk within ROUTER_HOPS ops: a mixture-of-experts router."""
    frontier, seen = [site], {site}
    for _ in range(ROUTER_HOPS):
        frontier = [user for node in frontier for user in node.users if user not in seen]
        seen.update(frontier)
        if any(node.target is torch.ops.aten.topk.default for node in frontier):
            return True
    return False


def left_out(gm: fx.GraphModule, targets: dict[str, Target]) -> dict[str, str]:
    """{target: why "all-linear" leaves it out}, in graph order: output heads, targets that are
    not linear layers (a conv, an embedding, an expert stack; all-linear adapts linear layers, as
    PEFT's does) and mixture-of-experts routers (their top-k picks the experts: name them to adapt
    them; PEFT's all-linear does not reach them either, their weights are bare parameters)."""
    heads = _head_reasons(gm, targets)
    nodes = {n.name: n for n in gm.graph.nodes}
    reasons = {}
    for t in targets.values():
        kind = _kind(t)
        if kind != "linear":
            article = "an" if kind[0] in "aeiou" else "a"
            reasons[t.name] = f"{article} {kind} op, not a linear layer"
        elif t.name in heads:
            reasons[t.name] = heads[t.name]
        elif any(_routes_experts(gm, nodes[site]) for site in t.sites):
            reasons[t.name] = ("mixture-of-experts router (its output picks the experts through top-k); "
                               "name it to adapt it")
    return reasons
