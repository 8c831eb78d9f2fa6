"""Checks that the training loops' no-gradient passes (DPO's reference, KTO's reference and
mismatched completions, GRPO's old and reference log-probs, PPO's rollout scoring) run under ``torch.inference_mode`` (``ops.inference``), and the
passes that train do not."""

import math

import torch
from conftest import RecordingUpdate, eos_policy

from minialign import dpo, grpo, kto
from minialign.preference import PreferenceHyperparams
from minialign.ppo import PPOHyperparams, PolicyWithValueHead, ppo_iteration
from minialign.runtime.optim import Update


def record_modes(model) -> list[bool]:
    """``torch.is_inference_mode_enabled()`` at every forward of ``model``'s first block."""
    modes = []
    model.blocks[0].register_forward_pre_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    return modes


class OneCall:
    """The ``update`` hook: ``loss_of`` on every row at once, a backward, no optimizer."""

    def __call__(self, rows, loss_of):
        loss, _, _, stats = loss_of(rows)
        loss.backward()
        return Update(grad_norm=0.0, extras=[stats])


def test_dpo_reference_pass_runs_in_inference_mode(world):
    tok = world.tokenizer
    policy, reference = eos_policy(world, math.log(tok.vocab_size - 1)), eos_policy(world, 0.0)
    policy_modes, reference_modes = record_modes(policy), record_modes(reference)
    eos, good = [tok.eos_id], tok.response("good")
    pairs = {"prompt": [tok.prompt(p) for p in world.review_prompts()[:2]], "chosen": [eos, good],
             "rejected": [good, eos]}
    dpo.dpo_step(policy, reference, tok, pairs, [0, 1], dpo.DPOHyperparams(), OneCall())
    assert reference_modes and all(reference_modes)
    assert policy_modes and not any(policy_modes)  # the policy's forward is trained through


def test_kto_reference_and_mismatched_passes_run_in_inference_mode(world):
    tok = world.tokenizer
    policy, reference = eos_policy(world, math.log(tok.vocab_size - 1)), eos_policy(world, 0.0)
    policy_modes, reference_modes = record_modes(policy), record_modes(reference)
    rows = kto.unpair_preference_rows(world.preference_dataset(2, seed=0))
    examples = kto.tokenize_unpaired(tok, rows)
    examples["kl_completion"] = examples["completion"][1:] + examples["completion"][:1]
    kto.kto_step(policy, reference, tok, examples, [0, 1, 2, 3], PreferenceHyperparams(loss="kto"), OneCall())
    assert reference_modes and all(reference_modes)
    # the policy: the examples' forward is trained through, the mismatched completions' is not (each
    # pass runs the blocks twice: the shared prompt, then the completions)
    assert policy_modes == [False, False, True, True]


def test_grpo_old_and_reference_passes_run_in_inference_mode(world):
    tok = world.tokenizer
    policy, reference = eos_policy(world, 1.0), eos_policy(world, 0.0)
    policy_modes, reference_modes = record_modes(policy), record_modes(reference)
    hp = grpo.GRPOHyperparams(group_size=2, batch_size=4, inner_updates=1, max_new_tokens=2, recompute_old_logps=True)
    grpo.grpo_iteration(policy, reference, tok, lambda *a, **k: [1, 0, 0, 1], world.arithmetic_questions("train")[:2],
                        hp, torch.Generator().manual_seed(0), RecordingUpdate())
    assert reference_modes and all(reference_modes)
    # each pass runs the blocks twice (the shared prompt, then the rest): sampling (the prompt, one
    # decode step) and pi_old's recomputed log-probs in inference mode, then the training forward
    assert policy_modes == [True, True, True, True, False, False]


def test_ppo_rollout_scoring_runs_in_inference_mode(world):
    tok = world.tokenizer
    actor_critic = PolicyWithValueHead(eos_policy(world, 1.0)).double()
    reference = eos_policy(world, 0.0)
    reference_modes, reward_modes = record_modes(reference), []

    def reward_model(sequences, attention_mask, response_mask):
        reward_modes.append(torch.is_inference_mode_enabled())
        return torch.ones(sequences.shape[0], dtype=torch.float64)

    hp = PPOHyperparams(minibatch_size=4, ppo_epochs=1, max_new_tokens=2)
    ppo_iteration(actor_critic, reference, reward_model, tok, [tok.prompt(p) for p in world.review_prompts()[:4]],
                  hp, 0.1, torch.Generator().manual_seed(0), torch.Generator().manual_seed(0), RecordingUpdate())
    assert reference_modes and all(reference_modes)
    assert reward_modes == [True]
