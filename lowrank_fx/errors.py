"""Exceptions raised by lowrank_fx. Each message says what was wrong and how to fix it."""

import difflib
from collections.abc import Iterable


class LowRankFxError(Exception):
    """Base class of every error lowrank_fx raises on purpose.

    Args:
        message: what was wrong and how to fix it (the only argument lowrank_fx passes).
    """


class SpecError(LowRankFxError, ValueError):
    """A spec or method option that cannot work: bad pattern, bad rank, unknown option.

    Args:
        message: what was wrong and how to fix it (the only argument lowrank_fx passes).
    """


class CaptureError(LowRankFxError, RuntimeError):
    """The model could not be captured as a graph.

    Args:
        message: what was wrong and how to fix it (the only argument lowrank_fx passes).
    """


class TargetError(LowRankFxError, ValueError):
    """A spec names something that is not an adaptable, linear-like weight.

    Args:
        message: what was wrong and how to fix it (the only argument lowrank_fx passes).
    """


class MergeError(LowRankFxError, ValueError):
    """Folding adapters into dense weights was refused; the input graph is unchanged.

    Args:
        message: what was wrong and how to fix it (the only argument lowrank_fx passes).
    """


class QuantizedBaseError(LowRankFxError, ValueError):
    """A quantized base that lowrank_fx cannot train or fold over (the message says why, measured).

    Args:
        message: what was wrong and how to fix it (the only argument lowrank_fx passes).
    """


class ModelTypeError(LowRankFxError, TypeError):
    """The object passed as a model is not a torch.nn.Module.

    Args:
        message: what was wrong and how to fix it (the only argument lowrank_fx passes).
    """


class AdapterFileError(LowRankFxError, ValueError):
    """An adapter file or PEFT directory that cannot be loaded (or an adapter that cannot be
    saved in a format): unreadable, from another model, or using an unsupported setting.

    Args:
        message: what was wrong and how to fix it (the only argument lowrank_fx passes).
    """


class FileWriteError(AdapterFileError, OSError):
    """A file could not be written (a read-only directory, a full disk); the message names the path.

    Args:
        message: what was wrong and how to fix it (the only argument lowrank_fx passes).
    """


class ExportError(LowRankFxError, RuntimeError):
    """ONNX export failed or was refused; the message names the node or adapter and the fix.

    Args:
        message: what was wrong and how to fix it (the only argument lowrank_fx passes).
    """


class InputError(LowRankFxError, ValueError):
    """Inputs that a model or session does not take: unknown, missing, or too many.

    Args:
        message: what was wrong and how to fix it (the only argument lowrank_fx passes).
    """


class TrainingError(LowRankFxError, RuntimeError):
    """Training stopped: a non-finite loss, or a checkpoint that cannot be resumed.

    Args:
        message: what was wrong and how to fix it (the only argument lowrank_fx passes).
    """


def nearest(word: str, choices: Iterable[str], n: int = 5) -> list[str]:
    """The `n` entries of `choices` closest to `word`, best first (for 'did you mean')."""
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=0.0)
