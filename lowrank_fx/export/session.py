"""`AdapterSession`: one ONNX Runtime session serving the base model and every adapter.

    session = lfx.AdapterSession("model.onnx")           # adapter files from the sidecar
    out = session.run({"input_ids": ids}, adapter="a")   # {"logits": array}; no adapter: base
    out = session.run({"input_ids": ids}, rows=["a", None, "b"])   # a per-row export

Unmerged exports ("adapters" mode): each adapter file is checked against the model and
loaded once (`onnxruntime.LoraAdapter`); its `RunOptions` with the adapter active is kept,
so switching adapters between runs costs nothing beyond the run. Per-row exports: names
map to `adapter_ids` (index in the export's adapter list, -1 for none).

Providers: CUDA when onnxruntime-gpu offers it, else CPU (`providers=` overrides).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..deprecation import api_options
from ..errors import AdapterFileError, ExportError, InputError, nearest
from .manifest import manifest_path, read_manifest
from .ort_adapter import check_adapter_file, load_ort, slots
from .per_row import IDS, NONE_ID
from .session_inputs import check_feeds, described


def _default_providers() -> list[str]:
    """CUDA when the installed onnxruntime offers it, then CPU."""
    available = load_ort().get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _open(ort, path: Path, options, providers: list[str]):
    """An InferenceSession over `path`; ExportError when the file is missing or ORT cannot read it."""
    if not path.is_file():
        raise ExportError(f"ONNX model {str(path)!r} does not exist; export one with lfx.export_onnx(gm, path, ...)")
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # ORT raises its own exception types (InvalidProtobuf, Fail, ...)
        reason = " ".join(str(err).split())[:300]
        raise ExportError(f"ONNX Runtime cannot load {str(path)!r}: {reason}. The file may be truncated or "
                          "corrupt: export it again") from None


def _sidecar(path: Path) -> tuple[list[str], dict[str, str]]:
    """(row adapters, {adapter: file}) from the model's sidecar; ExportError if they are malformed."""
    manifest = read_manifest(path)
    rows, files = manifest.get("row_adapters", []), manifest.get("adapters", {})
    if not (isinstance(rows, list) and all(isinstance(name, str) for name in rows)
            and isinstance(files, dict) and all(isinstance(v, str) for v in [*files, *files.values()])):
        raise ExportError(f"{manifest_path(path)} lists adapters in a malformed way (row_adapters {rows!r}, "
                          f"adapters {files!r}); it may be corrupt: export the model again")
    return rows, files


class AdapterSession:
    """An ONNX Runtime session over an exported model plus its named adapters.

    A session holds no current adapter: each `run` names the one it uses, and switching
    between runs costs nothing. Adding an adapter (`add_adapter`) changes the session in place.

    Args:
        model_path: the .onnx written by `lfx.export_onnx`; the adapter files its sidecar
            lists are loaded.
        adapters: extra {name: .onnx_adapter file} to load besides the sidecar's.
        providers: ONNX Runtime execution providers (default: CUDA when available, else CPU).
        session_options: an `onnxruntime.SessionOptions` (thread counts, ...).

    Raises:
        ExportError: the model is missing or ONNX Runtime cannot load it, or its sidecar is malformed.
        AdapterFileError: an adapter file does not fit the model, or onnxruntime is not installed.

    Attributes:
        path: the .onnx model.
        session: the `onnxruntime.InferenceSession`.
        input_names: the model's inputs (without a per-row export's `adapter_ids`).
        output_names: the model's outputs, the keys of `run`'s result.
        row_adapters: a per-row export's adapters, of id 0, 1, ...; else empty.
    """

    @api_options(positional=2)
    def __init__(self, model_path: str | os.PathLike, *, adapters: Mapping[str, str | os.PathLike] | None = None,
                 providers: Sequence[str] | None = None, session_options: Any = None) -> None:
        ort = load_ort()
        self.path = Path(model_path)
        rows, files = _sidecar(self.path)
        options = session_options or ort.SessionOptions()
        if session_options is None:
            options.log_severity_level = 3  # ORT warns about every overridable initializer
        self.session = _open(ort, self.path, options, list(providers or _default_providers()))
        self.input_names = [i.name for i in self.session.get_inputs() if i.name != IDS]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.row_adapters: list[str] = rows
        self._per_row = any(i.name == IDS for i in self.session.get_inputs())
        self._slots = slots(self.session)
        self._loaded: dict[str, tuple] = {}  # name -> (LoraAdapter, RunOptions with it active)
        files = {name: self.path.parent / file for name, file in files.items()}
        for name, file in {**files, **dict(adapters or {})}.items():
            self.add_adapter(name, file)

    @property
    def adapters(self) -> list[str]:
        """The adapters of this session.

        Returns:
            The names usable as `adapter=` / in `rows=`: the loaded adapter files, or a
            per-row export's adapters.
        """
        return list(self._loaded) if not self._per_row else list(self.row_adapters)

    def add_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Check an .onnx_adapter file against this model and load it under `name` (in place).

        A name already loaded is replaced.

        Args:
            name: the name runs select it by (`run(..., adapter=name)`).
            path: an .onnx_adapter file from `lfx.export_onnx` / `lfx.export_onnx_adapter`.

        Returns:
            None; the session is changed in place.

        Raises:
            AdapterFileError: the file is missing, damaged or does not fit the model, or the
                model takes no adapter files (a merged or per-row export).
        """
        if self._per_row:
            raise AdapterFileError(
                f"{self.path.name} is a per-row export: its adapters are constants of the graph "
                f"({', '.join(self.row_adapters)}); adapter files need an export with mode='adapters'"
            )
        if not self._slots:
            raise AdapterFileError(
                f"{self.path.name} has no adapter inputs (a merged export?); export the adapted "
                "graph with lfx.export_onnx(gm, path) to swap adapters"
            )
        check_adapter_file(path, self._slots)
        ort = load_ort()
        adapter = ort.LoraAdapter()
        try:
            adapter.Load(str(path))
        except Exception as err:  # ORT's own exception types; the file passed the check above
            raise AdapterFileError(f"ONNX Runtime cannot load the adapter file {str(path)!r} ({err}); it may "
                                   "be corrupt: write it again (lfx.export_onnx_adapter)") from None
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        self._loaded[name] = (adapter, options)

    def _unknown(self, name) -> AdapterFileError:
        known = self.adapters
        hint = nearest(str(name), known, n=1)
        return AdapterFileError(
            f"unknown adapter {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
            + f" This session has: {', '.join(known) if known else 'no adapters'}."
            + ("" if self._per_row else " Load more with session.add_adapter(name, path).")
        )

    def _feeds(self, inputs) -> dict[str, np.ndarray]:
        args = [i for i in self.session.get_inputs() if i.name != IDS]
        extra = "the adapter of each row is given by rows=[...]" if self._per_row else ""
        return check_feeds(self.path.name, args, inputs, extra)

    def _row_ids(self, rows: Sequence[str | None]) -> np.ndarray:
        ids = []
        for name in rows:
            if name is not None and name not in self.row_adapters:
                raise self._unknown(name)
            ids.append(NONE_ID if name is None else self.row_adapters.index(name))
        return np.asarray(ids, dtype=np.int64)

    def run_options(self, adapter: str | None) -> Any:
        """The RunOptions that make `adapter` active, for callers that run `self.session` themselves.

        Args:
            adapter: a loaded adapter's name, or None for the base model.

        Returns:
            An `onnxruntime.RunOptions` with the adapter active, or None for the base model.

        Raises:
            AdapterFileError: an unknown name (with a did-you-mean), or a per-row export.
        """
        if adapter is None:
            return None
        if self._per_row:
            raise AdapterFileError(
                f"{self.path.name} is a per-row export: pick adapters per row (row_ids) rather than per run"
            )
        if adapter not in self._loaded:
            raise self._unknown(adapter)
        return self._loaded[adapter][1]

    def row_ids(self, rows: Sequence[str | None]) -> np.ndarray:
        """The `adapter_ids` input of a per-row export for one adapter name (or None) per row.

        Args:
            rows: one adapter name, or None for the base model, per batch row.

        Returns:
            (batch,) int64: each row's adapter id, -1 for none.

        Raises:
            AdapterFileError: this is not a per-row export, or a name is unknown.
        """
        if not self._per_row:
            raise AdapterFileError(f"{self.path.name} is not a per-row export; it has no adapter_ids input")
        return self._row_ids(rows)

    @api_options(positional=2)
    def run(self, inputs: Mapping[str, Any], *, adapter: str | None = None,
            rows: Sequence[str | None] | None = None) -> dict[str, np.ndarray]:
        """Run the model on `inputs` with one adapter, or one adapter per row.

        Args:
            inputs: {input name: array or tensor} for the model's inputs (`input_names`).
            adapter: the adapter for the whole batch; None (the default) runs the base model,
                with no adapter. A session has no active adapter: each run names its own.
            rows: for a per-row export, one adapter name (or None) per batch row, instead of `adapter`.

        Returns:
            {output name: array} for every output of the model.

        Raises:
            AdapterFileError: an unknown adapter, or `rows` with an export that is not per-row.
            InputError: missing, unknown or ill-shaped inputs, or `rows` of the wrong length.
        """
        feeds = self._feeds(inputs)
        if self._per_row:
            batch = len(next(iter(feeds.values())))
            if rows is None:
                rows = [adapter] * batch
            elif len(rows) != batch:
                raise InputError(f"rows has {len(rows)} entries for a batch of {batch}; give one adapter name (or "
                                 "None) per row")
            feeds[IDS] = self._row_ids(rows)
            options = None
        elif rows is not None:
            raise AdapterFileError(
                f"{self.path.name} is not a per-row export; export with mode='per_row' to give "
                "each row its own adapter, or pass adapter=<name> for the whole batch"
            )
        elif adapter is None:
            options = None
        elif adapter in self._loaded:
            options = self._loaded[adapter][1]
        else:
            raise self._unknown(adapter)
        try:
            results = self.session.run(self.output_names, feeds, options)
        except Exception as err:  # ORT's own exception types: sizes that do not fit the graph, ...
            shapes = ", ".join(f"{name} {list(array.shape)}" for name, array in feeds.items())
            raise InputError(f"ONNX Runtime could not run {self.path.name} on inputs {shapes}: "
                             f"{' '.join(str(err).split())[:300]}; "
                             f"{described(self.path.name, self.session.get_inputs())}") from None
        return dict(zip(self.output_names, results))
