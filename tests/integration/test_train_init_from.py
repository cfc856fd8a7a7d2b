"""`train.init_from`: a new run starts from the EMA of another run trained on other frames and another
resolution (position embeddings are computed per batch, so the weights fit); a run whose tensors have
other shapes (more latent channels: the patch embedding) fails with the tensors named."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from pipeline.train import checkpoint as ckpt
from tests.deepspeed_launch import common_args, output_of, read_steps, train_cli, write_latents
from tests.integration import train_runs

pytestmark = pytest.mark.slow


def test_init_from_a_run_with_other_frames_and_resolution(tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    source = train_runs.run("reference")  # (4, 4, 4, 4) latents
    data = write_latents(tmp_path / "longer", shape=(4, 8, 8, 8))  # twice the frames, twice the side
    out = tmp_path / "run"
    result = train_cli(common_args(data, out, steps=1) + ["--set", f"train.init_from={source}"])
    assert result.returncode == 0, output_of(result)
    assert "initial weights: EMA weights of" in result.stdout and "step_00000006" in result.stdout
    initial = load_file(str(source / "checkpoints" / "step_00000006" / ckpt.EMA_FILE))
    after = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints" / "step_00000001"), tag=ckpt.DS_TAG)
    # AdamW's first step moves each weight by at most lr (plus lr x weight decay x |w|): the run started
    # from the source's EMA, not from a fresh init.
    lr = read_steps(out)[1]["lr"]
    assert initial.keys() == after.keys()
    for key, value in initial.items():
        assert float((after[key].detach() - value).abs().max()) <= lr * 1.05, key

    wider = write_latents(tmp_path / "channels", shape=(8, 4, 4, 4))
    result = train_cli(common_args(wider, tmp_path / "bad") + ["--set", f"train.init_from={source}"], timeout=120)
    assert result.returncode == 2, output_of(result)
    assert "patch_embed" in result.stderr and "other shapes" in result.stderr, output_of(result)
