"""Small built-in model configs for the command line (random weights, nothing downloaded).

Needs `transformers` (the `demo` extra): `pip install 'lowrank-fx[demo]'`.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import LowRankFxError


@dataclasses.dataclass
class BuiltinModel:
    model: torch.nn.Module
    example_inputs: tuple
    example_kwargs: dict
    vocab_size: int


def _transformers():
    try:
        import transformers
    except ImportError:
        raise LowRankFxError(
            "the built-in models need transformers: pip install 'lowrank-fx[demo]'"
        ) from None
    return transformers


def _ids(vocab: int, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq))


def tiny_llama(vocab: int = 64, hidden: int = 64, layers: int = 2) -> BuiltinModel:
    T = _transformers()
    config = T.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256)
    return BuiltinModel(T.LlamaForCausalLM(config), (_ids(vocab),), {"use_cache": False}, vocab)


def tiny_gpt2(vocab: int = 64, hidden: int = 64, layers: int = 2) -> BuiltinModel:
    T = _transformers()
    config = T.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                          bos_token_id=0, eos_token_id=0)
    return BuiltinModel(T.GPT2LMHeadModel(config), (_ids(vocab),), {"use_cache": False}, vocab)


def tiny_bert(vocab: int = 64, hidden: int = 64, layers: int = 2) -> BuiltinModel:
    T = _transformers()
    config = T.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=256)
    return BuiltinModel(T.BertModel(config), (_ids(vocab),), {}, vocab)


BUILTIN = {"tiny-llama": tiny_llama, "tiny-gpt2": tiny_gpt2, "tiny-bert": tiny_bert}


def builtin(name: str, seed: int = 0) -> BuiltinModel:
    if name not in BUILTIN:
        raise LowRankFxError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN)}")
    torch.manual_seed(seed)
    built = BUILTIN[name]()
    built.model.eval()
    return built
