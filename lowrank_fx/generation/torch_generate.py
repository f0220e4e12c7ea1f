"""`lfx.generate(gm, input_ids, ...)`: KV-cache generation in PyTorch with the adapters unmerged.

The graph `gm` (from `lfx.rewrite`, captured with use_cache=False for training) does not
run generation itself: its KV-cache decode graph does (decode_graph.py), a second capture
of the same model that carries gm's own adapter modules and gates. So generation always sees
the adapters as they are now (training gm changes it, `lfx.set_active_adapters(gm, ...)`
switches it), with no fold and no copy.

The model: `rewrite` keeps a weak reference to the model it captured, and generation
captures that one; pass `model=` when gm was built from a GraphModule or the model is gone.
The decode graph is built on first use and cached per gm (rebuilt when gm gains an adapter
or another `model=` is given). A call runs it without the adapters whose gate is 0
(active_graph.py: one copy per set of active adapters, sharing every module), and so does
its compiled form (`compile=True`, or a backend name such as "aot_eager":
`torch.compile(dynamic=True)`, one per set; after a set's first call, no recompiles per
token or per prompt length; the options, and the module check that replaces dynamo's module
guards: compile_options.py). One row and several rows compile apart, once each: torch
specialises a batch of 1, and that is the fast case, since a one-row token step's matrix
products are matrix-vector products (run as two rows, a step's products took 1.6x as long
on a 2-core CPU); batches of 2 and more share one graph (traced_sizes). Per-row adapters run the full graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from ..adapt.capture import source_model
from ..deprecation import api_options
from ..errors import ModelTypeError, SpecError
from ..export.exporter import eval_mode
from ..graph.gates import GATES, active_adapters, set_active_adapters
from ..graph.record import Record
from ..noise import quiet_third_party
from ..progress import note
from .active_graph import inactive_adapters, without_adapters
from .beam import check_beams, reorder_tensors, run_beams
from .compile_options import compile_kwargs, state_key, traced_sizes
from .decode_graph import LAYOUT, decode_graph, share_adapters, use_base_of
from .decoder import layer_types
from .loop import Generated, Sampling, check_count, check_left_padded, eos_list, run
from .rows import row_generation


@dataclasses.dataclass
class _Entry:
    key: tuple
    decode: fx.GraphModule
    pruned: dict  # inactive adapters -> decode without them (active_graph.py)
    compiled: dict  # (compile option, inactive adapters) -> compiled callable


_DECODERS: weakref.WeakKeyDictionary[fx.GraphModule, _Entry] = weakref.WeakKeyDictionary()


def _model(gm: fx.GraphModule, model: nn.Module | None) -> nn.Module:
    if model is not None:
        return model
    found = source_model(gm)
    if found is None:
        raise ModelTypeError(
            "the model this graph was captured from is not known (the graph was built from a GraphModule, "
            "or the model was freed); pass it: lfx.generate(gm, ids, model=hf_model)"
        )
    return found


def decoder_for(gm: fx.GraphModule, model: nn.Module | None = None) -> fx.GraphModule:
    """gm's KV-cache decode graph, sharing gm's base weights, adapter modules and gates (cached)."""
    if not isinstance(gm, fx.GraphModule) or Record.find(gm) is None:
        raise ModelTypeError(
            f"lfx.generate takes a graph from lfx.rewrite (or lfx.merge), got {type(gm).__name__}; "
            "for a plain model use model.generate(...)"
        )
    model = _model(gm, model)
    record = Record.require(gm, "lfx.generate")
    # a hot-swap slot keeps its modules when another adapter is swapped in: the decode graph stays
    key = (id(model), tuple((name, info.max_rank or id(info.spec)) for name, info in record.adapters.items()))
    entry = _DECODERS.get(gm)
    if entry is not None and entry.key == key:
        return entry.decode
    decode = decode_graph(model)
    use_base_of(decode, gm)
    if record.adapters:
        share_adapters(decode, [(name, gm, name) for name in record.adapters])
        decode.add_module(GATES, getattr(gm, GATES))  # gm's gates: set_active_adapters(gm) switches both
    _DECODERS[gm] = _Entry(key, decode, {}, {})
    return decode


def _runnable(gm: fx.GraphModule, per_row: bool) -> fx.GraphModule:
    """The graph one call runs: the decode graph without its inactive adapters (cached per set);
    the full graph for per-row adapters, whose gates are all on."""
    entry = _DECODERS[gm]
    inactive = () if per_row else inactive_adapters(entry.decode)
    if not inactive:
        return entry.decode
    if inactive not in entry.pruned:
        entry.pruned[inactive] = without_adapters(entry.decode, inactive)
    return entry.pruned[inactive]


def _compiled(gm: fx.GraphModule, graph: fx.GraphModule, option):
    """graph compiled for `option`, kept per option, graph and module state (compile_options.py)."""
    entry = _DECODERS[gm]
    kwargs = compile_kwargs(option)
    key = (option if isinstance(option, (bool, str)) else repr(sorted(option.items())), id(graph), state_key(graph))
    if key not in entry.compiled:
        entry.compiled[key] = torch.compile(graph, **kwargs)
        note("compiling the decode step with torch.compile on its first calls (later calls with these adapters reuse "
             "it)")
    return entry.compiled[key]


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _default_ids(model: nn.Module, eos_token_id, pad_token_id) -> tuple[list[int], int | None]:
    """EOS and pad ids as transformers' generate picks them: given, else the generation config, else the config."""
    generation = getattr(model, "generation_config", None)
    config = _text_config(model)
    if eos_token_id is None:
        eos_token_id = getattr(generation, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(config, "eos_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(generation, "pad_token_id", None)
    return eos_list(eos_token_id), pad_token_id


@api_options(positional=2, renamed={"adapter": "adapters"})
def generate(gm: fx.GraphModule, input_ids: torch.Tensor | Sequence[Sequence[int]], *,
             attention_mask: torch.Tensor | Sequence[Sequence[int]] | None = None,
             adapters: str | list[str] | tuple[str, ...] | None = None, max_new_tokens: int = 20,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             seed: int | None = None, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False, compile: bool | str | dict[str, Any] = False,
             model: nn.Module | None = None, output_logits: bool = False,
             rows: Sequence[str | None] | None = None) -> torch.Tensor | Generated:
    """Generate tokens with `gm`'s adapters unmerged, as transformers' `generate`.

    Padding is left or right, by attention_mask (loop.py); left only for sliding-window or
    chunked models.

    Args:
        gm: a graph from `lfx.rewrite` (or `lfx.merge`) of a Hugging Face causal LM.
        input_ids: (batch, prompt) token ids, a tensor or lists of ints.
        attention_mask: (batch, prompt), 1 for tokens and 0 for padding (default: all ones).
        adapters: which adapters to apply, as `lfx.set_active_adapters` takes them: a name, a
            list, or [] for the base model. None (the default) keeps the graph's active set.
            The graph's active set is restored afterwards. Replaces `adapter=`, which is still
            accepted for one release.
        max_new_tokens: how many tokens to add at most.
        do_sample: sample (True) or pick the most likely token (False).
        temperature: sampling temperature.
        top_k: sample among the k most likely tokens (0: all).
        top_p: sample among the most likely tokens whose probabilities add up to p.
        eos_token_id: the id(s) that end a row; None takes the model's generation config;
            [] never stops early.
        pad_token_id: the id written after a row ended; None takes the model's generation
            config, else the first EOS id.
        seed: seed of the sampling generator (None: torch's global one).
        num_beams: > 1 runs beam search as transformers' (beam.py): greedy only
            (do_sample=False), one adapter set for the batch.
        length_penalty: beam search's length penalty.
        early_stopping: beam search's stop rule: True, False or "never".
        compile: False, True, a torch.compile backend name, or a dict of its options.
        model: the Hugging Face model gm was rewritten from (default: the one rewrite captured).
        output_logits: return a `Generated` (sequences, per-step logits) instead of the ids.
        rows: one adapter name (or None, the base model) per batch row, instead of
            `adapters`: the rows are generated together, each with its own adapter (`lfx.adapter_rows`).

    Returns:
        (batch, prompt + new) int64 token ids, or a `Generated` with output_logits=True.

    Raises:
        ModelTypeError: `gm` is not a lowrank_fx graph, or the model it came from is unknown.
        SpecError: `adapters` names an adapter the graph lacks, or bad generation settings
            (beams with sampling or with rows, counts, ...).
        InputError: bad input ids or mask, rows of the wrong length, or both `adapters` and `rows`.
    """
    check_count(max_new_tokens)
    check_beams(num_beams, length_penalty, early_stopping)
    if num_beams > 1 and do_sample:
        raise SpecError("beam search here is deterministic: pass do_sample=False with num_beams > 1 "
                        "(or num_beams=1 to sample)")
    if num_beams > 1 and rows is not None:
        raise SpecError("beam search with per-row adapters is not supported: generate each adapter's rows "
                        "with its own call (adapters=...), or pass num_beams=1 with rows=")
    decode = decoder_for(gm, model)
    model = _model(gm, model)
    eos, pad = _default_ids(model, eos_token_id, pad_token_id)
    if any(kind != "full_attention" for kind in layer_types(_text_config(model))):
        check_left_padded(attention_mask)
    layout = decode.meta[LAYOUT]
    device = next(iter(decode.parameters())).device
    calls: dict[int, Any] = {}

    def step(ids, mask, positions, cache):
        if cache is None:
            empty = torch.zeros((ids.shape[0], layout.kv_heads, 0, layout.head_dim), dtype=layout.dtype, device=device)
            cache = [{"key": empty, "value": empty} for _ in range(layout.layers)]
        # fresh dense inputs: a compiled graph guards on strides, and a sliced prompt has others, as
        # has the prompt step's cache (attention's transposed output; later steps' caches are concatenated)
        dense = [t.to(device).clone(memory_format=torch.contiguous_format) for t in (ids, mask, positions)]
        if compile:
            cache = [{part: t.contiguous() for part, t in layer.items()} for layer in cache]
        out = calls["graph"](input_ids=dense[0], attention_mask=dense[1], position_ids=dense[2], past_key_values=cache)
        return out["logits"].cpu(), out["present"]

    record = Record.require(gm, "lfx.generate")
    per_row = row_generation(gm, decode, input_ids, adapters, rows)
    previous = active_adapters(gm) if record.adapters else None
    if adapters is not None:
        set_active_adapters(gm, adapters)
    try:
        with (eval_mode(decode), torch.no_grad(), per_row, quiet_third_party(),
              traced_sizes() if compile else contextlib.nullcontext()):
            graph = _runnable(gm, rows is not None)
            calls["graph"] = _compiled(gm, graph, compile) if compile else graph
            vocab = getattr(_text_config(model), "vocab_size", None)
            if num_beams > 1:
                result = run_beams(step, reorder_tensors, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                   num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                                   eos_token_id=eos, pad_token_id=pad, vocab=vocab)
            else:
                result = run(step, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                             sampling=Sampling(do_sample, temperature, top_k, top_p), eos_token_id=eos,
                             pad_token_id=pad, seed=seed, vocab=vocab)
    finally:
        if previous is not None:
            set_active_adapters(gm, previous)
    return result if output_logits else result.sequences


__all__ = ["Generated", "decoder_for", "generate"]
