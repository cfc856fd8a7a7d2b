"""`pomvid demo`: the whole pipeline on real components, from made videos to a scored model.

    data        captioned moving-shapes MP4s + CSV manifest, some colour/direction pairs held out
    precompute  Ray Data (local): decode, pixel-codec VAE, a tiny random-weight text encoder -> latents
    train       `pomvid train` through the real deepspeed launcher: 2 CPU processes with sp=2 (all GPUs
                when there are some), tracked in MLflow
    sample      the held-out captions, several seeds each, with pipeline/generate.py (MP4 + GIF)
    score       the detector: colour and direction both right = adherence; logged to the training run

Everything lives in one output folder (layout in `DemoPaths`) with one MLflow experiment in its
embedded store (<out>/mlflow.db). Running again into the same folder resumes: phases already done with
the same settings are reused (data, latents, the final checkpoint; an interrupted training continues
from its newest checkpoint), sampling and scoring run again. With other settings (e.g. --quick after a
full run) the folder's data, latents, run and samples are deleted and made again; the MLflow store is
kept, so earlier runs stay comparable.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.demo.settings import DemoSettings

log = logging.getLogger("pomvid.demo")
EXPERIMENT = "pomvid-demo"
TARGET = 0.8


class DemoError(RuntimeError):
    """A phase of the demo failed; the message says which and where its log is."""


class DemoPaths:
    """The output folder's layout."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.settings = self.root / "demo_settings.json"
        self.data = self.root / "data"  # videos/*.mp4, train.csv, held_out.txt
        self.encoders = self.root / "encoders"  # the tiny text encoder
        self.latents = self.root / "latents"  # precompute output
        self.run = self.root / "run"  # training run: checkpoints/, steps.jsonl, train.log
        self.samples = self.root / "samples"  # held-out samples: MP4 + GIF + samples.csv
        self.score = self.root / "score.json"
        self.tracking_uri = f"sqlite:///{self.root / 'mlflow.db'}"

    def made(self) -> list[Path]:
        return [self.data, self.encoders, self.latents, self.run, self.samples, self.score]


def prepare_folder(paths: DemoPaths, settings: DemoSettings) -> bool:
    """Delete what other settings made; returns True when earlier work can be reused."""
    wanted = settings.to_dict()
    if paths.settings.is_file():
        try:
            same = json.loads(paths.settings.read_text()) == wanted
        except ValueError:
            same = False
        if same:
            return True
        log.info("%s was made with other settings: making it again", paths.root)
    for path in paths.made():
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.settings.write_text(json.dumps(wanted, indent=1))
    return False


@contextmanager
def phase(name: str, times: dict[str, float], say):
    say(f"[{len(times) + 1}/5] {name} ...")
    start = time.perf_counter()
    yield
    times[name] = round(time.perf_counter() - start, 1)
    say(f"      {name} done in {times[name]:.1f} s")


def shapes_config(settings: DemoSettings):
    from pipeline.demo.shapes import ShapesConfig

    return ShapesConfig(frames=settings.frames, height=settings.size, width=settings.size, fps=settings.fps,
                        shapes=settings.shapes, held_out=settings.held_out, seed=settings.seed)


def held_out_captions(settings: DemoSettings) -> list[str]:
    from pipeline.demo.shapes import specs_for_split

    return [spec.caption for spec in specs_for_split(shapes_config(settings), "held_out")]


# -- phases ---------------------------------------------------------------------------------------------


def make_data(paths: DemoPaths, settings: DemoSettings) -> Path:
    """The training videos and manifest, the held-out prompts, and the saved tiny text encoder."""
    from pipeline.demo.shapes import specs_for_split, write_shapes_dataset

    manifest, done = paths.data / "train.csv", paths.data / "DONE"
    if not done.is_file():
        config = shapes_config(settings)
        write_shapes_dataset(paths.data, config, count=settings.train_videos, split="train", workers=2)
        (paths.data / "held_out.txt").write_text("\n".join(held_out_captions(settings)) + "\n")
        folder = paths.encoders / settings.text_encoder
        if folder.exists():
            shutil.rmtree(folder)
        if settings.text_encoder == "clip":
            from pipeline.data.encode.text_clip import make_tiny_clip

            make_tiny_clip(folder, width=settings.text_dim, context_length=settings.text_len, seed=settings.seed)
        else:
            from transformers.utils import logging as hf_logging

            from pipeline.data.encode.text_t5 import make_tiny_t5

            hf_logging.disable_progress_bar()  # "Writing model shards" of a 100 kB model
            captions = [spec.caption for spec in specs_for_split(config, "train")]  # every word occurs there
            make_tiny_t5(folder, captions, dim=settings.text_dim, seed=settings.seed)
        check_caption_length(settings, folder, [spec.caption for spec in specs_for_split(config, "all")])
        done.write_text("ok\n")
    return manifest


def check_caption_length(settings: DemoSettings, folder: Path, captions: list[str]) -> None:
    """Every caption must fit the encoder's text_len: a truncated one loses its last words (the direction),
    and the model could never learn them. The tiny T5's sentencepiece splits words into characters."""
    if settings.text_encoder == "t5":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        counts = [len(tokenizer(c).input_ids) for c in captions]  # with the end-of-text token
    else:
        from open_clip.tokenizer import SimpleTokenizer

        tokenizer = SimpleTokenizer()
        counts = [len(tokenizer.encode(c)) + 2 for c in captions]  # with start and end tokens
    longest = max(counts)
    if longest > settings.text_len:
        caption = captions[counts.index(longest)]
        raise DemoError(f"caption {caption!r} takes {longest} tokens of the {settings.text_encoder} encoder but "
                        f"text_len={settings.text_len}: its end would be cut off; raise text_len to {longest}")


def precompute(paths: DemoPaths, settings: DemoSettings, manifest: Path, *, say) -> dict:
    """Ray Data precompute into <out>/latents (resumes a partial output), tracked as its own MLflow run."""
    from pipeline.data.precompute.config import PrecomputeConfig
    from pipeline.data.precompute.run import format_summary, run_precompute
    from pipeline.data.store.shards import read_output_manifest
    from pipeline.demo.progress import redirect_output
    from pipeline.tracking import log_precompute_summary, start_run

    existing = read_output_manifest(paths.latents) if (paths.latents / "manifest.json").is_file() else None
    if existing is not None and existing.get("status") == "complete":
        return {"status": "complete", "reused": True, "clips_out": existing.get("totals", {}).get("clips")}
    cpus = os.cpu_count() or 2
    config = PrecomputeConfig(
        manifest=str(manifest), output=str(paths.latents), buckets=f"{settings.frames}x{settings.size}x{settings.size}",
        fps=settings.fps, vae="pixel", vae_config={"spatial": settings.vae_spatial}, text_encoder=settings.text_encoder,
        text_encoder_path=str(paths.encoders / settings.text_encoder), text_max_length=settings.text_len,
        storage_dtype="float32", rows_per_work_unit=64, decode_num_cpus=0.5, vae_num_cpus=0.5, text_num_cpus=0.5,
        ray_num_cpus=cpus, progress=False)
    tracker = start_run(config={"precompute": config.to_dict(), "demo": settings.to_dict()},
                        tracking_uri=paths.tracking_uri, experiment=EXPERIMENT, run_name="demo-precompute", rank=0,
                        tags={"pomvid.kind": "precompute", "pomvid.demo": "true"}, plots_at_end=False)
    status = "FAILED"
    try:
        with redirect_output(paths.root / "precompute.log"):  # Ray's logs; the summary is printed below
            summary = run_precompute(config)
        say("      " + format_summary(summary).replace("\n", "\n      "))
        # The same metric names as `pomvid precompute`'s runs, so `pomvid runs compare` lines them up.
        log_precompute_summary(
            tracker, counts={k: summary[k] for k in ("videos_in", "clips_out", "failed_videos", "work_units",
                                                     "work_units_written", "work_units_skipped", "clips_this_run")},
            elapsed_s=summary["total_seconds"], failures_by_reason=summary["failures_by_reason"],
            throughput={k: summary[k] for k in ("clips_per_second", "steady_clips_per_second")},
            errors_path=paths.latents / "errors", extra={"status": summary["status"], "output": summary["output"]})
        tracker.log_artifact(paths.latents / "manifest.json")
        status = "FINISHED" if summary["status"] == "complete" else "FAILED"
    finally:
        tracker.end(status)
    if summary["status"] != "complete" or not summary["clips_out"]:
        raise DemoError(f"precompute did not finish ({summary['status']}, {summary['clips_out']} clips); "
                        f"see {paths.latents}/errors/*/*.jsonl and {paths.root / 'precompute.log'}")
    return summary


def train_args(paths: DemoPaths, settings: DemoSettings, *, num_gpus: int, port: int) -> list[str]:
    """`pomvid train` arguments of the demo: the `demo` recipe with the settings' values."""
    sp = 2 if num_gpus % 2 == 0 else 1
    dp = num_gpus // sp
    if settings.batch % dp:
        raise DemoError(f"global batch {settings.batch} does not split over {dp} data-parallel groups "
                        f"({num_gpus} processes, sp={sp}); set CUDA_VISIBLE_DEVICES to fewer GPUs")
    overrides = {
        "model.width": settings.width, "model.depth": settings.depth, "model.patch_size": settings.patch,
        "parallel.sp": sp, "data.global_batch_size": settings.batch, "data.micro_batch_size": settings.batch // dp,
        "data.seed": settings.seed, "optim.lr": settings.lr, "optim.warmup_steps": settings.warmup,
        "optim.decay": settings.lr_decay, "flow.caption_dropout": settings.caption_dropout,
        "flow.logit_mean": settings.logit_mean,
        "train.steps": settings.steps, "train.seed": settings.seed, "train.ema_decay": settings.ema_decay,
        "train.checkpoint_every": settings.checkpoint_every, "train.keep_checkpoints": 1,
        "train.log_every": max(1, min(50, settings.steps // 10)),
    }
    args = ["train", "--recipe", "demo", "--data", str(paths.latents), "--output-dir", str(paths.run),
            "--resume", "auto", "--tracking-uri", paths.tracking_uri, "--experiment", EXPERIMENT,
            "--run-name", "demo-train", "--num_gpus", str(num_gpus), "--master_port", str(port)]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    return args


def train(paths: DemoPaths, settings: DemoSettings, *, say) -> Path:
    """Train to settings.steps (or reuse a finished run); returns the final checkpoint folder."""
    import torch

    from pipeline.demo.progress import follow_training, redirect_output
    from pipeline.train import checkpoint as ckpt
    from pipeline.train.distributed import free_port

    latest = ckpt.find_latest(paths.run / "checkpoints")
    if latest is not None and ckpt.read_state(latest)["step"] >= settings.steps:
        say(f"      reusing the finished training run {paths.run}")
        return latest
    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 2
    args = train_args(paths, settings, num_gpus=num_gpus, port=free_port())
    paths.run.mkdir(parents=True, exist_ok=True)
    train_log = paths.run / "train.log"
    say(f"      pomvid {' '.join(args[:11])} ... ({num_gpus} {'GPU' if torch.cuda.is_available() else 'CPU'} "
        f"processes; log: {train_log})")
    from pipeline.cli import main as pomvid

    with follow_training(paths.run / "steps.jsonl", settings.steps, say), redirect_output(train_log):
        code = pomvid(args)
    latest = ckpt.find_latest(paths.run / "checkpoints")
    if code != 0 or latest is None or ckpt.read_state(latest)["step"] < settings.steps:
        raise DemoError(f"training failed (exit code {code}); the last lines of {train_log}:\n"
                        + "\n".join(train_log.read_text(errors="replace").splitlines()[-25:]))
    return latest


# -- the whole demo -------------------------------------------------------------------------------------


def run_demo(out_dir: str | Path = "outputs/demo", *, quick: bool = False, seed: int = 0,
             settings: DemoSettings | None = None, say=None) -> dict:
    """Run (or resume) every phase into `out_dir`; returns the score record (also in score.json)."""
    import torch

    from pipeline.demo.evaluate import log_to_training_run, sample_held_out, score_samples, write_score
    from pipeline.demo.progress import console_print
    from pipeline.demo.settings import demo_settings
    from pipeline.train import checkpoint as ckpt

    say = say or console_print
    settings = settings or demo_settings(quick, seed=seed)
    paths = DemoPaths(out_dir)
    start = time.perf_counter()
    reused = prepare_folder(paths, settings)
    say(f"pomvid demo{' --quick' if quick else ''}: {paths.root}" + (" (resuming)" if reused else ""))
    times: dict[str, float] = {}
    with phase("data: moving-shapes videos with captions", times, say):
        manifest = make_data(paths, settings)
    with phase("precompute: Ray Data -> latents", times, say):
        precompute(paths, settings, manifest, say=say)
    with phase("train: DeepSpeed through the launcher", times, say):
        checkpoint = train(paths, settings, say=say)
    # One thread in this process, like each training process: OpenMP's spinning threads slow a forward
    # pass of this tiny model tenfold when the cores are shared with other work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with phase("sample: held-out captions", times, say):
            captions = held_out_captions(settings)
            rows, generator = sample_held_out(checkpoint, captions, settings, paths.samples)
        with phase("score: detector", times, say):
            scores = score_samples(rows)
    finally:
        torch.set_num_threads(threads)
    times = {name.split(":")[0]: seconds for name, seconds in times.items()}
    times["total"] = round(time.perf_counter() - start, 1)
    record = write_score(paths.score, scores, settings=settings, checkpoint=checkpoint, step=generator.step,
                         phase_seconds=times, target=TARGET)
    state = ckpt.read_state(checkpoint)
    record["mlflow_run_id"] = log_to_training_run(
        tracking_uri=paths.tracking_uri, experiment=EXPERIMENT, run_id=state.get("mlflow_run_id"),
        step=generator.step, scores=scores, settings=settings, phase_seconds=times, score_file=paths.score, rows=rows)
    paths.score.write_text(json.dumps(record, indent=1))
    say(report(paths, record, quick=quick))
    return record


def report(paths: DemoPaths, record: dict, *, quick: bool) -> str:
    """Where everything is, the score against chance and the target, and the time of each phase."""
    adherence, chance = record["adherence"], record["chance_adherence"]
    verdict = ("smoke run: the score only shows the pipeline works" if quick else
               f"target {TARGET:.2f}: {'MET' if record['met_target'] else 'MISSED'}")
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in record["phase_seconds"].items()
                       if name != "total")
    right = round(adherence * record["num_videos"])
    lines = [
        "",
        f"pomvid demo finished in {record['phase_seconds']['total'] / 60:.1f} min ({phases})",
        f"  caption adherence on held-out captions: {adherence:.2f} ({right}/{record['num_videos']} videos with "
        f"colour and direction right; colour {record['colour_accuracy']:.2f}, direction "
        f"{record['direction_accuracy']:.2f}); chance {chance:.3f}; {verdict}",
        f"  videos (MP4, GIF previews beside them): {paths.samples}/",
    ]
    for caption, entry in record["per_caption"].items():
        lines.append(f"    {caption!r}: {entry['right']}/{entry['videos']} right (seen: {', '.join(entry['seen'])})")
    lines += [
        f"  score: {paths.score}",
        f"  checkpoint: {record['checkpoint']} (step {record['step']}); sample it again with",
        f"    pomvid sample --checkpoint {paths.run} --prompts-file {paths.data / 'held_out.txt'} --out samples/",
        f"  data: {paths.data}/train.csv; latents: {paths.latents}; training log: {paths.run / 'train.log'}",
        f"  MLflow (experiment {EXPERIMENT!r}, training run {record.get('mlflow_run_id')}):",
        f"    mlflow ui --backend-store-uri {paths.tracking_uri} --host 127.0.0.1",
        "    then open http://127.0.0.1:5000",
    ]
    return "\n".join(lines)
