"""The Ray Data precompute pipeline end to end, on a local Ray with 2 CPUs: tiny CogVideoX VAE + tiny
T5, the pixel codec + tiny CLIP, errors, resume (also after SIGKILL), stale-output refusal, the CLI
and the Ray job entry point."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch

from pipeline.cli import main as pomvid
from pipeline.data.decode.video import decode_clip
from pipeline.data.encode.fingerprint import fingerprint_diff
from pipeline.data.encode.text_clip import make_tiny_clip
from pipeline.data.encode.text_factory import build_text_encoder
from pipeline.data.encode.text_t5 import make_tiny_t5
from pipeline.data.encode.vae_factory import build_vae
from pipeline.data.load.loader import LatentDataset, LatentLoader
from pipeline.data.precompute.config import PrecomputeConfig
from pipeline.data.precompute.run import PrecomputeError, run_precompute
from pipeline.data.store.index import read_index
from pipeline.data.store.shards import read_errors, read_output_manifest, read_samples, read_shard
from pipeline.data.store.text_conditioning import read_text_conditioning
from tests.integration.ray_cluster import add_node, start_cluster

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BUCKETS = "9x32x32,9x32x48,9x48x32"  # 9 frames at 8 fps: 1 s per clip; the 2-3 s test videos fit
TINY_COG = {
    "block_out_channels": [8, 16, 16], "down_block_types": ["CogVideoXDownBlock3D"] * 3,
    "up_block_types": ["CogVideoXUpBlock3D"] * 3, "latent_channels": 4, "layers_per_block": 1,
    "norm_num_groups": 4, "temporal_compression_ratio": 4, "sample_height": 32, "sample_width": 32,
}
GOOD = ["h264_mp4", "mpeg4_avi", "vp9_webm", "h264_mkv", "fps24", "fps60", "vfr", "landscape", "portrait"]
SMALL = dict(decode_num_cpus=0.5, vae_num_cpus=0.5, text_num_cpus=0.5, progress=False)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (run_precompute joins it instead of starting its own)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(test_videos, tmp_path_factory):
    """A CSV manifest: the good test videos, then every bad kind; expected reason per bad path."""
    folder = tmp_path_factory.mktemp("precompute_inputs")
    bad = test_videos.bad()
    rows = [(str(getattr(test_videos, n).path), f"a {n.replace('_', ' ')} video") for n in GOOD]
    rows += [(str(path), f"broken {name.replace('_', ' ')}") for name, (path, _) in bad.items()]
    manifest = folder / "videos.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "caption"])
        writer.writerows(rows)
    t5 = make_tiny_t5(folder / "t5", [c for _, c in rows])
    clip = make_tiny_clip(folder / "clip")
    expected = {str(path): reason for path, reason in bad.values()}
    return {"manifest": str(manifest), "rows": rows, "t5": str(t5), "clip": str(clip), "bad": expected}


def cog_config(inputs, output, **overrides) -> PrecomputeConfig:
    values = dict(manifest=inputs["manifest"], output=str(output), buckets=BUCKETS, fps=8.0, vae="cogvideox",
                  vae_config=TINY_COG, text_encoder="t5", text_encoder_path=inputs["t5"], text_max_length=16,
                  storage_dtype="float32", rows_per_work_unit=3, vae_batch_size=2, **SMALL)
    return PrecomputeConfig(**{**values, **overrides})


def pixel_args(inputs, output) -> list[str]:
    return ["--manifest", inputs["manifest"], "--out", str(output), "--buckets", BUCKETS, "--fps", "8",
            "--vae", "pixel", "--vae-config", '{"spatial": 4}', "--text-encoder", "clip",
            "--text-encoder-path", inputs["clip"], "--rows-per-work-unit", "1", "--storage-dtype", "float32",
            "--decode-num-cpus", "0.5", "--vae-num-cpus", "0.5", "--text-num-cpus", "0.5", "--no-progress"]


def shard_bytes(root) -> dict[str, tuple]:
    """Shard file -> (ids, latent bytes, text bytes) of a finished output."""
    out = {}
    for file in read_index(root, columns=["file"]).column("file").to_pylist():
        table = read_shard(Path(root) / file)
        out[file] = tuple(table.column(c).to_pylist() for c in ("id", "latent", "text"))
    return out


@pytest.fixture(scope="module")
def cog_run(local_ray, inputs, tmp_path_factory):
    output = tmp_path_factory.mktemp("cog") / "latents"
    prompts = output.parent / "prompts.txt"
    prompts.write_text("a vp9 webm video\n\n  a portrait video  \n")  # the blank line is skipped
    return output, run_precompute(cog_config(inputs, output, validation_prompts=str(prompts)))


def test_cogvideox_t5_shards_manifest_and_errors(cog_run, inputs, capsys):
    output, summary = cog_run
    n_good, n_bad = len(GOOD), len(inputs["bad"])
    assert summary["status"] == "complete" and summary["videos_in"] == n_good + n_bad
    assert summary["clips_out"] == summary["clips_this_run"] == n_good  # one clip per good video
    assert summary["failed_videos"] == n_bad and summary["clips_per_second"] > 0
    # Each unit its own decode task (the plan's rows are split one per block): units stream through the
    # stages one by one instead of a block of them decoded in series and handed on at once.
    assert summary["decode_tasks"] == summary["work_units_written"] == 6
    reasons = sorted(inputs["bad"].values())
    assert summary["failures_by_reason"] == {r: reasons.count(r) for r in set(reasons)}

    manifest = read_output_manifest(output)
    vae = build_vae("cogvideox", config=TINY_COG)
    t5 = build_text_encoder("t5", path=inputs["t5"], max_length=16)
    assert manifest["status"] == "complete"
    assert fingerprint_diff(manifest["vae"], vae.fingerprint()) == []
    assert fingerprint_diff(manifest["text_encoder"], t5.fingerprint()) == []
    assert [b["key"] for b in manifest["buckets"]] == BUCKETS.split(",")
    assert manifest["buckets"][1]["latent_shape"] == [4, 3, 8, 12]
    assert manifest["latent"]["scaling_factor"] == vae.scaling_factor
    index = read_index(output)
    assert sum(index.column("rows").to_pylist()) == n_good and index.num_rows == 6 and "shards" not in manifest

    errors = read_errors(output)
    assert {e["path"]: e["reason"] for e in errors} == inputs["bad"]
    assert all(e["message"] and e["id"] for e in errors)

    samples = [s for file in index.column("file").to_pylist() for s in read_samples(output / file)]
    by_path = {s["source_path"]: s for s in samples}
    assert len({s["id"] for s in samples}) == n_good and set(by_path) == {r[0] for r in inputs["rows"][:n_good]}
    assert by_path[str(inputs["rows"][GOOD.index("portrait")][0])]["bucket"] == "9x48x32"
    assert by_path[str(inputs["rows"][GOOD.index("landscape")][0])]["bucket"] == "9x32x48"
    for s in samples[:3]:  # the stored numbers are the encoders' own
        f, h, w = (int(v) for v in s["bucket"].split("x"))
        video = torch.from_numpy(decode_clip(s["source_path"], frames=f, height=h, width=w, fps=8.0, start=s["clip_start"]))
        torch.testing.assert_close(s["latent"], vae.encode(video[None])[0], atol=1e-5, rtol=1e-4)
        emb, mask = t5.encode([s["caption"]])
        torch.testing.assert_close(s["text"], emb[0, mask[0]])
        assert s["clip_end"] == pytest.approx(s["clip_start"] + 9 / 8) and s["fps"] == 8.0

    # The text conditioning beside the latents: "" and the prompts, encoded like the captions.
    conditioning = read_text_conditioning(output)
    assert conditioning.prompts == ["a vp9 webm video", "a portrait video"]
    assert fingerprint_diff(conditioning.text_encoder, t5.fingerprint()) == []
    emb, mask = t5.encode(["", *conditioning.prompts])
    torch.testing.assert_close(conditioning.null_text, emb[0, mask[0]])
    assert conditioning.null_mask.all() and conditioning.null_text.shape[0] == int(mask[0].sum()) >= 1
    for i in range(2):
        length = int(mask[i + 1].sum())
        assert conditioning.prompt_mask[i].tolist() == [True] * length + [False] * (conditioning.prompt_mask.shape[1] - length)
        torch.testing.assert_close(conditioning.prompt_text[i, :length], emb[i + 1, :length])


def test_second_run_skips_finished_units(cog_run, inputs, capsys):
    output, _ = cog_run
    before = {p: p.stat().st_mtime_ns for p in (output / "shards").rglob("*")}
    summary = run_precompute(cog_config(inputs, output))
    assert summary["work_units_skipped"] == summary["work_units"] == 6 and summary["work_units_written"] == 0
    assert summary["clips_out"] == len(GOOD) and summary["failed_videos"] == len(inputs["bad"])
    assert {p: p.stat().st_mtime_ns for p in (output / "shards").rglob("*")} == before
    assert "videos in" in capsys.readouterr().out


def test_stale_output_is_refused_unless_overwrite(cog_run, inputs, tmp_path):
    output, _ = cog_run
    with pytest.raises(PrecomputeError, match=r"other encoders, buckets or settings:\n  VAE weights_hash"):
        run_precompute(cog_config(inputs, output, vae_seed=1))
    with pytest.raises(PrecomputeError, match="(?s)buckets: 9x32x32,9x32x48,9x48x32 != 9x32x32.*--overwrite"):
        run_precompute(cog_config(inputs, output, buckets="9x32x32"))
    # A killed run is detected too: its provisional manifest names its encoders.
    killed = tmp_path / "killed"
    manifest = read_output_manifest(output)
    killed.mkdir()
    (killed / "manifest.json").write_text(json.dumps({**manifest, "status": "running", "shards": []}))
    with pytest.raises(PrecomputeError, match="text encoder"):
        run_precompute(cog_config(inputs, killed, text_max_length=8))
    (killed / "shards" / "x").mkdir(parents=True)
    (killed / "shards" / "x" / "x.parquet").write_bytes(b"?")
    (killed / "manifest.json").unlink()
    with pytest.raises(PrecomputeError, match="holds shards but no manifest.json"):
        run_precompute(cog_config(inputs, killed))


@pytest.fixture(scope="module")
def pixel_run(cog_run, inputs, tmp_path_factory):
    """The uninterrupted reference: pixel codec + CLIP through `pomvid precompute`, one video per unit,
    with --overwrite into a folder that holds another run's output (a copy of the CogVideoX one)."""
    output = tmp_path_factory.mktemp("pixel") / "latents"
    shutil.copytree(cog_run[0], output)
    next((output / "shards").iterdir()).joinpath(".half-written.parquet.tmp").write_bytes(b"?")
    summary_file = output.parent / "summary.json"
    refused = io.StringIO()
    with contextlib.redirect_stderr(refused):
        assert pomvid(["precompute", *pixel_args(inputs, output), "--summary-json", str(summary_file)]) == 2
    assert "was made with other encoders" in refused.getvalue() and "--overwrite" in refused.getvalue()
    assert pomvid(["precompute", *pixel_args(inputs, output), "--overwrite", "--summary-json", str(summary_file)]) == 0
    return output, json.loads(summary_file.read_text()), cog_run[0]


def test_cli_overwrite_pixel_codec_clip_and_loader(pixel_run, inputs):
    output, summary, stale = pixel_run
    assert summary["status"] == "complete" and summary["work_units"] == len(inputs["rows"])
    assert summary["work_units_skipped"] == 0  # overwrite: nothing of the old output is kept
    files = {p.name for d in ("shards", "errors") for p in (output / d).rglob("*.*")}
    assert files.isdisjoint({p.name for d in ("shards", "errors") for p in (stale / d).rglob("*.*")})
    assert len(list((output / "shards").rglob("*.parquet"))) == len(inputs["rows"])
    manifest = read_output_manifest(output)
    assert manifest["vae"]["kind"] == "pixel" and manifest["text_encoder"]["kind"] == "clip"
    for file in read_index(output).column("file").to_pylist():  # the pixel codec is exact
        for s in read_samples(output / file):
            f, h, w = (int(v) for v in s["bucket"].split("x"))
            video = decode_clip(s["source_path"], frames=f, height=h, width=w, fps=8.0, start=s["clip_start"])
            assert torch.equal(build_vae("pixel", config={"spatial": 4}).decode(s["latent"][None])[0],
                               torch.from_numpy(video))
    loader = LatentLoader(LatentDataset(output), batch_size=1, dp_rank=0, dp_size=1, seed=0)
    batches = list(loader)
    assert len(batches) == len(GOOD)
    assert all(b["latents"].shape[:2] == (1, 48) and b["text_mask"].any() for b in batches)


def stop_only(cluster) -> None:
    # Not `ray stop`: that ends every Ray on the machine (this module's local Ray too).
    gcs_port = cluster.gcs_address.rsplit(":", 1)[1]
    mine = [p for p in psutil.process_iter(["cmdline"])
            if any(str(cluster.temp_dir) in a or a.endswith(f":{gcs_port}") for a in p.info["cmdline"] or [])]
    procs = {q.pid: q for p in mine for q in [p, *p.children(recursive=True)]}
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(list(procs.values()), timeout=30)
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)


def _kill_one(pattern: str, killed: list, run: threading.Thread) -> None:
    """SIGKILL the first of this test's Ray workers (descendants of this process, which started the
    module's local Ray) whose process title names `pattern`: a worker running that stage now (Ray
    titles a worker after the task it runs; idle ones are ray::IDLE). Gives up when `run` ends."""
    me = psutil.Process()
    while run.is_alive():
        for proc in me.children(recursive=True):
            try:
                title = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if pattern in title:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
                    killed.append((pattern, proc.pid))
                    return
        time.sleep(0.005)


def test_killed_decode_worker_and_encoder_actor_are_redone_byte_for_byte(pixel_run, inputs, tmp_path):
    """A decode task's process and the VAE actor's process are SIGKILLed mid-run (found by their Ray
    process titles); Ray runs the task again and restarts the actor (task_retries / actor_restarts),
    the run finishes by itself, and its shards equal the uninterrupted run's."""
    reference, output = pixel_run[0], tmp_path / "latents"
    killed, result = [], {}
    run = threading.Thread(target=lambda: result.update(code=pomvid(["precompute", *pixel_args(inputs, output)])))
    run.start()
    try:
        for pattern in ("decode_units", "MapBatches(VAEStage)"):
            _kill_one(pattern, killed, run)  # one after the other: a decode task first, then the actor
        done_at_kill = len(list((output / "shards").glob("*/*.parquet")))
    finally:
        run.join(timeout=600)
    assert [p for p, _ in killed] == ["decode_units", "MapBatches(VAEStage)"], killed
    assert done_at_kill < len(inputs["rows"])  # killed mid-run: units were still to go through the VAE
    assert result.get("code") == 0
    assert shard_bytes(output) == shard_bytes(reference)  # same ids, same latent and text bytes
    assert read_index(output).num_rows == len(inputs["rows"])  # every unit once


def test_two_node_cluster_s3_videos_to_s3_output_sigkill_and_resume(pixel_run, inputs, s3_server, tmp_path,
                                                                    monkeypatch):
    """The driver SIGKILLed halfway, on a cluster of two nodes and object storage (head + `ray start
    --address`, token auth; the driver joins through RAY_ADDRESS as a Ray job's entrypoint does): a local
    output is refused before any work; the videos and their manifest (relative paths) in a bucket,
    the output in a bucket, SIGKILL halfway, the same command again: the latents and text embeddings
    equal the local run's, shard for shard, and both nodes decoded or wrote work units."""
    reference = pixel_run[0]
    bucket = s3_server.create_bucket("precompute")
    client = s3_server.client()
    rows = []
    for i, (path, caption) in enumerate(inputs["rows"]):
        key = f"videos/{i:02d}-{Path(path).name}"
        if Path(path).is_file():  # the "missing" video stays missing in the bucket too
            client.upload_file(path, bucket, f"data/{key}")
        rows.append((key, caption))  # relative to the manifest's location
    text = io.StringIO()
    csv.writer(text).writerows([("video", "caption"), *rows])
    client.put_object(Bucket=bucket, Key="data/videos.csv", Body=text.getvalue().encode())
    manifest, output = f"s3://{bucket}/data/videos.csv", f"s3://{bucket}/latents"

    # Every node has the store's endpoint and credentials in its environment (a Kubernetes Secret, a
    # `ray up` setup command), and so has this process (pipeline.storage reads them back below).
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    cluster = start_cluster(num_cpus=2)
    try:
        add_node(cluster, num_cpus=2)
        env = {**cluster.env, "RAY_ADDRESS": cluster.gcs_address}
        job = [sys.executable, "jobs/precompute_latents.py", "--tracking", "off"]

        # A local output on two nodes: refused before anything is written.
        local = tmp_path / "local-latents"
        refused = subprocess.run([*job, *pixel_args(inputs, local)], cwd=ROOT, env=env, capture_output=True,
                                 text=True, timeout=300)
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-3000:]
        assert "the Ray cluster has 2 nodes" in refused.stderr and "--output-is-shared" in refused.stderr
        assert "s3://" in refused.stderr and not local.exists()

        args = [*job, *pixel_args(inputs, output), "--manifest", manifest]
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        total = len(rows)
        shards = lambda: [k for k in s3_server.list_keys(bucket, "latents/shards/") if k.endswith(".parquet")]  # noqa: E731
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and proc.poll() is None and len(shards()) < 2:
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        done = len(shards())
        assert 2 <= done < total, f"{done} of {total} shards when killed: not halfway"
        assert read_output_manifest(output)["status"] == "running"

        summary_file = tmp_path / "summary.json"
        resumed = subprocess.run([*args, "--summary-json", str(summary_file)], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    finally:
        stop_only(cluster)
    summary = json.loads(summary_file.read_text())
    assert summary["status"] == "complete" and summary["work_units_skipped"] == done
    assert summary["work_units_written"] == total - done and summary["clips_out"] == len(GOOD)
    assert len(summary["nodes"]) == 2, summary["nodes"]  # decode/write tasks ran on both nodes
    assert s3_server.env["AWS_SECRET_ACCESS_KEY"] not in resumed.stdout + resumed.stderr
    keys = s3_server.list_keys(bucket, "latents/")
    assert {"latents/manifest.json", "latents/index.parquet", "latents/text_conditioning.safetensors"} <= set(keys)
    files = [k for k in keys if not k.endswith("/")]  # pyarrow may leave empty "folder/" markers
    assert not any("/plan/" in k or "/index_parts/" in k or ".tmp" in k or "preflight" in k for k in files), keys

    # The same numbers as the local run (unit ids differ: they hash the videos' paths).
    def numbers(root):
        files = read_index(root, columns=["file"]).column("file").to_pylist()
        return [tuple(read_shard(f"{root}/{f}").column(c).to_pylist() for c in ("latent", "text")) for f in files]

    assert numbers(output) == numbers(reference)
    assert sorted(e["reason"] for e in read_errors(output)) == sorted(e["reason"] for e in read_errors(reference))
    # The loader of training reads the shards from the bucket.
    batches = list(LatentLoader(LatentDataset(output), batch_size=1, dp_rank=0, dp_size=1, seed=0))
    assert len(batches) == len(GOOD)
