"""The model zoo of test_zoo.py and test_all_linear.py: tiny models, random weights, no downloads.

`build(family)` returns a `models.Case` (model in eval mode, capture examples, examples of
other shapes, the main output): Llama, Qwen2 and GPT-2 causal LMs, T5, BERT and ViT with
3-way classification heads (one layer each, hidden 32, so that capturing, compiling and
exporting stay fast; T5 has one encoder and one decoder block), nn.TransformerEncoder (two
layers) with a 5-way linear head, a functional MLP on raw parameters and one linear called twice.
"""

from __future__ import annotations

import models
import torch
import torch.nn.functional as F
import transformers as T
from torch import nn

FAMILIES = ("llama", "qwen2", "gpt2", "bert_cls", "t5", "vit_cls", "encoder", "mlp", "twice")


class EncoderClassifier(nn.Module):
    """nn.TransformerEncoder (batch first) over features, mean-pooled into a 5-way linear head."""

    def __init__(self, width: int = 16, classes: int = 5):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=width, nhead=2, dim_feedforward=32, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.encoder(x).mean(dim=1))


class FunctionalMLP(nn.Module):
    """F.linear on raw parameters: 16 -> 32 -> 32 -> 5, log-probabilities out."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(32, 16) / 4)
        self.b1 = nn.Parameter(torch.randn(32) / 4)
        self.w2 = nn.Parameter(torch.randn(32, 32) / 6)
        self.w3 = nn.Parameter(torch.randn(5, 32) / 6)
        self.b3 = nn.Parameter(torch.zeros(5))

    def forward(self, x):
        h = F.gelu(F.linear(x, self.w1, self.b1))
        h = F.gelu(F.linear(h, self.w2))
        return F.linear(h, self.w3, self.b3).log_softmax(dim=-1)


class Twice(nn.Module):
    """One nn.Linear applied twice: its two call sites share one adapter."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


def _ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, models.VOCAB, (batch, seq))


def build(family: str, seed: int = 0) -> models.Case:
    torch.manual_seed(seed)
    output = models._main_output
    decoder = {"use_cache": False}
    if family in ("llama", "qwen2"):
        config_class, model_class = (T.LlamaConfig, T.LlamaForCausalLM) if family == "llama" else (
            T.Qwen2Config, T.Qwen2ForCausalLM)
        config = config_class(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = model_class(config)
        args, kwargs, other, other_kw = (_ids(2, 8),), decoder, (_ids(3, 11),), decoder
    elif family == "gpt2":
        config = T.GPT2Config(vocab_size=models.VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64,
                              bos_token_id=0, eos_token_id=0)
        model = T.GPT2LMHeadModel(config)
        args, kwargs, other, other_kw = (_ids(2, 8),), decoder, (_ids(3, 11),), decoder
    elif family == "t5":
        config = T.T5Config(vocab_size=models.VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                            decoder_start_token_id=0)
        model = T.T5ForConditionalGeneration(config)
        args, kwargs = (_ids(2, 8),), {"decoder_input_ids": _ids(2, 6), **decoder}
        other, other_kw = (_ids(3, 11),), {"decoder_input_ids": _ids(3, 5), **decoder}
    elif family == "bert_cls":
        config = T.BertConfig(vocab_size=models.VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=64, num_labels=3)
        model = T.BertForSequenceClassification(config)
        args, kwargs, other, other_kw = (_ids(2, 8),), {}, (_ids(3, 11),), {}
    elif family == "vit_cls":
        config = T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                             image_size=32, patch_size=8, num_labels=3)
        model = T.ViTForImageClassification(config)
        args, kwargs, other, other_kw = (torch.randn(2, 3, 32, 32),), {}, (torch.randn(5, 3, 32, 32),), {}
    elif family == "encoder":
        model = EncoderClassifier()
        args, kwargs, other, other_kw = (torch.randn(2, 6, 16),), {}, (torch.randn(3, 9, 16),), {}
    elif family == "mlp":
        model = FunctionalMLP()
        args, kwargs, other, other_kw = (torch.randn(2, 4, 16),), {}, (torch.randn(3, 7, 16),), {}
    elif family == "twice":
        model = Twice()
        args, kwargs, other, other_kw = (torch.randn(2, 4, 16),), {}, (torch.randn(5, 3, 16),), {}
    else:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    model.eval()
    return models.Case(model, args, kwargs, other, other_kw, output)
