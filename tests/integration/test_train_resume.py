"""Exact resume: 3 steps, stop, resume, 3 steps == 6 steps straight; also from dp=2 (ZeRO-2, ZeRO-3) to dp=1.

The straight runs are the shared 6-step runs of train_runs.py, which checkpoint at step 3. A new
process resumes from that checkpoint into a fresh output folder and trains steps 4-6: the losses,
gradient norms, learning rates and samples of those steps and the EMA at step 6 must equal the
straight run's. From dp=2 the ZeRO partitions are converted to DeepSpeed's universal checkpoint.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.deepspeed_launch import common_args, output_of, read_steps, train_cli
from tests.integration import train_runs

pytestmark = pytest.mark.slow


def _resume(source: str, name: str):
    checkpoint = train_runs.run(source) / "checkpoints" / "step_00000003"
    out = train_runs.base() / name
    same_engine = [item for override in train_runs.RUNS[source]["set"] for item in ("--set", override)]
    result = train_cli(common_args(train_runs.data(), out, extra=same_engine) + ["--resume", str(checkpoint)])
    assert result.returncode == 0, output_of(result)
    return out, result


def _assert_continues(resumed, straight, *, rel: float):
    got, want = read_steps(resumed), read_steps(straight)
    assert sorted(got) == [4, 5, 6], f"the resumed run trained steps {sorted(got)}, expected 4-6"
    for step in (4, 5, 6):
        assert got[step]["indices"] == want[step]["indices"], f"step {step}: other samples"
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=rel), f"step {step}: loss"
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=rel), f"step {step}: grad norm"
        assert got[step]["lr"] == pytest.approx(want[step]["lr"], rel=1e-12), f"step {step}: learning rate"
    ema = "checkpoints/step_00000006/ema.safetensors"
    got_ema, want_ema = load_file(str(resumed / ema)), load_file(str(straight / ema))
    for key in want_ema:
        torch.testing.assert_close(got_ema[key], want_ema[key], rtol=rel, atol=1e-7, msg=key)


def test_stop_and_resume_equals_straight_run():
    resumed, result = _resume("reference", "resume_same")
    straight = train_runs.run("reference")
    _assert_continues(resumed, straight, rel=1e-6)
    assert "resumed from" in result.stdout and "step_00000003" in result.stdout
    # Samples: the first epoch (4 steps of 4) saw every one of the 16 samples exactly once, the
    # resumed run continued where the stopped one was, none repeated, none skipped.
    before, after = read_steps(straight), read_steps(resumed)
    epoch = [i for s in (1, 2, 3) for i in before[s]["indices"]] + after[4]["indices"]
    assert sorted(epoch) == list(range(16))


@pytest.mark.parametrize("source", ["zero2", "zero3"])
def test_resume_on_another_data_parallel_size(source):
    resumed, result = _resume(source, f"resume_{source}_dp1")
    _assert_continues(resumed, train_runs.run("reference"), rel=1e-4)
    assert (train_runs.run(source) / "checkpoints" / "step_00000003" / "universal" / "COMPLETE").is_file()
    assert "universal" in result.stdout
