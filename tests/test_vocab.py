"""Vocabulary alignment by token string, independent of token ids."""

from __future__ import annotations

import pytest
import torch

from vlm_merge.architecture import vocab
from vlm_merge.errors import VlmMergeError
from vlm_merge.architecture.vocab import VocabSide, fill_vocab_rows, pad_multiple, plan_vocab, target_mean


def test_rows_matched_by_string_not_position():
    en = {"<s>": 0, "a": 1, "b": 2, "c": 3}
    vlm = {"<s>": 0, "a": 1, "b": 2, "c": 3, "<image>": 4, "<pad>": 5}
    ja = {"<s>": 0, "c": 1, "あ": 2, "a": 3, "b": 4}  # shared tokens at other ids, one new token
    plan = plan_vocab(
        target=VocabSide(5, ja, 5, None),
        vlm=VocabSide(8, vlm, 6, "<pad>"),
        image_token_id=4,
        delta_roles={"vlm": VocabSide(8, vlm, 6, "<pad>"), "en": VocabSide(4, en, 4, None)},
        multiple=pad_multiple(8, 6),
    )
    assert plan.pairs["vlm"].out.tolist() == [0, 1, 3, 4]  # "あ" (row 2) has no counterpart
    assert plan.pairs["vlm"].src.tolist() == [0, 3, 1, 2]
    assert plan.pairs["en"].src.tolist() == [0, 3, 1, 2]
    assert [(a.token, a.out_row, a.row, a.role) for a in plan.added] == [("<image>", 5, 4, "vlm"), ("<pad>", 6, 5, "vlm")]
    assert plan.out_rows == 8 and plan.image_token_id == 5 and plan.pad_token_id == 6
    target = torch.arange(10.0).reshape(5, 2)
    vlm_rows = torch.full((8, 2), -1.0)
    vlm_rows[4] = torch.tensor([40.0, 41.0])
    filled = fill_vocab_rows(target, plan, {"vlm": vlm_rows})
    assert torch.equal(filled[:5], target)
    assert torch.equal(filled[5], torch.tensor([40.0, 41.0]))  # the VLM's image-token row
    assert torch.equal(filled[6], vlm_rows[5])  # the VLM's pad row
    assert torch.equal(filled[7], target.mean(0))  # padding to the VLM's row multiple


def test_no_tokenizer_needs_equal_rows():
    ident = plan_vocab(target=VocabSide(4, None), vlm=VocabSide(4, None), image_token_id=None,
                       delta_roles={"vlm": VocabSide(4, None)})
    assert ident.is_identity and ident.out_rows == 4
    with pytest.raises(VlmMergeError, match="no tokenizer files"):
        plan_vocab(target=VocabSide(5, None), vlm=VocabSide(4, None), image_token_id=None,
                   delta_roles={"vlm": VocabSide(4, None)})


def test_pad_multiple_follows_llava_hf():
    assert pad_multiple(32064, 32002) == 64
    assert pad_multiple(32000, 32000) == 1
    assert pad_multiple(336, 334) == 16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(5, 2), (1000, 7), (3001, 200), (2048, 4096)])
@pytest.mark.parametrize("block_bytes", [1, 16 << 20])  # 64-column blocks (and a partial last one), or the default
def test_target_mean_is_the_float32_mean_bit_for_bit(dtype, shape, block_bytes, monkeypatch):
    """Padding rows take the target's mean: computed in column blocks, it must equal the whole float32 mean."""
    monkeypatch.setattr(vocab, "MEAN_BLOCK_BYTES", block_bytes)
    target = torch.empty(shape, dtype=dtype).normal_(0, 0.02, generator=torch.Generator().manual_seed(shape[0]))
    assert torch.equal(target_mean(target), target.float().mean(dim=0))
