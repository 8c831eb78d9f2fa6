"""Checks minialign/data.py: collation and masks, left padding, minibatches, bad input."""

import pytest
import torch

from minialign.data import InfiniteMinibatches, collate, left_pad, minibatches


def test_collate_by_hand():
    b = collate([[1, 3], [1]], [[7, 2], [5, 6, 2]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 3, 7, 2], [1, 5, 6, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert b["response_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    b = collate([[1, 3, 4]], [[7, 2]], pad_id=0)
    assert b["response_mask"].tolist() == [[0, 0, 0, 1, 1]]
    b = collate([[1, 3, 4], [1]], [[7, 2], [2]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 3, 4, 7, 2], [1, 2, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert b["response_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 0, 0, 0]]


def test_collate_bad_input():
    with pytest.raises(ValueError, match="empty response"):
        collate([[1]], [[]], 0)
    with pytest.raises(ValueError, match="nothing is truncated"):
        collate([[1, 2, 3]], [[4, 5]], 0, block_size=4)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        collate([[1], [1]], [[2]], 0)


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_minibatches_cover_each_example_once():
    generator = torch.Generator().manual_seed(0)
    seen = torch.cat(list(minibatches(10, 3, generator)))
    assert sorted(seen.tolist()) == list(range(10))
    it = InfiniteMinibatches(10, 4, generator)
    assert all(len(next(it)) == 4 for _ in range(7))
    with pytest.raises(ValueError, match="smaller than batch_size"):
        next(InfiniteMinibatches(3, 4))
