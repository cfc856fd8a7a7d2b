"""Bucket tables: parsing, which bucket a video goes to, and where its clips start."""

from __future__ import annotations

import random

import pytest

from pipeline.data.decode.buckets import (
    TIME_TOLERANCE,
    Assignment,
    Bucket,
    BucketTable,
    assign_bucket,
    clip_starts,
    parse_buckets,
)

TABLE = parse_buckets("17x256x256,17x256x448,17x448x256")


def test_parse_and_round_trip():
    table = parse_buckets(" 17x256x256 , 33 x 480 x 720,")
    assert table.buckets == (Bucket(frames=17, height=256, width=256), Bucket(frames=33, height=480, width=720))
    assert str(table) == "17x256x256,33x480x720"
    assert BucketTable.from_list(table.to_list()) == table
    assert table["33x480x720"].aspect == 1.5 and len(table) == 2
    assert [b.name for b in table] == ["17x256x256", "33x480x720"]


@pytest.mark.parametrize("spec, words", [
    ("", "empty"), (" , ", "empty"), ("17x256", "FRAMESxHEIGHTxWIDTH"), ("axbxc", "FRAMESxHEIGHTxWIDTH"),
    ("0x256x256", "Bucket.frames=0"), ("17x256x256,17x256x256", "repeats 17x256x256"),
])
def test_parse_errors(spec, words):
    with pytest.raises(ValueError, match=words):
        parse_buckets(spec)


def test_bucket_fields_are_checked():
    with pytest.raises(ValueError, match="Bucket.width=True"):
        Bucket(frames=1, height=2, width=True)
    with pytest.raises(TypeError):
        Bucket(17, 256, 256)  # keyword-only
    with pytest.raises(ValueError, match="expected Bucket"):
        BucketTable(buckets=("17x256x256",))
    with pytest.raises(KeyError, match="no bucket '9x9x9'"):
        TABLE["9x9x9"]


@pytest.mark.parametrize("width, height, expected", [
    (1280, 720, "17x256x448"),  # 16:9 -> the landscape bucket
    (720, 1280, "17x448x256"),  # 9:16 -> the portrait one
    (500, 500, "17x256x256"),
    (640, 480, "17x256x448"),  # 4:3 is nearer 7:4 than 1:1 in log ratio (0.27 vs 0.29)
    (560, 480, "17x256x256"),  # 7:6 is nearer 1:1
    (40, 20, "17x256x448"),  # far too small: upscaling is fine
])
def test_nearest_aspect_ratio(width, height, expected):
    a = assign_bucket(TABLE, width=width, height=height, duration=10.0, fps=8)
    assert a.bucket.name == expected and a.reason is None and a.starts == (0.0,)


def test_duration_decides_before_aspect():
    table = parse_buckets("33x256x448,9x256x256")
    # 33 frames at 8 fps span 4 s: a 3 s landscape video only fits the square 9-frame bucket.
    assert assign_bucket(table, width=1280, height=720, duration=3.0, fps=8).bucket.name == "9x256x256"
    assert assign_bucket(table, width=1280, height=720, duration=5.0, fps=8).bucket.name == "33x256x448"
    short = assign_bucket(table, width=1280, height=720, duration=0.9, fps=8)
    assert (short.bucket, short.reason, short.starts) == (None, "too_short", ())


def test_duration_boundary():
    bucket = parse_buckets("17x256x256")
    # 17 frames at 8 fps sample t = 0 .. 2.0 s. A 48-frame 24 fps video lasts exactly 2.0 s and
    # shows nothing at t = 2.0; a 49-frame one does.
    assert assign_bucket(bucket, width=64, height=64, duration=48 / 24, fps=8).reason == "too_short"
    assert assign_bucket(bucket, width=64, height=64, duration=49 / 24, fps=8).bucket is not None
    assert Bucket(frames=1, height=8, width=8).fits(2 * TIME_TOLERANCE, fps=8)


def test_ties_prefer_no_upscaling_then_more_frames_then_more_pixels():
    table = parse_buckets("17x512x512,17x256x256,33x256x256")
    assert assign_bucket(table, width=300, height=300, duration=10, fps=8).bucket.name == "33x256x256"
    assert assign_bucket(table, width=300, height=300, duration=3, fps=8).bucket.name == "17x256x256"
    assert assign_bucket(table, width=1000, height=1000, duration=3, fps=8).bucket.name == "17x512x512"
    # Upscaling is only a tie-breaker: a 100-pixel video still goes to the nearest aspect ratio.
    only_big = parse_buckets("17x512x512,17x256x448")
    assert assign_bucket(only_big, width=100, height=100, duration=3, fps=8).bucket.name == "17x512x512"


def test_time_window():
    table = parse_buckets("17x256x256")  # needs a window of more than 2.0 s at 8 fps
    kw = dict(width=64, height=64, duration=10.0, fps=8)
    assert assign_bucket(table, start=7.5, **kw).starts == (7.5,)
    assert assign_bucket(table, start=8.0, **kw).reason == "too_short"
    assert assign_bucket(table, start=1.0, end=3.0, **kw).reason == "too_short"
    assert assign_bucket(table, start=1.0, end=3.5, **kw).starts == (1.0,)
    assert assign_bucket(table, start=12.0, **kw).reason == "too_short"  # past the end
    assert assign_bucket(table, end=99.0, clips_per_video=9, **kw).starts == (0.0, 2.5, 5.0, 7.5)  # end cut to 10


def test_several_clips_spread_without_overlap():
    bucket = Bucket(frames=17, height=256, width=256)  # one clip occupies 17 / 8 = 2.125 s
    assert clip_starts(window_start=0, window_end=10, bucket=bucket, fps=8, max_clips=1) == (0.0,)
    three = clip_starts(window_start=0, window_end=10, bucket=bucket, fps=8, max_clips=3)
    assert three == pytest.approx((0.0, 10 / 3, 20 / 3))
    assert clip_starts(window_start=1, window_end=11, bucket=bucket, fps=8, max_clips=50) == (1.0, 3.5, 6.0, 8.5)
    assert clip_starts(window_start=0, window_end=2.05, bucket=bucket, fps=8, max_clips=5) == (0.0,)
    assert clip_starts(window_start=0, window_end=2.0, bucket=bucket, fps=8, max_clips=5) == ()
    with pytest.raises(ValueError, match="max_clips=0"):
        clip_starts(window_start=0, window_end=10, bucket=bucket, fps=8, max_clips=0)


def test_clip_starts_invariants_on_random_windows():
    rng = random.Random(0)
    for _ in range(500):
        bucket = Bucket(frames=rng.randint(1, 65), height=8, width=8)
        fps = rng.choice([4, 8, 12.5, 15, 24, 30])
        a = rng.uniform(0, 5)
        b = a + rng.uniform(0, 20)
        wanted = rng.randint(1, 12)
        starts = clip_starts(window_start=a, window_end=b, bucket=bucket, fps=fps, max_clips=wanted)
        assert starts == clip_starts(window_start=a, window_end=b, bucket=bucket, fps=fps, max_clips=wanted)
        assert len(starts) <= wanted
        assert (len(starts) > 0) == bucket.fits(b - a, fps)
        for s in starts:  # every sample time inside the window
            assert a <= s and s + bucket.span(fps) <= b - TIME_TOLERANCE + 1e-9
        for s0, s1 in zip(starts, starts[1:]):  # no two clips share a moment
            assert s1 - s0 >= bucket.period(fps) - TIME_TOLERANCE
        if len(starts) < wanted and starts:  # fewer than asked only when no more fit
            assert (b - a) < (len(starts) + 1) * bucket.period(fps)


def test_assignment_and_argument_checks():
    with pytest.raises(ValueError, match="not both or neither"):
        Assignment(bucket=None)
    with pytest.raises(ValueError, match="no clip start times"):
        Assignment(bucket=Bucket(frames=1, height=1, width=1))
    with pytest.raises(ValueError, match="video size 0x64"):
        assign_bucket(TABLE, width=0, height=64, duration=3, fps=8)
    with pytest.raises(ValueError, match="fps=0"):
        assign_bucket(TABLE, width=64, height=64, duration=3, fps=0)
    with pytest.raises(ValueError, match="clips_per_video=0"):
        TABLE.assign(width=64, height=64, duration=3, fps=8, clips_per_video=0)
