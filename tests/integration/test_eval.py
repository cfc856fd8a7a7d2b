"""`pomvid eval`, `pomvid export` and run comparison with eval metrics, end to end on tiny real inputs.

Two tracked runs (tests/eval_helpers.py: tiny PoM DiT checkpoints written by the real checkpoint
writer, MLflow runs in run_a's embedded SQLite store), real clips made with ffmpeg, a random-weight
tiny open_clip CLIP and a random-weight Kinetics-400 I3D saved to a file. Both runs are evaluated once
in this process with one protocol (module fixture); the tests read what that left and run the rest.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from pipeline.cli import main as pomvid
from tests.deepspeed_launch import cpu_env, free_port, output_of

pytestmark = pytest.mark.slow

NUM_VIDEOS = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    from tests.eval_helpers import one_thread

    with one_thread():
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory, mlflow_db_template):
    from pipeline.data.encode.text_clip import make_tiny_clip
    from tests.eval_helpers import PROMPTS, random_i3d, real_clips, tracked_run

    root = tmp_path_factory.mktemp("eval")
    text_clip = make_tiny_clip(root / "text_clip", width=16, context_length=8)
    # Another seed for the scorer: this one's similarities are positive, so CLIP scores are not all 0.
    score_clip = make_tiny_clip(root / "score_clip", width=16, context_length=8, seed=2)
    run_a, id_a = tracked_run(root / "run_a", text_clip, name="run-a", loss0=1.0, template_db=mlflow_db_template)
    store = f"sqlite:///{run_a / 'mlflow.db'}"  # run_a's embedded store, where run_b is tracked too
    run_b, id_b = tracked_run(root / "run_b", text_clip, name="run-b", loss0=2.0, tracking_uri=store)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    env = {"root": root, "store": store, "run_a": run_a, "run_b": run_b, "id_a": id_a, "id_b": id_b,
           "i3d": random_i3d(root / "i3d.safetensors"), "real": real_clips(root / "real", count=4),
           "clip": score_clip, "cache": root / "cache"}
    env["args"] = _args(env, env["cache"])
    # run_a: the store is found next to the checkpoint; run_b: given explicitly.
    assert pomvid(["eval", "--checkpoint", str(env["run_a"]), "--out", str(root / "eval_a"), *env["args"]]) == 0
    assert pomvid(["eval", "--checkpoint", str(run_b), "--out", str(root / "eval_b"), "--tracking-uri", store,
                   *env["args"]]) == 0
    env["a"] = json.loads((root / "eval_a" / "eval.json").read_text())
    env["b"] = json.loads((root / "eval_b" / "eval.json").read_text())
    return env


def _args(env, cache: Path) -> list[str]:
    return ["--prompts", str(env["root"] / "prompts.txt"), "--num-videos", str(NUM_VIDEOS), "--real", str(env["real"]),
            "--i3d", str(env["i3d"]), "--fvd-resolution", "32", "--clip-model", str(env["clip"]), "--steps", "2",
            "--device", "cpu", "--real-stats-dir", str(cache), "--no-progress"]


def _client(env):
    from mlflow import MlflowClient

    return MlflowClient(env["store"])


def test_results_json_videos_and_the_training_run_at_the_checkpoint_step(env):
    a = env["a"]
    assert set(a["metrics"]) == {"fvd", "clip_score"} and a["metrics"]["fvd"] > 0 and a["metrics"]["clip_score"] > 0
    assert a["step"] == 5 and a["world_size"] == 1 and a["mlflow_run_id"] == env["id_a"]
    assert [v["index"] for v in a["videos"]] == list(range(NUM_VIDEOS)) and [v["seed"] for v in a["videos"]] == [0, 1, 2, 3]
    assert all(Path(v["mp4"]).is_file() for v in a["videos"])
    assert a["protocol"]["fvd"]["resolution"] == 32 and a["protocol"]["seeds"] == "0..3"
    assert a["protocol"]["clip"] and a["protocol"]["num_videos"] == NUM_VIDEOS
    run = _client(env).get_run(env["id_a"])
    assert run.data.params["eval.protocol"] == a["protocol_id"] and run.data.params["eval.fvd.resolution"] == "32"
    assert run.data.metrics["eval/fvd"] == pytest.approx(a["metrics"]["fvd"])
    assert [m.step for m in _client(env).get_metric_history(env["id_a"], "eval/clip_score")] == [5]
    assert json.loads(run.data.tags[f"eval.protocol.{a['protocol_id']}"]) == a["protocol"]
    assert run.info.status == "FINISHED"  # the finished training run stays finished
    artifacts = Path(run.info.artifact_uri.removeprefix("file://")) / "eval" / a["protocol_id"] / "step_00000005"
    assert (artifacts / "eval.json").is_file() and len(list((artifacts / "videos").glob("*.mp4"))) == NUM_VIDEOS


def test_real_statistics_are_cached_and_refused_for_another_protocol(env, tmp_path):
    a, b = env["a"], env["b"]
    assert a["real_stats"]["source"] == "computed" and b["real_stats"]["source"] == "cache"
    assert a["real_stats"]["path"] == b["real_stats"]["path"] and a["protocol_id"] == b["protocol_id"]
    # Another protocol (I3D at 16 pixels) with that file given explicitly: refused, naming the field.
    args = [*env["args"], "--fvd-resolution", "16", "--real-stats", a["real_stats"]["path"]]
    assert pomvid(["eval", "--checkpoint", str(env["run_b"]), "--out", str(tmp_path / "x"), "--tracking", "off", *args]) == 2
    # The same change with the cache folder: new statistics, a new protocol, its own metric names.
    args = [*env["args"], "--fvd-resolution", "16"]
    assert pomvid(["eval", "--checkpoint", str(env["run_b"]), "--out", str(tmp_path / "y"), "--tracking-uri",
                   env["store"], *args]) == 0
    c = json.loads((tmp_path / "y" / "eval.json").read_text())
    assert c["real_stats"]["source"] == "computed" and c["real_stats"]["path"] != a["real_stats"]["path"]
    assert c["protocol_id"] != b["protocol_id"] and c["metrics"]["clip_score"] == pytest.approx(b["metrics"]["clip_score"])
    metrics = _client(env).get_run(env["id_b"]).data.metrics
    assert metrics["eval/fvd"] == pytest.approx(b["metrics"]["fvd"])  # the first protocol keeps the plain name
    assert metrics[f"eval/{c['protocol_id']}/fvd"] == pytest.approx(c["metrics"]["fvd"])


def test_two_processes_give_the_numbers_of_one(env, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    out = tmp_path / "two"
    command = [sys.executable, "-m", "pipeline.cli", "eval", "--checkpoint", str(env["run_b"]), "--out", str(out),
               "--tracking", "off", *_args(env, tmp_path / "cache2"), "--num_gpus", "2", "--master_port", str(free_port())]
    result = subprocess.run(command, env=cpu_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, output_of(result)
    two, one = json.loads((out / "eval.json").read_text()), env["b"]
    assert two["world_size"] == 2 and two["protocol_id"] == one["protocol_id"]
    assert two["real_stats"]["source"] == "computed"  # its own cache folder: both ranks decoded real clips
    for mine, theirs in zip(two["videos"], one["videos"]):
        assert (mine["prompt"], mine["seed"]) == (theirs["prompt"], theirs["seed"])
        assert mine["clip_score"] == pytest.approx(theirs["clip_score"], rel=1e-4, abs=1e-4)
    assert two["metrics"]["fvd"] == pytest.approx(one["metrics"]["fvd"], rel=1e-3)
    real_one, real_two = (load_file(p)["stats"] for p in (one["real_stats"]["path"], two["real_stats"]["path"]))
    # float32 convolutions round differently in batches of 2 and of 4: equal to ~1e-6 of the values
    torch.testing.assert_close(real_two, real_one, rtol=1e-4, atol=1e-5)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.images, self._row, self._in_cell = [], [], None, False

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._in_cell = True
            self._row.append("")
        elif tag == "img":
            self.images.append(dict(attrs))

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in_cell = False
        elif tag == "tr":
            self.rows.append(self._row)

    def handle_data(self, data):
        if self._in_cell:
            self._row[-1] += data


def test_runs_list_and_compare_show_eval_metrics_per_protocol(env, tmp_path, capsys):
    import base64
    import csv
    import io

    pid = env["a"]["protocol_id"]
    where = ["--experiment", "eval-tests", "--tracking-uri", env["store"]]
    assert pomvid(["runs", "list", *where, "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["name"] for r in table} >= {"run-a", "run-b"}
    row = next(r for r in table if r["name"] == "run-a")
    assert row["steps"] == "5" and float(row["loss"]) == pytest.approx(0.2) and row["recipe"] == "run-a"
    assert float(row[f"fvd@{pid}"]) == pytest.approx(env["a"]["metrics"]["fvd"], rel=1e-5)
    assert pomvid(["runs", "list", *where, "--columns", "name,train.lr,eval/clip_score", "--format", "markdown"]) == 0
    header = capsys.readouterr().out.splitlines()[0]  # run_b also holds a second protocol (the cache test)
    assert header.startswith("| name | train.lr | clip@") and f"| clip@{pid} |" in header

    page = tmp_path / "compare.html"
    args = ["runs", "compare", *where, "--runs", "run-a", "run-b", "--out", str(tmp_path / "plots"), "--html", str(page)]
    assert pomvid(args) == 0
    text = capsys.readouterr().out
    labels = [line.split("  ")[0] for line in text.splitlines()]
    order = [i for i, line in enumerate(labels) if line.startswith(("param train.lr", f"eval/fvd [{pid}]", "train/loss"))]
    assert [labels[i].split(" ")[0] for i in order][:3] == ["param", "eval/fvd", "eval/fvd"]  # params, eval, loss
    assert f"[{pid}] {NUM_VIDEOS} videos 4x8x8@8fps" in text
    parser = _Page()
    parser.feed(page.read_text())
    header = parser.rows[0]
    assert header[1:] == ["run-a", "run-b"]
    fvd = next(r for r in parser.rows if r[0] == f"eval/fvd [{pid}] final")
    assert [float(v) for v in fvd[1:]] == pytest.approx([env["a"]["metrics"]["fvd"], env["b"]["metrics"]["fvd"]],
                                                        rel=1e-5)
    assert any(r[0] == "param train.lr" for r in parser.rows)
    names = {img["alt"] for img in parser.images}
    assert {"eval metrics", "train/loss"} <= names
    for img in parser.images:
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "plots" / "eval_metrics.png").is_file()


def test_export_samples_like_the_checkpoint_and_registers_with_eval_tags(env, tmp_path, capsys):
    from safetensors.torch import load_file

    from pipeline.generate import SampleOptions, VideoGenerator
    from pipeline.models.configs import DiTConfig
    from pipeline.models.dit import PoMDiT

    out = tmp_path / "export"
    assert pomvid(["export", str(env["run_a"]), "--out", str(out), "--register", "pomvid-tiny"]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "latents_manifest.json", "model.safetensors"]
    assert pomvid(["export", str(env["run_a"]), "--out", str(out)]) == 2  # exists: not overwritten silently
    # The few lines of Python in docs/eval.md.
    config = json.loads((out / "config.json").read_text())
    model = PoMDiT(DiTConfig(**config["model"]))
    model.load_state_dict(load_file(out / "model.safetensors"))
    options = SampleOptions(steps=2, seed=3)
    from_export = VideoGenerator.load(out, device="cpu")
    from_checkpoint = VideoGenerator.load(env["run_a"], device="cpu")
    assert from_export.step == 5 and from_export.mlflow_run_id == env["id_a"]
    assert torch.equal(from_export.generate(["a red square moving up"], options)[0].video,
                       from_checkpoint.generate(["a red square moving up"], options)[0].video)
    assert pomvid(["sample", "--checkpoint", str(out), "--prompt", "a blue circle", "--steps", "2", "--device", "cpu",
                   "--out", str(tmp_path / "samples")]) == 0
    assert len(list((tmp_path / "samples").glob("*.mp4"))) == 1

    client = _client(env)
    version = client.get_model_version("pomvid-tiny", "1")
    assert version.run_id == env["id_a"] and version.tags["pomvid.step"] == "5"
    assert float(version.tags["eval/fvd"]) == pytest.approx(env["a"]["metrics"]["fvd"], rel=1e-5)
    assert version.tags["eval/fvd.protocol"] == env["a"]["protocol_id"] and version.tags["eval/fvd.step"] == "5"
    assert "registered as model 'pomvid-tiny' version 1" in printed
    run = client.get_run(env["id_a"])
    exported = Path(run.info.artifact_uri.removeprefix("file://")) / "export" / "step_00000005"
    assert (exported / "model.safetensors").is_file()
