"""Tutorial 11: the preference family and rejection sampling, against best-of-N's frontier.

DPO (E9) is one member of a family; each member changes one thing (``minialign/preference.py``):

- **cDPO** trusts each label with probability 1 - epsilon (label smoothing), **rDPO** de-biases
  the loss for labels flipped with probability epsilon: here epsilon is the toy world's own mean
  flip rate, 1 - the Bayes-optimal accuracy of its Bradley-Terry labels (known exactly);
- **IPO** replaces -log sigma by a squared loss on the log-ratio difference;
- **SimPO** drops the reference: the length-normalised log-prob is the implicit reward, with a margin;
- **KTO** reads single responses marked desirable (the chosen) or undesirable (the rejected);
- **ORPO** adds an odds-ratio term to SFT's loss, with no reference model;
- **rejection sampling** (``minialign rejection-sampling``) samples N reviews per prompt, keeps the
  best by the reward model r_phi and fine-tunes on them with SFT's loss.

Every member starts from the same SFT model (which is pi_ref), with the same steps, learning rate
and pairs, and is measured the same way: r* and KL(pi || pi_ref) of fresh samples. PPO (E2, E5,
E6, against r_phi) and DPO stand beside them. The frontier they must beat is **best-of-N**: no
training at all, only N samples of the SFT model and the best one kept. Its curve (N = 1..64) is
computed with the exact best-of-N law (``best_of_n.best_of_n_distribution``) applied to 512 samples
per prompt of the SFT model: the formula is exact, its inputs (how often the SFT model writes a
review of each r* level) are sampled. Ranked by r* it is the oracle's frontier; ranked by r_phi it
is what a reward model buys. The figure: ``<out>/preference_family/reward_vs_kl.png``.

    python tutorials/11_preference_family.py      # after tutorials 02 and 03 (without their models it trains them)

A script and a notebook: each ``# %%`` line starts a cell (Jupyter, VS Code, Jupytext).
"""

# %%
from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm  # tqdm.write prints a member's line without breaking the bar

from _common import banner, bar, base_parser, choose_members, ensure_reward_model, ensure_sft, parse_args, summary

parser = base_parser(__doc__.splitlines()[0])
MEMBERS = ("DPO", "cDPO", "rDPO", "IPO", "SimPO", "KTO", "ORPO", "RS", "PPO")
parser.add_argument("--members", default=",".join(MEMBERS),
                    help="comma-separated members to train (RS: rejection sampling)")
parser.add_argument("--beta", type=float, default=0.1, help="beta of every member that has one (SimPO: --simpo-beta)")
parser.add_argument("--steps", type=int, default=40, help="optimizer steps of every preference member and of RS")
parser.add_argument("--batch-size", type=int, default=64, help="pairs per step (RS: kept reviews per step)")
parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of every member")
parser.add_argument("--simpo-beta", type=float, default=2.0, help="SimPO's reward scale (its paper: 2 to 2.5)")
parser.add_argument("--ppo-steps", type=int, default=20, help="PPO iterations (rollouts of 32 responses)")
parser.add_argument("--rs-samples", type=int, default=8, help="rejection sampling's N samples per prompt")
parser.add_argument("--bon-samples", type=int, default=512, help="SFT samples per prompt behind best-of-N's curve")
parser.add_argument("--max-n", type=int, default=64, help="best-of-N's curve for N = 1..max-n")
parser.add_argument("--samples", type=int, default=32, help="samples per prompt for r* and KL")
args = parse_args(parser)
start, cpu_start = time.time(), resource.getrusage(resource.RUSAGE_SELF)
members = choose_members(parser, args.members, MEMBERS)
sft = ensure_sft(args.out, args.device, args.seed)
rm = ensure_reward_model(args.out, args.device, args.seed)
folder = Path(args.out) / "preference_family"
folder.mkdir(parents=True, exist_ok=True)


# %% 1. Best-of-N from the SFT model: the frontier that training must beat
# ``stages.rollout_tasks.RankedPrompts.best_of_n`` samples M reviews per prompt from pi_ref, ranks them
# (by r*, or by the reward model r_phi), and applies the exact best-of-N law to the sampled levels:
# E[r* of the chosen review] and KL(pi_BoN || pi_ref) = sum_v P_v log(P_v / q_v), averaged over the
# six prompts. r* has few levels (multiples of 0.5, and -7 for a malformed review), so the KL lies
# well below the often-quoted log N - (N-1)/N, which holds only for a reward without ties.
from minialign.runtime.devices import resolve_device, seed_everything  # noqa: E402
from minialign.runtime.loading import load_policy, load_reward_model  # noqa: E402
from minialign.stages.rejection_sampling import RejectionSamplingConfig  # noqa: E402
from minialign.stages.rollout_tasks import RankedPrompts  # noqa: E402
from minialign.toyworld import ToyWorld  # noqa: E402

world = ToyWorld()
device = resolve_device(args.device)
seed_everything(args.seed)
reference, tok = load_policy(sft, device, world.tokenizer)
reference.eval().requires_grad_(False)
ns = list(range(1, args.max_n + 1))
settings = dict(out=args.out, seed=args.seed, device=args.device, eval_samples=args.samples,
                best_of_n=",".join(map(str, ns)), best_of_n_samples=args.bon_samples)
by_truth = RankedPrompts(RejectionSamplingConfig(reward="true", **settings), world, tok)
reward_model, _ = load_reward_model(rm, "minialign", device)
by_rm = RankedPrompts(RejectionSamplingConfig(reward_model=str(rm), **settings), world, tok, reward_model)

banner("1. Best-of-N from the SFT model (no training): the frontier")
bon = {}
for name, task in bar([("r*", by_truth), ("r_phi", by_rm)], args, "best-of-N"):
    bon[name] = task.best_of_n(reference, torch.Generator(device=device).manual_seed(args.seed))
print(f"{'N':>3} {'r*, ranked by r*':>17} {'KL':>7} {'r*, ranked by r_phi':>20} {'KL':>7} {'log N - (N-1)/N':>16}")
for a, b in zip(bon["r*"], bon["r_phi"]):
    if a["n"] in (1, 2, 4, 8, 16, 32, 64):
        print(f"{a['n']:>3} {a['true_reward']:>+17.3f} {a['kl']:>7.3f} {b['true_reward']:>+20.3f} {b['kl']:>7.3f} "
              f"{a['kl_bound']:>16.3f}")


# %% 2. Every member from the same SFT model
# The preference members run ``minialign dpo --loss NAME`` (its stage function) with the same
# steps, learning rate, beta and pairs; rejection sampling runs ``minialign rejection-sampling``
# ranked by the same reward model as PPO. Each writes ``<out>/preference_family/<member>/``.
@dataclass
class Point:
    member: str
    kl: float           # KL(pi || pi_ref), nats per response, sampled
    true_reward: float  # mean r* of sampled reviews
    malformed: float
    seconds: float


def flip_rate() -> float:
    """The toy world's labels: each pair's label is flipped with probability sigma(-|r*_1 - r*_2|);
    their mean over the training pairs is 1 - the Bayes-optimal accuracy (``ToyWorld.bayes_optimal_accuracy``)."""
    return 1 - world.bayes_optimal_accuracy(world.preference_dataset(args.steps * args.batch_size, seed=args.seed))


EPSILON = flip_rate()
PREFERENCE = {  # member -> the dpo stage's loss flags
    "DPO": dict(loss="sigmoid"), "cDPO": dict(loss="sigmoid", label_smoothing=EPSILON),
    "rDPO": dict(loss="robust", label_smoothing=EPSILON), "IPO": dict(loss="ipo"),
    "SimPO": dict(loss="simpo", beta=args.simpo_beta), "KTO": dict(loss="kto"), "ORPO": dict(loss="orpo")}


def train(member: str) -> Path:
    out = folder / member
    common = dict(out=str(out), init=str(sft), seed=args.seed, device=args.device, progress=False, overwrite=True)
    if member in PREFERENCE:
        from minialign.stages.dpo import DPOConfig, main
        flags = {"beta": args.beta, **PREFERENCE[member]}
        main(DPOConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                       num_pairs=args.steps * args.batch_size, eval_every=args.steps, eval_pairs=16,
                       eval_samples_per_prompt=2, **flags, **common))
        return out / "dpo" / "model.pt"
    if member == "RS":
        from minialign.stages.rejection_sampling import main
        main(RejectionSamplingConfig(reward_model=str(rm), steps=args.steps, lr=args.lr,
                                     batch_size=args.batch_size, samples_per_prompt=args.rs_samples,
                                     eval_samples=2, best_of_n="", **common))
        return out / "rejection_sampling" / "model.pt"
    from minialign.stages.ppo import PPOConfig, main
    main(PPOConfig(reward_model=str(rm), beta=args.beta, steps=args.ppo_steps, eval_every=args.ppo_steps,
                   eval_samples=2, final_eval_samples=2, **common))
    return out / "ppo" / "model.pt"


banner(f"2. Training {', '.join(members)} from the same SFT model (label flip rate epsilon = {EPSILON:.3f})")
sft_point = by_truth.evaluate(reference, reference)
print(f"SFT model: r* {sft_point['true_reward']:+.3f}, malformed {sft_point['malformed']:.1%}, KL {sft_point['kl']:.3f}")
points = []
for member in bar(members, args, "members"):
    t = time.time()
    policy, _ = load_policy(train(member), device, world.tokenizer)
    m = by_truth.evaluate(policy, reference)  # r* and KL of args.samples fresh reviews per prompt, seeded
    points.append(Point(member, m["kl"], m["true_reward"], m["malformed"], time.time() - t))
    tqdm.write(f"{member:>5}: r* {m['true_reward']:+.3f}, KL {m['kl']:6.3f} nats, malformed {m['malformed']:5.1%} "
               f"({time.time() - t:.0f} s)")


# %% 3. r* against KL: each member beside best-of-N's curve
# A point above the curve of best-of-N ranked by r* bought more hidden reward per nat of KL than
# the oracle's best-of-N; the r_phi curve is the fair bar for the members that see r_phi only
# through its pairs or its scores. ``frontier_at`` reads a curve at a point's KL (linear
# interpolation; beyond the curve's end its last value).
def frontier_at(curve: list[dict], kl: float) -> float:
    xs, ys = [r["kl"] for r in curve], [r["true_reward"] for r in curve]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= kl <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (kl - x0) / (x1 - x0)
    return ys[0] if kl < xs[0] else ys[-1]


def plot(path: Path) -> None:
    from minialign.runtime.plots import plot_panels
    curves = [([r["kl"] for r in bon[k]], [r["true_reward"] for r in bon[k]],
               f"best-of-N, N = 1..{args.max_n}, ranked by {k}", style) for k, style in (("r*", "k-"), ("r_phi", "k--"))]
    curves += [([p.kl], [p.true_reward], p.member, "o") for p in points]
    ys = [y for c in curves for y in c[1]] + [sft_point["true_reward"]]
    low, high = min(ys), max(ys)  # room above the curves for the legend
    plot_panels(path, [{"title": "every member from the same SFT model, beside best-of-N",
                        "xlabel": "KL(pi || pi_ref), nats per response (sampled; symlog)",
                        "ylabel": "mean hidden reward r* of sampled reviews", "xscale": "symlog",
                        "curves": curves, "hlines": [(sft_point["true_reward"], "SFT model (pi_ref)")],
                        "ylim": (low - 0.3, high + 0.9 * (high - low)), "legend": "upper left"}],
                width=8, height=5.5,
                caption=f"Best-of-N: the exact law on {args.bon_samples} SFT samples per prompt. A member above the r* curve beat "
                        "the oracle's best-of-N at its KL.")


banner("3. Hidden reward against KL")
plot(folder / "reward_vs_kl.png")
print(f"{'member':>6} {'KL':>8} {'r*':>7} {'best-of-N(r*) there':>20} {'best-of-N(r_phi) there':>23}")
above = []
for p in points:
    f_truth, f_rm = frontier_at(bon["r*"], p.kl), frontier_at(bon["r_phi"], p.kl)
    if p.true_reward > f_truth:
        above.append(p.member)
    print(f"{p.member:>6} {p.kl:8.3f} {p.true_reward:+7.3f} {f_truth:>+20.3f} {f_rm:>+23.3f}")
print(f"\nabove best-of-N ranked by r* at their KL: {', '.join(above) or 'none'}")
print("What it shows (one seed: compare with docs/preference.md before reading the second decimal): best-of-N\n"
      "spends its KL only on choosing among the SFT model's own reviews, so it is hard to beat at small KL;\n"
      "the trained members move pi away from pi_ref in ways the pairs or r_phi reward, and r* of 32 samples\n"
      "per prompt is noisy (about +-0.1).")
(folder / "points.json").write_text(json.dumps({"sft": sft_point, "epsilon": EPSILON, "best_of_n": bon,
                                                "points": [p.__dict__ for p in points]}, indent=1))
cpu = resource.getrusage(resource.RUSAGE_SELF)
cpu_s = cpu.ru_utime + cpu.ru_stime - cpu_start.ru_utime - cpu_start.ru_stime
print(f"\nplot: {folder / 'reward_vs_kl.png'}; points: {folder / 'points.json'}; total {time.time() - start:.0f} s "
      f"wall, {cpu_s:.0f} s of CPU over {torch.get_num_threads()} thread(s)")
if not all(math.isfinite(p.kl) for p in points):
    raise SystemExit("a KL is not finite")

# %% Try this
TRY_THIS = """
Try this (its seeded outcome is in docs/course.md, "The preference family"):
  python tutorials/11_preference_family.py --members DPO,IPO --beta 1.0 --out runs/family_beta1
      ten times the beta: IPO's target margin 1/(2 beta) shrinks to 0.5 nats; do DPO and IPO stay nearer
      pi_ref, and where do they land against best-of-N's curve?
"""
print(TRY_THIS)
summary("11_preference_family", r_star_sft=f"{sft_point['true_reward']:.3f}", epsilon=f"{EPSILON:.3f}",
        **{f"bon{n}": f"{bon['r*'][n - 1]['true_reward']:.3f}@{bon['r*'][n - 1]['kl']:.2f}"
           for n in (8, 64) if n <= args.max_n},
        above="+".join(above) or "none",
        **{p.member: f"{p.true_reward:.3f}@{p.kl:.2f}" for p in points})
