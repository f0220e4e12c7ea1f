"""`genai_config.json`: what onnxruntime-genai needs to run the exported decoder.

Built from the Hugging Face config, its generation config and the cache layout:

    {"model": {"type": "llama" | "qwen2" | "phi3" | "mistral" | "decoder" (GPT-2 and others),
               "vocab_size", "context_length", "bos_token_id", "eos_token_id", "pad_token_id",
               "decoder": {"filename": "model.onnx", "head_size", "hidden_size",
                           "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
                           "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                           "inputs": {"input_ids", "attention_mask", "position_ids",
                                      "past_key_names": "past_key_values.%d.key", "past_value_names": ...},
                           "outputs": {"logits", "present_key_names": "present.%d.key", ...},
                           "sliding_window": {"window_size": W, "slide_key_value_cache": false,
                                              "slide_inputs": false}}},   (sliding-window models only)
     "search": {"do_sample", "temperature", "top_k", "top_p", "max_length", "num_beams": 1,
                "past_present_share_buffer": false, ...}}

Types: genai's own decoder types where they match the export's layout (one key and one
value input per layer, [batch, kv_heads, past, head_dim]); GPT-2 is "decoder", because
genai's "gpt2" type expects another cache layout, and so is any model genai has no type
for. `past_present_share_buffer` is false: genai then feeds the previous step's present
tensors as past (a growing cache, as the export computes), which is what CPU needs.
Sliding-window models (Mistral, Qwen2 with use_sliding_window, Gemma-2/3) carry
`decoder.sliding_window`: the window in tokens, with the cache NOT slid and the inputs NOT
cut into windows, because the export keeps every past token and applies the window in its
attention mask (generation/decoder.py). No per-layer `layers` list: genai's model builder
writes one so that the runtime may size those layers' caches to the window, which the
export's full-length cache does not follow.
EOS and pad ids must lie inside the vocabulary: genai compares generated tokens with them,
so an id it can never produce would silently never stop generation.
"""

from __future__ import annotations

from ..errors import ExportError
from .decoder import CacheLayout, layer_types

# The files of a generation directory.
MODEL = "model.onnx"
CONFIG = "genai_config.json"
PER_ROW = "per_row"  # subdirectory: the per-row export, with its own genai_config.json

# Hugging Face model_type -> genai model type, for the types whose decoders read this layout.
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
               "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3_text", "granite": "granite", "olmo": "olmo",
               "smollm3": "smollm3", "nemotron": "nemotron"}


def _first(*values):
    return next((v for v in values if v is not None), None)


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def token_ids(config, generation) -> dict:
    """bos / eos (a list) / pad ids from the generation config, else the model config."""
    eos = _ids(_first(getattr(generation, "eos_token_id", None), getattr(config, "eos_token_id", None)))
    pad = _first(getattr(generation, "pad_token_id", None), getattr(config, "pad_token_id", None))
    bos = _first(getattr(generation, "bos_token_id", None), getattr(config, "bos_token_id", None))
    if isinstance(pad, (list, tuple)):
        pad = pad[0] if pad else None
    if pad is None and eos:
        pad = eos[0]
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}


def check_token_ids(ids: dict, vocab: int) -> None:
    named = (("eos_token_id", ids["eos_token_id"]), ("pad_token_id", ids["pad_token_id"]))
    outside = {name: value for name, value in named
               if value is not None and any(not 0 <= v < vocab for v in _ids(value))}
    if not ids["eos_token_id"]:
        raise ExportError(
            "the model has no eos_token_id (generation config or config); onnxruntime-genai needs one to stop. "
            "Set model.generation_config.eos_token_id = <id> before exporting"
        )
    if outside:
        shown = ", ".join(f"{name}={value}" for name, value in outside.items())
        raise ExportError(
            f"{shown} lies outside the vocabulary [0, {vocab}): generation could never produce or pad with it. "
            "Set model.generation_config.eos_token_id (and pad_token_id) to ids of this vocabulary before exporting"
        )


def sliding_window(config) -> dict | None:
    """genai's `decoder.sliding_window` entry for a config with sliding-window layers, else None."""
    if "sliding_attention" not in layer_types(config):
        return None
    return {"window_size": int(config.sliding_window), "slide_key_value_cache": False, "slide_inputs": False}


def genai_config(model, layout: CacheLayout, filename: str = MODEL) -> dict:
    """The genai_config.json content for `model` exported as `filename` (raises ExportError on bad ids)."""
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    generation = getattr(model, "generation_config", None)
    vocab = int(config.vocab_size)
    ids = token_ids(config, generation)
    check_token_ids(ids, vocab)
    kind = GENAI_TYPES.get(getattr(config, "model_type", ""), "decoder")
    hidden = int(_first(getattr(config, "hidden_size", None), getattr(config, "n_embd", None)))
    heads = int(_first(getattr(config, "num_attention_heads", None), getattr(config, "n_head", None)))
    context = int(_first(getattr(config, "max_position_embeddings", None), getattr(config, "n_positions", None), 2048))
    eos = ids["eos_token_id"]
    search = {
        "do_sample": bool(getattr(generation, "do_sample", False) or False),
        "temperature": float(_first(getattr(generation, "temperature", None), 1.0)),
        "top_k": int(_first(getattr(generation, "top_k", None), 50)),
        "top_p": float(_first(getattr(generation, "top_p", None), 1.0)),
        "repetition_penalty": float(_first(getattr(generation, "repetition_penalty", None), 1.0)),
        "max_length": context,
        "min_length": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "length_penalty": 1.0,
        "diversity_penalty": 0.0,
        "no_repeat_ngram_size": 0,
        "early_stopping": True,
        "past_present_share_buffer": False,
    }
    decoder = {
        "filename": filename,
        "head_size": layout.head_dim,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_hidden_layers": layout.layers,
        "num_key_value_heads": layout.kv_heads,
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "inputs": {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "position_ids": "position_ids",
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
    }
    window = sliding_window(config)
    if window is not None:
        decoder["sliding_window"] = window
    return {
        "model": {
            "type": kind,
            "vocab_size": vocab,
            "context_length": context,
            "bos_token_id": ids["bos_token_id"] if ids["bos_token_id"] is not None else eos[0],
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": ids["pad_token_id"],
            "decoder": decoder,
        },
        "search": search,
    }
