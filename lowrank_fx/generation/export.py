"""`lfx.export_generation(model, adapters, directory)`: a KV-cache ONNX decoder plus adapter files.

    export = lfx.export_generation(model, {"a": gm_a, "b": "b.safetensors"}, "out/")
    # out/model.onnx             the decoder, adapters as swappable inputs (export_onnx mode "adapters")
    # out/a.onnx_adapter, ...    one ONNX Runtime adapter file per adapter
    # out/genai_config.json      for onnxruntime-genai (genai_config.py)
    # out/model.lowrank_fx.json  the sidecar: which adapter files belong to the model
    # out/per_row/               with per_row=True: every adapter as constants, an `adapter_ids` input

`model` is the original Hugging Face decoder. `adapters`: a graph from `lfx.rewrite` (all
its adapters), an adapter file written by `lfx.save_adapters` (all of its adapters), or
{name: graph or file} (the graph's or file's adapter called `name`, else its only one).

The base is captured and exported ONCE: the decode graph (decode_graph.py) takes the first
adapter's layout for its ONNX inputs, and every adapter must share that layout (same
targets and method settings; ranks and alpha may differ), else ExportError says which one
to export on its own. Each adapter file is then written from the trained graph's own tensors
under the decoder graph's input names (target-based, so the same names in both captures):
no second training, no second export. Adapter files are loaded into a capture of `model`
and checked against it first (lfx.load_adapters). `dtype` exports the base in another
dtype (a copy of the model is cast; adapters stay float32). A model whose weights differ
from a training graph's base (an adapter merged into it with lfx.load_merged) is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim

from ..deprecation import api_options
from ..errors import ExportError, SpecError
from ..export.manifest import read_manifest, write_manifest
from ..export.onnx import export_onnx
from ..files.adapter_file import load_adapters
from ..files.atomic import check_writable
from ..graph.record import Record
from ..graph.targets import find_targets
from ..progress import stage
from .decode_graph import EXAMPLES, LAYOUT, decode_graph, share_adapters
from .decoder import check_onnx_decoder
from .genai_config import CONFIG, MODEL, PER_ROW, check_token_ids, genai_config, token_ids
from .session import GenerationSession

SUFFIX = ".onnx_adapter"


AdapterSource = fx.GraphModule | str | os.PathLike  # a graph from lfx.rewrite, or an adapter file


@dataclasses.dataclass
class GenerationExport:
    """What `export_generation` wrote.

    Args:
        directory: the generation directory.
        model: the decoder, `model.onnx`.
        adapters: adapter name -> its .onnx_adapter file.
        config: `genai_config.json`.
        tokenizer: the tokenizer files copied or saved (empty without a tokenizer).
        per_row: `per_row/model.onnx` with per_row=True, else None.
        files: every file written.
    """

    directory: Path
    model: Path
    adapters: dict[str, Path]
    config: Path
    tokenizer: list[Path]
    per_row: Path | None
    files: list[Path]

    def session(self, *, providers: Sequence[str] | None = None, session_options: Any = None,
                adapters: Mapping[str, str | os.PathLike] | None = None) -> GenerationSession:
        """A GenerationSession over this directory.

        Args:
            providers: ONNX Runtime execution providers (default: CUDA when available, else CPU).
            session_options: an `onnxruntime.SessionOptions` (thread counts, ...).
            adapters: extra {name: .onnx_adapter file} to load besides the export's own.

        Returns:
            A `GenerationSession` over `directory`.

        Raises:
            ExportError: the directory is damaged or ONNX Runtime cannot load the model.
            AdapterFileError: an adapter file does not fit the model, or onnxruntime is not installed.
        """
        return GenerationSession(self.directory, providers=providers, session_options=session_options,
                                 adapters=adapters)


def _examples(model: nn.Module, example_inputs) -> dict:
    """Training-capture examples (use_cache=False) from example_inputs (input ids) or random ids."""
    if example_inputs is None:
        vocab = int(getattr(model.config, "vocab_size", 2) or 2)
        device = next(model.parameters()).device
        ids = torch.randint(0, vocab, (2, 4), generator=torch.Generator().manual_seed(0)).to(device)
    elif isinstance(example_inputs, torch.Tensor):
        ids = example_inputs
    elif isinstance(example_inputs, dict):
        return {**example_inputs, "use_cache": False}
    else:
        ids = example_inputs[0]
    return {"input_ids": ids, "use_cache": False}


def _one(names: list[str], wanted: str, where: str) -> str:
    if wanted in names:
        return wanted
    if len(names) == 1:
        return names[0]
    raise ExportError(f"{where} holds adapters {names}; name one of them as the key, e.g. {{{names[0]!r}: ...}}")


def _sources(model: nn.Module, adapters, examples: dict) -> list[tuple[str, fx.GraphModule, str]]:
    """(name, source graph, adapter name in it) for every adapter to export."""
    loaded: dict[str, fx.GraphModule] = {}

    def graph_of(value, key: str | None) -> fx.GraphModule:
        if isinstance(value, fx.GraphModule):
            if Record.find(value) is None or not Record.find(value).adapters:
                raise ExportError(f"{key or 'the graph'} has no adapters; pass a graph from lfx.rewrite or an adapter "
                                  "file")
            return value
        if isinstance(value, (str, os.PathLike)):
            path = str(Path(value).resolve())
            if path not in loaded:
                loaded[path] = load_adapters(model, value, example_kwargs=examples)
            return loaded[path]
        raise ExportError(
            f"adapters{f'[{key!r}]' if key else ''} must be a graph from lfx.rewrite or an adapter file path, "
            f"got {type(value).__name__}"
        )

    if isinstance(adapters, dict):
        if not adapters:
            raise ExportError("adapters={} names no adapter; give at least one")
        out = []
        for name, value in adapters.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ExportError(f"adapter names must be identifiers (they name files), got {name!r}")
            gm = graph_of(value, name)
            known = list(Record.require(gm, "lfx.export_generation").adapters)
            out.append((name, gm, _one(known, name, f"adapters[{name!r}]")))
        return out
    gm = graph_of(adapters, None)
    return [(name, gm, name) for name in Record.require(gm, "lfx.export_generation").adapters]


def _check_base(decode: fx.GraphModule, sources) -> None:
    """Refuse a model whose adapted weights are not the training graphs' base weights."""
    targets = find_targets(decode, Record.require(decode, "lfx.export_generation").aliases)
    for name, gm, source_name in sources:
        for target in Record.require(gm, "lfx.export_generation").adapters[source_name].groups:
            weight = targets[target].weight
            mine, theirs = decode.get_parameter(weight), gm.get_parameter(weight)
            if mine is theirs:
                continue
            if mine.shape != theirs.shape or not torch.equal(theirs.detach().to(mine.dtype).cpu(), mine.detach().cpu()):
                raise ExportError(
                    f"the model's {weight} differs from the base weight adapter {name!r} was trained on: was an "
                    "adapter merged into this model (lfx.load_merged)? Pass the original model."
                )


def _dynamic(examples: dict) -> dict:
    """Batch, sequence and past dynamic; kv heads and head size fixed (genai reads them from its config)."""
    shapes = {"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}, "attention_mask": {0: Dim.AUTO, 1: Dim.AUTO},
              "position_ids": {0: Dim.AUTO, 1: Dim.AUTO}}
    for i in range(len(examples["past_key_values"])):
        for part in ("key", "value"):
            shapes[f"past_key_values.{i}.{part}"] = {0: Dim.AUTO, 2: Dim.AUTO}
    return shapes


def _tokenizer_files(tokenizer, directory: Path) -> list[Path]:
    if tokenizer is None:
        return []
    if hasattr(tokenizer, "save_pretrained"):
        before = set(directory.iterdir())
        written = tokenizer.save_pretrained(str(directory))
        files = [Path(f) for f in written] if written else sorted(set(directory.iterdir()) - before)
        return [f for f in files if f.exists()]
    path = Path(tokenizer)
    if path.is_dir():
        files = [f for f in sorted(path.iterdir())
                 if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens"))
                                     or f.suffix in (".model", ".tiktoken")
                                     or f.name in ("vocab.json", "merges.txt"))]
        if not files:
            raise ExportError(f"tokenizer directory {path} holds no tokenizer files (tokenizer.json, "
                              "tokenizer_config.json, ...)")
    elif path.is_file():
        files = [path]
    else:
        raise ExportError(f"tokenizer {str(tokenizer)!r} is neither a tokenizer object, a directory nor a file")
    copied = []
    for file in files:
        target = directory / file.name
        if file.resolve() != target.resolve():
            shutil.copyfile(file, target)
        copied.append(target)
    return copied


@stage("exporting the KV-cache decoder")
def _export(decode, path: Path, names: list[str], mode: str, optimize: bool):
    examples = decode.meta[EXAMPLES]
    return export_onnx(decode, path, example_kwargs=examples, mode=mode, adapters=names,
                       dynamic_shapes=_dynamic(examples), optimize=optimize)


@api_options(positional=3)
def export_generation(model: nn.Module, adapters: AdapterSource | Mapping[str, AdapterSource],
                      directory: str | os.PathLike, *, example_inputs: torch.Tensor | tuple[Any, ...] | None = None,
                      dtype: torch.dtype | None = None, tokenizer: Any = None, per_row: bool = False,
                      optimize: bool = True) -> GenerationExport:
    """Write a generation directory for ONNX Runtime and onnxruntime-genai (see the module docstring).

    Args:
        model: the original Hugging Face decoder (not a graph, and with no adapter merged in).
        adapters: the adapters to export, each under its name: a graph from `lfx.rewrite`
            (all its adapters), an adapter file from `lfx.save_adapters` (all of its
            adapters), or {name: graph or file} (the graph's or file's adapter called `name`,
            else its only one).
        directory: the folder to write; created if missing.
        example_inputs: example input ids for loading adapter files (default: random ids).
        dtype: export the base in this floating dtype (torch.float16, ...); adapters stay float32.
        tokenizer: a transformers tokenizer (saved with save_pretrained), or a tokenizer file
            or directory (copied).
        per_row: also write per_row/ (rows=[...] in GenerationSession, `adapter_ids` in genai).
        optimize: clean up the exported graphs (export/optimize.py: weight transposes and small
            constants folded, common subexpressions merged; cost linear in the graph's size).

    Returns:
        A `GenerationExport` listing the model, adapter files, config and every file written.

    Raises:
        ExportError: the adapters cannot share the decoder's layout, a source has no
            adapters, the model's base differs from the adapters' base, `directory` is a
            file, or the export fails.
        ModelTypeError: `model` is not a causal LM that can be exported with a KV cache.
        SpecError: `dtype` is not a floating torch.dtype.
        AdapterFileError: an adapter file cannot be loaded into `model`.
        FileWriteError: `directory` cannot be written.
    """
    check_onnx_decoder(model)
    config = model.config
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    check_token_ids(token_ids(text_config, getattr(model, "generation_config", None)), int(text_config.vocab_size))
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"{directory} is a file; give a directory to write the generation export into")
    check_writable(directory, directory)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise SpecError(f"export_generation dtype must be a floating torch.dtype such as torch.float16, got {dtype!r}")
    if dtype is not None and dtype != next(model.parameters()).dtype:
        model = copy.deepcopy(model).to(dtype)
    examples = _examples(model, example_inputs)
    sources = _sources(model, adapters, examples)
    decode = decode_graph(model)
    config = genai_config(model, decode.meta[LAYOUT], MODEL)
    share_adapters(decode, sources)
    _check_base(decode, sources)
    names = [name for name, _, _ in sources]
    directory.mkdir(parents=True, exist_ok=True)
    result = _export(decode, directory / MODEL, names, "adapters", optimize)
    files = [f for f in result.files if f.suffix != SUFFIX]
    adapter_files = {}
    for name, written in result.adapters.items():  # model.<name>.onnx_adapter -> <name>.onnx_adapter
        target = directory / f"{name}{SUFFIX}"
        os.replace(written, target)
        adapter_files[name] = target
    sidecar = read_manifest(result.path)
    sidecar["adapters"] = {name: file.name for name, file in adapter_files.items()}
    sidecar["generation"] = {"config": CONFIG, "per_row": f"{PER_ROW}/{MODEL}" if per_row else None}
    write_manifest(result.path, sidecar)
    config_path = directory / CONFIG
    config_path.write_text(json.dumps(config, indent=1) + "\n")
    token_files = _tokenizer_files(tokenizer, directory)
    per_row_path = None
    if per_row:
        rows = _export(decode, directory / PER_ROW / MODEL, names, "per_row", optimize)
        (directory / PER_ROW / CONFIG).write_text(json.dumps(config, indent=1) + "\n")
        per_row_path = rows.path
        files += [*rows.files, directory / PER_ROW / CONFIG]
        files += _tokenizer_files(tokenizer, directory / PER_ROW) if tokenizer is not None else []
    files = files + list(adapter_files.values()) + [config_path] + token_files
    return GenerationExport(directory, result.path, adapter_files, config_path, token_files, per_row_path, files)
