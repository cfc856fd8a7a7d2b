"""Pieces of the trainer without processes: checkpoint bookkeeping, resume choice, RNG states, EMA,
and the per-sample noise that makes runs independent of how the batch is split."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, FlowConfig
from pipeline.parallel.dims import ParallelDims
from pipeline.train import checkpoint as ckpt
from pipeline.train.build import resolve_resume
from pipeline.train.ema import ShardedEMA
from pipeline.train.inputs import prepare_micro_batch, sample_seed


def _fake_checkpoint(root, step, *, complete=True):
    folder = ckpt.step_dir(root, step)
    folder.mkdir(parents=True)
    (folder / ckpt.STATE_FILE).write_text(f'{{"version": {ckpt.STATE_VERSION}, "step": {step}}}')
    if complete:
        (folder / ckpt.COMPLETE).write_text("done\n")
    return folder


def test_latest_is_the_newest_complete_checkpoint(tmp_path):
    assert ckpt.find_latest(tmp_path) is None
    _fake_checkpoint(tmp_path, 2)
    four = _fake_checkpoint(tmp_path, 4)
    ckpt.write_atomic(tmp_path / ckpt.LATEST, "step_00000004\n")
    _fake_checkpoint(tmp_path, 6, complete=False)  # killed mid-save: never used
    assert ckpt.find_latest(tmp_path) == four
    # COMPLETE written but the pointer not yet updated (a crash in between): the newer one wins.
    eight = _fake_checkpoint(tmp_path, 8)
    assert ckpt.find_latest(tmp_path) == eight
    with pytest.raises(FileNotFoundError, match="interrupted while saving"):
        ckpt.read_state(ckpt.step_dir(tmp_path, 6))
    assert ckpt.read_state(four)["step"] == 4


def test_prune_keeps_the_newest_and_drops_old_incomplete(tmp_path):
    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 5, complete=False)  # newer than every complete one: a save in progress
    old_incomplete = _fake_checkpoint(tmp_path, 0, complete=False)
    ckpt.prune(tmp_path, keep=2)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [3, 4]
    assert not old_incomplete.exists() and ckpt.step_dir(tmp_path, 5).exists()
    ckpt.prune(tmp_path, keep=0)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [3, 4]


def test_resume_choice(tmp_path):
    root = tmp_path / "checkpoints"
    assert resolve_resume("none", root) is None and resolve_resume("auto", root) is None
    three = _fake_checkpoint(root, 3)
    broken = _fake_checkpoint(root, 5, complete=False)
    with pytest.raises(ConfigError, match="already holds checkpoints .* pass --resume auto"):
        resolve_resume("none", root)
    assert resolve_resume("auto", root) == three
    assert resolve_resume(str(three), root) == three
    assert resolve_resume(str(root), tmp_path / "other") == three
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        resolve_resume(str(broken), root)


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_ema_update_and_full_state_round_trip():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = ShardedEMA(model, decay=0.75)
    start = {k: v.clone() for k, v in ema.full_state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    full = ema.full_state_dict()
    torch.testing.assert_close(full["weight"], 0.75 * start["weight"] + 0.25 * model.weight.detach())
    torch.testing.assert_close(full["bias"], start["bias"])
    other = ShardedEMA(torch.nn.Linear(3, 2), decay=0.75)
    other.load_full_state_dict(full)
    assert all(torch.equal(other.full_state_dict()[k], full[k]) for k in full)
    with pytest.raises(ValueError, match="missing"):
        other.load_full_state_dict({"weight": full["weight"]})


def _inputs(latents, text, mask, positions, step, dims=None):
    flow = FlowConfig(caption_dropout=0.5)
    null = torch.zeros(1, text.shape[-1])
    return prepare_micro_batch(latents, text, mask, positions=positions, step=step, seed=7, flow=flow, patch_t=1,
                               patch_size=2, null_text=null, null_mask=torch.zeros(1, dtype=torch.bool),
                               dims=dims or ParallelDims(dp=1, sp=1, world_size=1, rank=0, build_groups=False),
                               dtype=torch.float32)


def test_noise_depends_on_the_sample_position_not_on_the_split():
    torch.manual_seed(0)
    latents, text = torch.randn(4, 2, 4, 4, 4), torch.randn(4, 3, 5)
    mask = torch.ones(4, 3, dtype=torch.bool)
    whole = _inputs(latents, text, mask, [0, 1, 2, 3], step=5)
    halves = [_inputs(latents[i:i + 2], text[i:i + 2], mask[i:i + 2], [i, i + 1], step=5) for i in (0, 2)]
    for field in ("latents", "timesteps"):
        torch.testing.assert_close(torch.cat([getattr(h.local, field) for h in halves]), getattr(whole.local, field))
    torch.testing.assert_close(torch.cat([h.local.extras["target"] for h in halves]), whole.local.extras["target"])
    torch.testing.assert_close(torch.cat([h.text for h in halves]), whole.text)
    assert whole.tokens == 4 * 4 * 2 * 2
    assert not torch.equal(_inputs(latents, text, mask, [0, 1, 2, 3], step=6).local.latents, whole.local.latents)
    assert len({sample_seed(7, 5, p) for p in range(100)}) == 100


def test_sequence_parallel_ranks_get_slices_of_the_same_draws():
    torch.manual_seed(0)
    latents, text = torch.randn(2, 2, 4, 4, 4), torch.randn(2, 3, 5)
    mask = torch.ones(2, 3, dtype=torch.bool)
    whole = _inputs(latents, text, mask, [0, 1], step=1)
    parts = [_inputs(latents, text, mask, [0, 1], step=1,
                     dims=ParallelDims(dp=1, sp=2, world_size=2, rank=r, build_groups=False)) for r in (0, 1)]
    torch.testing.assert_close(torch.cat([p.local.latents for p in parts], dim=2), whole.local.latents)
    torch.testing.assert_close(torch.cat([p.local.extras["target"] for p in parts], dim=2),
                               whole.local.extras["target"])
    assert [p.local.shard.frame_offset for p in parts] == [0, 2]
    assert all(torch.equal(p.local.timesteps, whole.local.timesteps) for p in parts)


class _Latents:
    """The parts of a LatentDataset the conditioning reads."""

    def __init__(self, root, manifest):
        self.root, self.manifest = root, manifest

    def __len__(self):
        return 3

    def __getitem__(self, index):
        return {"text": torch.full((2 + index, 8), float(index)), "caption": f"clip {index}",
                "latent": torch.zeros(4, 4, 4, 4)}


def test_validation_captions_and_null_caption(tmp_path, monkeypatch):
    from pipeline.config import get_recipe
    from pipeline.config_overrides import apply_overrides
    from pipeline.data.encode import text_factory
    from pipeline.data.encode.text_clip import make_tiny_clip
    from pipeline.data.encode.text_factory import build_text_encoder
    from pipeline.data.store.text_conditioning import (
        TextConditioning,
        pad_embeddings,
        write_text_conditioning,
    )
    from pipeline.train.conditioning import load_or_compute

    # What precompute stores next to the latents: the encoded "" and the --validation-prompts.
    encoder = build_text_encoder("clip", path=make_tiny_clip(tmp_path / "clip", width=8, context_length=16))
    stored_prompts = ["a green cone", "a red ball", "a blue cube"]
    emb, mask = encoder.encode(["", *stored_prompts])
    prompt_text, prompt_mask = pad_embeddings([emb[i][mask[i]] for i in range(1, 4)], 8)
    latents = tmp_path / "latents"
    write_text_conditioning(latents, TextConditioning(
        null_text=emb[0][mask[0]], null_mask=mask[0][mask[0]], prompts=stored_prompts, prompt_text=prompt_text,
        prompt_mask=prompt_mask, text_encoder=encoder.fingerprint()))
    # No training rank loads a text encoder: building one fails the test.
    monkeypatch.setattr(text_factory, "build_text_encoder", lambda *a, **k: pytest.fail("a text encoder was loaded"))
    buckets = [{"key": "b", "latent_shape": [4, 4, 2, 2]}]
    manifest = {"text_encoder": encoder.fingerprint(), "buckets": buckets}
    config = apply_overrides(get_recipe("debug"), ["validation.prompts=a red ball|a blue cube"])
    cond = load_or_compute(config, _Latents(latents, manifest), output_dir=tmp_path / "run", is_main=True,
                           device=torch.device("cpu"))
    torch.testing.assert_close(cond.null_text, emb[0][mask[0]])  # the encoded empty caption
    n = int(mask[2].sum())
    torch.testing.assert_close(cond.val_text[0, :n], emb[2][mask[2]])
    assert cond.val_mask[0].sum() == n and cond.val_captions == ["a red ball", "a blue cube"]
    assert cond.val_shapes == [(4, 4, 2, 2)] * 2  # the first bucket's latents
    assert (tmp_path / "run" / "conditioning.safetensors").is_file()
    # No prompts asked: the stored ones. A prompt precompute did not encode: a clear error.
    empty = apply_overrides(config, ["validation.prompts=[]"])
    cond = load_or_compute(empty, _Latents(latents, manifest), output_dir=tmp_path / "run2", is_main=True,
                           device=torch.device("cpu"))
    assert cond.val_captions == stored_prompts
    other = apply_overrides(config, ["validation.prompts=a pink star"])
    with pytest.raises(ConfigError, match=r"\['a pink star'\] are not in .*--validation-prompts FILE"):
        load_or_compute(other, _Latents(latents, manifest), output_dir=tmp_path / "run3", is_main=True,
                        device=torch.device("cpu"))

    # Latents without the file (an older precompute): prompts are refused; empty prompts use the data
    # set's captions and the null caption is the empty context.
    plain = _Latents(tmp_path, {"buckets": buckets})
    with pytest.raises(ConfigError, match="no such file .*--validation-prompts FILE"):
        load_or_compute(config, plain, output_dir=tmp_path / "other", is_main=True, device=torch.device("cpu"))
    config = apply_overrides(config, ["validation.prompts=[]", "validation.num_samples=2"])
    cond = load_or_compute(config, plain, output_dir=tmp_path / "other", is_main=True, device=torch.device("cpu"))
    assert cond.val_captions == ["clip 0", "clip 1"] and cond.val_shapes == [(4, 4, 4, 4)] * 2
    assert cond.val_mask.sum(dim=1).tolist() == [2, 3] and not cond.null_mask.any()
