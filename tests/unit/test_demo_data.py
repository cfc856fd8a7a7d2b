"""pipeline.demo.shapes: the moving-shapes data set is deterministic, balanced, and shows its caption."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from pipeline.demo import shapes
from pipeline.demo.shapes import PALETTE, ShapesConfig, ShapeSpec
from pipeline.media import read_video


def object_track(frames: np.ndarray, background: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame centroid (x, y) and pixel mass of everything that differs from the background."""
    weight = np.abs(frames.astype(np.float32) - background).max(axis=-1)  # (T, H, W)
    mass = weight.sum(axis=(1, 2))
    ys, xs = np.mgrid[: frames.shape[1], : frames.shape[2]]
    cx = (weight * xs).sum(axis=(1, 2)) / mass
    cy = (weight * ys).sum(axis=(1, 2)) / mass
    return np.stack([cx, cy], axis=1), mass


@pytest.mark.parametrize(
    "field, value",
    [
        ("frames", 1),
        ("height", 4),
        ("fps", 0),
        ("colours", ("red", "purple")),
        ("shapes", ("square", "square")),
        ("directions", ()),
        ("max_size", 0.9),
        ("min_travel", 0),
        ("background_max", 200),
        ("held_out", 5),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"ShapesConfig.{field}"):
        ShapesConfig(**{field: value})


def test_caption_roundtrip_and_parse_errors():
    spec = ShapeSpec(colour="blue", shape="triangle", direction="down")
    assert spec.caption == "a blue triangle moving down"
    assert shapes.parse_caption(spec.caption) == spec
    for bad in ["a purple square moving left", "a red square going left", "red square moving left"]:
        with pytest.raises(ValueError, match="caption"):
            shapes.parse_caption(bad)


def test_held_out_pairs_keep_every_colour_and_direction_in_training():
    config = ShapesConfig(shapes=("square", "circle"))
    held = shapes.held_out_pairs(config.colours, config.directions, count=4, seed=0)
    assert len(held) == 4
    assert len({c for c, _ in held}) == 4 and len({d for _, d in held}) == 4  # no repeats
    assert held == shapes.held_out_pairs(config.colours, config.directions, count=4, seed=0)
    assert any(
        shapes.held_out_pairs(config.colours, config.directions, count=4, seed=s) != held for s in range(1, 5)
    )
    train, held_out = shapes.split_specs(config)
    assert len(train) == 24 and len(held_out) == 8  # 12 of 16 pairs x 2 shapes; 4 pairs x 2 shapes
    assert {(s.colour, s.direction) for s in held_out} == set(held)
    assert not {(s.colour, s.direction) for s in train} & set(held)
    assert {s.colour for s in train} == set(config.colours)
    assert {s.direction for s in train} == set(config.directions)
    with pytest.raises(ValueError, match="count"):
        shapes.held_out_pairs(("red", "blue"), tuple(shapes.DIRECTIONS), count=3)


def test_samples_are_deterministic_for_a_seed_and_vary_across_seeds():
    config = ShapesConfig(frames=8, height=16, width=16, background_max=20)
    first = [shapes.make_sample(config, i) for i in range(6)]
    again = [shapes.make_sample(config, i) for i in range(6)]
    other = [shapes.make_sample(ShapesConfig(frames=8, height=16, width=16, seed=1), i) for i in range(6)]
    for a, b in zip(first, again):
        assert a.spec == b.spec and np.array_equal(a.frames, b.frames)
    assert any(not np.array_equal(a.frames, c.frames) for a, c in zip(first, other))
    # Per-sample randomness: start, speed and size differ between samples of the same caption.
    assert len({round(abs(s.velocity[0] + s.velocity[1]), 6) for s in first}) == 6
    assert len({s.start for s in first}) == 6 and len({s.size for s in first}) == 6


@pytest.mark.parametrize("size, frames", [(32, 16), (16, 8)])
def test_every_sample_shows_its_caption(size, frames):
    config = ShapesConfig(frames=frames, height=size, width=size, shapes=shapes.SHAPES, held_out=0,
                          background_max=30)  # fmt: skip
    specs = shapes.specs_for_split(config, "all")
    samples = [shapes.make_sample(config, i, "all") for i in range(len(specs))]
    assert {s.spec for s in samples} == set(specs)  # one full cycle covers every combination once
    for sample in samples:
        spec, video = sample.spec, sample.frames
        assert video.shape == (frames, size, size, 3) and video.dtype == np.uint8
        # Colour: every pixel lies on the line from the background to the caption's palette colour
        # (anti-aliased edges blend the two), and some pixels are mostly covered.
        offset = video.reshape(-1, 3).astype(np.float32) - sample.background  # (P, 3)
        towards = np.asarray(PALETTE[spec.colour], np.float32) - sample.background  # (3,)
        cover = offset @ towards / (towards @ towards)  # (P,)
        assert np.abs(offset - cover[:, None] * towards).max() <= 1.0, spec
        assert cover.max() >= 0.5 and cover.min() >= -0.01, spec
        # Motion: the centroid moves along the caption's axis, by at least half the free room.
        track, mass = object_track(video, sample.background)
        moved = track[-1] - track[0]
        ux, uy = shapes.DIRECTIONS[spec.direction]
        along, across = (moved[0] * ux, moved[1]) if ux else (moved[1] * uy, moved[0])
        assert along >= 0.5 * (size - sample.size) - 0.5 and abs(across) < 0.5, (spec, moved)
        # The object stays in the frame from first to last frame.
        for t in (0, frames - 1):
            centre = np.add(sample.start, np.multiply(sample.velocity, t))
            assert np.all(centre - sample.size / 2 >= -1e-6) and np.all(
                centre + sample.size / 2 <= size + 1e-6
            )
        assert mass.min() > 0.8 * mass.max(), spec


def test_written_dataset_matches_its_manifest(tmp_path):
    config = ShapesConfig(frames=8, height=16, width=16)
    manifest = shapes.write_shapes_dataset(tmp_path / "data", config, count=10, split="train", workers=2)
    assert manifest == (tmp_path / "data" / "train.csv").resolve()
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 10 and list(rows[0]) == ["video", "caption", "colour", "shape", "direction"]
    held = set(shapes.held_out_pairs(config.colours, config.directions, count=4))
    for index, row in enumerate(rows):
        assert row["caption"] == f"a {row['colour']} {row['shape']} moving {row['direction']}"
        assert (row["colour"], row["direction"]) not in held
        assert row["video"].startswith("/")  # absolute: any reader finds it
        decoded = read_video(row["video"])
        expected = shapes.make_sample(config, index)
        assert decoded.shape == (8, 16, 16, 3) and expected.caption == row["caption"]
        assert np.abs(decoded.astype(int) - expected.frames.astype(int)).mean() < 4  # close after H.264


def test_dataset_is_deterministic_and_relative_paths_work(tmp_path):
    config = ShapesConfig(frames=6, height=16, width=16, seed=3)
    first = shapes.write_shapes_dataset(tmp_path / "a", config, count=4, split="held_out", workers=1)
    second = shapes.write_shapes_dataset(tmp_path / "b", config, count=4, split="held_out",
                                         absolute_paths=False)  # fmt: skip
    rows_a = list(csv.DictReader(open(first, newline="")))
    rows_b = list(csv.DictReader(open(second, newline="")))
    assert [r["caption"] for r in rows_a] == [r["caption"] for r in rows_b]
    assert rows_b[0]["video"] == "videos/held_out_000000.mp4"
    for row_a, row_b in zip(rows_a, rows_b):
        assert np.array_equal(read_video(row_a["video"]), read_video(tmp_path / "b" / row_b["video"]))
    with pytest.raises(ValueError, match="split"):
        shapes.write_shapes_dataset(tmp_path / "c", config, count=1, split="test")
    with pytest.raises(ValueError, match="no combinations"):
        shapes.make_sample(ShapesConfig(held_out=0), 0, "held_out")
