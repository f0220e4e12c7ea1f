"""A Hugging Face decoder with its KV cache as flat tensors: the module the decode graph captures.

    KVDecoder(model)(input_ids, attention_mask, position_ids, past_key_values)
        past_key_values: [{"key": k, "value": v}] per layer, each [batch, kv_heads, past, head_dim]
        -> {"logits": [batch, seq, vocab], "present": [{"key": k', "value": v'}]}   (past + new)

Flattened for ONNX (export/signature.py), the inputs are `input_ids`, `attention_mask`,
`position_ids`, `past_key_values.<i>.key/.value` and the outputs `logits`,
`present.<i>.key/.value`: the names onnxruntime-genai reads. `past` may be 0 (the prompt).
The forward builds a `DynamicCache` from the tensors and calls the model with
`use_cache=True`; the attention mask covers past and new tokens (`past + seq` columns).

Sliding-window, chunked and hybrid local/global attention (Mistral, Qwen2 with
use_sliding_window, Gemma-2/3, Llama-4's chunks) decode through the same flat cache: every
layer keeps EVERY past token (a transformers DynamicCache built from plain pairs holds full
layers, never the cropping sliding layers), and the model's own mask functions, which see
absolute cache indices, hide what lies outside a layer's window or chunk. Tokens therefore
equal transformers' generate past the window, at the cost of a cache as long as the text.

`_check_decoder` refuses models whose cache is not one K/V pair per attention layer or whose
positions depend on the total length: recurrent or hybrid layers (Mamba, linear attention:
their state is no K/V) and length-dependent RoPE (Phi-3's LongRoPE, dynamic NTK: the
rotation of every cached key would change once the sequence grows past a threshold).
`check_onnx_decoder` also refuses, for ONNX, RoPE computed in complex numbers (Llama-4).
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn

from ..errors import ModelTypeError

FULL = "full_attention"
# Layer types whose cache is one key/value pair per token; the window or chunk lives in the mask.
ATTENTION = (FULL, "sliding_attention", "chunked_attention")
# RoPE variants whose frequencies depend on the current sequence length.
LENGTH_DEPENDENT_ROPE = {"longrope": "LongRoPE", "dynamic": "dynamic NTK scaling"}


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Shape of a decoder's KV cache: per layer one key and one value [batch, kv_heads, seq, head_dim]."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype


def _config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise ModelTypeError(
            f"{type(model).__name__} has no `config`: generation needs a Hugging Face causal LM "
            "(LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, Phi3ForCausalLM, GPT2LMHeadModel, ...)"
        )
    get_text = getattr(config, "get_text_config", None)
    return get_text(decoder=True) if get_text is not None else config


def layer_types(config) -> list[str]:
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:
        get_layer_types_and_kwargs = None
    if get_layer_types_and_kwargs is not None:
        try:
            return list(get_layer_types_and_kwargs(config)[0])
        except Exception:  # an older or unusual config: infer from its fields below
            pass
    if getattr(config, "layer_types", None) is not None:
        return list(config.layer_types)
    uses_window = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    return ["sliding_attention" if uses_window else FULL] * int(getattr(config, "num_hidden_layers", 1) or 1)


def _rope_types(config) -> list[str]:
    """Every rope type the config names (rope_parameters / rope_scaling, possibly per layer type)."""
    found = []
    for field in ("rope_parameters", "rope_scaling"):
        value = getattr(config, field, None)
        values = [value] if isinstance(value, dict) and ("rope_type" in value or "type" in value) else (
            list(value.values()) if isinstance(value, dict) else [])
        for entry in values:
            if isinstance(entry, dict):
                kind = entry.get("rope_type", entry.get("type"))
                if kind:
                    found.append(str(kind))
    return found


def _check_causal(model: nn.Module) -> None:
    """Raise ModelTypeError for a model transformers says cannot generate: an encoder (BERT,
    T5EncoderModel), a classifier or a base model without its language-model head."""
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and not can_generate():
        name = type(model).__name__
        raise ModelTypeError(
            f"{name} is not a causal LM but an encoder or a model without a language-model head (BertModel, "
            f"T5EncoderModel, a sequence classifier, LlamaModel; transformers: {name}.can_generate() is False). "
            "lfx.generate and lfx.export_generation support decoder-only causal LMs with a KV cache "
            "(LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, Phi3ForCausalLM, GPT2LMHeadModel, ...); "
            "run an encoder's graph directly (gm(**inputs)), or load a decoder's ...ForCausalLM class"
        )


def _check_decoder(model: nn.Module) -> None:
    """Raise ModelTypeError unless `model` is a causal LM whose cache KVDecoder can hold."""
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"expected a Hugging Face causal LM (an nn.Module), got {type(model).__name__}")
    config = _config(model)
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ModelTypeError(f"{name} is an encoder-decoder model; generation export handles decoder-only causal LMs")
    _check_causal(model)
    if getattr(model, "_is_stateful", False):
        raise ModelTypeError(
            f"{name} keeps a recurrent state (a stateful cache), not one key/value pair per layer; "
            "KV-cache generation supports attention decoders only (full, sliding-window or chunked)"
        )
    types = layer_types(config)
    other = sorted(set(t for t in types if t not in ATTENTION))
    if other:
        raise ModelTypeError(
            f"{name} has recurrent or hybrid cache layers (config.layer_types includes {other}); KV-cache "
            "generation supports decoders whose every layer is attention (full, sliding-window or chunked) with "
            "one key/value pair per token"
        )
    for kind in _rope_types(config):
        if kind in LENGTH_DEPENDENT_ROPE:
            raise ModelTypeError(
                f"{name} uses length-dependent RoPE (rope_scaling / rope_parameters rope_type={kind!r}, "
                f"{LENGTH_DEPENDENT_ROPE[kind]}): positions are rotated differently once the sequence passes "
                "original_max_position_embeddings, so cached keys would go stale. Use a model with "
                "rope_type 'default' (or linear / llama3 / yarn scaling), e.g. Phi-3 4k rather than 128k."
            )


# model types whose RoPE multiplies complex tensors, which ONNX has no type for
COMPLEX_ROPE = {"llama4", "llama4_text"}


def check_onnx_decoder(model: nn.Module) -> None:
    """check_decoder, and raise ModelTypeError for a decoder ONNX cannot express (complex RoPE)."""
    _check_decoder(model)
    kind = getattr(_config(model), "model_type", "")
    if kind in COMPLEX_ROPE:
        raise ModelTypeError(
            f"{type(model).__name__} (model_type {kind!r}) rotates queries and keys with complex-valued RoPE, "
            "which ONNX cannot express: export_generation does not support it. Generate with lfx.generate "
            "(eager or compile=...) instead"
        )


def _forward_parameters(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _make_cache(pairs: list[tuple[torch.Tensor, torch.Tensor]]):
    """A transformers DynamicCache holding `pairs` ((key, value) per layer)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(pairs)
    except TypeError:  # transformers before 4.56
        return DynamicCache.from_legacy_cache(tuple(pairs))


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer of a transformers cache (or a legacy tuple of pairs)."""
    if isinstance(cache, (tuple, list)):
        return [(k, v) for k, v, *_ in cache]
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    raise ModelTypeError(f"cannot read the key/value tensors of a {type(cache).__name__}")


class KVDecoder(nn.Module):
    """`model` with the KV cache as flat tensors in and out (see the module docstring)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        _check_decoder(model)
        self.model = model
        params = _forward_parameters(model)
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        # The mask covers past and new tokens; saying so lets capture tie its length to theirs.
        torch._check(attention_mask.shape[1] == past_key_values[0]["key"].shape[2] + input_ids.shape[1])
        cache = _make_cache([(layer["key"], layer["value"]) for layer in past_key_values])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self._cache_arg: cache})
        present = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return {"logits": out.logits,
                "present": [{"key": k, "value": v} for k, v in _cache_tensors(present)]}


def cache_layout(model: nn.Module) -> CacheLayout:
    """The cache's layer count, kv heads, head size and dtype, read from one tiny eager step."""
    _check_decoder(model)
    params = _forward_parameters(model)
    cache_arg = "cache" if "cache" in params else "past_key_values"
    device = next(model.parameters()).device
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                        **{cache_arg: _make_cache([])})
    finally:
        for module, training in modes:
            module.training = training
    pairs = _cache_tensors(getattr(out, "cache", None) or getattr(out, "past_key_values", None))
    if not pairs:
        raise ModelTypeError(f"{type(model).__name__} returned no key/value cache with use_cache=True")
    key = pairs[0][0]
    return CacheLayout(layers=len(pairs), kv_heads=int(key.shape[1]), head_dim=int(key.shape[3]), dtype=key.dtype)


def example_inputs(model: nn.Module, layout: CacheLayout, batch: int = 2, seq: int = 3, past: int = 4) -> dict:
    """Example kwargs of KVDecoder(model): sizes >= 2 so that capture keeps every axis dynamic."""
    device = next(model.parameters()).device
    vocab = int(getattr(_config(model), "vocab_size", 2) or 2)
    draw = torch.Generator().manual_seed(0)  # examples only: leave the caller's random state alone
    ids = torch.randint(0, max(vocab, 1), (batch, seq), generator=draw).to(device)
    mask = torch.ones((batch, past + seq), dtype=torch.long, device=device)
    positions = torch.arange(past, past + seq, device=device).expand(batch, seq).contiguous()
    shape = (batch, layout.kv_heads, past, layout.head_dim)
    cache = [{"key": torch.randn(shape, generator=draw).to(device, layout.dtype),
              "value": torch.randn(shape, generator=draw).to(device, layout.dtype)} for _ in range(layout.layers)]
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "past_key_values": cache}
