"""The demo's bookkeeping without running it: settings, the output folder on a re-run, the training
command for CPU and GPU layouts, and the final report."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from pipeline.config import get_recipe
from pipeline.config_overrides import apply_overrides
from pipeline.demo.run import DemoError, DemoPaths, held_out_captions, prepare_folder, report, train_args
from pipeline.demo.settings import DemoSettings, demo_settings


def test_settings_validate_and_quick_is_smaller():
    full, quick = demo_settings(False), demo_settings(True, seed=3)
    assert quick.seed == 3 and quick.steps < full.steps and quick.train_videos < full.train_videos
    assert quick.steps <= 100 and quick.train_videos <= 64  # a smoke run (CI: under 3 minutes)
    for bad, needle in (({"size": 18}, "multiple of"), ({"frames": 7}, "even"), ({"text_encoder": "bert"}, "t5"),
                        ({"steps": 0}, "steps"), ({"held_out": 0}, "held_out"), ({"lr": 2.0}, "lr")):
        with pytest.raises(ValueError, match=needle):
            replace(full, **bad)


def test_held_out_captions_are_the_held_out_pairs():
    captions = held_out_captions(DemoSettings())
    assert len(captions) == 8  # 4 colour/direction pairs x 2 shapes
    pairs = {(c.split()[1], c.split()[4]) for c in captions}
    assert len({colour for colour, _ in pairs}) == 4 and len({d for _, d in pairs}) == 4


def test_a_rerun_keeps_the_folder_and_other_settings_clear_it(tmp_path):
    paths = DemoPaths(tmp_path / "demo")
    settings = DemoSettings()
    assert prepare_folder(paths, settings) is False
    for folder in (paths.data, paths.latents, paths.run):
        folder.mkdir()
        (folder / "file").write_text("x")
    (paths.root / "mlflow.db").write_text("db")
    assert prepare_folder(paths, settings) is True
    assert (paths.run / "file").is_file()
    assert prepare_folder(paths, replace(settings, steps=10)) is False
    assert not paths.run.exists() and not paths.data.exists() and not paths.latents.exists()
    assert (paths.root / "mlflow.db").read_text() == "db"  # earlier MLflow runs stay
    assert json.loads(paths.settings.read_text())["steps"] == 10


@pytest.mark.parametrize("gpus,sp,micro", [(2, 2, 16), (4, 2, 8), (8, 2, 4), (1, 1, 16), (3, 1, 0)])
def test_training_command_layout(tmp_path, gpus, sp, micro):
    paths = DemoPaths(tmp_path)
    settings = DemoSettings(logit_mean=0.5)  # not the demo recipe's default, so a dropped override fails
    if not micro:  # 3 data-parallel groups cannot share a batch of 16
        with pytest.raises(DemoError, match="does not split"):
            train_args(paths, settings, num_gpus=gpus, port=1234)
        return
    args = train_args(paths, settings, num_gpus=gpus, port=1234)
    assert args[:2] == ["train", "--recipe"] and args[args.index("--num_gpus") + 1] == str(gpus)
    assert args[args.index("--resume") + 1] == "auto"
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    config = apply_overrides(get_recipe("demo"), overrides)
    layout = config.layout(gpus)
    assert (layout.sp, layout.micro_batch_size, layout.global_batch_size) == (sp, micro, settings.batch)
    assert config.train.steps == settings.steps and config.optim.lr == settings.lr
    assert config.train.ema_decay == settings.ema_decay and config.flow.caption_dropout == settings.caption_dropout
    assert config.flow.logit_mean == settings.logit_mean


def test_report_says_where_everything_is(tmp_path):
    paths = DemoPaths(tmp_path)
    record = {"adherence": 0.75, "colour_accuracy": 1.0, "direction_accuracy": 0.75, "chance_adherence": 1 / 16,
              "met_target": False, "num_videos": 32, "checkpoint": str(paths.run / "checkpoints" / "step_00003000"),
              "step": 3000, "phase_seconds": {"data": 10.0, "train": 600.0, "total": 700.0},
              "per_caption": {"a red square moving up": {"videos": 4, "right": 3, "seen": ["red up"] * 4}},
              "mlflow_run_id": "abc"}
    text = report(paths, record, quick=False)
    assert "0.75 (24/32 videos" in text and "MISSED" in text and "chance 0.062" in text
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'} --host 127.0.0.1" in text
    assert "11.7 min" in text and "train 600 s" in text
    assert "smoke run" in report(paths, record, quick=True)


def test_captions_that_do_not_fit_the_text_length_are_refused(tmp_path):
    from pipeline.data.encode.text_t5 import make_tiny_t5
    from pipeline.demo.run import check_caption_length

    captions = held_out_captions(DemoSettings())
    check_caption_length(replace(DemoSettings(), text_encoder="clip", text_len=7), tmp_path, captions)
    with pytest.raises(DemoError, match="text_len=6"):
        check_caption_length(replace(DemoSettings(), text_encoder="clip", text_len=6), tmp_path, captions)
    folder = make_tiny_t5(tmp_path / "t5", captions)  # sentencepiece on 8 captions: about one token a letter
    with pytest.raises(DemoError, match="its end would be cut off; raise text_len to"):
        check_caption_length(replace(DemoSettings(), text_len=16), folder, captions)
    check_caption_length(DemoSettings(), folder, captions)
