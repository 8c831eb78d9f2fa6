"""Each member of the preference family (``minialign/preference.py``) inside ``dpo.dpo_step``. The
members' own equations are checked by hand in ``tests/equations/test_preference.py``; here, that the
step hands them the right log-probs. (The flags of ``minialign dpo --loss NAME`` and each member end
to end: tests/runtime/test_dpo_family_stage.py.)"""

import functools

import pytest
import torch

from minialign import dpo, preference
from minialign.model import GPT, GPTConfig
from minialign.preference import PreferenceHyperparams, kto_mismatched_index, preference_loss

# (--loss, its settings) for every member; cDPO is "sigmoid" with label smoothing
MEMBERS = [("sigmoid", dict(label_smoothing=0.1)), ("robust", dict(label_smoothing=0.2)), ("ipo", {}),
           ("ipo", dict(ipo_normalise="mean")), ("simpo", dict(simpo_gamma=0.3)),
           ("kto", dict(desirable_weight=1.0, undesirable_weight=1.3)), ("orpo", dict(orpo_lambda=0.5))]


def gpt64(world, seed, scale=1.0):
    """A random float64 GPT; ``scale`` > 1 sharpens its next-token distributions (larger logits)."""
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=world.tokenizer.vocab_size, block_size=48, n_layer=1, n_head=2, n_embd=16)
    model = GPT(config).double()
    with torch.no_grad():
        model.wte.weight.mul_(scale)
    return model


class OneCallUpdate:
    """The ``update`` hook without an optimizer: ``loss_of`` on all rows at once, its loss kept."""

    def __call__(self, rows, loss_of):
        from minialign.runtime.optim import Update
        loss, units, total, stats = loss_of(rows)
        self.loss, self.units, self.total = loss, units, total
        return Update(grad_norm=0.0, extras=[stats])


@pytest.mark.parametrize("loss,settings", MEMBERS, ids=[f"{m}-{'-'.join(map(str, s.values()))}" for m, s in MEMBERS])
def test_the_member_in_the_step_is_preference_loss_of_the_same_logps(world, loss, settings):
    tok = world.tokenizer
    pairs = dpo.tokenize_pairs(tok, world.preference_dataset(6, seed=0))
    if loss == "kto":  # each prompt also with the responses of pair i - 1, for z_0
        index = kto_mismatched_index(6).tolist()
        pairs.update({"kl_" + k: [pairs[k][j] for j in index] for k in ("chosen", "rejected")})
    # a sharp reference gives the toy responses less probability than the policy, so that KTO's z_0 > 0
    policy, reference = gpt64(world, 0), gpt64(world, 1, scale=30.0)
    hp = PreferenceHyperparams(loss=loss, beta=0.3, **settings)
    uses_reference = preference.needs_reference(loss)
    update = OneCallUpdate()
    rows = [4, 0, 2, 5]
    result = dpo.dpo_step(policy, reference if uses_reference else None, tok, pairs, rows,
                          dpo.DPOHyperparams(beta=0.3), update, loss_fn=functools.partial(preference_loss, hp))

    # the same log-probs computed apart from the step (no gradient), and the member on them
    def logps(model, chosen="chosen", rejected="rejected"):
        sub = {"prompt": [pairs["prompt"][i] for i in rows], "chosen": [pairs[chosen][i] for i in rows],
               "rejected": [pairs[rejected][i] for i in rows]}
        return dpo.pair_logps(model, sub, tok.pad_id, "cpu")
    pi_w, pi_l = logps(policy)
    ref_w, ref_l = logps(reference) if uses_reference else (None, None)
    n_w, n_l = (torch.tensor([len(pairs[k][i]) for i in rows]) for k in ("chosen", "rejected"))  # |y|, EOS included
    kl = {}
    if loss == "kto":
        kl = {"kl_policy_logps": torch.cat(logps(policy, "kl_chosen", "kl_rejected")),
              "kl_ref_logps": torch.cat(logps(reference, "kl_chosen", "kl_rejected"))}
    want = preference_loss(hp, pi_w, pi_l, ref_w, ref_l, n_w, n_l, **kl)
    if loss == "kto":
        assert want.reference_point > 0.1  # not clamped to 0: the mismatched log-probs count
    assert update.units == 4 and update.total == 4
    assert update.loss.item() == pytest.approx(want.loss.item(), abs=1e-10)
    assert result.loss == pytest.approx(want.loss.item(), abs=1e-10)
    torch.testing.assert_close(result.chosen_rewards, want.chosen_rewards, rtol=0, atol=1e-10)
    torch.testing.assert_close(result.rejected_rewards, want.rejected_rewards, rtol=0, atol=1e-10)
    torch.testing.assert_close(result.chosen_logps, pi_w, rtol=0, atol=1e-10)
    update.loss.backward()  # a gradient reaches the policy, none the reference
    assert all(p.grad is None for p in reference.parameters())
    assert sum(p.grad.abs().sum() for p in policy.parameters() if p.grad is not None) > 0


def test_kto_without_its_mismatched_responses_is_refused(world):
    tok = world.tokenizer
    pairs = dpo.tokenize_pairs(tok, world.preference_dataset(4, seed=0))
    policy = gpt64(world, 0)
    with pytest.raises(ValueError, match="kl_policy_logps and kl_ref_logps"):
        dpo.dpo_step(policy, gpt64(world, 1), tok, pairs, [0, 1], dpo.DPOHyperparams(), OneCallUpdate(),
                     loss_fn=functools.partial(preference_loss, PreferenceHyperparams(loss="kto")))
