"""VideoVAE: pixel codec, tiny CogVideoX and per-frame KL VAEs, fingerprints, reload, errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download; everything here is local

import pytest
import torch

from pipeline.data.encode.fingerprint import fingerprint_diff
from pipeline.data.encode.vae import PixelCodec
from pipeline.data.encode.vae_factory import build_vae, vae_from_fingerprint

# The smallest configs that still run the real diffusers code paths (norm groups must divide 8).
TINY_COG = {
    "block_out_channels": (8, 16, 16),
    "down_block_types": ("CogVideoXDownBlock3D",) * 3,
    "up_block_types": ("CogVideoXUpBlock3D",) * 3,
    "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 4,
    "temporal_compression_ratio": 4, "sample_height": 32, "sample_width": 32,
}
TINY_KL = {
    "block_out_channels": (8, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 16,
    "scaling_factor": 0.5, "shift_factor": 0.25,
}


def video(frames, size=16, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, size, size, generator=g) * 2 - 1  # (B, 3, T, H, W)


@pytest.fixture(scope="module")
def cog():
    return build_vae("cogvideox", config=TINY_COG)


@pytest.fixture(scope="module")
def kl():
    return build_vae("frame_kl", config=TINY_KL)


# ---- pixel codec -----------------------------------------------------------------------------


@pytest.mark.parametrize("spatial,temporal", [(1, 1), (2, 1), (4, 2)])
def test_pixel_codec_is_an_exact_inverse(spatial, temporal):
    vae = PixelCodec(spatial=spatial, temporal=temporal, scaling_factor=1.7, shift_factor=-0.3)
    x = video(4, size=8, batch=2)
    z = vae.encode(x)
    assert z.shape == (2, vae.latent_channels, 4 // temporal, 8 // spatial, 8 // spatial)
    assert vae.latent_channels == 3 * temporal * spatial * spatial
    assert tuple(z.shape[1:]) == vae.latent_shape(4, 8, 8)
    torch.testing.assert_close(vae.decode(z), x, rtol=0, atol=1e-6)


def test_pixel_codec_space_to_depth_layout_and_scaling():
    vae = PixelCodec(spatial=2, scaling_factor=2.0, shift_factor=0.5)
    x = video(1, size=4)
    z = vae.encode(x)  # channel c*4 + dy*2 + dx holds pixel (2i+dy, 2j+dx) of colour c
    assert torch.equal(z[0, 1 * 4 + 1 * 2 + 0, 0], (x[0, 1, 0, 1::2, 0::2] - 0.5) * 2.0)
    raw = PixelCodec(spatial=2).encode(x)
    torch.testing.assert_close(z, (raw - 0.5) * 2.0)


def test_pixel_codec_save_and_fingerprint(tmp_path):
    vae = PixelCodec(spatial=4, temporal=2, scaling_factor=0.5)
    loaded = build_vae("pixel", path=vae.save(tmp_path))
    assert fingerprint_diff(vae.fingerprint(), loaded.fingerprint()) == []
    assert fingerprint_diff(vae.fingerprint(), PixelCodec(spatial=2).fingerprint()) != []
    assert vae_from_fingerprint(vae.fingerprint()).spatial_compression == 4


# ---- CogVideoX -------------------------------------------------------------------------------


def test_cogvideox_shapes_and_compression(cog):
    assert (cog.temporal_compression, cog.spatial_compression, cog.latent_channels) == (4, 4, 4)
    assert cog.latent_shape(9, 16, 32) == (4, 3, 4, 8)
    z = cog.encode(video(9, batch=2))
    assert z.shape == (2, 4, 3, 4, 4) and z.dtype == torch.float32
    assert cog.decode(z).shape == (2, 3, 9, 16, 16)


@pytest.mark.parametrize("frames", [1, 5, 13])
def test_cogvideox_decode_returns_the_encoded_frame_count(cog, frames):
    # 5 and 13 frames give an even number of latent frames, which diffusers alone decodes to 4 more.
    out = cog.decode(cog.encode(video(frames)))
    assert out.shape == (1, 3, frames, 16, 16)
    assert out.min() >= -1 and out.max() <= 1


def test_cogvideox_shallow_config_compresses_time_less():
    vae = build_vae("cogvideox", config={**TINY_COG, "block_out_channels": (8, 16),
                                         "down_block_types": ("CogVideoXDownBlock3D",) * 2,
                                         "up_block_types": ("CogVideoXUpBlock3D",) * 2})
    assert (vae.temporal_compression, vae.spatial_compression) == (2, 2)
    assert vae.encode(video(5)).shape == (1, 4, 3, 8, 8)


def test_scaling_factor_is_applied(cog):
    x = video(5)
    raw = cog.model.encode(x).latent_dist.mode()
    torch.testing.assert_close(cog.encode(x), raw * cog.scaling_factor)
    assert cog.scaling_factor == pytest.approx(1.15258426) and cog.shift_factor == 0.0


@pytest.mark.parametrize("frames,hint", [(8, "Use 5 or 9"), (0, "Use 1")])
def test_invalid_frame_count_names_the_value(cog, frames, hint):
    with pytest.raises(ValueError, match=rf"frames={frames} .*1 \+ 4\*k.*{hint}"):
        cog.latent_shape(frames, 16, 16)


def test_invalid_inputs_are_clear_errors(cog):
    with pytest.raises(ValueError, match="frames=8"):
        cog.encode(video(8))
    with pytest.raises(ValueError, match="height=18, width=16 must be positive multiples of .* 4"):
        cog.encode(torch.zeros(1, 3, 5, 18, 16))
    with pytest.raises(ValueError, match=r"values in \[-1, 1\]"):
        cog.encode(video(5) * 127.5 + 127.5)
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        cog.encode(torch.zeros(3, 5, 16, 16))
    with pytest.raises(ValueError, match=r"latents \(B, 4, T', H', W'\)"):
        cog.decode(torch.zeros(1, 3, 2, 4, 4))


def test_cogvideox_reload_and_fingerprints(cog, tmp_path):
    x = video(5)
    fp = cog.fingerprint()
    assert fp["kind"] == "cogvideox" and fp["dtype"] == "float32" and fp["source"] is None
    same = build_vae("cogvideox", config=TINY_COG)  # same seed: same random weights
    assert fingerprint_diff(fp, same.fingerprint()) == []
    other = build_vae("cogvideox", config=TINY_COG, seed=1)
    assert [d.split(":")[0] for d in fingerprint_diff(fp, other.fingerprint())] == ["weights_hash"]

    rebuilt = vae_from_fingerprint(fp)  # from config + seed
    assert torch.equal(rebuilt.encode(x), cog.encode(x))

    saved = build_vae("cogvideox", config=TINY_COG, seed=1)
    saved.save(tmp_path / "vae")
    assert saved.fingerprint()["source"] == str((tmp_path / "vae").resolve())
    loaded = build_vae("cogvideox", path=tmp_path / "vae")
    assert fingerprint_diff(saved.fingerprint(), loaded.fingerprint()) == []
    z = loaded.encode(x)
    assert torch.equal(z, other.encode(x))
    assert torch.equal(loaded.decode(z), other.decode(z))
    # a pipeline-style folder holds the VAE under vae/
    assert build_vae("cogvideox", path=tmp_path).fingerprint()["subfolder"] == "vae"


def test_fingerprint_detects_changed_weights(tmp_path):
    vae = build_vae("cogvideox", config=TINY_COG)
    vae.save(tmp_path)
    fp = vae.fingerprint()
    changed = build_vae("cogvideox", config=TINY_COG, seed=3)
    changed.save(tmp_path)  # other weights under the same path
    with pytest.raises(ValueError, match="does not match the fingerprint.*weights_hash"):
        vae_from_fingerprint(fp)


def test_dtype_is_part_of_the_fingerprint():
    bf16 = build_vae("cogvideox", config=TINY_COG, dtype="bfloat16")
    fp = bf16.fingerprint()
    assert fp["dtype"] == "bfloat16"
    assert "dtype: 'bfloat16' != 'float32'" in fingerprint_diff(fp, build_vae("cogvideox", config=TINY_COG).fingerprint())
    assert bf16.encode(video(5)).dtype == torch.float32


def test_tiling_and_slicing_switches(cog):
    vae = build_vae("cogvideox", config=TINY_COG, tiling=True, slicing=True)
    assert vae.model.use_tiling and vae.model.use_slicing
    assert fingerprint_diff(vae.fingerprint(), cog.fingerprint()) == []  # memory settings only
    x = video(5, batch=2)
    torch.testing.assert_close(vae.encode(x), cog.encode(x))  # 16x16 stays below the tile size


# ---- per-frame KL ----------------------------------------------------------------------------


def test_frame_kl_folds_frames_into_the_batch(kl):
    assert (kl.temporal_compression, kl.spatial_compression) == (1, 2)
    x = video(3, batch=2)
    z = kl.encode(x)
    assert z.shape == (2, 4, 3, 8, 8) == (2, *kl.latent_shape(3, 16, 16))
    single = kl.encode(x[1:, :, 2:3])  # frame 2 of sample 1 alone gives the same latents
    torch.testing.assert_close(z[1:, :, 2:3], single, rtol=1e-5, atol=1e-5)
    raw = kl.model.encode(x[:, :, 0]).latent_dist.mode()
    torch.testing.assert_close(z[:, :, 0], (raw - 0.25) * 0.5, rtol=1e-5, atol=1e-5)
    assert kl.decode(z).shape == (2, 3, 3, 16, 16)


def test_frame_kl_reload_gives_identical_outputs(kl, tmp_path):
    kl_copy = build_vae("frame_kl", config=TINY_KL)
    kl_copy.save(tmp_path)
    loaded = vae_from_fingerprint(kl_copy.fingerprint())
    x = video(2)
    assert torch.equal(loaded.encode(x), kl.encode(x))


# ---- factory errors --------------------------------------------------------------------------


def test_build_vae_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown VAE kind 'sdxl'"):
        build_vae("sdxl", config={})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_vae("cogvideox", path=tmp_path / "missing")
    with pytest.raises(OSError, match="could not load from"):
        build_vae("cogvideox", path=tmp_path)  # an empty folder
    with pytest.raises(ValueError, match="give path="):
        build_vae("frame_kl")
    with pytest.raises(ValueError, match="invalid config"):
        build_vae("cogvideox", config={"no_such_arg": 1})
    with pytest.raises(ValueError, match="spatial=0"):
        PixelCodec(spatial=0)
