"""The one generation loop: padding, positions, greedy or sampled tokens, EOS, for every runtime.

`lfx.generate` (PyTorch) and `GenerationSession.generate` (ONNX Runtime) differ only in their
`step(input_ids, attention_mask, position_ids, cache) -> (logits, cache)`; everything else
happens here, in torch on the CPU side of the step:

- **Padding**, left or right, from `attention_mask` (1 real, 0 pad; all ones when omitted).
  Positions count real tokens only (cumsum of the mask - 1, pads at 0, as transformers does),
  each row's first new token is predicted from its *last real* token, and every new token
  is appended at the end with mask 1. Left padding is therefore exactly transformers'
  `generate`; right-padded rows get the same tokens as each row alone (transformers would
  read the pad's logits there; onnxruntime-genai does what this loop does).
- **Tokens**: greedy (argmax, first maximum on ties) or sampling: temperature, then top-k,
  then top-p (nucleus, at least one token kept), then a draw from the softmax, with
  `torch.Generator(seed)` when a seed is given.
- **EOS**: a row that produced an EOS id is finished; its later tokens are `pad_token_id`
  (defaulting to the first EOS id, as transformers). The loop ends when every row is finished
  or after `max_new_tokens`, so the result is (batch, prompt + steps taken) like transformers'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from ..errors import InputError, SpecError

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object], tuple[torch.Tensor, object]]


@dataclasses.dataclass
class Generated:
    """What `generate(..., output_logits=True)` returns (transformers' `output_logits`).

    Args:
        sequences: (batch, length) int64: prompt + new tokens.
        logits: the raw next-token logits of every step, (batch, vocab) each; with beams
            (batch * num_beams, vocab).
        scores: with beams, each row's final beam score (transformers' `sequences_scores`), else None.
    """

    sequences: torch.Tensor
    logits: tuple[torch.Tensor, ...]
    scores: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def check(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise SpecError(f"do_sample must be True or False, got {self.do_sample!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise SpecError(f"temperature must be a number > 0, got {self.temperature!r} (greedy: do_sample=False)")
        if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0):
            raise SpecError(f"top_k must be an int >= 0 (0: no top-k filter), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise SpecError(f"top_p must be in (0, 1] (1: no nucleus filter), got {self.top_p!r}")

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits after temperature, top-k and top-p (removed tokens at -inf), in float32."""
        scores = logits.float()
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k and self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = torch.sort(scores, dim=-1)  # ascending
            mass = ordered.softmax(dim=-1).cumsum(dim=-1)
            drop = mass <= 1 - self.top_p
            drop[..., -1] = False  # the most likely token always stays
            scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return scores

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if not self.do_sample:
            return logits.argmax(dim=-1)
        probs = self.scores(logits).softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def eos_list(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise InputError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
    return ids


def as_ids(value, name: str) -> torch.Tensor:
    """A (batch, length) int64 CPU tensor from a tensor, array or nested list."""
    tensor = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if tensor.dim() == 1:
        tensor = tensor[None]
    if tensor.dim() != 2:
        raise InputError(f"{name} must be (batch, length), got shape {tuple(tensor.shape)}")
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.dtype.is_complex:
        raise InputError(f"{name} must hold integers, got {tensor.dtype}")
    return tensor.long()


def check_inputs(input_ids, attention_mask, max_new_tokens: int,
                 vocab: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    ids = as_ids(input_ids, "input_ids")
    if ids.shape[1] == 0:
        raise InputError("input_ids is empty: give at least one prompt token per row")
    mask = torch.ones_like(ids) if attention_mask is None else as_ids(attention_mask, "attention_mask")
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask is {tuple(mask.shape)} but input_ids is {tuple(ids.shape)}; they must match")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError("attention_mask must hold 0 (padding) and 1 (token) only")
    empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise InputError(f"rows {empty} of attention_mask are all padding; every row needs a prompt token")
    if vocab is not None:
        bad = ids[(mask == 1) & ((ids < 0) | (ids >= vocab))]
        if bad.numel():
            raise InputError(f"input_ids holds {bad[0].item()}, outside the vocabulary [0, {vocab})")
    check_count(max_new_tokens)
    return ids, mask


def check_left_padded(attention_mask) -> None:
    """Refuse a pad after a real token, for models with a sliding window or chunks: the window
    counts cache slots, so a right-padded row's pads would take window slots from its tokens."""
    if attention_mask is None:
        return
    mask = as_ids(attention_mask, "attention_mask")
    right = ((mask.cummax(-1).values == 1) & (mask == 0)).any(-1).nonzero().flatten().tolist()
    if right:
        raise InputError(
            f"rows {right} of attention_mask have padding after their tokens. This model attends within a sliding "
            "window (or chunks) of cache positions, so those pads would sit inside the window: pad on the left "
            "(tokenizer.padding_side = 'left'), as transformers' generate expects"
        )


def check_count(max_new_tokens) -> None:
    if not (isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool) and max_new_tokens >= 1):
        raise InputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")


def prefill(step: Step, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, object, torch.Tensor]:
    """Run the prompt: (each row's next-token logits (batch, vocab), the cache, real tokens per row).

    Positions count real tokens (pads at 0); a row's logits are read at its last real token."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0) * mask
    last = ids.shape[1] - 1 - mask.flip(-1).argmax(-1)
    logits, cache = step(ids, mask, positions, None)
    next_logits = logits[torch.arange(ids.shape[0]), last] if logits.shape[1] > 1 else logits[:, -1]
    return next_logits, cache, mask.sum(-1)  # real tokens so far: the next token's position


def run(step: Step, input_ids, attention_mask=None, *, max_new_tokens: int, sampling: Sampling,
        eos_token_id: int | Sequence[int] | None, pad_token_id: int | None, seed: int | None,
        vocab: int | None = None) -> Generated:
    """Generate with `step` (see the module docstring); returns sequences and per-step logits."""
    sampling.check()
    ids, mask = check_inputs(input_ids, attention_mask, max_new_tokens, vocab)
    eos = eos_list(eos_token_id)
    if pad_token_id is None and eos:
        pad_token_id = eos[0]
    generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    batch = ids.shape[0]
    next_logits, cache, seen = prefill(step, ids, mask)
    stop = torch.tensor(eos, dtype=torch.long) if eos else None
    unfinished = torch.ones(batch, dtype=torch.bool)
    tokens, steps = [ids], []
    for index in range(max_new_tokens):
        steps.append(next_logits)
        new = sampling.pick(next_logits, generator).long()
        if stop is not None:
            new = torch.where(unfinished, new, torch.full_like(new, pad_token_id))
            unfinished &= ~torch.isin(new, stop)
        tokens.append(new[:, None])
        if index == max_new_tokens - 1 or not bool(unfinished.any()):
            break
        mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=-1)
        logits, cache = step(new[:, None], mask, seen[:, None].clone(), cache)
        seen = seen + 1
        next_logits = logits[:, -1]
    return Generated(torch.cat(tokens, dim=-1), tuple(steps))
