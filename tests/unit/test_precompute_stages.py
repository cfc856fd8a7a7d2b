"""Precompute without Ray: work-unit ids, the stage functions in one process, config checks, output
preparation (refusal, overwrite), the command's flags."""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.commands.precompute import add_arguments, config_from_args
from pipeline.data.decode.video import decode_clip
from pipeline.data.encode.text_clip import make_tiny_clip
from pipeline.data.encode.vae_factory import build_vae
from pipeline.data.precompute.config import PrecomputeConfig
from pipeline.data.precompute.run import (
    PrecomputeError,
    build_output_manifest,
    describe_text,
    describe_vae,
    prepare_output,
    steady_rate,
)
from pipeline.data.precompute.stages import TextStage, VAEStage, decode_units, write_units
from pipeline.data.source.plan import plan_run
from pipeline.data.store.shards import read_errors, read_output_manifest, read_samples, shard_path

BUCKETS = "9x32x32,9x32x48,9x48x32"


def test_config_errors_name_the_field(tmp_path):
    ok = dict(manifest=str(tmp_path), output=str(tmp_path / "out"), vae="pixel", text_encoder="clip",
              text_encoder_path=str(tmp_path))
    PrecomputeConfig(**ok)
    for change, match in [({"manifest": str(tmp_path / "nope.csv")}, "manifest=.*does not exist"),
                          ({"buckets": "17x256"}, "buckets='17x256'"),
                          ({"fps": 0}, "fps=0"),
                          ({"vae": "cogvideox"}, "needs vae_path"),
                          ({"storage_dtype": "int8"}, "storage_dtype='int8'"),
                          ({"rows_per_work_unit": 0}, "rows_per_work_unit=0"),
                          ({"text_encoder": "t5", "text_encoder_path": None}, "needs text_encoder_path"),
                          ({"validation_prompts": str(tmp_path / "p.txt")}, "validation_prompts=.*one prompt per line"),
                          ({"decode_timeout": 0}, "decode_timeout=0: give seconds > 0"),
                          ({"actor_restarts": -1}, "actor_restarts=-1: must be an integer >= 0")]:
        with pytest.raises(ValueError, match=match):
            PrecomputeConfig(**{**ok, **change})


def test_flags_build_the_config(tmp_path):
    (tmp_path / "vae.json").write_text('{"spatial": 4}')
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--manifest", str(tmp_path), "--out", str(tmp_path / "o"), "--vae", "pixel",
                              "--vae-config", f"@{tmp_path / 'vae.json'}", "--text-encoder", "clip",
                              "--text-encoder-config", '{"embed_dim": 8}', "--num-gpus-per-actor", "0.5",
                              "--rows-per-work-unit", "4", "--overwrite", "--no-progress",
                              "--validation-prompts", str(tmp_path / "vae.json")])
    config = config_from_args(args)
    assert config.read_validation_prompts() == ['{"spatial": 4}']
    assert config.vae_config == {"spatial": 4} and config.text_encoder_config == {"embed_dim": 8}
    assert (config.num_gpus_per_actor, config.rows_per_work_unit, config.overwrite, config.progress) == (0.5, 4, True, False)
    assert config.vae_build_kwargs()["device"] == "cuda" and config.text_gpus == 0.5
    args.vae_config = "{oops"
    with pytest.raises(ValueError, match="--vae-config: not JSON"):
        config_from_args(args)


def test_steady_rate_needs_enough_units():
    assert steady_rate([(0.0, 4), (0.1, 4)]) == 0.0
    assert steady_rate([(10.0, 4), (11.0, 4), (12.0, 4), (14.0, 4)]) == pytest.approx(3.0)


@pytest.fixture(scope="module")
def setup(test_videos, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stages")
    clip = make_tiny_clip(folder / "clip")
    config = PrecomputeConfig(manifest=str(folder), output=str(folder / "out"), buckets=BUCKETS, vae="pixel",
                              vae_config={"spatial": 4}, text_encoder="clip", text_encoder_path=str(clip),
                              storage_dtype="float32", vae_batch_size=2)
    vae = describe_vae(config.vae, config.vae_build_kwargs(), config.buckets)
    text = describe_text(config.text_encoder, config.text_build_kwargs())
    return config, vae, text


def test_stages_in_one_process_write_a_shard_and_errors(setup, test_videos, tmp_path):
    config, vae, text = setup
    paths = [test_videos.landscape.path, test_videos.missing, test_videos.fps30.path, test_videos.text_mp4,
             test_videos.portrait.path]
    manifest = tmp_path / "m.csv"
    long = "a very long caption " + "with many words " * 12  # more than the tiny CLIP's 32 tokens
    captions = ["video 0", "video 1", "video 2", "video 3", long]
    manifest.write_text("video,caption\n" + "".join(f"{p},{c}\n" for p, c in zip(paths, captions)))
    plan = plan_run(manifest, rows_per_unit=5, settings_hash="s", finished=[], write_to=tmp_path)
    unit_id = plan.unit_ids[0].as_py()
    batch = pq.read_table(plan.plan_files[0])
    decoded = decode_units(batch, buckets=BUCKETS, fps=8.0, clips_per_video=2, backend="auto")
    meta = json.loads(decoded["meta"][0])
    assert decoded["video"][0].dtype == np.uint8  # what crosses the object store: a quarter of float32
    assert [e["reason"] for e in meta["errors"]] == ["missing", "not_a_video"]  # recorded, not raised
    # fps30 (3 s) holds two 9-frame clips at 8 fps, the 2 s landscape and portrait one each; table order.
    assert [(c["bucket"], c["source_row"]) for c in meta["clips"]] == [
        ("9x32x32", 2), ("9x32x32", 2), ("9x32x48", 0), ("9x48x32", 4)]
    encode = VAEStage(kind="pixel", build_kwargs=config.vae_build_kwargs(), fingerprint=vae["fingerprint"],
                      batch_size=2, num_cpus=1)
    embed = TextStage(kind="clip", build_kwargs=config.text_build_kwargs(), fingerprint=text["fingerprint"],
                      batch_size=8, num_cpus=1)
    done = write_units(embed(encode(decoded)), output=config.output, storage_dtype="float32",
                       bucket_keys=BUCKETS.split(","))
    assert done.column("rows").to_pylist() == [4] and done.column("clips_per_bucket").to_pylist() == [[2, 1, 1]]
    assert done.column("failures").to_pylist() == [[{"reason": "missing", "count": 1},
                                                    {"reason": "not_a_video", "count": 1}]]
    assert done.column("long_captions").to_pylist() == [1]  # counted per clip, named in the index
    assert done.column("long_caption_examples").to_pylist() == [[long.strip()]]
    assert done.column("file").to_pylist() == [f"shards/{unit_id[:2]}/{unit_id}.parquet"]
    samples = read_samples(shard_path(config.output, unit_id))
    pixel = build_vae("pixel", config={"spatial": 4})
    for s in samples:
        f, h, w = (int(v) for v in s["bucket"].split("x"))
        video = decode_clip(s["source_path"], frames=f, height=h, width=w, fps=8.0, start=s["clip_start"])
        assert torch.equal(s["latent"], pixel.encode(torch.from_numpy(video)[None])[0])
    assert len({s["id"] for s in samples}) == 4 and [s["clip_start"] for s in samples[:2]] == [0.0, 1.5]
    assert {e["path"] for e in read_errors(config.output)} == {str(test_videos.missing), str(test_videos.text_mp4)}


def test_actor_refuses_other_weights(setup):
    config, vae, _ = setup
    with pytest.raises(RuntimeError, match="differs from the one the run was started with"):
        VAEStage(kind="pixel", build_kwargs={**config.vae_build_kwargs(), "config": {"spatial": 2}},
                 fingerprint=vae["fingerprint"], batch_size=2, num_cpus=1)


def test_prepare_output_refuses_or_overwrites(setup, tmp_path):
    config, vae, text = setup
    config = PrecomputeConfig(**{**config.to_dict(), "output": str(tmp_path / "out")})
    manifest = build_output_manifest(config, vae, text, records=3)
    assert prepare_output(config, manifest) == []
    assert read_output_manifest(config.output)["status"] == "running"
    (tmp_path / "out" / "shards" / "ab").mkdir(parents=True)
    (tmp_path / "out" / "shards" / "ab" / ".abu.parquet.abc.tmp").write_bytes(b"?")
    (tmp_path / "out" / "shards" / "ab" / "abu.parquet").write_bytes(b"?")
    # same settings: accepted, leftovers of a killed writer removed, finished units found by one listing
    assert prepare_output(config, manifest) == ["abu"]
    assert [p.name for p in (tmp_path / "out" / "shards" / "ab").iterdir()] == ["abu.parquet"]
    other = PrecomputeConfig(**{**config.to_dict(), "fps": 12.0, "storage_dtype": "float16"})
    with pytest.raises(PrecomputeError, match="fps: 8.0 != 12.0\n  storage_dtype: 'float32' != 'float16'"):
        prepare_output(other, build_output_manifest(other, vae, text, records=3))
    again = PrecomputeConfig(**{**other.to_dict(), "overwrite": True})
    prepare_output(again, build_output_manifest(again, vae, text, records=3))
    assert not (tmp_path / "out" / "shards").exists()
    assert read_output_manifest(config.output)["settings"]["fps"] == 12.0


def test_a_hanging_decode_is_recorded_as_timeout_and_the_unit_goes_on(test_videos, tmp_path):
    stuck = tmp_path / "stuck.mp4"
    os.mkfifo(stuck)  # nobody writes: opening it for reading blocks, in C, for ever
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"video,caption\n{test_videos.landscape.path},a\n{stuck},b\n{test_videos.portrait.path},c\n")
    plan = plan_run(manifest, rows_per_unit=3, settings_hash="s", finished=[], write_to=tmp_path)
    began = time.monotonic()
    try:
        decoded = decode_units(pq.read_table(plan.plan_files[0]), buckets=BUCKETS, fps=8.0, clips_per_video=1,
                               backend="auto", decode_timeout=1.5)
    finally:  # release the abandoned reader: open the write end, then close it (the reader sees EOF)
        os.close(os.open(stuck, os.O_WRONLY | os.O_NONBLOCK))
    meta = json.loads(decoded["meta"][0])
    assert [(e["path"], e["reason"]) for e in meta["errors"]] == [(str(stuck), "timeout")]
    assert "longer than 1.5 s" in meta["errors"][0]["message"]
    assert sorted(c["source_row"] for c in meta["clips"]) == [0, 2]  # the videos around it are decoded
    assert time.monotonic() - began < 30


def test_local_output_on_a_multi_node_cluster_is_refused(tmp_path):
    from pipeline.data.precompute.checks import PrecomputeError, check_output_is_shared

    (tmp_path / "m.csv").write_text("video,caption\na.mp4,a\n")
    base = dict(manifest=str(tmp_path / "m.csv"), buckets=BUCKETS, vae="pixel", text_encoder="clip",
                text_encoder_path=str(tmp_path))
    nodes = [{"Alive": True, "NodeManagerAddress": "10.0.0.1"}, {"Alive": True, "NodeManagerAddress": "10.0.0.2"}]
    local = PrecomputeConfig(**base, output=str(tmp_path / "out"))
    with pytest.raises(PrecomputeError, match="2 nodes") as info:
        check_output_is_shared(local, nodes)
    message = str(info.value)
    assert "10.0.0.1, 10.0.0.2" in message and "s3://" in message and "--output-is-shared" in message
    check_output_is_shared(local, nodes[:1] + [{"Alive": False, "NodeManagerAddress": "10.0.0.2"}])  # one alive
    check_output_is_shared(PrecomputeConfig(**base, output=str(tmp_path / "out"), output_is_shared=True), nodes)
    check_output_is_shared(PrecomputeConfig(**base, output="s3://bucket/latents"), nodes)
