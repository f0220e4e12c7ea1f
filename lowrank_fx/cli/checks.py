"""Checks the command line makes before any work: number flags, and that outputs can be written.

An output is checked by creating (and removing) a temporary file where it will be written, or
in the nearest folder that exists above it, so a full disk, a read-only mount or a missing
permission is found before a model is loaded or a step is trained, and nothing is left behind.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from ..errors import LowRankFxError


def at_least(low: int):
    """An argparse type: an integer >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _existing_above(path: Path) -> Path:
    """The nearest existing path at or above `path`'s folder."""
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    return folder


def _probe(folder: Path, flag: str, path: Path) -> None:
    """Raise unless a file can be created in `folder`."""
    if not folder.is_dir():
        raise LowRankFxError(f"{flag} {path}: {folder} is a file, not a folder; choose another path")
    try:
        fd, temp = tempfile.mkstemp(dir=folder, prefix=".lowrank-fx-check.")
    except OSError as err:
        raise LowRankFxError(
            f"{flag} {path}: cannot write in {folder} ({err.strerror}); choose a writable place") from None
    os.close(fd)
    os.unlink(temp)


def check_output_file(path: str, example: str, flag: str = "--out") -> None:
    """Raise unless `path` names a file that can be written (its folders are created on writing).

    example: a file name to suggest when `path` is a folder."""
    file = Path(path)
    if file.is_dir():
        raise LowRankFxError(f"{flag} {file} is a folder; give a file name, e.g. {file / example}")
    _probe(_existing_above(file), flag, file)


def check_output_folder(path: str, flag: str) -> None:
    """Raise unless `path` is, or can be created as, a folder that files can be written in."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise LowRankFxError(f"{flag} {folder} is a file; give a folder to write into")
    _probe(folder if folder.is_dir() else _existing_above(folder), flag, folder)
