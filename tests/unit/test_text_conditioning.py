"""The text conditioning file stored next to the latents (pipeline/data/text_conditioning.py)."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.store.text_conditioning import (
    FILE_NAME,
    TextConditioning,
    TextConditioningError,
    pad_embeddings,
    read_text_conditioning,
    write_text_conditioning,
)


def test_round_trip_keeps_tensors_prompts_and_fingerprint(tmp_path):
    prompt_text, prompt_mask = pad_embeddings([torch.randn(3, 8), torch.randn(5, 8)], 8)
    stored = TextConditioning(
        null_text=torch.randn(2, 8), null_mask=torch.ones(2, dtype=torch.bool), prompts=["a cat", "a dog running"],
        prompt_text=prompt_text, prompt_mask=prompt_mask, text_encoder={"kind": "t5", "max_length": 32},
    )
    write_text_conditioning(tmp_path, stored)
    got = read_text_conditioning(tmp_path)
    assert got.prompts == ["a cat", "a dog running"] and got.text_encoder == {"kind": "t5", "max_length": 32}
    torch.testing.assert_close(got.null_text, stored.null_text)
    torch.testing.assert_close(got.prompt_text, prompt_text)
    assert got.prompt_mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert got.null_mask.dtype == torch.bool and got.text_dim == 8


def test_without_prompts_and_absent_file(tmp_path):
    assert read_text_conditioning(tmp_path) is None
    write_text_conditioning(tmp_path, TextConditioning(null_text=torch.zeros(1, 4), null_mask=torch.zeros(1).bool()))
    got = read_text_conditioning(tmp_path)
    assert got.prompts == [] and got.prompt_text is None and got.text_encoder is None
    assert [p.name for p in tmp_path.iterdir()] == [FILE_NAME]  # no temporary file left behind


def test_damaged_file_names_itself(tmp_path):
    (tmp_path / FILE_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(TextConditioningError, match=FILE_NAME):
        read_text_conditioning(tmp_path)


def test_inconsistent_shapes_are_refused():
    with pytest.raises(TextConditioningError, match="2 prompts"):
        TextConditioning(null_text=torch.zeros(1, 4), null_mask=torch.ones(1).bool(), prompts=["a", "b"],
                         prompt_text=torch.zeros(3, 2, 4), prompt_mask=torch.ones(3, 2).bool())
