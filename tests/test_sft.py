"""Checks minialign/sft.py: E0b counts response tokens only; a tiny run writes what it promises."""

import json

import pytest
import torch

from minialign.data import collate
from minialign.pretrain import lm_loss


def test_sft_loss_ignores_prompt_tokens(world, tiny_model):
    """E0b: changing the logits at prompt positions leaves the loss unchanged."""
    tok = world.tokenizer
    b = collate([tok.prompt("review the movie")], [tok.response("the movie was good .")], tok.pad_id)
    logits = tiny_model(b["input_ids"]).detach()
    P = len(tok.prompt("review the movie"))
    moved = logits.clone()
    moved[:, :P - 1] += torch.randn_like(moved[:, :P - 1]) * 5  # positions that predict prompt tokens
    assert lm_loss(moved, b["input_ids"], b["response_mask"]) == lm_loss(logits, b["input_ids"], b["response_mask"])
    moved[:, P - 1] += 5 * torch.randn_like(moved[:, P - 1])  # this one predicts the first response token
    assert lm_loss(moved, b["input_ids"], b["response_mask"]) != lm_loss(logits, b["input_ids"], b["response_mask"])
    # the EOS is a target: the response mask covers it
    assert b["response_mask"][0, -1] == 1 and b["input_ids"][0, -1] == tok.eos_id


@pytest.mark.slow
def test_tiny_sft_run_writes_checkpoint_metrics_and_truth(tiny_run):
    sft = tiny_run / "sft"
    assert (sft / "model.pt").is_file() and (sft / "loss.png").is_file() and (sft / "truth.png").is_file()
    summary = json.loads((sft / "summary.json").read_text())
    assert 0 <= summary["heldout_accuracy"] <= 1 and -7 <= summary["true_reward"] <= 6
    rows = [json.loads(line) for line in (sft / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["heldout_loss"] < rows[0]["heldout_loss"]
