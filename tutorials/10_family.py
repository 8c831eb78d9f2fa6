"""Tutorial 10: the policy-gradient family, REINFORCE to CISPO, from one SFT model on one task.

GRPO (tutorial 06) is one member of a family that differs in two places only: the advantage (which
baseline, which scale) and the loss (which ratio, which clip, which mean over tokens). Every member
here is ``minialign grpo`` with a few options changed (``minialign grpo --help`` lists them;
docs/policy_gradient.md has each member's equation and the paper it comes from):

- **GRPO**: E12's group advantage, E13's clipped loss, the KL in the loss (the default);
- **REINFORCE**: advantage A = r (no baseline), loss -A log pi summed over the answer, KL (k1) in the reward;
- **RLOO**: the mean of the *other* answers of the group as the baseline, REINFORCE's loss;
- **REINFORCE++**: the return-to-go whitened over the batch, PPO's clip, the KL per token in the reward;
- **DAPO**: clip-higher, a token mean, no KL, dynamic sampling (only groups that carry a signal) and
  the soft overlong penalty;
- **GSPO**: one ratio per answer, (pi / pi_old)^(1/|y|), clipped per answer, no KL;
- **CISPO**: REINFORCE weighted by the clipped ratio with its gradient stopped, no KL.

Each trains from the same SFT model (tutorial 02, trained now if missing) with the same seed, the same
questions and the same number of iterations, and is measured on held-out questions it never saw.

It shows:

1. held-out accuracy against KL(pi || pi_ref), one line per member from the SFT model (KL 0) to its end
   (``<out>/family/accuracy_vs_kl.png``): what each member bought with its distance from pi_ref;
2. a table: final held-out accuracy, KL, tokens generated, wall time, the fraction of groups that
   carried no signal (all G answers scored the same), and, for DAPO, the questions it drew.

    python tutorials/10_family.py                           # 7 members x 100 iterations (after tutorial 02)
    python tutorials/10_family.py --members grpo,rloo,dapo --steps 100

A script and a notebook: each ``# %%`` line starts a cell (Jupyter, VS Code, Jupytext).
"""

# %%
from __future__ import annotations

import json
import time
from pathlib import Path

from _common import banner, base_parser, choose_members, ensure_sft, parse_args, summary

from minialign.runtime.plots import plot_panels
from minialign.stages.grpo import GRPOConfig, main as grpo

# member -> the GRPOConfig fields that make it out of GRPO (the CLI's flags, as in minialign grpo --help)
MEMBERS = {
    "grpo": {},
    "reinforce": dict(advantage="none", loss="reinforce", kl_in="reward", kl_estimator="k1",
                      aggregation="sequence_sum"),
    "rloo": dict(advantage="rloo", loss="reinforce", kl_in="reward", kl_estimator="k1", aggregation="sequence_sum"),
    "reinforce_pp": dict(advantage="reinforce_pp", loss="ppo_clip", kl_in="reward"),
    "dapo": dict(loss="dapo", beta=0.0, dynamic_sampling=True, overlong="penalty"),
    "gspo": dict(loss="gspo", beta=0.0),
    "cispo": dict(loss="cispo", beta=0.0),
}

parser = base_parser(__doc__.split("\n")[0])
parser.add_argument("--init", default="", help="SFT checkpoint (default: <out>/sft/model.pt, trained now if missing)")
parser.add_argument("--members", default=",".join(MEMBERS), help="comma-separated: " + ",".join(MEMBERS))
parser.add_argument("--steps", type=int, default=100, help="iterations of each member")
parser.add_argument("--questions", type=int, default=16, help="questions per iteration")
parser.add_argument("--group-size", type=int, default=8, help="G answers per question")
parser.add_argument("--eval-every", type=int, default=25, help="held-out accuracy every N iterations")
parser.add_argument("--eval-samples", type=int, default=16, help="samples per held-out question during training")
parser.add_argument("--final-eval-samples", type=int, default=32, help="samples per held-out question at the end")
args = parse_args(parser)
members = choose_members(parser, args.members, MEMBERS)


# %% Train every member from the same SFT model

t0 = time.time()
init = args.init or str(ensure_sft(args.out, args.device, args.seed))
root = Path(args.out) / "family"
results = {}
for name in members:
    banner(f"{name}: {MEMBERS[name] or 'GRPO as tutorial 06 runs it'}")
    config = GRPOConfig(out=str(root / name), init=init, device=args.device, seed=args.seed, overwrite=True,
                        progress=args.progress, steps=args.steps, questions=args.questions, group_size=args.group_size,
                        eval_every=args.eval_every, eval_samples=args.eval_samples,
                        final_eval_samples=args.final_eval_samples, **MEMBERS[name])
    result = grpo(config)
    rows = [json.loads(line) for line in (root / name / "grpo" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss" in r]
    # (KL, held-out accuracy): the SFT model, each evaluation during training, the end
    path = [(0.0, result["heldout_accuracy_before"])]
    path += [(r["kl"], r["heldout/accuracy"]) for r in trained if "heldout/accuracy" in r]
    path += [(result["kl_last"], result["heldout_accuracy"])]
    results[name] = {"accuracy": result["heldout_accuracy"], "accuracy_sft": result["heldout_accuracy_before"],
                     "kl": result["kl_last"], "tokens": sum(r["tokens"] for r in trained),
                     "seconds": result["seconds"], "path": path,
                     "no_signal": sum(r["zero_spread"] for r in trained) / len(trained),
                     "drawn": result.get("questions_drawn")}


# %% The figure: held-out accuracy against KL(pi || pi_ref)

plot_panels(root / "accuracy_vs_kl.png", [
    {"title": "what each member bought with its distance from pi_ref", "xlabel": "KL(pi || pi_ref), nats per token (k3)",
     "ylabel": "held-out accuracy (sampled, T = 1)", "ylim": (0, 1),
     "curves": [([p[0] for p in r["path"]], [p[1] for p in r["path"]], name, "o-") for name, r in results.items()],
     "hlines": [(next(iter(results.values()))["accuracy_sft"], "the SFT model (pi_ref)")]}],
    caption="Each line runs from the SFT model (KL 0) through its evaluations to the member's end; "
            "up and left is better.", width=7.0, height=5.0)


# %% The table

banner("the family on the arithmetic task: the same SFT model, seed, questions and iterations")
print(f"{'member':14s}{'held-out acc':>13s}{'KL/token':>10s}{'tokens':>9s}{'wall s':>8s}{'no signal':>11s}"
      f"{'questions':>11s}")
for name, r in results.items():
    drawn = "" if r["drawn"] is None else f"{r['drawn']:.0f}"
    print(f"{name:14s}{r['accuracy']:13.3f}{r['kl']:10.4f}{r['tokens']:9.0f}{r['seconds']:8.0f}"
          f"{r['no_signal']:11.2f}{drawn:>11s}")
sft = next(iter(results.values()))["accuracy_sft"]
print(f"\nthe SFT model they all start from: held-out accuracy {sft:.3f}. 'no signal': the mean fraction of "
      "groups whose G answers all scored the same\n(E12 gives them advantage 0). 'questions': the questions "
      f"DAPO's dynamic sampling drew ({args.steps} x {args.questions} without it).")
print("What the math says about each (docs/policy_gradient.md; the exact fixed points: python -m "
      "minialign.theory_policy_gradient):\n"
      "- DAPO, GSPO and CISPO have no KL term: only their clip limits each step, and in the exact lab they end at\n"
      "  pi_ref restricted to the best answers; in 100 iterations their KL is not always above the others'.\n"
      "- REINFORCE without a baseline pushes up every rewarded answer, RLOO only the answers better than the\n"
      "  others of their group: both are unbiased, the same expected gradient, RLOO's usually with less variance.\n"
      "- a group with no signal teaches E12 nothing; DAPO's dynamic sampling pays for that in questions drawn.\n"
      "One short run of one seed is not a ranking: over seeds 0-4 (docs/policy_gradient.md) every member gains,\n"
      "RLOO least each time, DAPO ends among the two best at the largest KL, and below it the order changes\n"
      "with the seed.")
print(f"\nfigure: {root / 'accuracy_vs_kl.png'}; each member's run folder: {root}/<member>/grpo/")
print(f"total time {time.time() - t0:.0f} s")

# %% Try this
TRY_THIS = """
Try this:
  python tutorials/10_family.py --members grpo,dapo,gspo --seed 1 --out runs/family_seed1
      the same three members with another seed: does their order hold?
  python tutorials/10_family.py --members grpo,rloo --steps 300 --out runs/family_long
      three times the iterations: where does each member's KL end?
"""
print(TRY_THIS)
summary("10_family", steps=args.steps, accuracy_sft=f"{sft:.3f}",
        **{f"accuracy_{name}": f"{r['accuracy']:.3f}" for name, r in results.items()},
        **{f"kl_{name}": f"{r['kl']:.4f}" for name, r in results.items()})
