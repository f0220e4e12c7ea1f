"""Adapter files: `save_adapters(gm, path)` and `load_adapters(gm, path)`.

Format, version 1: ONE safetensors file (suggested suffix `.safetensors`).
  - Tensors: each saved adapter's parameters and persistent buffers, named
    `<adapter>.<name inside gm.lowrank_fx[adapter]>`, for example
    `default.lora.units.model-layers-0-self_attn-q_proj.lora_A`. Non-persistent buffers
    (tensors a method regenerates, such as random bases rebuilt from a seed) are left out
    unless `include_buffers=True`, or unless they differ from what the stored spec
    regenerates (RandLoRA bases imported from PEFT): leaving those out would change the model.
  - Header metadata `"lowrank_fx"`: the manifest, a JSON object
        {"format": "lowrank_fx.adapters", "version": 1, "lowrank_fx": "<library version>",
         "checksum": "sha256:<hex>",      # over every tensor's name, dtype, shape and bytes
         "adapters": {"<adapter>": {
             "spec": {"rules": [{"pattern": "*.q_proj", "method": {"method": "lora", "rank": 8, ...}}],
                      "exclude": []},
             "targets": {"<target name>": [out, in]},   # the base weights it adapts
             "fingerprint": "sha256:<hex>"}},           # of those names and shapes
         "manifest_checksum": "sha256:<hex>"}   # over the rest of the manifest (compact JSON, sorted keys)
The two checksums together cover every byte that matters: a damaged file is refused rather than
loaded with other values (an alpha or a pattern changed by one bit). A file without
"manifest_checksum" (from an older lowrank_fx) is read with its tensor checksum only.
One file rather than a tensors-plus-JSON pair: a save is then a single atomic rename (a
crash leaves the old file whole), and a manifest can never be paired with another save's
tensors. `safe_open(path).metadata()["lowrank_fx"]` or `read_manifest(path)` shows it.

Reading uses safetensors and json only: nothing is unpickled and no code runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import fx, nn

from ..adapt.capture import capture
from ..adapt.hotswap import slot_scales
from ..adapt.rewrite import resolve
from ..deprecation import api_options
from ..errors import AdapterFileError, SpecError
from ..graph.dtensors import whole, writes_files
from ..graph.record import CONTAINER, Record, require_graph
from ..graph.targets import find_targets
from ..options import flag
from ..passes.inject import build_groups
from ..passes.layers import flat_view
from ..version import __version__
from .atomic import write_atomic
from .into_graph import install, place
from .serial import fingerprint, spec_from_json, spec_to_json

FORMAT = "lowrank_fx.adapters"
VERSION = 1
MANIFEST_KEY = "lowrank_fx"


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def _manifest_checksum(manifest: dict) -> str:
    rest = {key: value for key, value in manifest.items() if key != "manifest_checksum"}
    return "sha256:" + hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _chosen(names, adapters: str | Sequence[str] | None, where: str) -> list[str]:
    """The adapters of `names` that `adapters` selects (None: all of them), in `names`' order."""
    names = list(names)
    if adapters is None:
        return names
    wanted = [adapters] if isinstance(adapters, str) else list(adapters)
    if not wanted or not all(isinstance(name, str) for name in wanted):
        raise AdapterFileError(f"adapters= must be an adapter name, a non-empty list of names, or None for all; "
                               f"got {adapters!r}")
    missing = [name for name in wanted if name not in names]
    if missing:
        raise AdapterFileError(f"{where} has no adapter {', '.join(map(repr, missing))}; "
                               f"it has: {', '.join(names) or 'none'}")
    return [name for name in names if name in wanted]


def _buffers_to_keep(gm: fx.GraphModule, adapter: str, include_buffers: bool) -> dict[str, torch.Tensor]:
    """Non-persistent buffers to store: all of them if asked, else those the spec would not regenerate."""
    module = getattr(gm, CONTAINER)[adapter]
    persistent = module.state_dict()
    scales = slot_scales(module)
    buffers = {key: buf for key, buf in module.named_buffers() if key not in persistent and key not in scales}
    if include_buffers or not buffers:
        return buffers
    targets, assignment = resolve(gm, Record.require(gm, "lfx.save_adapters").adapters[adapter].spec)
    with torch.random.fork_rng(devices=[]):
        regenerated = dict(nn.ModuleDict(build_groups(assignment, targets)[0]).named_buffers())
    return {key: buf for key, buf in buffers.items()
            if key not in regenerated or not torch.equal(regenerated[key].to(buf.device), buf)}


@api_options(positional=2, renamed={"adapter": "adapters"})
def save_adapters(gm: fx.GraphModule, path: str | os.PathLike, *, adapters: str | Sequence[str] | None = None,
                  include_buffers: bool = False) -> Path:
    """Save adapters of `gm` to the file `path` (format: this module's docstring).

    The write is atomic: `path` keeps its previous content if the save fails midway.
    A graph sharded by FSDP2 is gathered: every rank calls this, rank 0 writes.

    Args:
        gm: a graph from `lfx.rewrite` (or `lfx.load_adapters` / `lfx.load_peft`) with adapters.
        path: the file to write, a `.safetensors` name by convention.
        adapters: which adapters to save: a name, a list of names, or None (the default) for
            every adapter of the graph. Replaces `adapter=`, which is still accepted for one release.
        include_buffers: also store non-persistent buffers, which methods otherwise
            regenerate (RandLoRA's seeded random bases); buffers that differ from what the
            method regenerates are always stored.

    Returns:
        The path written (on FSDP2 ranks other than 0, the path rank 0 writes).

    Raises:
        AdapterFileError: the graph has no adapters, `adapters` names one it lacks, or `path` is a folder.
        FileWriteError: the file cannot be written (a read-only folder, a full disk).
        SpecError: `path` is not a path, or `include_buffers` is not a bool.
        ModelTypeError: `gm` is not a lowrank_fx graph.
    """
    require_graph(gm, "lfx.save_adapters")
    flag("lfx.save_adapters", "include_buffers", include_buffers)
    if not isinstance(path, (str, os.PathLike)):
        raise SpecError(f"lfx.save_adapters needs a file path (a str or pathlib.Path), got {path!r}; "
                        "e.g. lfx.save_adapters(gm, 'adapters.safetensors')")
    with whole(getattr(gm, CONTAINER, nn.Module())) as sharded:  # FSDP2: the adapters only, not the base
        data, path = _serialised(flat_view(gm), path, adapters, include_buffers)  # blocks: the flat names
    return write_atomic(path, data) if writes_files(sharded) else path


def _serialised(gm: fx.GraphModule, path, adapters: str | Sequence[str] | None,
                include_buffers: bool) -> tuple[bytes, Path]:
    record = Record.find(gm)
    if record is None or not record.adapters:
        raise AdapterFileError("this graph has no adapters to save; add one with lfx.rewrite(model, spec, ...) first")
    path = Path(path)
    if path.is_dir():
        raise AdapterFileError(f"{path} is a directory; give a file name, e.g. {path / 'adapters.safetensors'}")
    graph_targets = find_targets(gm, record.aliases)
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for name in _chosen(record.adapters, adapters, "this graph"):
        state = {**getattr(gm, CONTAINER)[name].state_dict(), **_buffers_to_keep(gm, name, include_buffers)}
        tensors.update((f"{name}.{key}", value.detach().cpu().contiguous().clone()) for key, value in state.items())
        shapes = {target: graph_targets[target].shape for target in record.adapters[name].groups}
        entries[name] = {
            "spec": spec_to_json(record.adapters[name].spec),
            "targets": {target: list(shape) for target, shape in shapes.items()},
            "fingerprint": fingerprint(shapes),
        }
    manifest = {"format": FORMAT, "version": VERSION, "lowrank_fx": __version__,
                "checksum": _checksum(tensors), "adapters": entries}
    manifest["manifest_checksum"] = _manifest_checksum(manifest)
    return safetensors.torch.save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest), "format": "pt"}), path


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if path.is_dir():
        hint = ("; it looks like a PEFT adapter directory: use lfx.load_peft(model, directory, ...)"
                if (path / "adapter_config.json").exists() else "")
        raise AdapterFileError(f"{path} is a directory, not a lowrank_fx adapter file{hint}")
    if not path.exists():
        raise AdapterFileError(f"adapter file {path} does not exist")
    try:
        with safetensors.safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except safetensors.SafetensorError as err:
        raise AdapterFileError(
            f"{path} is not a complete safetensors file ({err}); it may be truncated or corrupt. "
            "Save the adapters again (saves are atomic, so the last complete save is intact)."
        ) from None
    if MANIFEST_KEY not in metadata:
        raise AdapterFileError(
            f"{path} is a safetensors file without a lowrank_fx manifest, so not a lowrank_fx adapter "
            "file (a PEFT adapter? use lfx.load_peft(model, directory, ...))"
        )
    try:
        manifest = json.loads(metadata[MANIFEST_KEY])
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"the manifest in {path} is not valid JSON ({err}); the file is corrupt") from None
    _check_manifest(path, manifest, tensors)
    return manifest, tensors


def _check_manifest(path: Path, manifest, tensors: dict[str, torch.Tensor]) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise AdapterFileError(f"{path} has a manifest that is not a {FORMAT} manifest")
    if "manifest_checksum" in manifest and manifest["manifest_checksum"] != _manifest_checksum(manifest):
        raise AdapterFileError(f"{path} fails its manifest checksum: its spec or settings are corrupt; "
                               "save the adapters again")
    version = manifest.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise AdapterFileError(
            f"{path} is format version {version!r}; this lowrank_fx reads versions up to {VERSION}: upgrade lowrank_fx"
        )
    adapters = manifest.get("adapters")
    if not isinstance(adapters, dict) or not all(
        isinstance(entry, dict) and isinstance(entry.get("targets"), dict) and "spec" in entry
        for entry in adapters.values()
    ):
        raise AdapterFileError(f"{path} has a malformed manifest: 'adapters' must map names to spec and targets")
    stray = [key for key in tensors if key.split(".", 1)[0] not in adapters]
    if stray:
        raise AdapterFileError(f"{path} holds tensors of no adapter in its manifest: {stray[:5]}; the file is corrupt")
    if manifest.get("checksum") != _checksum(tensors):
        raise AdapterFileError(f"{path} fails its checksum: its tensor data is corrupt; save the adapters again")


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of an adapter file (after checking that the file is whole).

    Args:
        path: an adapter file written by `lfx.save_adapters`.

    Returns:
        The manifest's JSON object (this module's docstring lists its keys).

    Raises:
        AdapterFileError: the file is missing, damaged or not a lowrank_fx adapter file.
    """
    return _read(Path(path))[0]


@api_options(positional=2, renamed={"adapter": "adapters"})
def load_adapters(model: nn.Module | fx.GraphModule, path: str | os.PathLike, *,
                  adapters: str | Sequence[str] | None = None, example_inputs: tuple[Any, ...] | None = None,
                  example_kwargs: dict[str, Any] | None = None) -> fx.GraphModule:
    """Load adapters from the file `path` into `model` and return the graph that holds them.

    In place: a lowrank_fx GraphModule (from `lfx.rewrite`, or an earlier load) is changed
    and returned as it is. An adapter the graph already has keeps its modules and gets the
    file's values (its targets and method settings must agree with the file); an adapter the
    graph does not have is first added by `rewrite` with the spec stored in the file. Names,
    shapes, dtypes and the base fingerprint are all checked before anything changes: on any
    difference one AdapterFileError lists them all, and the graph is untouched. Any other
    model is captured first (pass `example_inputs` / `example_kwargs` as for `rewrite`) and
    the new graph is returned; the model itself is not changed: use the returned graph.

    Args:
        model: a GraphModule (rewritten or not), or a model to capture.
        path: an adapter file written by `lfx.save_adapters`.
        adapters: which of the file's adapters to load: a name, a list of names, or None (the
            default) for all of them. Replaces `adapter=`, which is still accepted for one release.
        example_inputs: positional example inputs for capturing a model that is not yet a graph.
        example_kwargs: keyword example inputs for the capture (decoders: {"use_cache": False}).

    Returns:
        The graph holding the loaded adapters: `model` itself when it is a lowrank_fx GraphModule.

    Raises:
        AdapterFileError: the file is missing, damaged, not a lowrank_fx adapter file, lacks a
            selected adapter, or does not fit the graph (every difference listed; nothing changed).
        CaptureError: `model` cannot be captured with the example inputs.
        ModelTypeError: `model` is not an nn.Module.
    """
    path = Path(path)
    manifest, tensors = _read(path)
    gm = capture(model, example_inputs, example_kwargs)
    items = []
    for name in _chosen(manifest["adapters"], adapters, str(path)):
        entry = manifest["adapters"][name]
        try:
            shapes = {target: (int(shape[0]), int(shape[1])) for target, shape in entry["targets"].items()}
        except (TypeError, ValueError, IndexError):
            raise AdapterFileError(f"{path}: malformed target shapes for adapter {name!r}") from None
        placement = place(flat_view(gm), name, spec_from_json(entry["spec"]), shapes, entry.get("fingerprint"))
        prefix = f"{name}."
        items.append((placement, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}))
    install(gm, items, source=f"adapters from {path}")
    return gm
