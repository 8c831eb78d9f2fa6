"""KTO's step on unpaired examples (``kto.kto_step``) by hand, and the toy world's pairs split
into unpaired examples in TRL's layout (``kto.unpair_preference_rows``). The data files and
the stage's runs: ``tests/runtime/test_kto_unpaired_stage.py``."""

import math

import pytest
import torch

from minialign import kto as K
from minialign import preference as P
from minialign.model import GPT, GPTConfig
from minialign.runtime.optim import Update


class OneCallUpdate:
    """The ``update`` hook without an optimizer: ``loss_of`` on all rows at once, its loss kept."""

    def __call__(self, rows, loss_of):
        self.loss, self.units, self.total, stats = loss_of(rows)
        return Update(grad_norm=0.0, extras=[stats])


# ----------------------------------------------------------------------------------------------
# the step, by hand
# ----------------------------------------------------------------------------------------------


def uniform_gpt(vocab_size: int) -> GPT:
    """A float64 GPT whose every weight is 0: its logits are all 0, so every token has probability
    1/V and log pi(y | x) = -|y| ln V exactly, whatever the prompt."""
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=8)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def test_kto_step_by_hand(world):
    tok = world.tokenizer
    V = tok.vocab_size
    a, b, c = tok.encode("good")[0], tok.encode("bad")[0], tok.encode("movie")[0]
    # four examples: completions of 2 and 3 tokens (EOS included); each kl_completion is the completion
    # of the example before it (kto_mismatched_index), so its length differs from the example's own
    prompts = [tok.prompt("review the movie"), tok.prompt("review the book"), tok.prompt("review the movie"),
               tok.prompt("review the song")]
    completions = [[a, tok.eos_id], [a, b, tok.eos_id], [c, tok.eos_id], [b, c, tok.eos_id]]
    examples = {"prompt": prompts, "completion": completions, "desirable": [True, False, False, True],
                "kl_completion": [completions[j] for j in P.kto_mismatched_index(4).tolist()]}
    n = [2, 3, 2, 3]      # |y_i|
    m = [3, 2, 3, 2]      # |y'_i|, the mismatched completions
    L = math.log(V)       # log pi_theta(y | x) = -|y| L under the uniform policy
    d = [0.5, -0.2, 0.3, 1.0]   # the log-ratios log pi_theta / pi_ref we give each example
    e = [0.2, 0.4, -0.1, 0.3]   # and each mismatched one
    reference = {"completion": torch.tensor([-n[i] * L - d[i] for i in range(4)], dtype=torch.float64),
                 "kl_completion": torch.tensor([-m[i] * L - e[i] for i in range(4)], dtype=torch.float64)}
    hp = P.PreferenceHyperparams(loss="kto", beta=2.0, desirable_weight=1.0, undesirable_weight=1.5)
    rows = [3, 1, 2]  # example 0 is not drawn
    update = OneCallUpdate()
    result = K.kto_step(uniform_gpt(V), reference, tok, examples, rows, hp, update)

    # z_0 = max(0, mean of the drawn rows' mismatched log-ratios) = (0.3 + 0.4 - 0.1) / 3 = 0.2
    z0 = 0.2
    sig = lambda x: 1 / (1 + math.exp(-x))
    # row 3 desirable:   lambda_D (1 - sigma(beta (1.0 - z0)))   = 1 - sigma(1.6)
    # row 1 undesirable: lambda_U (1 - sigma(beta (z0 - -0.2)))  = 1.5 (1 - sigma(0.8))
    # row 2 undesirable: lambda_U (1 - sigma(beta (z0 - 0.3)))   = 1.5 (1 - sigma(-0.2))
    want = ((1 - sig(1.6)) + 1.5 * (1 - sig(0.8)) + 1.5 * (1 - sig(-0.2))) / 3
    assert result.loss == pytest.approx(want, abs=1e-12)
    assert update.loss.item() == pytest.approx(want, abs=1e-12) and (update.units, update.total) == (3, 3)
    assert result.reference_point == pytest.approx(z0, abs=1e-12)
    torch.testing.assert_close(result.chosen_rewards, torch.tensor([2.0 * 1.0], dtype=torch.float64))
    torch.testing.assert_close(result.rejected_rewards, torch.tensor([2.0 * -0.2, 2.0 * 0.3], dtype=torch.float64))
    torch.testing.assert_close(result.chosen_logps, torch.tensor([-3 * L], dtype=torch.float64))
    assert result.metrics["rewards/chosen"] == pytest.approx(2.0)
    assert result.metrics["rewards/rejected"] == pytest.approx((-0.4 + 0.6) / 2)
    assert result.metrics["rewards/margins"] == pytest.approx(2.0 - 0.1)
    assert result.metrics["logps/rejected"] == pytest.approx(-(3 + 2) * L / 2)

    # a batch of one class: the other class's means are left out, not logged as NaN
    result = K.kto_step(uniform_gpt(V), reference, tok, examples, [1, 2], hp, OneCallUpdate())
    assert "rewards/chosen" not in result.metrics and "rewards/margins" not in result.metrics
    assert result.metrics["rewards/rejected"] == pytest.approx((-0.4 + 0.6) / 2)
    # mismatched log-ratios whose mean is negative: z_0 is clamped to 0 (0.4 - 0.1 - 0.5 < 0)
    reference["kl_completion"][0] = -m[0] * L + 0.5
    result = K.kto_step(uniform_gpt(V), reference, tok, examples, [0, 1, 2], hp, OneCallUpdate())
    assert result.reference_point == 0.0
    want = ((1 - sig(2 * 0.5)) + 1.5 * (1 - sig(2 * 0.2)) + 1.5 * (1 - sig(2 * -0.3))) / 3
    assert result.loss == pytest.approx(want, abs=1e-12)


def test_kto_step_with_a_reference_model_equals_kto_loss_and_trains_the_policy(world):
    """The reference as a model (``--precompute-ref-logps false``): its log-probs are computed in the
    step, under no gradient; a gradient reaches the policy only."""
    tok = world.tokenizer
    rows = K.unpair_preference_rows(world.preference_dataset(3, seed=0))
    examples = K.tokenize_unpaired(tok, rows)
    examples["kl_completion"] = [examples["completion"][j] for j in P.kto_mismatched_index(6).tolist()]
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=1, n_head=2, n_embd=16)
    policy, reference = GPT(config).double(), GPT(config).double()
    hp = P.PreferenceHyperparams(loss="kto", beta=0.5)
    update = OneCallUpdate()
    drawn = [5, 0, 3, 4]
    result = K.kto_step(policy, reference, tok, examples, drawn, hp, update)

    def logps(model, key):
        sub = {"prompt": [examples["prompt"][i] for i in drawn], "chosen": [examples[key][i] for i in drawn],
               "rejected": [examples[key][i] for i in drawn]}
        from minialign.dpo import pair_logps
        return pair_logps(model, sub, tok.pad_id, "cpu")[0]
    desirable = torch.tensor([examples["desirable"][i] for i in drawn])
    z0 = P.kto_reference_point(logps(policy, "kl_completion"), logps(reference, "kl_completion"))
    want = P.kto_loss(logps(policy, "completion"), logps(reference, "completion"), desirable, z0, 0.5)
    assert result.loss == pytest.approx(want.loss.item(), abs=1e-10)
    update.loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    assert sum(p.grad.abs().sum() for p in policy.parameters() if p.grad is not None) > 0


def test_unpair_preference_rows_is_trls_layout(world):
    pairs = world.preference_dataset(3, seed=0)
    rows = K.unpair_preference_rows(pairs)
    # every chosen answer (label true), then every rejected one (false), as TRL's unpair_preference_dataset
    assert rows == ([{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in pairs]
                    + [{"prompt": p["prompt"], "completion": p["rejected"], "label": False} for p in pairs])
    # so the mismatched completion of an example is never the other answer of its own pair
    index = P.kto_mismatched_index(6).tolist()
    assert all(index[i] % 3 != i % 3 for i in range(6))
    with pytest.raises(ValueError, match="lack 'prompt', 'chosen' or 'rejected'"):
        K.unpair_preference_rows([{"prompt": "x", "chosen": "y"}])


# ----------------------------------------------------------------------------------------------
# the data file
# ----------------------------------------------------------------------------------------------
