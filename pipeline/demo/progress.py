"""Keeping the demo's terminal readable while `pomvid train` runs: its output goes to a log file, and a
thread prints one progress line at a time from the steps.jsonl the trainer appends to."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

_console = None  # a copy of the terminal's stdout, valid while redirect_output is active


def console_print(text: str) -> None:
    """Print to the terminal, also while redirect_output sends fd 1 to a file."""
    if _console is not None:
        _console.write(text + "\n")
        _console.flush()
    else:
        print(text, flush=True)


@contextmanager
def redirect_output(path: Path):
    """Send this process's stdout and stderr (file descriptors 1 and 2, so child processes such as the
    deepspeed launcher too) to `path` (appended), and restore them after."""
    global _console
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _console = os.fdopen(os.dup(saved[0]), "w")
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)
        _console.close()
        _console = None


def _last_record(path: Path) -> dict | None:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 4096))
            lines = handle.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue  # a line being written
    return None


@contextmanager
def follow_training(steps_file: Path, total: int, say, *, every: float = 20.0):
    """Print "step N/total, loss, s/step, eta" every `every` seconds while the body runs."""
    stop = threading.Event()

    def loop():
        first: tuple[float, int] | None = None
        while not stop.wait(every):
            record = _last_record(steps_file)
            if record is None:
                say("      train: starting the processes ...")
                continue
            step, now = int(record["step"]), time.time()
            first = first or (now, step)
            rate = (now - first[0]) / (step - first[1]) if step > first[1] else None
            eta = f", about {rate * (total - step) / 60:.1f} min left" if rate else ""
            pace = f", {rate:.2f} s/step" if rate else ""
            say(f"      train: step {step}/{total}, loss {record['loss']:.4f}{pace}{eta}")

    thread = threading.Thread(target=loop, name="demo-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
