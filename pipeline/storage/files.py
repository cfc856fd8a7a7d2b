"""The file operations: list once, put whole, get, read, delete, exists, on local paths and URIs alike."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pipeline.storage.uri import StorageError, redact, resolve, storage_error

CHUNK = 8 << 20  # bytes per read/write call when streaming a file


def list_files(uri: str | os.PathLike) -> dict[str, int]:
    """Every file under the folder/prefix `uri`, recursively, as {relative path: size in bytes}, from ONE
    listing (a paginated ListObjectsV2 on S3). A missing folder/prefix gives {}."""
    import pyarrow.fs as pafs

    filesystem, root = resolve(uri)
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    try:
        infos = filesystem.get_file_info(selector)
    except OSError as err:
        raise storage_error(uri, "list files", err) from None
    prefix = root.rstrip("/") + "/"
    return {info.path[len(prefix):]: int(info.size) for info in infos
            if info.type == pafs.FileType.File and info.path.startswith(prefix)}


def exists(uri: str | os.PathLike) -> bool:
    """True when `uri` is a file (object) or a non-empty folder/prefix."""
    import pyarrow.fs as pafs

    filesystem, path = resolve(uri)
    try:
        return filesystem.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as err:
        raise storage_error(uri, "check whether it exists", err) from None


def put_file(local: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy the finished local file `local` to `uri`, visible only whole (module docstring)."""
    size = os.path.getsize(local)
    with open(local, "rb") as source:
        _write(uri, size, lambda sink: _copy(source, sink))


def put_bytes(data: bytes, uri: str | os.PathLike) -> None:
    """Write `data` to `uri` as one whole object (small files: markers, pointers, JSON)."""
    _write(uri, len(data), lambda sink: sink.write(data))


def put_written(uri: str | os.PathLike, write) -> None:
    """Write what `write(file)` writes to `uri`, visible only whole: locally through a temporary file
    in the same folder and a rename; on object storage through a local temporary file and one upload
    (put_file), whose size is then checked (large files: Parquet shards)."""
    filesystem, path = resolve(uri)
    import pyarrow.fs as pafs

    if isinstance(filesystem, pafs.LocalFileSystem):
        _write_local(Path(path), write)
        return
    fd, tmp = tempfile.mkstemp(prefix="pomvid-upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        put_file(tmp, uri)
    finally:
        os.unlink(tmp)


def _copy(source, sink) -> None:
    while chunk := source.read(CHUNK):
        sink.write(chunk)


def _write(uri: str | os.PathLike, size: int, fill) -> None:
    import pyarrow.fs as pafs

    filesystem, path = resolve(uri)
    if isinstance(filesystem, pafs.LocalFileSystem):
        _write_local(Path(path), fill)
        return
    try:
        # Straight to the final key: no rename on object stores, and the store shows the object only whole.
        with filesystem.open_output_stream(path) as sink:
            fill(sink)
        stored = filesystem.get_file_info(path).size
    except OSError as err:
        raise storage_error(uri, "upload", err) from None
    if stored != size:  # never leave a short object behind that a reader could take for the real one
        try:
            filesystem.delete_file(path)
        except OSError:
            pass  # the error below says what happened either way
        raise StorageError(f"{redact(uri)}: uploaded {stored} bytes of {size}; the object was deleted, retry")


def _write_local(path: Path, fill) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # ".tmp": what a killed writer leaves is found by that suffix (pipeline/data/store/index.py list_output).
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as sink:
            fill(sink)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk too.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The whole content of the file/object `uri`."""
    filesystem, path = resolve(uri)
    try:
        with filesystem.open_input_stream(path) as source:
            return source.read()
    except FileNotFoundError:
        raise StorageError(f"{redact(uri)}: no such file") from None
    except OSError as err:
        raise storage_error(uri, "read", err) from None


def get_file(uri: str | os.PathLike, local: str | os.PathLike) -> Path:
    """Download `uri` to the local path `local` (through a temporary file and a rename); returns it."""
    filesystem, path = resolve(uri)

    def fill(sink) -> None:
        with filesystem.open_input_stream(path) as source:
            _copy(source, sink)

    try:
        _write_local(Path(local), fill)
    except FileNotFoundError:
        raise StorageError(f"{redact(uri)}: no such file") from None
    except OSError as err:
        raise storage_error(uri, "download", err) from None
    return Path(local)


def delete(uri: str | os.PathLike) -> None:
    """Delete the file `uri`, or everything under the folder/prefix `uri`; nothing there is not an error."""
    import pyarrow.fs as pafs

    filesystem, path = resolve(uri)
    try:
        kind = filesystem.get_file_info(path).type
        if kind == pafs.FileType.File:
            filesystem.delete_file(path)
        elif kind == pafs.FileType.Directory:
            filesystem.delete_dir(path)
    except OSError as err:
        raise storage_error(uri, "delete", err) from None
