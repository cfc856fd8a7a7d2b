"""Text encoders: tiny T5 (trained sentencepiece) and tiny CLIP text tower, all offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download; everything here is local

import pytest
import torch

from pipeline.data.encode.fingerprint import fingerprint_diff
from pipeline.data.encode.text_clip import ClipTextEncoder, make_tiny_clip, tiny_clip_config
from pipeline.data.encode.text_factory import build_text_encoder, text_encoder_from_fingerprint
from pipeline.data.encode.text_t5 import make_tiny_t5

CAPTIONS = [
    "a red square moves left", "a blue circle moves right", "the green triangle spins slowly",
    "a yellow star jumps up and down", "two purple squares move apart", "an orange ball bounces",
]


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    return make_tiny_t5(tmp_path_factory.mktemp("t5"), CAPTIONS, dim=32, seed=0)


@pytest.fixture(scope="module")
def t5(t5_folder):
    return build_text_encoder("t5", path=t5_folder, max_length=16)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"), width=32, context_length=24, seed=0)


@pytest.fixture(scope="module")
def clip(clip_folder):
    return build_text_encoder("clip", path=clip_folder)


# ---- T5 --------------------------------------------------------------------------------------


def test_t5_shapes_masks_and_padding(t5):
    emb, mask = t5.encode(["a red square moves left", "", "a " * 40])
    assert (t5.dim, t5.max_length) == (32, 16)
    assert emb.shape == (3, 16, 32) and emb.dtype == torch.float32
    assert mask.shape == (3, 16) and mask.dtype == torch.bool
    lengths = mask.sum(1).tolist()
    ids = t5.tokenizer("a red square moves left").input_ids
    assert lengths[0] == len(ids) and ids[-1] == t5.tokenizer.eos_token_id
    assert lengths[1] == 1  # the null caption keeps its end-of-text token
    assert lengths[2] == 16  # truncated to max_length
    assert torch.all(emb[~mask] == 0) and torch.all(emb[mask].abs().sum(-1) > 0)
    # token_counts sees the length before the cut: what precompute counts as a long caption
    assert t5.token_counts(["a red square moves left", "", "a " * 40]) == [lengths[0], 1, 41]
    assert t5.token_counts([]) == []  # a unit whose videos all failed has no caption


def test_t5_is_deterministic_and_per_caption(t5):
    emb, mask = t5.encode(["a blue circle moves right", "an orange ball bounces"])
    again, _ = t5.encode(["a blue circle moves right", "an orange ball bounces"])
    assert torch.equal(emb, again)
    alone, _ = t5.encode(["an orange ball bounces"])  # batching and padding do not leak across samples
    torch.testing.assert_close(alone[0], emb[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(emb[0], emb[1])


def test_tiny_t5_tokenizer_is_trained_on_the_captions(t5_folder, t5):
    assert {"spiece.model", "tokenizer.json", "config.json", "model.safetensors"} <= set(os.listdir(t5_folder))
    pieces = t5.tokenizer.convert_ids_to_tokens(t5.tokenizer("a red square").input_ids)
    assert pieces[-1] == "</s>" and "<unk>" not in pieces
    assert t5.model.config.vocab_size == len(t5.tokenizer)


def test_t5_reload_and_fingerprints(t5, t5_folder, tmp_path):
    fp = t5.fingerprint()
    assert fp["kind"] == "t5" and fp["source"] == str(t5_folder)
    rebuilt = text_encoder_from_fingerprint(fp)
    assert fingerprint_diff(fp, rebuilt.fingerprint()) == []
    assert torch.equal(rebuilt.encode(CAPTIONS[:2])[0], t5.encode(CAPTIONS[:2])[0])

    same = make_tiny_t5(tmp_path / "same", CAPTIONS, dim=32, seed=0)
    assert fingerprint_diff(fp, build_text_encoder("t5", path=same, max_length=16).fingerprint()) == []
    other = make_tiny_t5(tmp_path / "other", CAPTIONS, dim=32, seed=1)
    diff = fingerprint_diff(fp, build_text_encoder("t5", path=other, max_length=16).fingerprint())
    assert [d.split(":")[0] for d in diff] == ["weights_hash"]
    longer = build_text_encoder("t5", path=t5_folder, max_length=20).fingerprint()
    assert [d.split(":")[0] for d in fingerprint_diff(fp, longer)] == ["max_length"]


def test_t5_pipeline_folder_layout(t5_folder, tmp_path):
    # diffusers pipelines (CogVideoX) keep text_encoder/ and tokenizer/ side by side
    for sub in ("text_encoder", "tokenizer"):
        (tmp_path / sub).mkdir()
        for name in os.listdir(t5_folder):
            (tmp_path / sub / name).write_bytes((t5_folder / name).read_bytes())
    encoder = build_text_encoder("t5", path=tmp_path, max_length=8)
    assert (encoder.subfolder, encoder.tokenizer_subfolder) == ("text_encoder", "tokenizer")
    assert encoder.encode([""])[0].shape == (1, 8, 32)


# ---- CLIP ------------------------------------------------------------------------------------


def test_clip_shapes_and_masks(clip):
    assert (clip.dim, clip.max_length) == (32, 24)
    emb, mask = clip.encode(["a red square!", "", "word " * 50])
    assert emb.shape == (3, 24, 32) and mask.shape == (3, 24) and emb.dtype == torch.float32
    # start + 4 tokens ("!" is a token whose id is 0, the same as padding) + end; "" is start + end
    assert mask.sum(1).tolist() == [6, 2, 24]
    assert torch.all(emb[~mask] == 0) and torch.all(emb[mask].abs().sum(-1) > 0)


def test_clip_is_causal_and_deterministic(clip):
    emb, _ = clip.encode(["a red square", "a red circle"])
    assert torch.equal(emb, clip.encode(["a red square", "a red circle"])[0])
    # causal attention: the shared prefix "<start> a red" has identical hidden states
    torch.testing.assert_close(emb[0, :3], emb[1, :3])
    assert not torch.allclose(emb[0, 3], emb[1, 3])


def test_clip_shorter_max_length_truncates(clip_folder, clip):
    short = build_text_encoder("clip", path=clip_folder, max_length=8)
    emb, mask = short.encode(["a red square", "word " * 50])
    assert emb.shape == (2, 8, 32) and mask[1].all()
    assert short.token_counts(["a red square", "word " * 50]) == [int(clip.encode(["a red square"])[1].sum()), 52]
    torch.testing.assert_close(emb[0, :5], clip.encode(["a red square"])[0][0, :5])


def test_clip_reload_and_fingerprints(clip, clip_folder):
    config = tiny_clip_config(width=32, context_length=24)
    in_memory = build_text_encoder("clip", config=config, seed=0)
    fp = clip.fingerprint()
    assert fingerprint_diff(fp, in_memory.fingerprint()) == []
    assert torch.equal(in_memory.encode(CAPTIONS)[0], clip.encode(CAPTIONS)[0])
    other = build_text_encoder("clip", config=config, seed=1)
    assert [d.split(":")[0] for d in fingerprint_diff(fp, other.fingerprint())] == ["weights_hash"]
    rebuilt = text_encoder_from_fingerprint(other.fingerprint())  # from config + seed
    assert torch.equal(rebuilt.encode(CAPTIONS)[0], other.encode(CAPTIONS)[0])
    assert text_encoder_from_fingerprint(fp).fingerprint()["source"] == str(clip_folder.resolve())


def test_clip_checkpoint_file_with_model_name(clip_folder, monkeypatch):
    # open_clip's built-in names (ViT-L-14, ...) resolve configs from its registry: register the tiny one
    from open_clip import factory

    name = "pomvid-tiny-test"
    monkeypatch.setitem(factory._MODEL_CONFIGS, name, tiny_clip_config(width=32, context_length=24))
    checkpoint = clip_folder / "open_clip_model.safetensors"
    encoder = build_text_encoder("clip", path=checkpoint, model_name=name)
    assert torch.equal(encoder.encode(["a cat"])[0], build_text_encoder("clip", path=clip_folder).encode(["a cat"])[0])
    with pytest.raises(ValueError, match="also give model_name="):
        build_text_encoder("clip", path=checkpoint)


# ---- errors ----------------------------------------------------------------------------------


def test_text_encoder_errors(tmp_path, t5, monkeypatch):
    import huggingface_hub

    # offline even if another module imported huggingface_hub before HF_HUB_OFFLINE was set
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="unknown text encoder kind 'bert'"):
        build_text_encoder("bert", path=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_text_encoder("t5", path=tmp_path / "missing")
    with pytest.raises(OSError, match="could not load from"):
        build_text_encoder("t5", path=tmp_path)  # an empty folder
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        build_text_encoder("t5", path="pomvid-no-such-org/no-such-t5")
    with pytest.raises(ValueError, match="make_tiny_t5"):
        build_text_encoder("t5", config={"d_model": 8})
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        build_text_encoder("clip", path=tmp_path)
    with pytest.raises(ValueError, match=r"max_length=99 must be in \[2, 24\]"):
        ClipTextEncoder(config=tiny_clip_config(context_length=24), max_length=99)
    with pytest.raises(TypeError, match="list of str"):
        t5.encode("a single caption")
    with pytest.raises(ValueError, match="captions is empty"):
        t5.encode([])
