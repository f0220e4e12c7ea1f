"""Model -> GraphModule.

Three ways in:
  - an `fx.GraphModule` is taken as it is (one from `torch.export(...).module()` is first
    turned into a plain GraphModule so that `.train()` / `.eval()` work; the nn.Linear calls
    of a symbolically traced one are inlined, as below);
  - with `example_inputs` / `example_kwargs`: non-strict `torch.export`, every dimension of
    every tensor input `Dim.AUTO` unless `dynamic_shapes` says otherwise, so one graph
    serves every batch size and sequence length the model allows (examples of batch 1 are
    traced as a batch of 2, batch_one.py; what torch.export could not do is explained by
    capture_hints.py);
  - without examples: `torch.fx.symbolic_trace`, for simple modules.

An exported graph's forward takes the examples' argument names; the ones that hold no tensor
(`use_cache=False`) default to their example value and refuse any other (passes/call_defaults.py);
a call the graph cannot serve (an argument it was not captured with, a size torch.export fixed,
the model's dtype changed after capture) raises a CaptureError saying so (passes/call_errors.py).
example_kwargs alone is a complete example; any Mapping (a tokenizer's BatchEncoding) is taken.

Export traces the model in training mode, so dropout and batch norm are in the graph; the
`mode_aware` pass then makes them follow `.train()` / `.eval()`, and the graph starts in the
model's own mode. Other Python branches on `self.training` are fixed at capture time (train).
`torch.no_grad()` / `torch.autocast` blocks, which torch.export records as higher-order ops
that torch.compile cannot trace with dynamic shapes, become plain calls (passes/grad_regions.py).

Quantized bases: bitsandbytes layers are swapped, while exporting only, for layers that
dequantize and call F.linear on the same packed tensors (graph/quant_formats.py); every
quantized layer is then checked for gradients and made one custom op (passes/quantized_base.py).
For a quantized model the examples are kept, detached, in `gm.meta[EXAMPLES]`: folding with
`requantize=True` measures its error on them.

Trace each block once: a module list whose children repeat one block (a decoder's layers) is
traced only up to a short prefix, one child per kind (graph/block_lists.py), and the other
children are written into the graph as copies over their own weights (passes/repeat_blocks.py):
node for node what tracing every child gives, at the cost of two or three children rather than
all of them (a KV-cache graph's per-layer inputs and outputs follow the traced layers' stride).
A prefix that cannot be repeated (a forward that reads every block's output) is traced whole
instead, with an INFO log on "lowrank_fx" saying why;
`trace_blocks=False` always traces whole.

Capture once: an exported capture is memoised per model in the process (capture_memo.py), so
`plan` then `rewrite` trace once, each getting its own graph; with `cache_dir=` or
$LOWRANK_FX_CACHE the finished graph (without weights) is also kept on disk for the next
process (capture_cache.py).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import re
import sys
import warnings
import weakref
from collections.abc import Mapping

import torch
from torch import fx, nn
from torch.export import Dim, ShapesCollection
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..errors import CaptureError, ModelTypeError
from ..graph.block_lists import prefixes, repeated_lists
from ..graph.module_copy import over_graph
from ..graph.quant_formats import bitsandbytes_layers, bitsandbytes_swapped, is_quantized
from ..graph.quantized import EXAMPLES, SWAPPED_LAYERS, SharedLayers
from ..graph.record import Record
from ..logs import logger
from ..noise import quiet_third_party
from ..options import flag
from ..passes.call_defaults import set_call_defaults
from ..passes.grad_regions import unwrap_regions
from ..passes.grouped_kernel import use_grouped_kernel
from ..passes.inline_linear import inline_linear
from ..passes.mode_aware import make_mode_aware
from ..passes.quantized_base import prepare_quantized
from ..passes.repeat_blocks import NotRepeatable, repeat_blocks
from ..progress import stage
from . import capture_memo
from .batch_one import takes, widened
from .capture_cache import CaptureCache, cache_directory, cache_key, cacheable, model_tensors
from .capture_hints import hint
from .experts_impl import traced_experts
from .keyword_forward import keyword_forward

SOURCE = "lowrank_fx_source"  # gm.meta[SOURCE]: the model the graph was captured from, held weakly


class _Source:
    """A weak reference to the captured model that copies as itself and pickles as empty."""

    def __init__(self, model: nn.Module):
        self.ref = weakref.ref(model)

    def __call__(self) -> nn.Module | None:
        return self.ref() if self.ref is not None else None

    def __deepcopy__(self, memo):
        return self

    def __getstate__(self):
        return {"ref": None}


def source_model(gm: fx.GraphModule) -> nn.Module | None:
    """The model `gm` was captured from, while it is alive (None for a graph given as a graph).

    Generation needs it: its KV-cache decode graph is a second capture of the same model."""
    ref = getattr(gm, "meta", {}).get(SOURCE)
    return ref() if ref is not None else None


def _tensors(tree) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(tree)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def _auto_dynamic(model, args, kwargs):
    """torch.export's dynamic_shapes with every dimension of every example tensor Dim.AUTO."""
    shapes = ShapesCollection()
    for tensor in _tensors((args, kwargs)):
        if tensor.dim():
            shapes[tensor] = {i: Dim.AUTO for i in range(tensor.dim())}
    return shapes.dynamic_shapes(model, args, kwargs)


def _warn_size_one(args, kwargs) -> None:
    """Warn when the examples a graph was traced with have size 1 in a batch or sequence dimension."""
    if any(size == 1 for tensor in _tensors((args, kwargs)) for size in tensor.shape[:2]):
        warnings.warn(
            "an example input has size 1 in its batch or sequence dimension; torch.export "
            "fixes size-1 dimensions, so the graph will accept only size 1 there. Use "
            "examples with sizes >= 2 for dimensions that should stay dynamic.",
            stacklevel=4,
        )


def tensor_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every name a parameter or buffer is reachable by, grouped by tensor (tied weights)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False)
    ):
        groups.setdefault(id(tensor), []).append(name)
    return {name: names for names in groups.values() for name in names}


_UNKNOWN_OUTPUT = re.compile(r"Found <class '([\w.]+)'> in output, which is not a known type")


def _output_dataclass(error: Exception) -> type | None:
    """The dataclass an export error says it found in the output, if it can be imported by name."""
    found = _UNKNOWN_OUTPUT.search(str(error))
    if found is None:
        return None
    module, _, name = found.group(1).rpartition(".")
    cls = getattr(sys.modules.get(module), name, None)
    return cls if isinstance(cls, type) and dataclasses.is_dataclass(cls) else None


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes):
    """Non-strict torch.export; a plain dataclass in the output is registered with pytree first
    (torch.export needs to know how to flatten it), as often as the output holds new ones."""
    registered = set()
    while True:
        try:
            return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as err:
            cls = _output_dataclass(err)
            if cls is None or cls in registered:
                raise
            torch.export.register_dataclass(cls)
            registered.add(cls)


def _examples(model: nn.Module, example_inputs, example_kwargs) -> tuple[tuple, dict]:
    """(args, kwargs) for torch.export. example_kwargs may be any Mapping (a BatchEncoding)."""
    if example_inputs is None:
        args = ()
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    else:
        args = (example_inputs,)
    if example_kwargs is None:
        kwargs = {}
    elif isinstance(example_kwargs, Mapping):
        kwargs = dict(example_kwargs)
    else:
        raise CaptureError(
            f"example_kwargs must map argument names to values (a dict, or a tokenizer's BatchEncoding), "
            f"got {type(example_kwargs).__name__}; pass positional examples as example_inputs=(...)"
        )
    bad = [k for k in kwargs if not isinstance(k, str)]
    if bad:
        raise CaptureError(f"example_kwargs keys must be argument names (strings), got {bad[:3]!r}")
    if model._forward_pre_hooks:  # a hook may supply or change arguments: let export judge
        return args, kwargs
    try:
        forward = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return args, kwargs
    try:
        forward.bind(*args, **kwargs)
    except TypeError as err:
        raise CaptureError(
            f"the examples do not fit {type(model).__name__}.forward{forward}: {err}. Give each argument "
            "once: positional ones in example_inputs=(...) in the forward's order, the others by name in "
            "example_kwargs={...} (example_kwargs alone is enough, e.g. {'input_ids': ids, 'use_cache': False})."
        ) from None
    return args, kwargs


def _plain(gm: fx.GraphModule) -> fx.GraphModule:
    """A plain GraphModule over the same graph and tensors (exported ones refuse .train())."""
    return over_graph(gm, copy.deepcopy(gm.graph))


def capture(model, example_inputs=None, example_kwargs=None, dynamic: bool = True,
            dynamic_shapes=None, cache_dir=None, trace_blocks: bool = True) -> fx.GraphModule:
    """Capture `model` as a GraphModule whose linear-like nodes can be rewritten.

    A GraphModule already captured by lowrank_fx is returned as it is; any other
    GraphModule gets a plain copy of its graph (sharing its tensors). An exported capture
    is memoised (every call gets its own graph) and, with `cache_dir` or $LOWRANK_FX_CACHE,
    stored on disk without weights (see the module docstring). `trace_blocks=False` traces
    every child of a repeated module list instead of one per kind (see the module docstring).
    """
    if not isinstance(model, nn.Module):
        raise ModelTypeError(
            f"expected a torch.nn.Module (or an fx.GraphModule), got {type(model).__name__}; "
            "pass the model object itself, e.g. lfx.rewrite(model, spec, example_inputs=(x,))"
        )
    flag("lfx.rewrite", "dynamic", dynamic)
    flag("lfx.rewrite", "trace_blocks", trace_blocks)
    if isinstance(model, fx.GraphModule):
        if Record.find(model) is not None:
            return model
        gm = _plain(model)
        inline_linear(gm)  # a symbolically traced one hides nn.Linear weights in call_module nodes
        prepare_quantized(gm)
        unwrap_regions(gm)
        make_mode_aware(gm)
        gm.train(model.training)
        Record.attach(gm, aliases=tensor_aliases(gm), state_keys=list(gm.state_dict()))
        return gm
    if example_inputs is None and example_kwargs is None:
        return _symbolic(model)
    args, kwargs = _examples(model, example_inputs, example_kwargs)
    directory = cache_directory(cache_dir)  # a cache_dir that is a file is refused before any tracing
    key = capture_memo.memo_key(model, args, kwargs, dynamic, dynamic_shapes, trace_blocks)
    gm = capture_memo.recall(model, key)
    if gm is None:
        with quiet_third_party():
            gm = _exported(model, args, kwargs, dynamic, dynamic_shapes, directory, trace_blocks, key)
    return gm


def _exported(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool, dynamic_shapes,
              directory, trace_blocks: bool, key: str) -> fx.GraphModule:
    """A new graph of `model`, memoised under `key`: loaded from the disk cache in `directory`
    (the memo keeps its bytes: a memo hit loads them again, which costs what copying the graph
    would), else exported and finished (and stored there, unless its base is quantized; the
    memo keeps this pristine graph and hands out copies)."""
    cache = CaptureCache(directory, cache_key(model, args, kwargs, dynamic, dynamic_shapes, trace_blocks)) \
        if directory is not None and cacheable(model) else None
    payload = cache.payload() if cache is not None else None
    if payload is not None:
        gm = _loaded(cache, payload, model)
        if gm is not None:
            capture_memo.remember(model, key, functools.partial(_loaded, cache, payload))
            return gm
    gm = _finished(model, args, kwargs, dynamic, dynamic_shapes, trace_blocks)
    if cache is not None and EXAMPLES not in gm.meta:
        cache.save(gm, model)
    capture_memo.remember(model, key, _ready(gm, model))
    return capture_memo.handout(gm, model.training)


def _loaded(cache: CaptureCache, payload: bytes, model: nn.Module) -> fx.GraphModule | None:
    """The graph stored in `payload` over `model`'s own tensors (None, with a warning, if it does not load)."""
    gm = cache.graph(payload, model_tensors(model))
    return _ready(gm, model) if gm is not None else None


def _ready(gm: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """`gm` in `model`'s mode, with its record and a weak reference to `model`."""
    gm.train(model.training)
    Record.attach(gm, aliases=tensor_aliases(model), state_keys=list(model.state_dict()))
    gm.meta[SOURCE] = _Source(model)
    return gm


def _finished(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool, dynamic_shapes,
              trace_blocks: bool) -> fx.GraphModule:
    """`model` exported, repeated blocks traced once per kind and copied (repeat_blocks), then
    every pass a captured graph gets: what the disk cache stores."""
    lists = repeated_lists(model) if trace_blocks and not bitsandbytes_layers(model) else []
    swapped, gm = _traced(model, args, kwargs, dynamic, dynamic_shapes, lists)
    try:
        repeat_blocks(gm, model, lists)
    except NotRepeatable as why:
        logger("capture").info("tracing every block of %s: %s", type(model).__name__, why)
        swapped, gm = _traced(model, args, kwargs, dynamic, dynamic_shapes, [])
    set_call_defaults(gm, args, kwargs, model)
    gm.meta[SWAPPED_LAYERS] = SharedLayers(swapped)  # the quantized layers' backward reads them too
    if not prepare_quantized(gm):
        del gm.meta[SWAPPED_LAYERS]
    else:  # a quantized base: what folding with requantize=True needs
        gm.meta[EXAMPLES] = torch.utils._pytree.tree_map(
            lambda v: v.detach() if isinstance(v, torch.Tensor) else v, (args, kwargs))
    unwrap_regions(gm)
    use_grouped_kernel(gm)  # a grouped_mm capture's fp32 experts: torch's kernel, not a loop per expert
    make_mode_aware(gm)
    return gm


@stage("capturing the model (torch.export)")
def _traced(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool, dynamic_shapes, lists):
    """(the bitsandbytes layers swapped while exporting, the exported program's plain graph).

    Each list in `lists` holds only its traced prefix meanwhile (graph/block_lists.py); when the
    prefix fails, every block is traced. With every size dynamic, examples of batch 1 are first
    traced as a batch of 2, kept if that graph takes them too (batch_one.py). Keywords the forward
    takes through **kwargs are named by a temporary forward meanwhile (keyword_forward.py)."""
    with keyword_forward(model, kwargs):
        return _traced_as_named(model, args, kwargs, dynamic, dynamic_shapes, lists)


def _traced_as_named(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool, dynamic_shapes, lists):
    name = type(model).__name__
    auto = dynamic and dynamic_shapes is None
    wide = widened(args, kwargs) if auto else None
    if wide is not None:
        try:
            exported, swapped = _export_with(model, *wide, _auto_dynamic(model, *wide), lists)
        except Exception as err:
            logger("capture").info("capturing %s at batch 1: it failed to export at batch 2 (%s)",
                                   name, _first_line(err))
        else:
            gm = _plain(exported.module())
            if takes(gm, args, kwargs):
                _warn_size_one(*wide)
                return swapped, gm
            logger("capture").info("capturing %s at batch 1: its graph traced at batch 2 does not take batch 1", name)
    shapes = _auto_dynamic(model, args, kwargs) if auto else dynamic_shapes
    try:
        exported, swapped = _export_with(model, args, kwargs, shapes, lists)
    except Exception as err:
        if not lists:
            raise _failed(model, args, kwargs, err) from err
        # the model's forward may need every block (it indexes them by position)
        logger("capture").info("tracing every block of %s: a prefix failed to export (%s)", name, _first_line(err))
        try:
            exported, swapped = _export_with(model, args, kwargs, shapes, [])
        except Exception as err:
            raise _failed(model, args, kwargs, err) from err
    if auto:
        _warn_size_one(args, kwargs)
    return swapped, _plain(exported.module())


def _export_with(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes, lists):
    """(torch.export's program, the bitsandbytes layers swapped meanwhile), exported in training
    mode with each list in `lists` cut to its prefix; every submodule keeps its own mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.train()
    try:
        with bitsandbytes_swapped(model) as swapped, prefixes(model, lists), traced_experts(model):
            return _export(model, args, kwargs, dynamic_shapes), swapped
    finally:
        for module, training in modes:  # each submodule's own flag, not only the root's
            module.training = training


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _failed(model: nn.Module, args: tuple, kwargs: dict, error: Exception) -> CaptureError:
    return CaptureError(
        f"torch.export could not capture {type(model).__name__}: {type(error).__name__}: {_first_line(error)}\n"
        f"Try: {hint(model, args, kwargs, error)}."
    )


def _symbolic(model: nn.Module) -> fx.GraphModule:
    quantized = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if is_quantized(t)
                 and is_traceable_wrapper_subclass(t)]
    if quantized or bitsandbytes_layers(model):
        raise CaptureError(
            f"{type(model).__name__} has quantized weights "
            f"({(quantized or [n for n, _ in bitsandbytes_layers(model)])[0]}, ...), "
            "which lowrank_fx finds in a torch.export graph only: pass example_inputs=(...) (and example_kwargs) "
            "so that the model is exported rather than symbolically traced"
        )
    try:
        gm = fx.symbolic_trace(model)
    except Exception as err:
        raise CaptureError(
            f"torch.fx.symbolic_trace could not trace {type(model).__name__} "
            f"({type(err).__name__}: {err}). Pass example_inputs=(...) (and example_kwargs, "
            "e.g. {'use_cache': False} for decoders) so that torch.export is used instead."
        ) from err
    inline_linear(gm)
    gm.train(model.training)
    Record.attach(gm, aliases=tensor_aliases(model), state_keys=list(model.state_dict()))
    gm.meta[SOURCE] = _Source(model)
    return gm
