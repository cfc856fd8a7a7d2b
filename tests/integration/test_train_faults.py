"""Faults: a rank killed mid-save, non-finite losses, bad configs.

- One rank is SIGKILLed while the step-4 checkpoint is being saved (held open by the test's fault
  hook after every file but COMPLETE is written): the `deepspeed` launcher exits non-zero, the
  half-saved checkpoint is ignored, and `--resume auto` continues from step 2 and then trains exactly
  like the uninterrupted reference run.
- NaN latents make a step's loss non-finite: the step is skipped (no update, no LR step, counted);
  `train.max_nonfinite_steps` in a row stop the run with exit code 1, a clear error and a checkpoint
  whose weights are those of the last good step.
- Bad configs fail fast with exit code 2 and a message naming the field, value and fix.
"""

from __future__ import annotations

import time

import pytest

from pipeline.data.load.loader import LatentDataset, LatentLoader
from pipeline.train import checkpoint as ckpt
from tests.deepspeed_launch import (
    common_args,
    cpu_env,
    kill_rank,
    launch,
    output_of,
    read_steps,
    start_launch,
    stop_launch,
    train_cli,
    write_latents,
)
from tests.integration import train_runs

pytestmark = pytest.mark.slow


def test_rank_killed_mid_save_then_resume_auto(tmp_path):
    out = tmp_path / "run"
    args = common_args(train_runs.data(), out) + ["--set", "train.checkpoint_every=2"]
    held = out / "checkpoints" / "step_00000004"
    proc = start_launch(args, env=cpu_env(**{ckpt.FAULT_DELAY_ENV: "4:300"}), log=tmp_path / "killed.log")
    try:
        deadline = time.time() + 400
        while not (held / ckpt.STATE_FILE).is_file():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-5000:]
            assert time.time() < deadline, "the step-4 checkpoint never started"
            time.sleep(0.2)
        assert not (held / ckpt.COMPLETE).exists()
        code = kill_rank(proc, 1)
    finally:
        stop_launch(proc)
    assert code != 0, "the launcher reported success although a rank was killed"
    assert ckpt.find_latest(out / "checkpoints") == out / "checkpoints" / "step_00000002"
    assert not ckpt.is_complete(held)

    result = launch(args + ["--resume", "auto"], num_gpus=2)
    assert result.returncode == 0, output_of(result)
    assert "resumed from" in result.stdout and "step_00000002" in result.stdout
    assert ckpt.is_complete(held) and ckpt.find_latest(out / "checkpoints").name == "step_00000006"
    reference, steps = read_steps(train_runs.run("reference")), read_steps(out)
    for step in range(1, 7):  # steps 3 and 4 were trained twice; the resumed ones are recorded last
        assert steps[step]["indices"] == reference[step]["indices"]
        assert steps[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-4), f"step {step}"


def _nan_data(root):
    """Latents whose NaN samples land in steps 2, 4 and 5 (batch 4, seed 0: the plan of the loader)."""
    clean = write_latents(root / "clean")
    loader = LatentLoader(LatentDataset(clean), batch_size=4, dp_rank=0, dp_size=1, seed=0)
    step2, step4, step5 = loader.plan(0)[1][1][0], loader.plan(0)[3][1][0], loader.plan(1)[0][1][0]
    return write_latents(root / "nan", nan_samples=(int(step2), int(step4), int(step5)))


def test_nonfinite_loss_skips_the_step_and_too_many_stop_the_run(tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = tmp_path / "run"
    args = common_args(_nan_data(tmp_path), out, steps=8) + ["--set", "train.max_nonfinite_steps=2"]
    result = train_cli(args)
    assert result.returncode == 1, output_of(result)
    assert "2 steps in a row" in result.stderr and "non-finite" in result.stderr
    steps = read_steps(out)
    assert sorted(steps) == [1, 2, 3, 4, 5], "the run must stop at step 5"
    assert [steps[s]["skipped"] for s in range(1, 6)] == [False, True, False, True, True]
    assert steps[3]["lr"] == steps[2]["lr"], "a skipped step must not advance the LR schedule"
    assert steps[3]["grad_norm"] is not None and steps[2]["grad_norm"] is None
    # Stopped with a checkpoint: complete, latest, and the weights of step 3 (4 and 5 changed nothing).
    last = ckpt.find_latest(out / "checkpoints")
    assert last.name == "step_00000005"
    assert ckpt.read_state(last)["counters"]["nonfinite_total"] == 3
    at3 = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints" / "step_00000003"), tag=ckpt.DS_TAG)
    at5 = get_fp32_state_dict_from_zero_checkpoint(str(last), tag=ckpt.DS_TAG)
    for key in at3:
        assert at3[key].equal(at5[key]), key


BAD_CONFIGS = [
    (["--recipe", "nope"], "unknown recipe 'nope'; choose one of debug, S, B, XL"),
    (["--set", "optim.nope=1"], "OptimConfig has no field 'nope'"),
    (["--set", "engine.zero_stage=5"], "EngineConfig.zero_stage=5 must be 1, 2 or 3"),
    (["--set", "data.micro_batch_size=4", "--set", "data.global_batch_size=6"], "not a multiple of micro_batch_size=4"),
    (["--set", "model.causal=true"], "set flow.per_frame_timesteps=true"),
    (["--set", "parallel.dp=2"], "dp=2 x sp=1 = 2 does not match the world size 1"),
    (["--data", "/nonexistent/latents"], "no manifest.json"),
]

# Every case in ONE fresh process (a process each would spend its time importing torch and DeepSpeed):
# `pomvid train` is called once per case, its stderr captured; the cases that reach the build come last.
_RUN_CASES = """
import contextlib, io, json, sys
from pipeline.cli import main
out = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", *args])
    out.append([code, err.getvalue()])
print("RESULTS " + json.dumps(out))
"""


def test_bad_configs_fail_with_a_clear_error(tmp_path):
    import json
    import subprocess
    import sys

    cases = [common_args(train_runs.data(), tmp_path / f"run{i}") + extra for i, (extra, _) in enumerate(BAD_CONFIGS)]
    result = subprocess.run([sys.executable, "-c", _RUN_CASES, json.dumps(cases)], env=cpu_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, output_of(result)
    results = json.loads(result.stdout.split("RESULTS ", 1)[1])
    for (extra, message), (code, stderr) in zip(BAD_CONFIGS, results, strict=True):
        assert code == 2, (extra, code, stderr)
        assert message in stderr, (extra, stderr)


def test_existing_checkpoints_need_resume_auto():
    result = train_cli(common_args(train_runs.data(), train_runs.run("reference")), timeout=120)
    assert result.returncode == 2 and "pass --resume auto" in result.stderr, output_of(result)


def test_world_size_must_match_dp_times_sp_under_the_launcher(tmp_path):
    result = launch(common_args(train_runs.data(), tmp_path / "run") + ["--set", "parallel.sp=1",
                                                                         "--set", "parallel.dp=1"], num_gpus=2)
    assert result.returncode != 0
    assert "dp=1 x sp=1 = 1 does not match the world size 2" in result.stderr, output_of(result)
