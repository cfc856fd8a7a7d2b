"""pipeline.demo.detector: right on made videos of known colour and direction, near chance on noise."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.demo import detector, shapes
from pipeline.demo.shapes import PALETTE, ShapesConfig
from pipeline.media import read_video, write_mp4

COLOURS = shapes.DEFAULT_COLOURS
DIRECTIONS = tuple(shapes.DIRECTIONS)


def hand_made(colour: str, direction: str, *, size: int = 16, frames: int = 8, side: int = 4) -> np.ndarray:
    """A square moving one pixel per frame, drawn without the data set's code (independent check)."""
    ux, uy = shapes.DIRECTIONS[direction]
    video = np.zeros((frames, size, size, 3), dtype=np.uint8)
    x0 = size // 2 - side // 2 - ux * (frames // 2)
    y0 = size // 2 - side // 2 - uy * (frames // 2)
    for t in range(frames):
        x, y = x0 + ux * t, y0 + uy * t
        video[t, y : y + side, x : x + side] = PALETTE[colour]
    return video


def roundtrip(frames: np.ndarray, path, *, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Add Gaussian pixel noise, encode to H.264 MP4 at default quality, decode back."""
    noisy = np.clip(frames.astype(np.float32) + rng.normal(0.0, noise, frames.shape), 0, 255)
    return read_video(write_mp4(noisy.astype(np.uint8), path, crf=23))


@pytest.mark.parametrize("colour, direction", list(itertools.product(COLOURS, DIRECTIONS)))
def test_hand_made_videos_are_detected(colour, direction):
    found = detector.analyse_video(hand_made(colour, direction))
    assert (found.colour, found.direction) == (colour, direction)
    assert found.confidence > 0.8
    assert detector.detect(hand_made(colour, direction)) == (colour, direction, found.confidence)


@pytest.mark.parametrize("size, frames", [(16, 8)])  # the demo's size; 32x16 adds 15 s and nothing new
def test_every_combination_is_detected_after_noise_and_mp4(size, frames, tmp_path):
    config = ShapesConfig(frames=frames, height=size, width=size, shapes=shapes.SHAPES, held_out=0,
                          background_max=40)  # fmt: skip
    rng = np.random.default_rng(size)
    videos, captions = [], []
    for index in range(len(shapes.specs_for_split(config, "all"))):  # every combination once
        sample = shapes.make_sample(config, index, "all")
        path = tmp_path / f"{index}.mp4"
        roundtrip(sample.frames, path, noise=10.0, rng=rng)
        videos.append(path)  # paths are read by the detector itself
        captions.append(sample.caption)
    assert len(set(captions)) == 48
    scores = detector.score_videos(videos, captions)
    assert scores["colour_accuracy"] == 1.0 and scores["direction_accuracy"] == 1.0
    assert scores["adherence"] == 1.0 and scores["num_videos"] == 48.0
    assert scores["mean_confidence"] > 0.7


def test_blurred_dim_desaturated_generations_are_detected():
    # What an imperfect model makes: soft edges, washed-out colours, a grey background, pixel noise.
    config = ShapesConfig(frames=16, height=32, width=32, shapes=shapes.SHAPES, held_out=0)
    rng = np.random.default_rng(1)
    kernel = np.array([1, 4, 6, 4, 1], np.float32) / 16
    videos, captions = [], []
    for index in range(48):
        sample = shapes.make_sample(config, index, "all")
        video = sample.frames.astype(np.float32)
        video = np.apply_along_axis(np.convolve, 1, video, kernel, "same")  # blur along y
        video = np.apply_along_axis(np.convolve, 2, video, kernel, "same")  # blur along x
        video = 0.5 * (0.5 * video + 0.5 * video.mean(axis=-1, keepdims=True)) + 20
        video = video + rng.normal(0.0, 20.0, video.shape)
        videos.append(np.clip(video, 0, 255).astype(np.uint8))
        captions.append(sample.caption)
    scores = detector.score_videos(videos, captions)
    assert scores["adherence"] >= 0.95, scores


def test_float_videos_in_model_range_are_accepted():
    frames = hand_made("green", "up", size=32, frames=12, side=6)
    video = frames.transpose(3, 0, 1, 2).astype(np.float32) / 127.5 - 1.0  # (3, T, H, W) in [-1, 1]
    assert detector.detect(video)[:2] == ("green", "up")


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "coloured"])
def test_noise_videos_score_near_chance(kind):
    rng = np.random.default_rng(7)
    captions = [shapes.ShapeSpec(colour=c, shape="square", direction=d).caption
                for c, d in itertools.product(COLOURS, DIRECTIONS)] * 8  # fmt: skip
    videos = []
    for _ in captions:
        if kind == "uniform":
            video = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
        elif kind == "gaussian":
            video = np.clip(rng.normal(0.0, 0.5, (3, 8, 16, 16)), -1, 1).astype(np.float32)
        else:  # dark background with random blobs of a random palette colour in random places
            video = np.zeros((8, 16, 16, 3), dtype=np.uint8)
            colour = PALETTE[COLOURS[rng.integers(len(COLOURS))]]
            for t in range(8):
                y, x = rng.integers(0, 13, size=2)
                video[t, y : y + 3, x : x + 3] = colour
        videos.append(video)
    scores = detector.score_videos(videos, captions)
    assert scores["chance_adherence"] <= 1 / 12
    # Chance is 1/16; allow sampling error, but nowhere near a working model's score.
    assert scores["adherence"] <= 0.15, scores
    assert scores["direction_accuracy"] <= 0.4, scores


def test_static_and_empty_videos_count_as_wrong():
    still = np.repeat(hand_made("red", "right")[:1], 8, axis=0)
    found = detector.analyse_video(still)
    assert found.colour == "red" and found.direction is None and found.confidence == 0.0
    white = np.zeros((8, 16, 16, 3), dtype=np.uint8)
    for t in range(8):
        white[t, 6:10, t + 2 : t + 6] = 255
    assert detector.detect(white)[:2] == (None, "right")  # no hue: no colour, never counted right
    black = np.zeros((8, 16, 16, 3), dtype=np.uint8)
    assert detector.detect(black) == (None, None, 0.0)
    scores = detector.score_videos([still, black], ["a red square moving right"] * 2)
    assert scores["colour_accuracy"] == 0.5 and scores["direction_accuracy"] == 0.0
    assert scores["adherence"] == 0.0


def test_wrong_captions_lower_the_score():
    videos = [hand_made(c, d) for c, d in itertools.product(COLOURS, DIRECTIONS)]
    right = [f"a {c} square moving {d}" for c, d in itertools.product(COLOURS, DIRECTIONS)]
    wrong_colour = [f"a {COLOURS[(i // 4 + 1) % 4]} square moving {d}" for i, (_, d) in
                    enumerate(itertools.product(COLOURS, DIRECTIONS))]  # fmt: skip
    assert detector.score_videos(videos, right)["adherence"] == 1.0
    scores = detector.score_videos(videos, wrong_colour)
    assert scores["colour_accuracy"] == 0.0 and scores["direction_accuracy"] == 1.0
    assert scores["adherence"] == 0.0


def test_extra_palette_colours_join_the_candidates():
    video = hand_made("magenta", "down")
    assert detector.detect(video, colours=("red", "blue", "magenta"))[:2] == ("magenta", "down")
    scores = detector.score_videos([video], ["a magenta square moving down"])
    assert scores["adherence"] == 1.0 and scores["chance_adherence"] == pytest.approx(1 / 20)


def test_bad_inputs_are_rejected():
    video = hand_made("red", "left")
    with pytest.raises(ValueError, match="detections"):
        detector.score_videos([video, video], ["a red square moving left"])
    with pytest.raises(ValueError, match="caption"):
        detector.score_videos([video], ["a red square"])
    with pytest.raises(ValueError, match="purple"):
        detector.analyse_video(video, colours=("red", "purple"))
