"""Checks minialign/sft.py: E0b counts response tokens only, its step through the update hook under
either aggregation (by hand: tests/equations/test_pretrain.py). (A tiny run writes what it promises:
tests/runtime/test_sft_stage.py.)"""

import pytest
import torch

from minialign.data import collate
from minialign.pretrain import lm_loss
from minialign.runtime.config import TrainConfig
from minialign.runtime.optim import gradient_update, make_optimizer
from minialign.sft import SFTHyperparams, sft_step


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


@pytest.mark.parametrize("aggregation", ["token_mean", "constant"])
def test_sft_step_through_the_update_hook(world, tiny_model, aggregation):
    """Through ``runtime.optim.gradient_update`` in two micro-batches, ``sft_step`` leaves the gradient
    of the whole batch's loss (the mean over its 6 rows' response tokens, or their sum / (6 x 48)),
    and reports that loss."""
    tok = world.tokenizer
    rows = world.sft_dataset(6, seed=0)
    prompts, responses = [tok.prompt(r["prompt"]) for r in rows], [tok.response(r["response"]) for r in rows]
    model = tiny_model.double()
    params = list(model.parameters())
    b = collate(prompts, responses, tok.pad_id, model.config.block_size)
    constant = None if aggregation == "token_mean" else 6 * model.config.block_size
    whole = lm_loss(model(b["input_ids"], b["attention_mask"]), b["input_ids"], b["response_mask"], constant)
    expected = torch.autograd.grad(whole, params)
    config = TrainConfig(grad_accum=2, grad_clip=0.0, warmup_steps=0, steps=1)
    update = gradient_update(model, model, make_optimizer(model, config), config, 0)
    result = sft_step(model, prompts, responses, SFTHyperparams(aggregation), update, tok.pad_id)
    assert result.loss == pytest.approx(whole.item(), abs=1e-12)
    assert all(torch.allclose(p.grad, e, atol=1e-12) for p, e in zip(params, expected))
    assert result.grad_norm == pytest.approx(torch.linalg.vector_norm(torch.stack([e.norm() for e in expected])).item())
