"""Where the command line gets models and training data from (all offline).

A model source is one of:
  - a built-in name (`tiny-llama`, `tiny-gpt2`, `tiny-bert`): small configs, random weights;
  - `pkg.module:factory`: an importable callable returning a model, `(model, args)` or
    `(model, args, kwargs)` with example inputs;
  - a local transformers model directory (config.json, with weights if present, else random
    weights) or a config.json file. Example inputs are made from the config.
A data source is a text file (one training text per line, for causal language models) or
`pkg.module:batches`, a callable returning an iterable of keyword-argument dicts for the
model whose output has a `.loss`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
from pathlib import Path
from typing import Any

import torch

from ..errors import LowRankFxError
from .builtin_models import BUILTIN, builtin

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclasses.dataclass
class _Source:
    model: Any  # a torch.nn.Module; a transformers model has a config
    example_inputs: tuple | None  # None when a --model factory returned only a model
    example_kwargs: dict | None
    tokenizer: Any = None  # a transformers tokenizer when the directory has one


def _import(path: str):
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise LowRankFxError(f"cannot import {module_name!r} from {path!r}: {err}") from None
    if not hasattr(module, attr):
        raise LowRankFxError(f"{module_name} has no attribute {attr!r} (from {path!r})")
    return getattr(module, attr)


def _call(path: str):
    """Call the callable `path` names with no arguments (what a factory must accept)."""
    factory = _import(path)
    if not callable(factory):
        raise LowRankFxError(f"{path} is a {type(factory).__name__}, not a callable; name a function that takes no "
                             "arguments")
    try:
        inspect.signature(factory).bind()
    except TypeError as err:
        raise LowRankFxError(
            f"{path} cannot be called without arguments ({err}); name a function that takes none") from None
    except ValueError:  # builtins without a signature: let the call itself tell
        pass
    return factory()


def _from_factory(path: str) -> _Source:
    made = _call(path)
    if isinstance(made, torch.nn.Module):
        return _Source(made, None, None)
    if isinstance(made, tuple) and made and isinstance(made[0], torch.nn.Module):
        args = made[1] if len(made) > 1 else None
        return _Source(made[0], tuple(args) if args is not None else None, dict(made[2]) if len(made) > 2 else {})
    raise LowRankFxError(f"{path} returned {type(made).__name__}; return a model, (model, args) or (model, args, "
                         "kwargs)")


def _example_from_config(model: Any) -> tuple[tuple, dict]:
    """Example inputs for a transformers model, made from its config (batch 2)."""
    config = model.config
    parameters = inspect.signature(model.forward).parameters
    if "pixel_values" in parameters:
        size = getattr(config, "image_size", 224)
        return (torch.randn(2, getattr(config, "num_channels", 3), size, size),), {}
    args = (torch.randint(0, config.vocab_size, (2, 16)),)
    kwargs: dict[str, Any] = {}
    if getattr(config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = torch.randint(0, config.vocab_size, (2, 8))
    if "use_cache" in parameters:
        kwargs["use_cache"] = False
    return args, kwargs


def _from_transformers(path: Path) -> _Source:
    try:
        import transformers
    except ImportError:
        raise LowRankFxError("loading a transformers model needs transformers: pip install transformers") from None
    config_file = path / "config.json" if path.is_dir() else path
    try:
        config_data = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LowRankFxError(f"cannot read the model config {config_file}: {err}") from None
    architecture = (config_data.get("architectures") or ["AutoModel"])[0]
    model_class = getattr(transformers, architecture, transformers.AutoModel)
    try:
        config = transformers.AutoConfig.from_pretrained(str(config_file.parent if not path.is_dir() else path),
                                                         local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise LowRankFxError(f"{config_file} is not a transformers config transformers can read: {err}") from None
    has_weights = path.is_dir() and any((path / name).exists() for name in WEIGHT_FILES)
    if has_weights:
        model = model_class.from_pretrained(str(path), local_files_only=True)
    else:
        model = model_class._from_config(config) if hasattr(model_class, "_from_config") else model_class(config)
    tokenizer = None
    if path.is_dir() and any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model.eval()
    args, kwargs = _example_from_config(model)
    return _Source(model, args, kwargs, tokenizer)


def load_model(source: str) -> _Source:
    """Resolve a model source string (see the module docstring)."""
    if source in BUILTIN:
        built = builtin(source)
        return _Source(built.model, built.example_inputs, built.example_kwargs)
    path = Path(source)
    if path.exists():
        return _from_transformers(path)
    if ":" in source:
        return _from_factory(source)
    raise LowRankFxError(
        f"model {source!r} is not a built-in ({', '.join(BUILTIN)}), an existing directory or config file, "
        "nor an import path like 'mypkg.models:build'"
    )


def text_batches(path: str, source: _Source, batch_size: int, seq_len: int, seed: int = 0):
    """Endless causal-LM batches {input_ids} from a text file, one text per line.

    Texts are tokenized with the model's tokenizer, or as UTF-8 bytes modulo the vocabulary
    size when the model has none (built-in and config-only models).
    """
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise LowRankFxError(f"cannot read training text {path}: {err}") from None
    if not lines:
        raise LowRankFxError(f"{path} has no non-empty lines to train on")
    vocab = source.model.config.vocab_size
    if source.tokenizer is not None:
        stream = [t for line in lines for t in source.tokenizer(line)["input_ids"]]
    else:
        stream = [b % vocab for line in lines for b in (line + "\n").encode("utf-8")]
    tokens = torch.tensor(stream)
    if len(tokens) <= seq_len:
        tokens = tokens.repeat(seq_len // len(tokens) + 2)
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)
        yield {"input_ids": torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])}


def factory_batches(path: str):
    batches = _call(path)
    try:
        return iter(batches)
    except TypeError:
        raise LowRankFxError(f"{path} returned {type(batches).__name__}, not an iterable of batches") from None
