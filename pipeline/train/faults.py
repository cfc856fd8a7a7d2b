"""A fault-injection point inside a training step, for the tests that kill ranks and servers mid-run.

    POMVID_FAULT_PAUSE="RANK:STEP[,STEP...]:FOLDER"

When rank RANK is inside step STEP (after the forward of its first micro-batch, before the backward:
the step has started and cannot be complete), it writes FOLDER/reached_step_<STEP> (its pid) and waits
until FOLDER/release_step_<STEP> exists. The test meanwhile kills the rank (a fault in the middle of a
step, never during a checkpoint save) or does something else (kills the tracking server) and then
releases it. Each pause happens once per FOLDER: a process restarted by Ray Train or `--resume auto`
runs through the same step without stopping. Unset (always, outside tests), it costs one dict lookup.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

PAUSE_ENV = "POMVID_FAULT_PAUSE"
MAX_PAUSE_S = 900.0  # a forgotten release must not hang CI forever

log = logging.getLogger("pomvid.train")


def parse_pause(spec: str) -> tuple[int, set[int], Path]:
    """"RANK:STEP[,STEP...]:FOLDER" -> (rank, steps, folder), with an error naming the variable."""
    try:
        rank, steps, folder = spec.split(":", 2)
        return int(rank), {int(s) for s in steps.split(",")}, Path(folder)
    except ValueError:
        raise ValueError(f"{PAUSE_ENV}={spec!r}: expected RANK:STEP[,STEP...]:FOLDER, e.g. 1:5:/tmp/faults") from None


def pause_point(step: int, rank: int) -> None:
    """Called by the trainer inside every step; pauses when POMVID_FAULT_PAUSE names this rank and step."""
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    want_rank, steps, folder = parse_pause(spec)
    reached = folder / f"reached_step_{step}"
    if rank != want_rank or step not in steps or reached.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = reached.with_name(f".{reached.name}.tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, reached)
    log.warning("fault injection: rank %d paused inside step %d (pid %d) until %s exists", rank, step, os.getpid(),
                folder / f"release_step_{step}")
    deadline = time.monotonic() + MAX_PAUSE_S
    while not (folder / f"release_step_{step}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
