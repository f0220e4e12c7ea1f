"""`lfx.GenerationSession(directory)`: KV-cache generation with plain ONNX Runtime.

    session = lfx.GenerationSession("out/")                  # a directory from export_generation
    session.generate(ids, adapter="a", max_new_tokens=32)    # (batch, prompt + new) int64
    session.generate(ids, rows=["a", None, "b"])             # per-row export: one adapter per row

No onnxruntime-genai needed. One InferenceSession serves the base model and every adapter
file listed in the export's sidecar (export/session.py: each file is checked against the
model and loaded once; switching adapters between calls is a different RunOptions, no
reload). The KV cache stays in OrtValues between steps: each step's `present.<i>.*` outputs
are the next step's `past_key_values.<i>.*` inputs as they are, never copied to numpy.
Padding, sampling and EOS are `loop.py`'s, beam search `beam.py`'s: the same code as
`lfx.generate` (a beam step reorders the cache rows through numpy).

Per-row generation (`rows=`) runs the export's `per_row/` model (export_generation(...,
per_row=True)), whose `adapter_ids` input picks each row's adapter; it is loaded on first use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..deprecation import api_options
from ..errors import AdapterFileError, ExportError, InputError
from ..export.ort_adapter import load_ort
from ..export.per_row import IDS
from ..export.session import AdapterSession
from .beam import check_beams, run_beams
from .genai_config import CONFIG, PER_ROW
from .loop import Generated, Sampling, as_ids, check_left_padded, eos_list, run

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class GenerationSession:
    """KV-cache generation over a directory written by `lfx.export_generation` (see the module docstring).

    A session holds no current adapter: each `generate` names the one it uses (None: the
    base model). Adding an adapter (`add_adapter`) changes the session in place.

    Args:
        directory: a directory written by `lfx.export_generation`.
        providers: ONNX Runtime execution providers (default: CUDA when available, else CPU).
        session_options: an `onnxruntime.SessionOptions` (thread counts, ...).
        adapters: extra {name: .onnx_adapter file} to load besides the export's own.

    Raises:
        ExportError: the directory has no genai_config.json, it is damaged, or ONNX Runtime
            cannot load the model.
        AdapterFileError: an adapter file does not fit the model, or onnxruntime is not installed.

    Attributes:
        directory: the generation directory.
        config: genai_config.json's content.
        layers: the decoder's layers (key/value cache pairs).
        kv_heads: key/value heads per layer.
        head_dim: the size of one attention head.
        vocab_size: the logits' size.
        eos_token_id: genai_config.json's end-of-sequence ids.
        pad_token_id: genai_config.json's padding id.
    """

    @api_options(positional=2)
    def __init__(self, directory: str | os.PathLike, *, providers: Sequence[str] | None = None,
                 session_options: Any = None, adapters: Mapping[str, str | os.PathLike] | None = None) -> None:
        self.directory = Path(directory)
        config_path = self.directory / CONFIG
        if not config_path.is_file():
            raise ExportError(
                f"{self.directory} has no {CONFIG}; give a directory written by lfx.export_generation(model, adapters, "
                "directory)"
            )
        try:
            self.config = json.loads(config_path.read_text())
            model = self.config["model"]
            decoder = model["decoder"]
            self.layers = int(decoder["num_hidden_layers"])
            self.kv_heads = int(decoder["num_key_value_heads"])
            self.head_dim = int(decoder["head_size"])
            self.vocab_size = int(model["vocab_size"])
        except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
            raise ExportError(f"{config_path} is damaged or not from lfx.export_generation ({type(err).__name__}: "
                              f"{err}); "
                              "write the directory again with lfx.export_generation") from None
        self.eos_token_id = eos_list(model.get("eos_token_id"))
        self.pad_token_id = model.get("pad_token_id")
        names = decoder["inputs"]
        outputs = decoder["outputs"]
        self._names = (names["input_ids"], names["attention_mask"], names["position_ids"])
        self._past = [(names["past_key_names"] % i, names["past_value_names"] % i) for i in range(self.layers)]
        self._present = [(outputs["present_key_names"] % i, outputs["present_value_names"] % i)
                         for i in range(self.layers)]
        self._logits = outputs["logits"]
        self._options = {"providers": providers, "session_options": session_options}
        self._main = AdapterSession(self.directory / decoder["filename"], adapters=adapters, **self._options)
        self._rows: AdapterSession | None = None
        past_type = {i.name: i.type for i in self._main.session.get_inputs()}.get(self._past[0][0], "tensor(float)")
        self._past_dtype = _NUMPY.get(past_type, np.float32)

    @property
    def adapters(self) -> list[str]:
        """The adapters of this session.

        Returns:
            The names usable as `adapter=`.
        """
        return self._main.adapters

    def add_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Check an .onnx_adapter file against the exported model and load it under `name` (in place).

        Args:
            name: the name `generate(..., adapter=name)` selects it by; a name already loaded is replaced.
            path: an .onnx_adapter file written for this export's model.

        Returns:
            None; the session is changed in place.

        Raises:
            AdapterFileError: the file is missing, damaged or does not fit the model.
        """
        self._main.add_adapter(name, path)

    def _per_row(self) -> AdapterSession:
        if self._rows is None:
            path = self.directory / PER_ROW / self.config["model"]["decoder"]["filename"]
            if not path.is_file():
                raise AdapterFileError(
                    f"{self.directory} has no per-row export ({PER_ROW}/); write it with "
                    "lfx.export_generation(..., per_row=True) to give each row its own adapter"
                )
            self._rows = AdapterSession(path, **self._options)
        return self._rows

    def _stepper(self, session: AdapterSession, options, row_ids: np.ndarray | None):
        ort = load_ort()
        outputs = [self._logits] + [name for pair in self._present for name in pair]
        device = "cpu"
        ids_array = np.ascontiguousarray(row_ids) if row_ids is not None else None

        def value(array: np.ndarray):  # the array must outlive the run: callers keep it in a local
            return ort.OrtValue.ortvalue_from_numpy(array, device)

        def step(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache):
            arrays = [np.ascontiguousarray(t.numpy()) for t in (ids, mask, positions)]
            feeds = {name: value(array) for name, array in zip(self._names, arrays)}
            if cache is None:
                empty = np.zeros((ids.shape[0], self.kv_heads, 0, self.head_dim), dtype=self._past_dtype)
                cache = [value(empty)] * (2 * self.layers)
            feeds.update(zip([name for pair in self._past for name in pair], cache))
            if row_ids is not None:
                feeds[IDS] = value(ids_array)
            results = session.session.run_with_ort_values(outputs, feeds, options)
            return torch.from_numpy(results[0].numpy()), results[1:]

        return step

    @staticmethod
    def _reorder(cache, rows: torch.Tensor):
        """The cache's OrtValues with their batch rows taken in `rows`' order (beam search)."""
        ort = load_ort()
        index = rows.numpy()
        return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value.numpy()[index]), "cpu") for value in cache]

    @api_options(positional=2)
    def generate(self, input_ids: torch.Tensor | Sequence[Sequence[int]], *,
                 attention_mask: torch.Tensor | Sequence[Sequence[int]] | None = None, adapter: str | None = None,
                 rows: Sequence[str | None] | None = None, max_new_tokens: int = 20, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 seed: int | None = None, num_beams: int = 1, length_penalty: float = 1.0,
                 early_stopping: bool | str = False, output_logits: bool = False) -> torch.Tensor | Generated:
        """Generate, as transformers' `generate` and `lfx.generate` (loop.py, beam.py).

        Padding is left or right, by attention_mask; left only with a sliding window.

        Args:
            input_ids: (batch, prompt) token ids, a tensor or lists of ints.
            attention_mask: (batch, prompt), 1 for tokens and 0 for padding (default: all ones).
            adapter: the one adapter for the batch; None (the default) generates with the base
                model. A session has no active adapter: each call names its own.
            rows: with a per-row export (export_generation(..., per_row=True)), one adapter
                name (or None) per batch row, instead of `adapter`.
            max_new_tokens: how many tokens to add at most.
            do_sample: sample (True) or pick the most likely token (False).
            temperature: sampling temperature.
            top_k: sample among the k most likely tokens (0: all).
            top_p: sample among the most likely tokens whose probabilities add up to p.
            eos_token_id: the id(s) that end a row; None takes genai_config.json's; [] never stops early.
            pad_token_id: the id written after a row ended; None takes genai_config.json's.
            seed: seed of the sampling generator (None: torch's global one).
            num_beams: > 1 runs beam search (greedy only, one adapter for the batch).
            length_penalty: beam search's length penalty.
            early_stopping: beam search's stop rule: True, False or "never".
            output_logits: return a `Generated` (sequences, per-step logits) instead of the ids.

        Returns:
            (batch, prompt + new) int64 token ids, or a `Generated` with output_logits=True.

        Raises:
            AdapterFileError: an unknown adapter, or `rows` without a per-row export.
            InputError: bad input ids or mask, both `adapter` and `rows`, rows of the wrong
                length, or beam search with sampling or rows.
            SpecError: bad generation settings (counts, temperature, ...).
        """
        batch = as_ids(input_ids, "input_ids").shape[0]
        if "sliding_window" in self.config["model"]["decoder"]:
            check_left_padded(attention_mask)
        check_beams(num_beams, length_penalty, early_stopping)
        if num_beams > 1 and (do_sample or rows is not None):
            raise InputError(
                f"num_beams={num_beams} runs a deterministic beam search over one adapter for the batch: "
                + ("pass do_sample=False" if do_sample else "rows= (one adapter per row) cannot be combined with it; "
                   "generate each adapter's rows in their own call with adapter=")
            )
        if rows is not None:
            if adapter is not None:
                raise InputError("pass adapter= (one for the batch) or rows= (one per row), not both")
            rows = list(rows)
            if len(rows) != batch:
                raise InputError(
                    f"rows has {len(rows)} entries for a batch of {batch}; give one name (or None) per row")
            session = self._per_row()
            step = self._stepper(session, None, session.row_ids(rows))
        else:
            step = self._stepper(self._main, self._main.run_options(adapter), None)
        eos = self.eos_token_id if eos_token_id is None else eos_list(eos_token_id)
        pad = self.pad_token_id if pad_token_id is None else pad_token_id
        if num_beams > 1:
            result = run_beams(step, self._reorder, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                               num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                               eos_token_id=eos, pad_token_id=pad, vocab=self.vocab_size)
        else:
            result = run(step, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                         sampling=Sampling(do_sample, temperature, top_k, top_p), eos_token_id=eos, pad_token_id=pad,
                         seed=seed, vocab=self.vocab_size)
        return result if output_logits else result.sequences


__all__ = ["Generated", "GenerationSession"]
