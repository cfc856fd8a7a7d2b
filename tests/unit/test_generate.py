"""`pomvid sample` and pipeline/generate.py on tiny checkpoints written with the real checkpoint writer.

The checkpoints hold a tiny PoM DiT with random (non-zero) weights as the EMA, the run folder's copy of
a latents manifest naming the pixel codec and a tiny CLIP text encoder saved to disk; only the
DeepSpeed engine is a stand-in (sampling never reads DeepSpeed's files).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.cli import main as pomvid
from pipeline.config_overrides import config_to_dict
from pipeline.data.encode.text_clip import make_tiny_clip
from pipeline.data.encode.vae import PixelCodec
from pipeline.generate import SampleError, SampleOptions, VideoGenerator, read_prompts, resolve_checkpoint
from pipeline.media import read_video
from pipeline.models.configs import DiTConfig
from pipeline.models.dit import PoMDiT
from pipeline.train import checkpoint as ckpt

TEXT_DIM, FRAMES, SIZE = 16, 4, 8
PROMPTS = ["a red square moving up", "a blue circle moving left", "a green square moving down"]


class _Engine:
    """Stands in for DeepSpeed's engine: only `save_checkpoint` is called by the writer."""

    def save_checkpoint(self, folder, tag, client_state, save_latest):
        (Path(folder) / tag).mkdir()


def make_run(root: Path, clip: Path, *, causal: bool = False, step: int = 5, in_channels: int = 12,
             text_dim: int = TEXT_DIM) -> Path:
    """A run folder with one complete checkpoint and latents_manifest.json."""
    config = DiTConfig(in_channels=in_channels, text_dim=text_dim, width=32, depth=2, patch_size=2, mlp_ratio=2.0,
                       freq_dim=32, causal=causal)
    torch.manual_seed(1)
    model = PoMDiT(config)
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised layers would make every video the noise itself
            p.normal_(0, 0.2)
    from pipeline.data.encode.text_factory import build_text_encoder

    text = build_text_encoder("clip", path=clip)
    vae = PixelCodec(spatial=2)
    manifest = {"status": "complete", "vae": vae.fingerprint(), "text_encoder": text.fingerprint(),
                "latent": {"channels": vae.latent_channels}, "text": {"dim": text.dim},
                "buckets": [{"key": f"{FRAMES}x{SIZE}x{SIZE}", "frames": FRAMES, "height": SIZE, "width": SIZE,
                             "latent_shape": list(vae.latent_shape(FRAMES, SIZE, SIZE))}],
                "settings": {"fps": 8.0}}
    root.mkdir(parents=True)
    (root / "latents_manifest.json").write_text(json.dumps(manifest))
    state = {"config": {"model": config_to_dict(config), "data": {"path": ""}}, "mlflow_run_id": None,
             "world_size": 1}
    ckpt.save(_Engine(), root / "checkpoints", step, ema_state=dict(model.state_dict()), trainer_state=state,
              rank=0, barrier=lambda: None)
    return root


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", width=TEXT_DIM, context_length=8)


@pytest.fixture(scope="module")
def run(tmp_path_factory, clip) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "bidirectional", clip)


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory, clip) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "causal", clip, causal=True)


@pytest.fixture(scope="module")
def generator(run) -> VideoGenerator:
    return VideoGenerator.load(run, device="cpu")


def test_same_seed_same_videos_and_prompt_i_uses_seed_plus_i(generator):
    options = SampleOptions(steps=3, seed=3, batch_size=2)
    first = generator.generate(PROMPTS, options)
    again = generator.generate(PROMPTS, options)
    for a, b in zip(first, again):
        assert torch.equal(a.video, b.video)
    assert [v.seed for v in first] == [3, 4, 5]
    alone = generator.generate(PROMPTS[1:2], SampleOptions(steps=3, seed=4))[0]
    torch.testing.assert_close(alone.video, first[1].video, atol=1e-5, rtol=0)
    other = generator.generate(PROMPTS[:1], SampleOptions(steps=3, seed=9))[0]
    assert (other.video - first[0].video).abs().max() > 1e-2  # another seed, another video
    assert first[0].video.shape == (3, FRAMES, SIZE, SIZE)
    assert first[0].video.abs().max() <= 1.0


def test_sample_command_writes_mp4_gif_and_csv_deterministically(run, tmp_path):
    args = ["sample", "--checkpoint", str(run), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--steps", "3",
            "--seed", "7", "--device", "cpu", "--scale", "4"]
    assert pomvid([*args, "--out", str(tmp_path / "a")]) == 0
    assert pomvid([*args, "--out", str(tmp_path / "b")]) == 0
    with open(tmp_path / "a" / "samples.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["prompt"], r["seed"]) for r in rows] == [(PROMPTS[0], "7"), (PROMPTS[1], "8")]
    for row in rows:
        frames = read_video(row["mp4"])
        assert frames.shape == (FRAMES, SIZE * 4, SIZE * 4, 3)
        assert Path(row["gif"]).is_file()
        twin = tmp_path / "b" / Path(row["mp4"]).name
        assert (frames == read_video(twin)).all()


def test_sequential_equals_parallel_block_causal_generation(causal_run):
    gen = VideoGenerator.load(causal_run, device="cpu")
    options = SampleOptions(steps=3, seed=11, guidance=2.0)
    parallel = gen.generate(PROMPTS[:2], options)
    sequential = gen.generate(PROMPTS[:2], SampleOptions(steps=3, seed=11, guidance=2.0, sequential=True))
    for p, s in zip(parallel, sequential):
        torch.testing.assert_close(s.video, p.video, atol=1e-5, rtol=1e-5)
    longer = gen.generate(PROMPTS[:1], SampleOptions(steps=2, frames=3 * FRAMES, sequential=True))[0]
    assert longer.video.shape[1] == 3 * FRAMES  # longer than the training clips


def test_bfloat16_sampling_is_close_to_float32(run):
    """The GPU recipes' training dtype: weights and latents in bf16, decoded in fp32."""
    options = SampleOptions(steps=2, seed=3, guidance=2.0)
    full = VideoGenerator.load(run, device="cpu").generate(PROMPTS[:1], options)[0].video
    half_gen = VideoGenerator.load(run, device="cpu", dtype="bfloat16")
    assert next(half_gen.model.parameters()).dtype == torch.bfloat16
    half = half_gen.generate(PROMPTS[:1], options)[0].video
    assert half.dtype == torch.float32 and not torch.equal(half, full)
    assert float((half - full).abs().mean()) < 0.05
    with pytest.raises(SampleError, match="dtype='fp16' is unknown"):
        VideoGenerator.load(run, device="cpu", dtype="fp16")


def test_checkpoint_resolution(run):
    latest = resolve_checkpoint(run)
    assert latest == run / "checkpoints" / "step_00000005"
    assert resolve_checkpoint(run / "checkpoints") == latest
    assert resolve_checkpoint(latest) == latest


def expect_error(args: list[str], capsys, *needles: str) -> None:
    assert pomvid(["sample", *args]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err


def test_errors_name_the_path_or_value(run, causal_run, clip, tmp_path, capsys):
    out = ["--out", str(tmp_path / "out"), "--steps", "2"]
    expect_error(["--checkpoint", str(tmp_path / "nope"), "--prompt", "x", *out], capsys,
                 str(tmp_path / "nope"), "no such folder")
    expect_error(["--checkpoint", str(run), *out], capsys, "no prompt")
    expect_error(["--checkpoint", str(run), "--prompts-file", str(tmp_path / "p.txt"), *out], capsys,
                 str(tmp_path / "p.txt"))
    expect_error(["--checkpoint", str(run), "--prompt", "x", "--height", "10", *out], capsys,
                 "cannot make 4 frames of 10x8", "multiples of 4")
    expect_error(["--checkpoint", str(run), "--prompt", "x", "--sequential", *out], capsys,
                 "--sequential needs a block-causal model", str(run / "checkpoints" / "step_00000005"))
    expect_error(["--checkpoint", str(run), "--prompt", "x", "--steps", "0", "--out", str(tmp_path)], capsys,
                 "steps=0")
    # an interrupted save: the step folder has no COMPLETE marker
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "checkpoints" / "step_00000005" / ckpt.COMPLETE).unlink()
    (broken / "checkpoints" / ckpt.LATEST).unlink()
    expect_error(["--checkpoint", str(broken), "--prompt", "x", *out], capsys, "no complete checkpoint",
                 "step_00000005")
    expect_error(["--checkpoint", str(broken / "checkpoints" / "step_00000005"), "--prompt", "x", *out], capsys,
                 "incomplete", "COMPLETE")
    # no manifest: neither the run's copy nor a data.path
    bare = tmp_path / "bare"
    shutil.copytree(run, bare)
    (bare / "latents_manifest.json").unlink()
    expect_error(["--checkpoint", str(bare), "--prompt", "x", *out], capsys, "latents_manifest.json")
    # model/encoder mismatches
    wide = make_run(tmp_path / "wide", clip, text_dim=24)
    expect_error(["--checkpoint", str(wide), "--prompt", "x", *out], capsys, "mismatch", "24-wide", "16")
    channels = make_run(tmp_path / "channels", clip, in_channels=6)
    expect_error(["--checkpoint", str(channels), "--prompt", "x", *out], capsys, "mismatch", "6 latent", "12")
    # missing EMA weights
    no_ema = tmp_path / "no_ema"
    shutil.copytree(run, no_ema)
    (no_ema / "checkpoints" / "step_00000005" / ckpt.EMA_FILE).unlink()
    expect_error(["--checkpoint", str(no_ema), "--prompt", "x", *out], capsys, ckpt.EMA_FILE)


def test_cuda_request_without_gpu_and_prompt_files(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expect_error(["--checkpoint", str(run), "--prompt", "x", "--device", "cuda", "--out", str(tmp_path)], capsys,
                 "no CUDA GPU", "--device cpu")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# held out\na red square moving up\n\n a blue circle moving left \n")
    assert read_prompts(prompts) == ["a red square moving up", "a blue circle moving left"]
    prompts.write_text("# nothing\n")
    with pytest.raises(SampleError, match="holds no prompt"):
        read_prompts(prompts)
