"""FVD and CLIP score plumbing on random-weight networks (a tiny open_clip CLIP, the Kinetics-400 I3D
saved to a file), the protocol id, and the CLIP-score hook of validation during training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.eval.clip_score import ClipScorer, quantize, validation_clip_score
from pipeline.eval.fvd import FeatureStats, frechet_distance, i3d_features, load_i3d
from pipeline.eval.protocol import EvalProtocol, describe_seeds, summary_of
from tests.eval_helpers import random_i3d


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    from tests.eval_helpers import one_thread

    with one_thread():
        yield


@pytest.fixture(scope="module")
def i3d(tmp_path_factory):
    return load_i3d(random_i3d(tmp_path_factory.mktemp("i3d") / "i3d.safetensors"))


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    from pipeline.data.encode.text_clip import make_tiny_clip

    return ClipScorer.load(make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", width=16, context_length=8,
                                          seed=2))


def _stats(i3d, videos: torch.Tensor) -> FeatureStats:
    stats = FeatureStats.empty()
    stats.add(i3d_features(i3d, videos, resolution=32))
    return stats


def test_fvd_is_zero_for_identical_sets_and_grows_with_a_shift(i3d):
    torch.manual_seed(0)
    videos = torch.rand(8, 3, 4, 8, 8) * 1.6 - 0.8  # (N, 3, T, H, W)
    real = _stats(i3d, videos)
    same = frechet_distance(real, _stats(i3d, videos.clone()))
    small = frechet_distance(real, _stats(i3d, videos + 0.1))
    large = frechet_distance(real, _stats(i3d, videos + 0.2))
    assert same < 1e-6 * large
    assert 0 < small < large
    # Sums over halves (two ranks) give the statistics of the whole set.
    halves = _stats(i3d, videos[:4])
    rest = _stats(i3d, videos[4:])
    merged = FeatureStats.from_tensor(halves.to_tensor() + rest.to_tensor())
    assert merged.count == 8
    torch.testing.assert_close(torch.from_numpy(merged.outer), torch.from_numpy(real.outer), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(_stats(i3d, videos[:1]), real)


def test_features_at_224_are_the_networks_own_logits(i3d):
    video = quantize(torch.rand(1, 3, 9, 224, 224) * 2 - 1)  # already on 8-bit levels and at the network's size
    with torch.no_grad():
        own = i3d(video).double()  # InceptionI3d.forward: AvgPool3d([2, 7, 7]), logits, mean over time
    torch.testing.assert_close(i3d_features(i3d, video, resolution=224), own, rtol=1e-5, atol=1e-6)


def test_i3d_weights_that_do_not_fit_are_refused_and_pt_files_load(i3d, tmp_path):
    state = {k: v for k, v in i3d.state_dict().items() if not k.startswith("logits")}
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="missing .*logits"):
        load_i3d(tmp_path / "broken.pt")
    torch.save(i3d.state_dict(), tmp_path / "i3d.pt")
    loaded = load_i3d(tmp_path / "i3d.pt")  # read with weights_only=True
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), i3d.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="--i3d"):
        load_i3d(tmp_path / "missing.pt")


def test_clip_score_of_a_matched_pair_beats_a_mismatched_one(scorer):
    prompts = ["a red square moving up", "a blue circle moving left"]
    text = scorer.text_features(prompts[:1])  # (1, E)
    # Build frames that match prompt 0: ascend the model's own similarity from random pixels.
    torch.manual_seed(0)
    raw = torch.randn(3, 3, 16, 16, requires_grad=True)  # (T, 3, H, W) before tanh
    optimizer = torch.optim.Adam([raw], lr=0.1)
    for _ in range(40):
        image = F.normalize(scorer.model.encode_image(scorer.preprocess(torch.tanh(raw), to_8bit=False)), dim=-1)
        loss = -(image @ text.T).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    video = torch.tanh(raw).detach().transpose(0, 1)  # (3, T, H, W)
    matched, mismatched = scorer.score_videos([video, video], prompts)
    random_video = torch.rand(3, 3, 16, 16) * 2 - 1
    baseline = scorer.score_videos([random_video], prompts[:1])[0]
    assert matched > 50 and matched > mismatched + 10 and matched > baseline + 10
    with pytest.raises(ValueError, match="2 videos but 1 prompts"):
        scorer.score_videos([video, video], prompts[:1])


def test_validation_computes_clip_score_only_when_a_model_is_configured(scorer):
    from pipeline.config import ConfigError, ValidationConfig

    videos = [torch.rand(3, 2, 8, 8) * 2 - 1 for _ in range(2)]
    captions = ["a red square moving up", "a blue circle moving left"]
    assert validation_clip_score(ValidationConfig(), videos, captions, device="cpu", cache={}) is None
    cache = {}
    config = ValidationConfig(clip_model=scorer.source)
    score = validation_clip_score(config, videos, captions, device="cpu", cache=cache)
    assert score == pytest.approx(sum(scorer.score_videos(videos, captions)) / 2)
    assert validation_clip_score(config, videos, captions, device="cpu", cache=cache) == pytest.approx(score)
    assert cache["scorer"] is cache["scorer"]  # loaded once
    with pytest.raises(ConfigError, match="clip_model"):
        ValidationConfig(clip_model="/no/such/clip")


def test_protocol_id_changes_with_each_field_and_reads_back():
    base = dict(num_videos=64, frames=16, height=256, width=256, fps=8.0, seeds=describe_seeds(list(range(64))),
                prompts="ab" * 32, num_prompts=8, steps=30, guidance=3.0, shift=1.0, solver="euler", sequential=False,
                fvd={"network": "n" * 64, "resolution": 224, "real": "r" * 64, "num_real": 2048})
    protocol = EvalProtocol(**base)
    assert base["seeds"] == "0..63" and describe_seeds([3, 1]) == "3,1"
    assert protocol.id == EvalProtocol(**base).id and len(protocol.id) == 8
    for field, value in [("num_videos", 128), ("frames", 17), ("guidance", 4.0), ("seeds", "1..64"),
                         ("fvd", {**base["fvd"], "resolution": 112})]:
        assert EvalProtocol(**{**base, field: value}).id != protocol.id, field
    assert summary_of(protocol.to_dict()) == protocol.summary()
    assert "64 videos 16x256x256@8fps" in protocol.summary() and "real 2048" in protocol.summary()


def test_prompts_from_a_file_or_a_latent_data_set_and_config_errors(tmp_path):
    from pipeline.eval.config import EvalConfig, EvalError
    from pipeline.eval.run import load_prompts
    from tests.deepspeed_launch import write_latents

    data = write_latents(tmp_path / "latents", count=8)
    assert load_prompts(str(data), 5) == [f"a test clip number {i}" for i in range(5)]
    assert load_prompts(str(data / "manifest.json"), 3) == load_prompts(str(data), 3)
    (tmp_path / "prompts.txt").write_text("# a comment\na red square\n\na blue circle\n")
    assert load_prompts(str(tmp_path / "prompts.txt"), 10) == ["a red square", "a blue circle"]
    with pytest.raises(EvalError, match="no such file"):
        load_prompts(str(tmp_path / "missing.txt"), 3)
    base = dict(checkpoint="run", prompts="p.txt", out="o", clip_model="clip")
    assert EvalConfig(**base, seeds=[7]).seed_of(3) == 10
    assert EvalConfig(**base, num_videos=2, seeds=[5, 1]).seed_of(1) == 1
    for extra, message in [({"seeds": [1, 2]}, "2 seeds for 64 videos"), ({"real": "clips"}, "--i3d"),
                           ({"clip_model": None}, "nothing to score"), ({"solver": "rk4"}, "solver")]:
        with pytest.raises(EvalError, match=message):
            EvalConfig(**{**base, **extra})
