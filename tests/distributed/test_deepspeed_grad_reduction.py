"""What DeepSpeed does with gradients over dp x sp, per ZeRO stage, through the real launcher.

The trainer gives DeepSpeed no mpu, so DeepSpeed's data-parallel group is the whole world and the
ranks of an SP group count as data-parallel replicas. This test shows, for ZeRO 1, 2 and 3, that the
applied gradient is the MEAN of the ranks' local gradients (ZeRO-3's reduce-scatter included), and
that multiplying each rank's loss by the world size (the SP factor when the world is one SP group:
pipeline/parallel/loss.py `deepspeed_loss_factor(dims, "world")` = sp) turns it into the SUM, the
gradient of the whole sample. The trainer-level consequence, sp=2 training equal to one process, is
tested in tests/integration/test_train_equivalence.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.deepspeed_launch import launch, output_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def probe():
    result = launch([], num_gpus=2, script="tests/distributed/deepspeed_grad_probe.py")
    assert result.returncode == 0, output_of(result)
    line = next(line for line in result.stdout.splitlines() if line.startswith("PROBE "))
    return json.loads(line[len("PROBE "):])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_averages_gradients_over_the_whole_world(probe, stage):
    assert probe["world_size"] == 2
    runs = {run["factor"]: run for run in probe["runs"] if run["stage"] == stage}
    assert set(runs) == {1.0, 2.0}
    for factor, run in runs.items():
        update = [torch.tensor(u) for u in run["update"]]
        grads = [[torch.tensor(g) for g in per_rank] for per_rank in run["local_grads"]]
        mean = [sum(g) / len(g) for g in grads]
        total = [sum(g) for g in grads]
        # The two ranks' gradients differ, so mean and sum are told apart.
        assert all(not torch.allclose(m, s) for m, s in zip(mean, total) if s.abs().max() > 1e-3)
        expected = mean if factor == 1.0 else total
        for u, e in zip(update, expected):
            torch.testing.assert_close(u, e, rtol=1e-5, atol=1e-6)
