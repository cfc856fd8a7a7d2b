"""Probing and decoding: which frames are chosen, resize + crop, both backends, every failure.

The test videos show their frame index as a binary pattern (tests/videos.py), so every test
reads back which source frame landed at each position of the clip.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from pipeline.data.decode import readers
from pipeline.data.decode.buckets import parse_buckets
from pipeline.data.decode.container import REASONS, DecodeError, probe
from pipeline.data.decode.frames import crop_box, select_frames, target_times
from pipeline.data.decode.video import decode_clip, decode_clips, open_video, plan_clips
from pipeline.data.source.manifest import VideoRecord
from tests.videos import VFR_TIMESTAMPS, read_frame_index

BACKENDS = ["decord", "pyav"]


def indices(clip: np.ndarray) -> list[int]:
    """The source frame index shown at each time step of a (3, T, H, W) clip."""
    return [read_frame_index(clip[:, t]) for t in range(clip.shape[1])]


def expected(timestamps, start: float, frames: int, fps: float) -> list[int]:
    """The rule, computed the slow way: the last frame shown at or before each target time."""
    out = []
    for k in range(frames):
        t = start + k / fps
        out.append(max(j for j, ts in enumerate(timestamps) if ts <= t + 1e-3))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, fps, start, frames, literal", [
    ("fps60", 15, 0.0, 9, [0, 4, 8, 12, 16, 20, 24, 28, 32]),  # every 4th frame
    ("fps60", 15, 1.25, 5, [75, 79, 83, 87, 91]),  # after a seek (keyframe every 10 frames)
    ("fps24", 8, 0.0, 17, list(range(0, 49, 3))),  # every 3rd; needs 2.0 s of the 3 s video
    ("fps24", 8, 0.5, 6, [12, 15, 18, 21, 24, 27]),
    ("fps30", 12, 0.0, 8, [0, 2, 5, 7, 10, 12, 15, 17]),  # a ratio of 2.5: floor(2.5 k)
    ("fps24", 30, 0.0, 8, [0, 0, 1, 2, 3, 4, 4, 5]),  # target above the source: frames repeat
    ("vfr", 10, 0.0, 17, [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 31, 32, 33, 34, 35, 36]),
    ("vfr", 10, 0.85, 8, [25, 28, 30, 31, 32, 33, 34, 35]),  # across the 30 -> 10 fps change
    ("vfr", 45, 0.9, 6, [27, 27, 28, 29, 29, 30]),  # 30 fps part, then 1.0 s is frame 30
])
def test_frames_chosen_by_timestamp(test_videos, backend, name, fps, start, frames, literal):
    video = getattr(test_videos, name)
    clip = decode_clip(video.path, frames=frames, height=32, width=32, fps=fps, start=start, backend=backend)
    assert clip.shape == (3, frames, 32, 32) and clip.dtype == np.float32
    assert indices(clip) == literal == expected(video.timestamps, start, frames, fps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["h264_mp4", "mpeg4_avi", "vp9_webm", "h264_mkv"])
def test_every_container_and_codec(test_videos, backend, name):
    video = getattr(test_videos, name)
    clip = decode_clip(video.path, frames=17, height=24, width=32, fps=10, start=0.3, backend=backend)
    assert clip.shape == (3, 17, 24, 32) and clip.dtype == np.float32
    assert indices(clip) == [9 + 3 * k for k in range(17)]
    # Black and white cells land near -1 and 1; nothing leaves [-1, 1].
    assert -1.0 <= clip.min() < -0.9 and 0.9 < clip.max() <= 1.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, height, width", [
    ("landscape", 32, 32), ("portrait", 32, 32), ("landscape", 20, 40), ("portrait", 40, 20),
    ("landscape", 70, 70),  # upscaled
])
def test_resize_then_center_crop(test_videos, backend, name, height, width):
    # The code sits in the central square of the source: only a centred crop reads back right.
    video = getattr(test_videos, name)
    clip = decode_clip(video.path, frames=4, height=height, width=width, fps=10, backend=backend)
    assert clip.shape == (3, 4, height, width)
    assert indices(clip) == [0, 3, 6, 9]


def test_crop_box():
    # (top, left, height, width) of the source region that is scaled onto the bucket
    assert crop_box(720, 1280, 256, 256) == (0, 280, 720, 720)
    assert crop_box(720, 1280, 256, 448) == (0, 10, 720, 1260)
    assert crop_box(1280, 720, 256, 448) == (434, 0, 411, 720)
    assert crop_box(10, 10, 20, 30) == (1, 0, 7, 10)  # upscaled
    assert crop_box(48, 64, 48, 64) == (0, 0, 48, 64)


@pytest.mark.parametrize("name, height, width", [("landscape", 20, 36), ("vp9_webm", 40, 80), ("fps30", 32, 32)])
def test_backends_agree(test_videos, name, height, width):
    # Both scale in libswscale; pixels differ only by rounding (means of 0.003-0.013 measured).
    kw = dict(frames=6, height=height, width=width, fps=7.5, start=0.2)
    a = decode_clip(getattr(test_videos, name).path, backend="decord", **kw)
    b = decode_clip(getattr(test_videos, name).path, backend="pyav", **kw)
    assert np.abs(a - b).mean() < 0.02


def test_select_frames_rule():
    times = np.array([0.0, 0.1, 0.2, 0.25, 0.5])
    # Last frame at or before each time; 1 ms of slack for rounded container times.
    assert select_frames(times, np.array([0.0, 0.0995, 0.15, 0.2499, 0.49, 0.7])).tolist() == [0, 1, 1, 3, 3, 4]
    assert select_frames(times + 0.05, np.array([0.0])).tolist() == [0]  # before the first frame
    assert target_times(1.0, 3, 4).tolist() == [1.0, 1.25, 1.5]


def test_probe_good_videos(test_videos):
    for name, video in test_videos.good().items():
        info = probe(video.path)
        assert (info.width, info.height, info.num_frames) == (video.width, video.height, video.num_frames), name
        assert info.duration == pytest.approx(video.num_frames / video.fps, abs=2e-3), name
        assert info.fps == pytest.approx(video.fps, rel=1e-3), name
        assert info.backend == "pyav" and not info.truncated, name
    vfr = probe(test_videos.vfr.path)
    assert vfr.duration == pytest.approx(VFR_TIMESTAMPS[-1] + 1 / 30, abs=2e-3)


def test_probe_bad_videos(test_videos):
    cut = probe(test_videos.truncated.path)  # readable, but less than the header claims
    assert cut.truncated and cut.num_frames < 30 and cut.claimed_duration == pytest.approx(3.0)
    for name, reason in [("missing", "missing"), ("text_mp4", "not_a_video"), ("audio_only", "not_a_video"),
                         ("corrupt", "corrupt"), ("truncated_index", "truncated")]:
        with pytest.raises(DecodeError) as info:
            probe(getattr(test_videos, name))
        assert info.value.reason == reason, name


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_every_failure_has_its_reason(test_videos, backend):
    for name, (path, reason) in test_videos.bad().items():
        with pytest.raises(DecodeError) as info:
            decode_clip(path, frames=17, height=32, width=32, fps=8, backend=backend)
        assert info.value.reason == reason, (name, info.value)
        assert str(path) in info.value.message


def test_truncated_file_still_gives_its_intact_part(test_videos):
    path = test_videos.truncated.path
    kw = dict(frames=4, height=32, width=32, fps=10)
    assert indices(decode_clip(path, backend="pyav", **kw)) == [0, 3, 6, 9]
    assert indices(decode_clip(path, backend="auto", **kw)) == [0, 3, 6, 9]  # PyAV after decord fails
    with pytest.raises(DecodeError, match="cut off") as info:
        decode_clip(path, backend="decord", **kw)
    assert info.value.reason == "truncated"
    for backend in BACKENDS:  # a clip running past the cut
        with pytest.raises(DecodeError) as info:
            decode_clip(path, frames=4, height=32, width=32, fps=2, backend=backend)
        assert info.value.reason == "truncated"


@pytest.mark.parametrize("backend", BACKENDS)
def test_too_short_boundaries(test_videos, backend):
    # too_short.mp4: 5 frames at 30 fps, shown until 0.1667 s.
    path = test_videos.too_short.path
    clip = decode_clip(path, frames=5, height=16, width=16, fps=30, backend=backend)
    assert indices(clip) == [0, 1, 2, 3, 4]
    clip = decode_clip(path, frames=2, height=16, width=16, fps=10, start=0.05, backend=backend)
    assert indices(clip) == [1, 4]  # 0.15 s still shows the last frame
    for frames, fps, start in [(6, 30, 0.0), (2, 10, 0.07), (1, 30, 0.2)]:
        with pytest.raises(DecodeError) as info:
            decode_clip(path, frames=frames, height=16, width=16, fps=fps, start=start, backend=backend)
        assert info.value.reason == "too_short"


@pytest.mark.parametrize("keep", [0.05, 0.3, 0.6, 0.9])
def test_damaged_files_never_crash(test_videos, tmp_path, keep):
    # Cut every kind of file at several points, and overwrite its middle with noise: each decode
    # returns a clip or raises DecodeError, whatever the bytes; a cut file says "truncated".
    rng = np.random.default_rng(int(keep * 100))
    for name, video in test_videos.good().items():
        data = video.path.read_bytes()
        cut = tmp_path / f"cut_{name}{video.path.suffix}"
        cut.write_bytes(data[: int(len(data) * keep)])
        noisy = tmp_path / f"noisy_{name}{video.path.suffix}"
        middle = int(len(data) * keep)
        noisy.write_bytes(data[:middle] + rng.integers(0, 256, 64, dtype=np.uint8).tobytes() + data[middle + 64:])
        for path, reasons in ((cut, {"truncated"}), (noisy, REASONS)):
            for backend in ["opened", "auto", *BACKENDS]:
                try:
                    if backend == "opened":  # the pipeline's way: open_video's single pass, then decode
                        with open_video(path) as video:
                            clip = decode_clips(path, starts=[0.0], frames=4, height=16, width=16, fps=8,
                                                rotation=video.info.rotation, video=video)[0]
                    else:
                        clip = decode_clip(path, frames=4, height=16, width=16, fps=8, backend=backend)
                    assert clip.shape == (3, 4, 16, 16) and np.isfinite(clip).all()
                except DecodeError as e:
                    assert e.reason in reasons, (path.name, backend, e)


def test_auto_falls_back_to_pyav(test_videos, monkeypatch):
    def broken(*args, **kwargs):
        raise DecodeError("corrupt", "decord says no")

    monkeypatch.setattr(readers, "decode_decord", broken)
    path = test_videos.fps30.path
    assert indices(decode_clip(path, frames=3, height=16, width=16, fps=10)) == [0, 3, 6]
    with pytest.raises(DecodeError, match="decord says no"):
        decode_clip(path, frames=3, height=16, width=16, fps=10, backend="decord")
    monkeypatch.setattr(readers, "HAVE_DECORD", False)
    assert indices(decode_clip(path, frames=3, height=16, width=16, fps=10)) == [0, 3, 6]
    with pytest.raises(ValueError, match="decord is not installed"):
        decode_clip(path, frames=3, height=16, width=16, fps=10, backend="decord")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, starts", [
    ("fps60", [0.0, 1.0, 2.0]),  # keyframe every 10 frames: PyAV seeks between clips
    ("fps60", [2.0, 0.25]),  # any order in, same order out
    ("fps60", [0.5, 0.6]),  # overlapping clips: PyAV seeks back
    ("vfr", [0.1, 1.3, 2.1]),
    ("long_gop", [0.0, 1.0, 2.0]),  # one keyframe: PyAV decodes straight through
])
def test_several_clips_in_one_pass(test_videos, make_video, backend, name, starts):
    video = make_video("long_gop.mp4", num_frames=90, gop=300) if name == "long_gop" else getattr(test_videos, name)
    kw = dict(frames=5, height=16, width=16, fps=6, backend=backend)
    clips = decode_clips(video.path, starts=starts, **kw)
    for start, clip in zip(starts, clips):
        assert indices(clip) == expected(video.timestamps, start, 5, 6)
        np.testing.assert_array_equal(clip, decode_clip(video.path, start=start, **kw))


def test_pyav_seeks_only_past_a_keyframe(test_videos, make_video, monkeypatch):
    seeks = []
    original = readers._Reader.seek
    monkeypatch.setattr(readers._Reader, "seek", lambda self, t: (seeks.append(t), original(self, t)))
    kw = dict(frames=3, height=16, width=16, fps=10, backend="pyav")
    decode_clips(make_video("long_gop.mp4", num_frames=90, gop=300).path, starts=[0.0, 1.0, 2.0], **kw)
    assert seeks == []  # the one keyframe is behind: decoding on is all it takes
    decode_clips(test_videos.fps60.path, starts=[0.0, 0.25, 2.0], **kw)
    # Keyframes every 1/6 s: the first clip ends at 0.2 s, past the keyframe before 0.25 s, so
    # decoding goes on; the one before 2.0 s lies far ahead, so a seek skips the gap.
    assert seeks == [2.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoder_threads(test_videos, backend):
    clip = decode_clip(test_videos.fps60.path, frames=5, height=16, width=16, fps=15, start=0.5,
                       backend=backend, threads=2)
    assert indices(clip) == [30, 34, 38, 42, 46]


@pytest.mark.parametrize("kwargs, words", [
    (dict(backend="ffmpeg"), "backend='ffmpeg'"), (dict(frames=0), "frames=0"), (dict(height=2.5), "height=2.5"),
    (dict(fps=0), "fps=0"), (dict(start=-1.0), "start=-1.0"), (dict(threads=0), "threads=0"),
    (dict(start=float("nan")), "start=nan"),
])
def test_argument_checks(test_videos, kwargs, words):
    args = dict(frames=2, height=16, width=16, fps=8) | kwargs
    with pytest.raises(ValueError, match=words):
        decode_clip(test_videos.fps30.path, **args)


def test_plan_clips(test_videos):
    table = parse_buckets("17x32x32,17x32x64")

    def record(path, **kw):
        return VideoRecord(path=str(path), caption="x", source_row=0, source="m.csv", **kw)

    info = probe(test_videos.fps60.path)  # 3 s, square
    plans = plan_clips(record(test_videos.fps60.path), info, table, fps=12, clips_per_video=4)
    assert [p.index for p in plans] == [0, 1] and plans[0].bucket.name == "17x32x32"
    assert plans[0].start == 0.0 and plans[1].start == pytest.approx(1.5) and plans[0].end == pytest.approx(17 / 12)
    clip = decode_clip(test_videos.fps60.path, frames=17, height=32, width=32, fps=12, start=plans[1].start)
    assert indices(clip) == [90 + 5 * k for k in range(17)]
    landscape = plan_clips(record(test_videos.landscape.path), probe(test_videos.landscape.path), table, fps=10)
    assert [p.bucket.name for p in landscape] == ["17x32x64"]
    with pytest.raises(DecodeError, match="shortest bucket") as error:
        plan_clips(record(test_videos.fps60.path, start=1.8), info, table, fps=12)
    assert error.value.reason == "too_short"
    truncated = test_videos.truncated.path
    with pytest.raises(DecodeError, match="header claims") as error:
        plan_clips(record(truncated), probe(truncated), table, fps=12)
    assert error.value.reason == "truncated"


def test_decode_error_is_machine_readable_and_picklable():
    error = DecodeError("truncated", "/x.mp4: cut off")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.message, str(copy)) == ("truncated", "/x.mp4: cut off", "truncated: /x.mp4: cut off")
    with pytest.raises(ValueError, match="expected one of"):
        DecodeError("weird", "?")


def test_rotated_phone_video_is_decoded_upright_into_a_portrait_bucket(tmp_path):
    """Stored 96x48 (landscape) with a 90 degree display rotation, as phones write portrait videos:
    stored left half red, right half blue, a green band along the top. Shown upright (as ffmpeg shows
    it): 48x96, blue above red, the green band down the left side."""
    import subprocess

    from tests.videos import ffmpeg_exe

    stored, rotated = tmp_path / "stored.mp4", tmp_path / "phone.mp4"
    scene = ("color=red:size=48x48:rate=8:duration=2[a];color=blue:size=48x48:rate=8:duration=2[b];"
             "[a][b]hstack,drawbox=x=0:y=0:w=96:h=8:color=0x00FF00:t=fill")
    subprocess.run([ffmpeg_exe(), "-y", "-v", "error", "-f", "lavfi", "-i", scene, "-c:v", "libx264",
                    "-pix_fmt", "yuv420p", "-qp", "0", str(stored)], check=True)
    subprocess.run([ffmpeg_exe(), "-y", "-v", "error", "-display_rotation", "90", "-i", str(stored), "-c", "copy",
                    str(rotated)], check=True)
    info = probe(rotated)
    assert (info.width, info.height, info.rotation) == (48, 96, 90)
    with open_video(rotated, backend="auto") as opened:  # the pipeline's open: a rotated video is PyAV's
        assert opened.info == info and opened.decord_index is None
    record = VideoRecord(path=str(rotated), caption="a phone video", source_row=0, source="m")
    (plan,) = plan_clips(record, info, parse_buckets("9x32x48,9x48x32"), 8.0)
    assert plan.bucket.name == "9x48x32"  # portrait, as shown
    for backend in ("pyav", "auto"):  # auto: PyAV for rotated videos (decord squeezes them)
        clip = decode_clip(rotated, frames=9, height=48, width=32, fps=8.0, backend=backend,
                           rotation=info.rotation)  # (3, 9, 48, 32) in [-1, 1]
        red, green, blue = clip[0, 4], clip[1, 4], clip[2, 4]
        assert blue[4:20, 10:].mean() > 0.8 and red[4:20, 10:].mean() < -0.8, backend  # top: blue
        assert red[28:44, 10:].mean() > 0.8 and blue[28:44, 10:].mean() < -0.8, backend  # bottom: red
        assert green[:, :3].mean() > 0.5 and green[:, 10:].mean() < -0.5, backend  # the band, on the left
    with pytest.raises(ValueError, match="cannot read rotated videos"):
        decode_clip(rotated, frames=9, height=48, width=32, fps=8.0, backend="decord", rotation=90)


def _count_opens(monkeypatch) -> list[str]:
    """Every PyAV open and decord reader made from now on, in order."""
    import av

    opens: list[str] = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: (opens.append("av"), real_open(*a, **k))[1])
    if readers.HAVE_DECORD:
        real_reader = readers.decord.VideoReader
        monkeypatch.setattr(readers.decord, "VideoReader",
                            lambda *a, **k: (opens.append("decord"), real_reader(*a, **k))[1])
    return opens


@pytest.mark.parametrize("backend", ["pyav", "auto"])
@pytest.mark.parametrize("name", ["fps60", "vfr"])
def test_probe_and_decode_share_one_pass(test_videos, monkeypatch, backend, name):
    """open_video probes a file with the reader that then decodes it: PyAV's walk of its handle
    (keyframes included: the second clip needs them), or decord's index (no PyAV walk). Nothing is
    opened again to decode, and the clips equal those of a fresh handle."""
    from pipeline.data.decode.container import VideoFile

    video, starts = getattr(test_videos, name), [0.0, 2.0]
    kw = dict(frames=5, height=16, width=16, fps=6, backend=backend)
    fresh, probed = decode_clips(video.path, starts=starts, **kw), probe(video.path)
    opens, walks = _count_opens(monkeypatch), _count_walks(monkeypatch)
    with open_video(video.path, backend=backend) as opened:
        decord_indexed = backend == "auto" and readers.HAVE_DECORD
        assert opens == (["av", "decord"] if decord_indexed else ["av"]) and walks == ([] if decord_indexed else [1])
        info = opened.info
        assert info.backend == ("decord" if decord_indexed else "pyav")
        assert (info.width, info.height, info.num_frames, info.rotation) == \
            (probed.width, probed.height, probed.num_frames, probed.rotation)
        assert abs(info.duration - probed.duration) < 1e-3 and not info.truncated
        opens.clear()
        clips = decode_clips(video.path, starts=starts, rotation=info.rotation, video=opened, **kw)
    assert opens == [] and len(walks) <= 1
    for start, clip, reference in zip(starts, clips, fresh):
        assert indices(clip) == expected(video.timestamps, start, 5, 6)
        np.testing.assert_array_equal(clip, reference)
    with VideoFile(video.path) as walked:  # a PyAV handle decoded by decord: decord opens its own reader
        assert walked.info == probed
        opens.clear()
        decode_clips(video.path, starts=starts, rotation=0, video=walked, **kw)
    assert opens == (["decord"] if backend == "auto" and readers.HAVE_DECORD else [])


def _count_walks(monkeypatch) -> list[int]:
    """One entry per PyAV probe walk over a file's packets from now on."""
    from pipeline.data.decode.container import VideoFile

    walks: list[int] = []
    real_walk = VideoFile._walk
    monkeypatch.setattr(VideoFile, "_walk", lambda self: (walks.append(1), real_walk(self))[1])
    return walks


@pytest.mark.parametrize("backend", ["pyav", "auto"])
def test_decode_units_reads_each_video_once(test_videos, monkeypatch, tmp_path, backend):
    """The pipeline's decode task: one PyAV open per video, and one pass over its packets (PyAV's
    walk, or decord's index under "auto"), probe and decode included."""
    import pyarrow.parquet as pq

    from pipeline.data.precompute.stages import decode_units
    from pipeline.data.source.plan import plan_run

    # Not the 48-wide portrait video: decord cannot hand out frames 48 wide and opens a wider reader.
    paths = [test_videos.fps60.path, test_videos.landscape.path, test_videos.fps24.path]
    manifest = tmp_path / "m.csv"
    manifest.write_text("video,caption\n" + "".join(f"{p},video {i}\n" for i, p in enumerate(paths)))
    plan = plan_run(manifest, rows_per_unit=3, settings_hash="s", finished=[], write_to=tmp_path)
    opens, walks = _count_opens(monkeypatch), _count_walks(monkeypatch)
    decoded = decode_units(pq.read_table(plan.plan_files[0]), buckets="9x32x32,9x32x48,9x48x32", fps=8.0,
                           clips_per_video=2, backend=backend)
    assert json.loads(decoded["meta"][0])["errors"] == [] and len(json.loads(decoded["meta"][0])["clips"]) == 5
    decord_indexed = backend == "auto" and readers.HAVE_DECORD
    assert opens == (["av", "decord"] if decord_indexed else ["av"]) * len(paths)
    assert len(walks) == (0 if decord_indexed else len(paths))
