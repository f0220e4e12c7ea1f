"""Tiny models with random weights for tests: one per family, built from configs (no downloads).

Each `build(family)` returns a `Case`: the model (eval mode), capture examples, call
examples of other shapes, and `output(result)` picking the main tensor of a forward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import transformers as T

FAMILIES = ("llama", "gpt2", "bert", "t5", "vit")
VOCAB = 128


@dataclasses.dataclass
class Case:
    model: torch.nn.Module
    args: tuple  # capture examples
    kwargs: dict
    other_args: tuple  # another batch size and sequence length
    other_kwargs: dict
    output: Callable  # forward result -> tensor


def _ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq))


def _main_output(result) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        value = getattr(result, name, None)
        if value is not None:
            return value
    return result[0] if isinstance(result, (tuple, list)) else result


def build(family: str, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    if family == "llama":
        config = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = T.LlamaForCausalLM(config)
        args, kwargs, other, other_kw = (_ids(2, 8),), {"use_cache": False}, (_ids(3, 11),), {"use_cache": False}
    elif family == "gpt2":
        config = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                              bos_token_id=0, eos_token_id=0)
        model = T.GPT2LMHeadModel(config)
        args, kwargs, other, other_kw = (_ids(2, 8),), {"use_cache": False}, (_ids(3, 11),), {"use_cache": False}
    elif family == "bert":
        config = T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=64)
        model = T.BertModel(config)
        args, kwargs, other, other_kw = (_ids(2, 8),), {}, (_ids(3, 11),), {}
    elif family == "t5":
        config = T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                            decoder_start_token_id=0)
        model = T.T5ForConditionalGeneration(config)
        args, kwargs = (_ids(2, 8),), {"decoder_input_ids": _ids(2, 6), "use_cache": False}
        other, other_kw = (_ids(3, 11),), {"decoder_input_ids": _ids(3, 5), "use_cache": False}
    elif family == "vit":
        config = T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             image_size=32, patch_size=8)
        model = T.ViTModel(config)
        args, kwargs, other, other_kw = (torch.randn(2, 3, 32, 32),), {}, (torch.randn(5, 3, 32, 32),), {}
    else:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    model.eval()
    return Case(model, args, kwargs, other, other_kw, _main_output)


class Toy(torch.nn.Module):
    """Two linears with a ReLU between, x (B, 8) -> (B, 8): the files and API-spelling tests' model."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def toy(seed: int = 1) -> Toy:
    """The toy model with the same weights for the same seed, in eval mode."""
    torch.manual_seed(seed)
    return Toy().eval()
