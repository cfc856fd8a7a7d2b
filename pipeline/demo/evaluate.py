"""The demo's proof that the model learned: sample the held-out captions, score them, log the result.

Captions held out of training (colour/direction pairs the model never saw together) are sampled with
several seeds each through pipeline/generate.py, the MP4 files are scored by the detector
(pipeline/demo/detector.py: colour and direction both right = adherence), and the score, the videos and
score.json go into the training run in MLflow (its id comes from the final checkpoint).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.demo.settings import DemoSettings


def sample_held_out(checkpoint: Path, captions: list[str], settings: DemoSettings, out_dir: Path):
    """Videos for every caption x settings.seeds_per_caption; returns (rows of samples.csv, generator)."""
    from pipeline.generate import SampleOptions, VideoGenerator, write_samples

    if out_dir.exists():
        shutil.rmtree(out_dir)  # a re-run replaces the samples, never mixes two runs' videos
    generator = VideoGenerator.load(checkpoint)
    prompts = [caption for caption in captions for _ in range(settings.seeds_per_caption)]
    options = SampleOptions(steps=settings.sample_steps, guidance=settings.guidance, solver="euler",
                            seed=settings.seed, batch_size=16)
    videos = generator.generate(prompts, options)
    rows = write_samples(videos, out_dir, fps=generator.fps, checkpoint=generator.checkpoint)
    return rows, generator


def score_samples(rows: list[dict]) -> dict:
    """Detector scores of the written MP4s, overall and per caption."""
    from pipeline.demo.detector import analyse_video, score_detections
    from pipeline.demo.shapes import DEFAULT_COLOURS, DIRECTIONS

    captions = [row["prompt"] for row in rows]
    detections = [analyse_video(row["mp4"]) for row in rows]
    scores = score_detections(detections, captions)
    scores["chance_adherence"] = 1.0 / (len(DEFAULT_COLOURS) * len(DIRECTIONS))  # the detector's candidates
    per_caption: dict[str, dict] = {}
    for row, found in zip(rows, detections):
        entry = per_caption.setdefault(row["prompt"], {"videos": 0, "right": 0, "seen": []})
        words = row["prompt"].split()
        entry["videos"] += 1
        entry["right"] += int(found.colour == words[1] and found.direction == words[4])
        entry["seen"].append(f"{found.colour} {found.direction}")
    return {**scores, "per_caption": per_caption,
            "videos": [{"mp4": row["mp4"], "gif": row["gif"], "prompt": row["prompt"], "seed": row["seed"],
                        "detected_colour": d.colour, "detected_direction": d.direction}
                       for row, d in zip(rows, detections)]}


def log_to_training_run(*, tracking_uri: str, experiment: str, run_id: str | None, step: int, scores: dict,
                        settings: DemoSettings, phase_seconds: dict, score_file: Path, rows: list[dict]) -> str | None:
    """Reopen the training run and add the demo's score, phase times, videos and score.json."""
    from pipeline.tracking import start_run

    if not run_id:
        return None
    tracker = start_run(config={"demo": settings.to_dict()}, tracking_uri=tracking_uri, experiment=experiment,
                        run_id=run_id, rank=0, system_metrics=False, plots_at_end=False)
    status = "FAILED"
    try:
        metrics = {f"demo/{k}": v for k, v in scores.items() if isinstance(v, (int, float))}
        metrics.update({f"demo/seconds_{name}": s for name, s in phase_seconds.items()})
        tracker.log_metrics(metrics, step=step)
        tracker.set_tags({"pomvid.demo": "true", "demo.adherence": f"{scores['adherence']:.3f}"})
        for row in rows:
            tracker.log_video(row["mp4"], artifact_path="demo_samples")
        tracker.log_artifact(score_file)
        status = "FINISHED"
    finally:
        tracker.end(status)
    return run_id


def write_score(path: Path, scores: dict, *, settings: DemoSettings, checkpoint: Path, step: int,
                phase_seconds: dict, target: float) -> dict:
    record = {"adherence": scores["adherence"], "colour_accuracy": scores["colour_accuracy"],
              "direction_accuracy": scores["direction_accuracy"], "chance_adherence": scores["chance_adherence"],
              "target": target, "met_target": scores["adherence"] >= target, "num_videos": int(scores["num_videos"]),
              "checkpoint": str(checkpoint), "step": step, "phase_seconds": phase_seconds,
              "settings": settings.to_dict(), "per_caption": scores["per_caption"], "videos": scores["videos"]}
    path.write_text(json.dumps(record, indent=1))
    return record
