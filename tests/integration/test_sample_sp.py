"""`pomvid sample --sp 2` starts the `deepspeed` launcher (2 CPU processes, gloo) that samples each video
across an SP group, frames sharded; it writes the same video as `--sp 1` in this process."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

from pipeline.cli import main as pomvid
from pipeline.data.encode.text_clip import make_tiny_clip
from pipeline.media import read_video
from tests.deepspeed_launch import ROOT, cpu_env, free_port, output_of
from tests.unit.test_generate import TEXT_DIM, make_run

pytestmark = pytest.mark.slow


def _args(out, run) -> list[str]:
    return ["--checkpoint", str(run), "--prompt", "a red square moving up", "--prompt", "a blue ball",
            "--steps", "3", "--cfg", "2", "--seed", "4", "--device", "cpu", "--out", str(out)]


def test_sample_sp2_through_the_launcher_writes_the_same_videos_as_sp1(tmp_path):
    clip = make_tiny_clip(tmp_path / "clip", width=TEXT_DIM, context_length=8)
    run = make_run(tmp_path / "run", clip)
    assert pomvid(["sample", *_args(tmp_path / "sp1", run)]) == 0  # one process, here
    two = subprocess.run([sys.executable, "-m", "pipeline.cli", "sample", *_args(tmp_path / "sp2", run), "--sp", "2",
                          "--master-port", str(free_port())], cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                         timeout=400)
    assert two.returncode == 0, output_of(two)
    rows = {name: list(csv.DictReader(open(tmp_path / name / "samples.csv"))) for name in ("sp1", "sp2")}
    assert [r["prompt"] for r in rows["sp2"]] == ["a red square moving up", "a blue ball"]
    for a, b in zip(rows["sp1"], rows["sp2"]):
        first, second = read_video(a["mp4"]).astype(np.int16), read_video(b["mp4"]).astype(np.int16)
        assert first.shape == second.shape
        # The PoM state sums are added in another order across 2 ranks; the MP4 encoder turns those float
        # rounding differences into a few pixel values off by 1-2 levels.
        diff = np.abs(first - second)
        assert diff.max() <= 3 and diff.mean() < 0.02, (b["mp4"], int(diff.max()), float(diff.mean()))
