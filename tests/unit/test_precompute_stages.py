"""Precompute without Ray: work-unit ids, the stage functions in one process, config checks, output
preparation (refusal, overwrite), the command's flags."""

from __future__ import annotations

import argparse
import json

import numpy as np
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
from pipeline.data.precompute.stages import (
    TextStage,
    VAEStage,
    decode_units,
    make_work_units,
    unit_to_row,
    write_units,
)
from pipeline.data.source.manifest import VideoRecord
from pipeline.data.store.shards import read_errors, read_output_manifest, read_samples, shard_path

BUCKETS = "9x32x32,9x32x48,9x48x32"


def records(n, caption="a video", path="/v/{i}.mp4"):
    return [VideoRecord(path=path.format(i=i), caption=caption, source_row=i, source="m.csv") for i in range(n)]


def test_work_unit_ids_are_stable_and_local():
    units = make_work_units(records(7), rows_per_unit=3, settings_hash="s")
    assert [len(u.videos) for u in units] == [3, 3, 1]
    assert [u.unit_id for u in units] == [u.unit_id for u in make_work_units(records(7), rows_per_unit=3, settings_hash="s")]
    # Appending rows keeps the full units before them; the partial last one changes.
    longer = make_work_units(records(9), rows_per_unit=3, settings_hash="s")
    assert [u.unit_id for u in longer[:2]] == [u.unit_id for u in units[:2]] and longer[2].unit_id != units[2].unit_id
    # Other settings or another caption: other ids.
    assert make_work_units(records(3), rows_per_unit=3, settings_hash="t")[0].unit_id != units[0].unit_id
    assert make_work_units(records(3, caption="b"), rows_per_unit=3, settings_hash="s")[0].unit_id != units[0].unit_id
    # The same row twice: two distinct videos.
    twice = make_work_units(records(2, path="/v/same.mp4"), rows_per_unit=3, settings_hash="s")[0]
    assert len({v for v, _ in twice.videos}) == 2


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
                          ({"validation_prompts": str(tmp_path / "p.txt")}, "validation_prompts=.*one prompt per line")]:
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


def test_stages_in_one_process_write_a_shard_and_errors(setup, test_videos):
    config, vae, text = setup
    paths = [test_videos.landscape.path, test_videos.missing, test_videos.fps30.path, test_videos.text_mp4,
             test_videos.portrait.path]
    recs = [VideoRecord(path=str(p), caption=f"video {i}", source_row=i, source="m") for i, p in enumerate(paths)]
    unit = make_work_units(recs, rows_per_unit=5, settings_hash="s")[0]
    batch = {k: np.array([v]) for k, v in unit_to_row(unit).items()}
    decoded = decode_units(batch, buckets=BUCKETS, fps=8.0, clips_per_video=2, backend="auto")
    meta = json.loads(decoded["meta"][0])
    assert [e["reason"] for e in meta["errors"]] == ["missing", "not_a_video"]  # recorded, not raised
    # fps30 (3 s) holds two 9-frame clips at 8 fps, the 2 s landscape and portrait one each; table order.
    assert [(c["bucket"], c["source_row"]) for c in meta["clips"]] == [
        ("9x32x32", 2), ("9x32x32", 2), ("9x32x48", 0), ("9x48x32", 4)]
    encode = VAEStage(kind="pixel", build_kwargs=config.vae_build_kwargs(), fingerprint=vae["fingerprint"],
                      batch_size=2, num_cpus=1)
    embed = TextStage(kind="clip", build_kwargs=config.text_build_kwargs(), fingerprint=text["fingerprint"],
                      batch_size=8, num_cpus=1)
    done = write_units(embed(encode(decoded)), output=config.output, storage_dtype="float32")
    assert done["clips"].tolist() == [4] and json.loads(done["failures"][0]) == {"missing": 1, "not_a_video": 1}
    samples = read_samples(shard_path(config.output, unit.unit_id))
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
    prepare_output(config, manifest)
    assert read_output_manifest(config.output)["status"] == "running"
    (tmp_path / "out" / "shards").mkdir()
    (tmp_path / "out" / "shards" / ".u.parquet.abc.tmp").write_bytes(b"?")
    prepare_output(config, manifest)  # same settings: accepted, leftovers of a killed writer removed
    assert list((tmp_path / "out" / "shards").iterdir()) == []
    other = PrecomputeConfig(**{**config.to_dict(), "fps": 12.0, "storage_dtype": "float16"})
    with pytest.raises(PrecomputeError, match="fps: 8.0 != 12.0\n  storage_dtype: 'float32' != 'float16'"):
        prepare_output(other, build_output_manifest(other, vae, text, records=3))
    (tmp_path / "out" / "shards" / "u.parquet").write_bytes(b"?")
    again = PrecomputeConfig(**{**other.to_dict(), "overwrite": True})
    prepare_output(again, build_output_manifest(again, vae, text, records=3))
    assert list((tmp_path / "out" / "shards").iterdir()) == []
    assert read_output_manifest(config.output)["settings"]["fps"] == 12.0
