"""Beam search over any runtime's `step`, token for token transformers' `generate(num_beams=B)`.

Each prompt row becomes B rows (batch * B, beams of a row adjacent). Per step, for every row:

    scores[b, t] = running[b] + log_softmax(logits[b])[t]            over B beams x vocab
    candidates   = the top K of scores, K = max(2, 1 + number of EOS ids) * B
    finished     = candidates ending in EOS (or at max length) among the first B, scored
                   score / new_tokens ** length_penalty, kept if among the best B finished so far
    running      = the best B candidates that did not finish (finished ones at -1e9)

and the cache is reordered to follow the running beams (`reorder(cache, rows)`: row i of
the new cache is row rows[i] of the old). Stopping, as transformers: every candidate hit EOS
or the length limit; or early_stopping=True and B hypotheses finished; or no running beam can
still beat the worst finished one (early_stopping=False: at its current length, "never": at
the longest possible length when length_penalty > 0). The result is each row's best finished
hypothesis, all cut to the longest one; shorter ones are filled with pad_token_id, or with the
first EOS id when the pad id is 0 or None (transformers' fill rule). Padding and positions are
loop.py's (`prefill`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import SpecError
from .loop import Generated, Step, check_inputs, eos_list, prefill

Reorder = Callable[[object, torch.Tensor], object]
LOST = -1.0e9  # transformers' score for a hypothesis that may not be chosen


def check_beams(num_beams, length_penalty, early_stopping) -> None:
    if not (isinstance(num_beams, int) and not isinstance(num_beams, bool) and num_beams >= 1):
        raise SpecError(f"num_beams must be an int >= 1 (1: no beam search), got {num_beams!r}")
    if not isinstance(length_penalty, (int, float)) or isinstance(length_penalty, bool):
        raise SpecError("length_penalty must be a number (1.0: score / length; 0: raw log-probability), "
                        f"got {length_penalty!r}")
    if early_stopping not in (True, False, "never"):
        raise SpecError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")


def _take(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor[b, index[b, j], ...] for (batch, n, ...) tensors and (batch, k) indices."""
    return tensor[torch.arange(tensor.shape[0])[:, None], index]


def run_beams(step: Step, reorder: Reorder, input_ids, attention_mask=None, *, max_new_tokens: int, num_beams: int,
              length_penalty: float = 1.0, early_stopping=False, eos_token_id: int | Sequence[int] | None,
              pad_token_id: int | None, vocab: int | None = None) -> Generated:
    """Beam search with `step` (see the module docstring); returns the best beam per row."""
    check_beams(num_beams, length_penalty, early_stopping)
    ids, mask = check_inputs(input_ids, attention_mask, max_new_tokens, vocab)
    eos = eos_list(eos_token_id)
    stop = torch.tensor(eos, dtype=torch.long)
    fill = (pad_token_id or eos[0]) if eos else -1
    batch, prompt = ids.shape
    beams, total = num_beams, prompt + max_new_tokens
    keep = max(2, 1 + len(eos)) * beams
    first = torch.arange(keep) < beams  # only the first B candidates may finish
    rows = torch.arange(batch)[:, None] * beams  # each row's first beam in the flat batch

    ids, mask = ids.repeat_interleave(beams, 0), mask.repeat_interleave(beams, 0)
    logits, cache, seen = prefill(step, ids, mask)
    running = torch.full((batch, beams, total), fill, dtype=torch.long)
    running[:, :, :prompt] = ids.view(batch, beams, prompt)
    running_scores = torch.zeros(batch, beams)
    running_scores[:, 1:] = LOST  # all beams start equal: draw the first tokens from beam 0 only
    done = running.clone()
    done_scores = torch.full((batch, beams), LOST)
    done_lengths = torch.zeros(batch, beams, dtype=torch.long)
    is_done = torch.zeros(batch, beams, dtype=torch.bool)
    improvable = torch.ones(batch, 1, dtype=torch.bool)
    steps = []
    length = prompt
    while True:
        steps.append(logits)
        scores = torch.log_softmax(logits.float(), dim=-1).view(batch, beams, -1) + running_scores[:, :, None]
        vocab_size = scores.shape[-1]
        top_scores, top = torch.topk(scores.reshape(batch, -1), k=keep)
        source = top // vocab_size  # which beam each candidate extends
        candidates = _take(running, source)
        candidates[:, :, length] = top % vocab_size
        hits = torch.isin(candidates[:, :, length], stop) | (length + 1 >= total)

        # the best B candidates that go on
        going = torch.topk(top_scores + hits.float() * LOST, k=beams)[1]
        running = _take(candidates, going)
        running_scores = _take(top_scores + hits.float() * LOST, going)
        parents = (_take(source, going) + rows).flatten()

        # the best B finished hypotheses so far
        new = length + 1 - prompt
        finished = hits & first[None, :]
        final = top_scores / (new ** length_penalty)
        final = final + (is_done.all(-1, keepdim=True) & (early_stopping is True)).float() * LOST
        final = final + (~improvable).float() * LOST
        final = final + (~finished).float() * LOST
        best = torch.topk(torch.cat([done_scores, final], 1), k=beams)[1]
        done = _take(torch.cat([done, candidates], 1), best)
        done_scores = _take(torch.cat([done_scores, final], 1), best)
        done_lengths = _take(torch.cat([done_lengths, torch.full((batch, keep), new)], 1), best)
        is_done = _take(torch.cat([is_done, finished], 1), best)

        length += 1
        reach = total - prompt if early_stopping == "never" and length_penalty > 0 else length - prompt
        best_possible = running_scores[:, :1] / (reach ** length_penalty)
        worst_done = torch.where(is_done, done_scores.min(1, keepdim=True)[0], LOST)
        improvable = improvable & (best_possible > worst_done).any(-1, keepdim=True)
        if not (bool(improvable.any()) and not (bool(is_done.all()) and early_stopping is True)
                and not bool(hits.all())):
            break
        cache = reorder(cache, parents)
        mask = torch.cat([mask, mask.new_ones((batch * beams, 1))], dim=-1)
        logits, cache = step(running[:, :, length - 1].reshape(-1, 1), mask, seen[:, None].clone(), cache)
        logits = logits[:, -1]
        seen = seen + 1
    width = prompt + int(done_lengths[:, 0].max())
    return Generated(done[:, 0, :width], tuple(steps), done_scores[:, 0])


def reorder_tensors(cache: list[dict], rows: torch.Tensor) -> list[dict]:
    """A torch cache ([{"key", "value"}] per layer) with its batch rows taken in `rows`' order."""
    return [{part: tensor.index_select(0, rows.to(tensor.device)) for part, tensor in layer.items()} for layer in cache]


__all__ = ["check_beams", "reorder_tensors", "run_beams"]
