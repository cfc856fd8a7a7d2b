"""Small real inputs for the evaluation tests: a tracked tiny run, random-weight networks, real clips.

- `tracked_run(root, clip)`: a run folder with one complete checkpoint of a tiny PoM DiT (written by the
  real checkpoint writer, tests/unit/test_generate.py's make_run) whose trainer_state names an MLflow
  run in the folder's embedded store (made with pipeline.tracking.start_run, with a train/loss curve).
- `random_i3d(path)`: the Kinetics-400 InceptionI3d with He-initialised random weights saved to a file
  (PyTorch's default init makes its logits nearly constant, so every FVD would be ~1e-12).
- `real_clips(folder)`: MP4s made with ffmpeg (tests/videos.py), 16x16 at 8 fps.
- `one_thread()`: torch on one intra-op thread while a test module runs. On a shared 2-core machine
  the I3D convolutions ran 10x slower with 2 spinning OpenMP threads than with one (measured at load 20).
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.train import checkpoint as ckpt
from tests.unit.test_generate import FRAMES, PROMPTS, SIZE, make_run
from tests.videos import make_video

__all__ = ["FRAMES", "PROMPTS", "SIZE", "one_thread", "random_i3d", "real_clips", "tracked_run"]


@contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tracked_run(root: Path, clip: Path, *, experiment: str = "eval-tests", steps: int = 5, loss0: float = 1.0,
                name: str = "tiny", tracking_uri: str | None = None,
                template_db: Path | None = None) -> tuple[Path, str]:
    """(run folder, MLflow run id): make_run's checkpoint at `steps`, tracked in `tracking_uri` (default
    <root>/mlflow.db, the embedded store `pomvid train` uses, copied from `template_db` when given: an
    already-migrated empty database saves MLflow's ~15 s of migrations)."""
    from pipeline.tracking import start_run

    run = make_run(root, clip, step=steps)
    if template_db is not None and tracking_uri is None:
        shutil.copy(template_db, root / "mlflow.db")
    tracker = start_run(config={"recipe": name, "train": {"lr": loss0}}, output_dir=root, experiment=experiment,
                        run_name=name, system_metrics=False, plots_at_end=False, tracking_uri=tracking_uri)
    with tracker:
        for step in range(1, steps + 1):
            tracker.log_metrics({"train/loss": loss0 / step, "train/samples_per_s": 10.0 + step}, step=step)
    state_file = ckpt.find_latest(run / "checkpoints") / ckpt.STATE_FILE
    state = json.loads(state_file.read_text())
    state["mlflow_run_id"] = tracker.run_id  # what the trainer records
    state_file.write_text(json.dumps(state))
    return run, tracker.run_id


def random_i3d(path: Path, *, seed: int = 0) -> Path:
    from pipeline.eval.fvd import build_i3d, save_i3d

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_i3d()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, (2.0 / p[0].numel()) ** 0.5)
    return save_i3d(model, path)


def real_clips(folder: Path, count: int = 6) -> Path:
    for i in range(count):
        make_video(folder / f"real_{i:02d}.mp4", width=16 + 8 * (i % 2), height=16, fps=8.0, num_frames=8 + i)
    return folder
