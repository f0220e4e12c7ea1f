"""Progress (lowrank_fx/progress.py): a start and an end line per slow stage on the "lowrank_fx"
logger, silenced by LOWRANK_FX_QUIET=1 or the logger's level; stderr only when the user has not
configured logging."""

from __future__ import annotations

import logging

import pytest
import torch

from lowrank_fx import logs, progress
from lowrank_fx.adapt.capture import capture


def _capture_tiny():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    return capture(model, (torch.randn(2, 4),))


@pytest.fixture
def loud(monkeypatch):
    monkeypatch.delenv(logs.QUIET, raising=False)
    yield
    logs.configure()  # the suite's own setup again: no default handler left behind


def test_a_capture_logs_its_stage_with_the_seconds_taken(loud, caplog):
    caplog.set_level(logging.INFO, logger="lowrank_fx")
    _capture_tiny()
    lines = [r.getMessage() for r in caplog.records if r.name == "lowrank_fx"]
    assert lines[0] == "capturing the model (torch.export) ..."
    assert lines[1].startswith("capturing the model (torch.export): done in ") and lines[1].endswith(" s")


def test_without_logging_configured_the_lines_go_to_stderr(loud, monkeypatch, capfd):
    with monkeypatch.context() as patched:
        patched.setattr(logging.getLogger(), "handlers", [])
        _capture_tiny()
    err = capfd.readouterr().err
    assert "lowrank_fx: capturing the model (torch.export) ...\n" in err
    assert "lowrank_fx: capturing the model (torch.export): done in " in err


def test_quiet_silences_every_line_and_bar(monkeypatch, capfd, caplog):
    monkeypatch.setenv(logs.QUIET, "1")
    caplog.set_level(logging.INFO, logger="lowrank_fx")
    with monkeypatch.context() as patched:
        patched.setattr(logging.getLogger(), "handlers", [])  # where a default handler would go
        _capture_tiny()
        items = range(100)
        assert progress.steps(items, "layers", 100) is items
    assert "lowrank_fx" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.name == "lowrank_fx"]


def test_the_logger_level_silences_lines_and_bars(loud, caplog):
    caplog.set_level(logging.WARNING, logger="lowrank_fx")
    _capture_tiny()
    items = range(100)
    assert progress.steps(items, "layers", 100) is items
    assert not [r for r in caplog.records if r.name == "lowrank_fx"]


def test_a_shown_loop_gets_a_delayed_bar_and_a_failed_stage_says_so(loud, caplog):
    caplog.set_level(logging.INFO, logger="lowrank_fx")
    bar = progress.steps(range(3), "layers", 3)
    assert list(bar) == [0, 1, 2] and bar.delay == progress.BAR_DELAY  # tiny loops end before it shows
    with pytest.raises(KeyError), progress.stage("reading"):
        raise KeyError("x")
    assert caplog.records[-1].getMessage().startswith("reading: failed after ")
