"""The trainer's fault-injection point (pipeline/train/faults.py): off unless asked, pauses the named rank
inside the named step once per folder, and explains a malformed setting."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from pipeline.train.faults import PAUSE_ENV, parse_pause, pause_point


def test_pause_holds_the_named_rank_once_until_released(tmp_path, monkeypatch):
    monkeypatch.setenv(PAUSE_ENV, f"1:3,5:{tmp_path}")
    pause_point(3, rank=0)  # another rank: no pause
    pause_point(4, rank=1)  # another step: no pause
    assert list(tmp_path.iterdir()) == []
    paused = threading.Thread(target=pause_point, args=(3, 1))
    paused.start()
    while not (tmp_path / "reached_step_3").exists():
        time.sleep(0.01)
    assert int((tmp_path / "reached_step_3").read_text()) == os.getpid()
    assert paused.is_alive()  # held inside the step until the test lets it go
    (tmp_path / "release_step_3").touch()
    paused.join(timeout=5)
    assert not paused.is_alive()
    (tmp_path / "release_step_3").unlink()
    pause_point(3, rank=1)  # a restarted process runs through: once per folder


def test_a_malformed_setting_says_what_is_expected(monkeypatch):
    assert parse_pause("0:2,4:/tmp/x:y") == (0, {2, 4}, Path("/tmp/x:y"))
    monkeypatch.setenv(PAUSE_ENV, "five")
    with pytest.raises(ValueError, match="expected RANK:STEP"):
        pause_point(1, rank=0)
    monkeypatch.delenv(PAUSE_ENV)
    pause_point(1, rank=0)  # unset: nothing happens
