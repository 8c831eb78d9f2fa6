"""Tests of minialign/stages/evaluate.py, the measurements the stages take beside training: here the
KL to the reference, estimated on the policy's own samples."""

import torch

from minialign.stages.evaluate import sampled_kl


def test_sampled_kl_is_zero_against_itself_and_positive_against_another_model(world, tiny_model):
    tok = world.tokenizer
    prompts = world.review_prompts()[:2]
    assert sampled_kl(tiny_model, tiny_model, tok, prompts, 4, max_new_tokens=6) == 0.0
    other = type(tiny_model)(tiny_model.config)
    other.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn_like(p))
    assert sampled_kl(tiny_model, other, tok, prompts, 16, max_new_tokens=6) > 0
