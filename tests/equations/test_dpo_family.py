"""``minialign dpo --loss NAME``: each member of the preference family (``minialign/preference.py``)
inside ``dpo.dpo_step`` and the stage (``minialign/stages/dpo.py``). The members' own equations
are checked by hand in ``tests/equations/test_preference.py``; here, that the step hands them the right
log-probs, that the reference-free members hold no reference model, and that each trains end to end."""

import functools
import json
import math

import pytest
import torch

from minialign import dpo, preference
from minialign.model import GPT, GPTConfig
from minialign.preference import PreferenceHyperparams, kto_mismatched_index, preference_loss
from minialign.runtime.cli import main as cli
from minialign.stages import dpo as dpo_stage
from minialign.stages.dpo import DPOConfig

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


def test_family_flags_are_checked_when_the_config_is_made():
    with pytest.raises(ValueError, match="--loss must be one of sigmoid, robust, ipo, simpo, kto, orpo"):
        DPOConfig(loss="dpo")
    with pytest.raises(ValueError, match=r"--label-smoothing must be in \[0, 0.5\)"):
        DPOConfig(loss="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="--label-smoothing must be 0 with --loss ipo"):
        DPOConfig(loss="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="--simpo-gamma must be >= 0"):
        DPOConfig(simpo_gamma=-1.0)
    with pytest.raises(ValueError, match="--undesirable-weight must be > 0"):
        DPOConfig(undesirable_weight=0.0)
    with pytest.raises(ValueError, match="--ipo-normalise must be one of sum, mean"):
        DPOConfig(ipo_normalise="max")


def test_help_lists_every_member_with_one_line(capsys):
    with pytest.raises(SystemExit):
        cli(["dpo", "--help"])
    text = capsys.readouterr().out
    for name in preference.LOSSES:
        assert any(line.strip().startswith(name + " ") for line in text.splitlines()), name
    for flag in ("--loss {sigmoid,robust,ipo,simpo,kto,orpo}", "--label-smoothing", "--ipo-normalise",
                 "--simpo-gamma", "--desirable-weight", "--undesirable-weight", "--orpo-lambda"):
        assert flag in text


# ----------------------------------------------------------------------------------------------
# end to end on the tiny fixtures: a few steps of each member
# ----------------------------------------------------------------------------------------------

# the loss at step 0, where the policy is its reference (h = 0, every log-ratio 0):
# DPO and cDPO ln 2 (eps log 2 + (1 - eps) log 2); rDPO ((1 - eps) - eps) ln 2 / (1 - 2 eps) = ln 2;
# IPO (0 - 1 / (2 x 0.1))^2 = 25; KTO z_0 = 0, lambda_y (1 - sigma(0)) = lambda_y / 2 for each response,
# half of them desirable (lambda_D = 1) and half not (lambda_U = 1.3): (1 + 1.3) / 4 = 0.575
AT_START = {"sigmoid": math.log(2), "robust": math.log(2), "ipo": 25.0, "kto": 0.575}


@pytest.mark.slow
@pytest.mark.parametrize("loss,settings", MEMBERS[:2] + MEMBERS[2:3] + MEMBERS[4:],
                         ids=["cdpo", "robust", "ipo", "simpo", "kto", "orpo"])
def test_each_member_trains_end_to_end(tiny_run, tmp_path, monkeypatch, loss, settings):
    references, loads = [], []
    step, load = dpo_stage.dpo_step, dpo_stage.load_model
    monkeypatch.setattr(dpo_stage, "dpo_step", lambda policy, reference, *a, **k: (
        references.append(reference), step(policy, reference, *a, **k))[1])
    monkeypatch.setattr(dpo_stage, "load_model", lambda *a, **k: (loads.append(a[0]), load(*a, **k))[1])
    # ORPO is trained from the base model in one stage; the others from the SFT model
    init = tiny_run / ("pretrain" if loss == "orpo" else "sft") / "model.pt"
    summary = dpo_stage.main(DPOConfig(out=str(tmp_path), init=str(init), steps=3, batch_size=8, lr=1e-3,
                                       warmup_steps=1, num_pairs=32, eval_pairs=16, eval_every=100, log_every=1,
                                       eval_samples_per_prompt=1, max_new_tokens=6, progress=False,
                                       device="cpu", loss=loss, **settings))
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    if loss in AT_START:
        assert rows[0]["loss"] == pytest.approx(AT_START[loss], abs=1e-5)
    assert 0 <= summary["heldout_accuracy"] <= 1 and math.isfinite(summary["kl"]) and "true_reward" in summary
    trained, _ = load(tmp_path / "dpo" / "model.pt")
    start, _ = load(init)
    assert max((p - q).abs().max() for p, q in zip(trained.parameters(), start.parameters())) > 1e-4  # it moved
    if loss in preference.REFERENCE_FREE:  # no reference in memory while training: the init model is
        assert references == [None] * 3    # loaded only to measure the KL, before and after
        assert len(loads) == 1 + 2
    else:  # the reference's log-probs were precomputed (and KTO's mismatched ones with them)
        assert all(set(r) == ({"chosen", "rejected", "kl_chosen", "kl_rejected"} if loss == "kto" else
                              {"chosen", "rejected"}) for r in references)
