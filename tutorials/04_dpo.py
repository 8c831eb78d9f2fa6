"""Tutorial 04: direct preference optimisation (DPO, E7-E10), no reward model needed.

    python tutorials/04_dpo.py      # after tutorials 01-02; without their models
                                    # it trains them first: _common.ensure_sft

1. The closed form DPO is built on, on one prompt with four responses: the optimal KL-regularised
   policy pi* (E7) for a few beta, the reward recovered from it as a policy ratio (E8), and why
   the unknown normaliser Z(x) cancels in Bradley-Terry (E3).
2. DPO (E9) from the SFT model on the toy world's preference pairs, once per beta: the implicit
   rewards (E10) separate chosen from rejected, and the hidden true reward r* of the policy's own
   samples is measured at the KL it spent: whether r* rises or falls in these short runs depends on
   the seed (docs/dpo.md has the runs of several seeds).
3. A plot of true reward against KL for each beta (``<out>/dpo/reward_vs_kl.png``), measured
   during training: how far each run moved from pi_ref and what it bought.

A script and a notebook: each ``# %%`` line starts a cell (Jupyter, VS Code, Jupytext).
"""

# %%
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from _common import banner, base_parser, ensure_sft, parse_args, summary

from minialign.dpo import implied_reward, log_partition, optimal_policy, preference_probability
from minialign.stages.dpo import DPOConfig, main as dpo
from minialign.runtime.plots import plot_panels

parser = base_parser(__doc__.splitlines()[0])
parser.add_argument("--betas", type=lambda s: [float(b) for b in s.split(",")], default=[0.1, 1.0, 10.0],
                    help="comma-separated betas, one DPO run each (the first is saved as <out>/dpo)")
parser.add_argument("--steps", type=int, default=40, help="DPO steps per beta (one pass over the pairs)")
parser.add_argument("--batch-size", type=int, default=64, help="preference pairs per step")
parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
parser.add_argument("--eval-every", type=int, default=20, help="steps between r* / KL measurements")
parser.add_argument("--eval-pairs", type=int, default=100, help="held-out pairs for the implicit reward's accuracy")
parser.add_argument("--samples", type=int, default=32,
                    help="sampled reviews per prompt for r* and KL (32, as tutorials 02 and 05 measure r*)")
args = parse_args(parser)
start = time.time()


# %% 1. E7-E8 on one prompt with four responses

def closed_form() -> None:
    banner("1. E7-E8 on one prompt with four responses")
    ref = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)   # pi_ref(y | x)
    r = torch.tensor([-1.0, 0.0, 0.5, 1.0], dtype=torch.float64)    # r(x, y)
    print(f"pi_ref = {[round(p, 3) for p in ref.tolist()]}   r = {r.tolist()}")
    print(f"{'beta':>6} {'pi* (E7)':>34} {'E_pi*[r]':>9} {'KL(pi*||ref)':>13} {'beta log Z':>11}")
    for beta in (10.0, 1.0, 0.3, 0.1):
        pi = optimal_policy(ref, r, beta)
        kl = (pi * (pi / ref).log()).sum().item()
        print(f"{beta:>6} {str([round(p, 3) for p in pi.tolist()]):>34} {(pi * r).sum().item():>9.3f} "
              f"{kl:>13.3f} {beta * log_partition(ref, r, beta).item():>11.3f}")
    beta = 0.3
    pi = optimal_policy(ref, r, beta)
    r_hat = implied_reward(pi, ref, beta)  # E8: beta log(pi*/pi_ref) = r - beta log Z
    print(f"\nE8 at beta={beta}: beta log(pi*/pi_ref) = {[round(x, 3) for x in r_hat.tolist()]}"
          f"\n  minus r = {[round(x, 3) for x in (r_hat - r).tolist()]}: the same -beta log Z(x) for every y")
    print(f"E3: P(y_4 > y_1) from r = {preference_probability(r[3], r[0]).item():.4f}, from the policy ratio "
          f"= {preference_probability(r_hat[3], r_hat[0]).item():.4f}: Z(x) cancels, so no reward model is needed")

closed_form()


# %% 2. DPO (E9) from the SFT model, one run per beta
def sweep(args, sft_path: Path) -> dict[float, dict]:
    banner("2. DPO (E9) from the SFT model, one run per beta")
    results = {}
    for i, beta in enumerate(args.betas):
        # the first beta's run is the tutorial's DPO model (<out>/dpo/model.pt); the others go aside
        out = args.out if i == 0 else f"{args.out}/dpo_sweep/beta_{beta:g}"
        config = DPOConfig(out=out, init=str(sft_path), beta=beta, steps=args.steps, batch_size=args.batch_size,
                           lr=args.lr, num_pairs=args.steps * args.batch_size, eval_every=args.eval_every,
                           eval_pairs=args.eval_pairs, eval_samples_per_prompt=args.samples,
                           device=args.device, seed=args.seed, progress=args.progress, overwrite=True)
        t = time.time()
        summary = dpo(config)
        rows = [r for r in _rows(Path(out) / "dpo") if "kl" in r]
        results[beta] = {"summary": summary, "rows": rows, "dir": Path(out) / "dpo"}
        print(f"beta={beta:g}: r* {summary['true_reward_before']:.3f} -> {summary['true_reward']:.3f}, "
              f"KL {summary['kl']:.3f} nats, malformed {summary['malformed']:.1%}, held-out pair accuracy "
              f"{summary['heldout_accuracy']:.3f} (Bayes-optimal {summary['bayes_optimal_accuracy']:.3f}), "
              f"{time.time() - t:.0f} s")
    return results


def _rows(run_dir: Path) -> list[dict]:
    import json
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


sft_path = ensure_sft(args.out, args.device, args.seed)
results = sweep(args, sft_path)


# %% 3. True reward against KL
BETA_NOTE = """
How beta acts, in principle. The gradient of E9 is beta * sigma(r_l - r_w) times the gradient of the log-ratio
margin. Adam divides every gradient by its own running scale, so the factor beta in front would cancel
but for Adam's epsilon (1e-8, added to that scale): where a parameter's gradient is of that order, a
smaller beta makes its step smaller, so a small beta starts slowly. beta also acts through
sigma(r_l - r_w), the weight of each pair, which moves away from 1/2 once beta times the log-ratio
margin is of order 1: a large beta gets there after a small move from pi_ref, so its pairs stop
pulling early and the KL stays small. beta sets the destination (E7: the smaller beta, the further
pi* is from pi_ref); a short run at a given learning rate is still on its way. r* of 32 samples per prompt is noisy:
compare the trend, not the second decimal."""


def plot(results: dict[float, dict], path: Path) -> None:
    r_sft = next(iter(results.values()))["summary"]["true_reward_before"]
    last = next(iter(results.values()))["rows"][-1]["step"]
    plot_panels(path, [{
        "title": "DPO: hidden reward against KL, measured during training",
        "xlabel": "KL(pi_theta || pi_ref), nats per response (sampled)",
        "ylabel": "mean hidden reward r* of sampled reviews",
        # the first row of each run is the SFT model before training, at KL 0; the arrows go from
        # each measurement to the next, since a run need not move away from pi_ref at every step
        "curves": [([r["kl"] for r in res["rows"]], [r["true_reward"] for r in res["rows"]], f"beta = {beta:g}", "o")
                   for beta, res in results.items()],
        "arrows": True, "legend": "outside",
        "notes": [(r["kl"], r["true_reward"], f"step {r['step']}") for res in results.values() for r in res["rows"]
                  if r["step"] > 0],
        "hlines": [(r_sft, f"SFT model, r* = {r_sft:.3f}")]}], width=8.5,
        caption=f"Each run starts at the SFT model (KL 0, step 0) and its arrows follow its measurements in order, "
                f"to step {last}: what each beta buys in r* for the KL it spends.")


banner("3. True reward against KL")
path = results[args.betas[0]]["dir"] / "reward_vs_kl.png"
plot(results, path)
for beta, res in results.items():
    pts = ", ".join(f"({r['kl']:.2f}, {r['true_reward']:.2f})" for r in res["rows"])
    print(f"beta={beta:g}  (KL, r*) during training: {pts}")
print(BETA_NOTE)
first = results[args.betas[0]]
print(f"\nsamples after DPO (beta={args.betas[0]:g}):")
for prompt, response in first["summary"]["examples"]:
    print(f"  {prompt!r:22} -> {response}")
for beta, res in results.items():
    rows = _rows(res["dir"])
    print(f"beta={beta:g}: log pi_theta(y_w|x) of the training pairs {rows[0]['logps/chosen']:.2f} -> "
          f"{rows[-1]['logps/chosen']:.2f}, of y_l {rows[0]['logps/rejected']:.2f} -> {rows[-1]['logps/rejected']:.2f}, "
          f"margin {rows[-1]['rewards/margins']:+.3f}")
if any(res["summary"]["true_reward"] < res["summary"]["true_reward_before"] for res in results.values()):
    print("Where r* fell: DPO asks only that the chosen response beat the rejected one. It can lower both, and the\n"
          "probability they lose goes to responses no pair ever showed, many of them malformed (r* = -7). Watch\n"
          "logps/chosen and the sampled KL, not the DPO loss; a smaller --lr (or fewer --steps) keeps the policy\n"
          "near pi_ref. docs/measurements.md has longer runs at the stage's default lr 1e-4.")
s = first["summary"]
change = "rose" if s["true_reward"] > s["true_reward_before"] else "did not rise"
print(f"\nWhat they show: r* of the samples {change}, {s['true_reward_before']:+.3f} -> {s['true_reward']:+.3f}, at a KL of\n"
      f"{s['kl']:.3f} nats per response; {s['malformed']:.1%} of them are malformed. In {args.steps} steps DPO moves the policy\n"
      "a little from pi_ref: it shifts which of the SFT model's reviews are likely, towards those the preference\n"
      "pairs favoured, rather than settling on one best review (compare PPO's samples in tutorial 05).")
print(f"\nplots: {path}, and loss.png / rewards.png / logps.png / truth.png in each run folder "
      f"({first['dir']}, {args.out}/dpo_sweep/)")
print(f"total {time.time() - start:.0f} s")
if not math.isfinite(first["summary"]["kl"]):
    raise SystemExit("the KL is not finite")

# %% Try this
TRY_THIS = """
Try this (its seeded outcome is in docs/course.md, session 4):
  python tutorials/04_dpo.py --betas 0.01 --out runs/dpo_beta001
      a ten times smaller beta than the first run: E7 puts its destination further from pi_ref, but
      Adam's epsilon slows its start (see "How beta acts"); how far does it get in 40 steps?
"""
print(TRY_THIS)
summary("04_dpo", r_star_sft=f"{first['summary']['true_reward_before']:.3f}",
        **{f"beta{beta:g}": f"{res['summary']['true_reward']:.3f}@{res['summary']['kl']:.3f}" for beta, res in results.items()},
        accuracy=f"{first['summary']['heldout_accuracy']:.3f}", malformed=f"{first['summary']['malformed']:.3f}")
