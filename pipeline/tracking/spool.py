"""The spool: an append-only, checksummed log of one MLflow run's logging calls in the run's output folder.

Every call of a Tracker (params, metrics, tags, artifacts, the run's status) is written here first, then
sent to MLflow in order (pipeline.tracking.worker), so an unreachable server or a killed process loses
nothing: what was not sent stays here, and a resumed run or `pomvid runs sync` sends it later.

    <output_dir>/mlflow_spool/<run_id>/
        run.json                  run id, tracking URI, experiment id: where `pomvid runs sync` sends
        log-000001.jsonl ...      records, one per line "<crc32 hex> <json>\\n"; a new segment every 32 MiB
        log-000001.summary.json   written when a segment is full: its last seq and last step per metric
        sent.json                 the position up to which records were sent
        files/                    snapshots of artifacts whose source may change before they are sent
        lock                      flock held by the one process that writes and sends (a run, or a sync)

Durability: a record is one os.write on an O_APPEND descriptor, made in the caller's thread, so a killed
process loses nothing it logged (the bytes are in the page cache); a background thread fsyncs every
`fsync_interval_s`, so a machine crash loses at most that much. A record cut by a kill mid-write (or
any line whose checksum fails) is skipped with a warning; the records around it are kept.

The sent position is saved without fsync: after a machine crash it may point back a little, and
records are sent again. That is harmless: MLflow keeps one copy of a metric with the same key, value,
step and timestamp, and params, tags, artifacts and statuses are set to the same values again.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("pipeline.tracking")

SPOOL_DIR = "mlflow_spool"
SEGMENT_BYTES = 32 * 1024 * 1024
RUN_FILE, SENT_FILE, LOCK_FILE, FILES_DIR = "run.json", "sent.json", "lock", "files"
_SEGMENT = re.compile(r"^log-(\d{6})\.jsonl$")


class SpoolBusyError(RuntimeError):
    """Another live process holds the spool's lock (it is logging or syncing that run)."""


@dataclass(frozen=True, order=True)
class Position:
    """A place in the spool: byte `offset` in segment `segment`; `seq` of the last record before it."""

    segment: int = 1
    offset: int = 0
    seq: int = 0


def encode(record: dict[str, Any]) -> bytes:
    body = json.dumps(record, separators=(",", ":"))
    return f"{zlib.crc32(body.encode()):08x} {body}\n".encode()


def decode(line: bytes) -> dict[str, Any] | None:
    """The record of one complete line, or None when its checksum or JSON is wrong."""
    try:
        text = line.decode().rstrip("\n")
        crc, body = text.split(" ", 1)
        if int(crc, 16) != zlib.crc32(body.encode()):
            return None
        record = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("seq"), int) else None


def segment_name(index: int) -> str:
    return f"log-{index:06d}.jsonl"


def spool_root(output_dir: str | os.PathLike) -> Path:
    """Where the spools of runs logged from `output_dir` live: `<output_dir>/mlflow_spool`."""
    return Path(output_dir).expanduser().resolve() / SPOOL_DIR


def find_spools(path: str | os.PathLike) -> list[Path]:
    """The spool folders of a run folder (its mlflow_spool/*), of a spool root, or `path` itself."""
    path = Path(path)
    if (path / RUN_FILE).is_file():
        return [path]
    root = path / SPOOL_DIR if (path / SPOOL_DIR).is_dir() else path
    if not root.is_dir():
        return []
    return sorted(child for child in root.iterdir() if (child / RUN_FILE).is_file())


class Spool:
    """One run's spool folder, opened by exactly one process (see `open`)."""

    def __init__(self, folder: Path, lock_fd: int, *, segment_bytes: int, fsync_interval_s: float) -> None:
        self.folder = folder
        self.segment_bytes = segment_bytes
        self.fsync_interval_s = fsync_interval_s
        self.info = json.loads((folder / RUN_FILE).read_text())
        self._lock_fd = lock_fd
        self._write_lock = threading.Lock()
        self._dirty = False
        self.corrupt_skipped = 0
        self._warned: set[tuple[int, int]] = set()
        self.sent = self._read_sent()
        self.recorded_steps: dict[str, int] = {}  # last step of every metric key in the spool
        self.last_status: str | None = None  # of the spool's last status record
        self.written = self._recover()
        if self.sent > self.written:  # a machine crash took the log's unsynced end after it was sent
            self.sent = self.written
        self._fd = os.open(folder / segment_name(self.written.segment), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | os.PathLike, *, run: dict[str, Any] | None = None,
             segment_bytes: int = SEGMENT_BYTES, fsync_interval_s: float = 1.0) -> Spool:
        """Open (with `run`: create if needed) the spool in `folder` and take its lock.

        `run` ({"run_id", "tracking_uri", "experiment_id"}) is written to run.json for a new spool.
        Raises SpoolBusyError when a live process holds the lock, FileNotFoundError when `folder` is
        not a spool and `run` is not given.
        """
        folder = Path(folder)
        if run is None and not (folder / RUN_FILE).is_file():
            raise FileNotFoundError(f"{folder} is not an MLflow spool (no {RUN_FILE})")
        (folder / FILES_DIR).mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SpoolBusyError(f"{folder} is in use by a live process (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        if run is not None:  # new, or resumed through another URI of the same store: sync goes there
            known = json.loads((folder / RUN_FILE).read_text()) if (folder / RUN_FILE).is_file() else None
            if known is None or known.get("tracking_uri") != run.get("tracking_uri"):
                _write_json(folder / RUN_FILE, {**(known or {}), **run, "version": 1}, fsync=True)
        try:
            return cls(folder, fd, segment_bytes=segment_bytes, fsync_interval_s=fsync_interval_s)
        except BaseException:
            os.close(fd)
            raise

    def _segments(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _SEGMENT.match(p.name)))

    def _recover(self) -> Position:
        """Scan what earlier processes wrote: the end position, the last seq, the last step of every
        metric (sealed segments through their summaries); cut a last record left half-written."""
        segments = self._segments() or [1]
        last_seq = 0
        for index in segments[:-1]:
            summary_path = self.folder / f"log-{index:06d}.summary.json"
            if summary_path.is_file():
                summary = json.loads(summary_path.read_text())
                last_seq = max(last_seq, summary["last_seq"])
                self._merge_steps(summary["recorded_steps"])
                self.last_status = summary.get("last_status") or self.last_status
            else:  # killed between filling a segment and writing its summary
                for record, _ in self._scan(index, 0, None):
                    last_seq = max(last_seq, record["seq"] if record else last_seq)
                    self._note(record)
        active = segments[-1]
        end = 0
        path = self.folder / segment_name(active)
        size = path.stat().st_size if path.exists() else 0
        for record, pos in self._scan(active, 0, None):
            if record is not None:
                last_seq = max(last_seq, record["seq"])
                self._note(record)
            if pos.offset < size or _ends_with_newline(path, pos.offset):
                end = pos.offset
        if size > end:
            logger.warning("MLflow spool %s: the last record was cut off (the process was killed while writing "
                           "it) and is skipped; every record before it is kept", path)
            self.corrupt_skipped += 1
            with open(path, "r+b") as handle:  # the next append must start on a line of its own
                handle.truncate(end)
                os.fsync(handle.fileno())
        return Position(active, end, last_seq)

    def _note(self, record: dict[str, Any] | None) -> None:
        if record is not None and record.get("op") == "metrics":
            self._merge_steps({key: step for key, _, step in record["metrics"]})
        elif record is not None and record.get("op") == "status":
            self.last_status = record["status"]

    def _merge_steps(self, steps: dict[str, int]) -> None:
        for key, step in steps.items():
            if step > self.recorded_steps.get(key, -1):
                self.recorded_steps[key] = step

    # ---- writing (any thread) --------------------------------------------------------------------
    def append(self, record: dict[str, Any]) -> int:
        """Write one record (a dict with "op"); returns its seq. Never touches the network."""
        with self._write_lock:
            if self._fd < 0:
                raise ValueError(f"MLflow spool {self.folder} is closed")
            seq = self.written.seq + 1
            data = encode({**record, "seq": seq})
            os.write(self._fd, data)
            self._dirty = True
            self._note(record)
            self.written = Position(self.written.segment, self.written.offset + len(data), seq)
            if self.written.offset >= self.segment_bytes:
                self._seal()
        return seq

    def _seal(self) -> None:
        """Close the full segment (fsync, summary) and start the next one."""
        os.fsync(self._fd)
        os.close(self._fd)
        index = self.written.segment
        steps = dict(self.recorded_steps)
        _write_json(self.folder / f"log-{index:06d}.summary.json",
                    {"last_seq": self.written.seq, "recorded_steps": steps, "last_status": self.last_status},
                    fsync=True)
        self._fd = os.open(self.folder / segment_name(index + 1), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.written = Position(index + 1, 0, self.written.seq)

    def sync(self) -> None:
        """fsync what was appended since the last call. Appends go on meanwhile (on a duplicate of the
        descriptor: a segment rotation may close the original)."""
        with self._write_lock:
            if not self._dirty or self._fd < 0:
                return
            fd = os.dup(self._fd)
            self._dirty = False
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def start_syncer(self) -> None:
        """fsync every `fsync_interval_s` from a daemon thread (batches the cost of durability)."""
        def loop() -> None:
            while not self._stop.wait(self.fsync_interval_s):
                self.sync()

        self._syncer = threading.Thread(target=loop, name="pomvid-spool-fsync", daemon=True)
        self._syncer.start()

    def snapshot_dir(self) -> Path:
        """A new folder under files/ for a copy of an artifact."""
        folder = self.folder / FILES_DIR / f"{time.time_ns()}-{os.getpid()}-{threading.get_ident() % 10_000}"
        folder.mkdir(parents=True)
        return folder

    # ---- reading -----------------------------------------------------------------------------------
    def _scan(self, segment: int, offset: int, stop: int | None
              ) -> Iterator[tuple[dict[str, Any] | None, Position]]:
        """(record, or None for a damaged line; the position after it) from `offset` of `segment` up to
        byte `stop` (None: the end of the file, where a last line without newline counts as damaged)."""
        path = self.folder / segment_name(segment)
        if not path.exists():
            return
        seq = 0
        with open(path, "rb") as handle:
            handle.seek(offset)
            pos = offset
            while stop is None or pos < stop:
                line = handle.readline() if stop is None else handle.readline(stop - pos)
                if not line:
                    return
                pos += len(line)
                record = decode(line) if line.endswith(b"\n") else None
                seq = record["seq"] if record is not None else seq
                yield record, Position(segment, pos, seq)

    def read(self, start: Position, limit: int = 1000) -> Iterator[tuple[dict[str, Any] | None, Position]]:
        """Up to `limit` records after `start`, in order, each with the position after it, up to what is
        written. A damaged line comes as None (after one warning): skip it, keep its position."""
        end = self.written
        segment, offset, count = start.segment, start.offset, 0
        while True:
            for record, pos in self._scan(segment, offset, end.offset if segment == end.segment else None):
                if record is None:
                    self._warn_damaged(segment, pos.offset)
                yield record, pos
                count += 1
                if count >= limit:
                    return
            if segment >= end.segment:
                return
            segment, offset = segment + 1, 0

    def _warn_damaged(self, segment: int, offset: int) -> None:
        if (segment, offset) in self._warned:
            return
        self._warned.add((segment, offset))
        self.corrupt_skipped += 1
        logger.warning("MLflow spool %s: a damaged record ending at byte %d (cut off by a kill, or corrupt) is "
                       "skipped; the records around it are kept", self.folder / segment_name(segment), offset)

    def pending(self) -> bool:
        return self.sent < self.written

    # ---- the sent position -------------------------------------------------------------------------
    def _read_sent(self) -> Position:
        path = self.folder / SENT_FILE
        if not path.is_file():
            return Position()
        data = json.loads(path.read_text())
        return Position(data["segment"], data["offset"], data["seq"])

    def mark_sent(self, position: Position) -> None:
        self.sent = position
        _write_json(self.folder / SENT_FILE, {"segment": position.segment, "offset": position.offset,
                                              "seq": position.seq}, fsync=False)

    # ---- closing -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the fsync thread, fsync, release the lock."""
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join(timeout=5)
        self.sync()
        with self._write_lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1


def _ends_with_newline(path: Path, offset: int) -> bool:
    with open(path, "rb") as handle:
        handle.seek(offset - 1)
        return handle.read(1) == b"\n"


def _write_json(path: Path, data: dict[str, Any], *, fsync: bool) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as handle:
        json.dump(data, handle)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)
