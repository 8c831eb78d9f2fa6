"""``minialign dpo --loss NAME``: the preference family's flags are checked and listed, and each member
trains end to end in the DPO stage (``minialign/stages/dpo.py``), the reference-free ones holding no
reference model. (Each member in ``dpo.dpo_step``: tests/equations/test_dpo_family.py.)"""

import json
import math

import pytest
from test_dpo_family import MEMBERS  # every member and its settings, tests/equations/test_dpo_family.py

from minialign import preference
from minialign.runtime.cli import main as cli
from minialign.stages import dpo as dpo_stage
from minialign.stages.dpo import DPOConfig


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
    step, load, load_reference = dpo_stage.dpo_step, dpo_stage.load_model, dpo_stage.load_reference
    monkeypatch.setattr(dpo_stage, "dpo_step", lambda policy, reference, *a, **k: (
        references.append(reference), step(policy, reference, *a, **k))[1])
    monkeypatch.setattr(dpo_stage, "load_model", lambda *a, **k: (loads.append(a[0]), load(*a, **k))[1])
    monkeypatch.setattr(dpo_stage, "load_reference", lambda *a, **k: (loads.append(a[0]), load_reference(*a, **k))[1])
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
