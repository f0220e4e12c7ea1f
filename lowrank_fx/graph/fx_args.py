"""Typed views of torch.fx node fields whose declared type is a wide union.

`node.target` is a str (an attribute path or a method name) for get_attr, call_module and
call_method nodes, and a callable for call_function nodes; `node.args[i]` is any fx Argument.
Where a pass knows which one it holds (from the node's op and the op's signature), these
helpers say so to the type checker. They check nothing at run time.
"""

from __future__ import annotations

from typing import cast

from torch import fx


def target_name(node: fx.Node) -> str:
    """`node.target` of a get_attr, call_module or call_method node: a dotted path or a method name."""
    return cast(str, node.target)


def arg_node(node: fx.Node, index: int = 0) -> fx.Node:
    """`node.args[index]` where the op's signature makes it a tensor operand, an fx.Node."""
    return cast(fx.Node, node.args[index])
