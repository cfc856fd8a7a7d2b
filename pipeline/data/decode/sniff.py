"""Why ffmpeg cannot open a file: cut off, damaged, or not a video at all.

Only the bytes are read (never the error text, which differs between ffmpeg versions). A file
counts as cut off when its container's own size fields promise more bytes than it has: an MP4
box, the RIFF size of an AVI, the Segment size of a Matroska / WebM file.
"""

from __future__ import annotations

import os

EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_SEGMENT_ID = b"\x18\x53\x80\x67"
_VIDEO_MAGIC = (EBML_MAGIC, b"RIFF", b"FLV", b"OggS", b"GIF8", b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3",
                b"\x30\x26\xb2\x75", b"\x00\x00\x00\x01")
_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pdin", b"styp")


def _mp4(f, size: int) -> str:
    # Walk the top-level boxes: a cut-off download ends inside a well-formed box, a damaged
    # file reaches bytes that are no box at all.
    offset = 0
    while offset + 8 <= size:
        f.seek(offset)
        box = f.read(16)
        box_size = int.from_bytes(box[:4], "big")
        if box_size == 1 and len(box) >= 16:
            box_size = int.from_bytes(box[8:16], "big")
        if not all(32 <= c < 127 for c in box[4:8]) or box_size < 8:
            return "corrupt"
        if offset + box_size > size:
            return "truncated"
        offset += box_size
    return "corrupt"


def _ebml_size(data: bytes, at: int) -> tuple[int, int | None]:
    """(bytes used, value) of the EBML variable-size integer at `at`; value None = unknown size."""
    if at >= len(data) or data[at] == 0:
        return 1, None
    first = data[at]
    length = 8 - first.bit_length() + 1
    value = first & (0xFF >> length)
    for byte in data[at + 1:at + length]:
        value = (value << 8) | byte
    if at + length > len(data) or value == (1 << (7 * length)) - 1:  # all ones: "unknown"
        return length, None
    return length, value


def classify_unreadable(path: str | os.PathLike) -> str:
    """'truncated', 'corrupt' (starts like a video container) or 'not_a_video'."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(512)
        if head[4:8] in _MP4_BOXES:
            return _mp4(f, size)
    if head[:4] == b"RIFF" and len(head) >= 8:
        return "truncated" if int.from_bytes(head[4:8], "little") + 8 > size else "corrupt"
    if head[:4] == EBML_MAGIC:
        at = head.find(_SEGMENT_ID)
        if at > 0:
            used, value = _ebml_size(head, at + 4)
            if value is not None and at + 4 + used + value > size:
                return "truncated"
        return "corrupt"
    if head.startswith(_VIDEO_MAGIC) or (len(head) > 188 and head[0] == 0x47 and head[188] == 0x47):
        return "corrupt"
    return "not_a_video"
