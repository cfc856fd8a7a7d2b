"""Shared pytest fixtures. Test videos: see tests/videos.py for what each one holds."""

from __future__ import annotations

import pytest

from tests.videos import MadeVideo, VideoSet, make_test_videos
from tests.videos import make_video as _make_video


@pytest.fixture(scope="session")
def test_videos(tmp_path_factory) -> VideoSet:
    """The standard set of tiny test videos (good and bad), made once per session."""
    return make_test_videos(tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="session")
def make_video(tmp_path_factory):
    """make_video(name, **kwargs) -> MadeVideo: one more video (tests.videos.make_video's keyword
    arguments) in a session folder; the same name and arguments give the cached file."""
    folder = tmp_path_factory.mktemp("made_videos")
    cache: dict[tuple, MadeVideo] = {}

    def make(name: str, **kwargs) -> MadeVideo:
        key = (name, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in cache:
            if any(k[0] == name for k in cache):
                raise ValueError(f"make_video: {name!r} already made with other arguments; pick a new name")
            cache[key] = _make_video(folder / name, **kwargs)
        return cache[key]

    return make
