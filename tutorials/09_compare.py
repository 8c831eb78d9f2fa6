"""Tutorial 09, the capstone: PPO, DPO and GRPO from the same SFT model, on one reward-KL figure.

Every alignment algorithm of this course trades reward for distance from the reference: E2 pays
beta nats of reward per nat of KL(pi || pi_ref). The DPO paper compared algorithms on exactly this
plane (its reward-KL frontier figure): the true reward of each trained policy against its KL to
the reference, each algorithm at several beta. This tutorial draws that figure for the toy world,
where the true reward r* is known:

- **PPO** (E2, E5, E6) maximises the learned reward r_phi of tutorial 03 with the KL in its reward;
- **DPO** (E9) fits the preference pairs directly, no reward model, no sampling;
- **GRPO** (E11-E14) with the reward model's score r_phi as its reward (reviews have no
  verifiable answer) and the group mean as its baseline, no value head.

All three start from the SFT model of tutorial 02 (which is pi_ref), train at each beta, and are
then measured the same way: r* and KL(pi || pi_ref) of the same number of fresh samples per
prompt, with the same seed. The figure (``<out>/compare/reward_vs_kl.png``) says which algorithm
reaches the most hidden reward per nat of KL here.

    python tutorials/09_compare.py       # after tutorials 02 and 03 (without their models it trains them)
    python tutorials/09_compare.py --betas 0.1 --algorithms dpo,grpo

A script and a notebook: each ``# %%`` line starts a cell (Jupyter, VS Code, Jupytext).
"""

# %%
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from _common import banner, base_parser, ensure_reward_model, ensure_sft, parse_args, summary

ALGORITHMS = ("ppo", "dpo", "grpo")
COLORS = {"ppo": "tab:blue", "dpo": "tab:orange", "grpo": "tab:green"}

parser = base_parser(__doc__.splitlines()[0])
parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated: ppo,dpo,grpo")
parser.add_argument("--betas", type=lambda s: [float(b) for b in s.split(",")], default=[0.3, 0.1, 0.03],
                    help="comma-separated betas, one run of each algorithm at each")
parser.add_argument("--ppo-steps", type=int, default=30, help="PPO iterations (rollouts of 32 responses)")
parser.add_argument("--dpo-steps", type=int, default=60, help="DPO steps of 64 pairs")
parser.add_argument("--dpo-lr", type=float, default=5e-4, help="DPO peak learning rate")
parser.add_argument("--grpo-steps", type=int, default=30, help="GRPO iterations (6 prompts x G answers)")
parser.add_argument("--grpo-lr", type=float, default=1e-4, help="GRPO peak learning rate")
parser.add_argument("--group-size", type=int, default=4, help="GRPO's G answers per prompt")
parser.add_argument("--samples", type=int, default=32, help="samples per prompt for r* and KL")
args = parse_args(parser)
algorithms = [a for a in args.algorithms.split(",") if a]
if set(algorithms) - set(ALGORITHMS):
    raise SystemExit(f"unknown algorithm(s) {sorted(set(algorithms) - set(ALGORITHMS))}: choose from {ALGORITHMS}")
start = time.time()
sft = ensure_sft(args.out, args.device, args.seed)
rm = ensure_reward_model(args.out, args.device, args.seed)
folder = Path(args.out) / "compare"
folder.mkdir(parents=True, exist_ok=True)


@dataclass
class Point:
    algorithm: str
    beta: float
    kl: float           # KL(pi || pi_ref), nats per response, sampled
    true_reward: float  # mean r* of sampled reviews
    malformed: float
    seconds: float

    def gain_per_nat(self, sft_reward: float) -> float:
        """Hidden reward gained over the SFT model per nat of KL (nan at KL <= 0.01: too close to tell)."""
        return (self.true_reward - sft_reward) / self.kl if self.kl > 0.01 else float("nan")


# %% 1. The same measurement for every policy
# r* of fresh samples (``evaluate.review_eval``) and the KL to the SFT model estimated on the
# policy's own samples, log pi_theta(y|x) - log pi_ref(y|x) summed over the response and averaged
# (``evaluate.sampled_kl``): exactly 0 for the SFT model itself.
def measure(policy_path, sft_path, samples: int, seed: int, device: str) -> dict:
    from minialign.runtime.devices import resolve_device
    from minialign.runtime.loading import load_policy
    from minialign.stages.evaluate import review_eval, sampled_kl
    from minialign.toyworld import ToyWorld

    world = ToyWorld()
    device = resolve_device(device)
    policy, tok = load_policy(policy_path, device, world.tokenizer)
    reference, _ = load_policy(sft_path, device, world.tokenizer)
    policy.eval()
    reference.eval()
    ev = review_eval(policy, tok, world, samples, seed=seed)
    kl = sampled_kl(policy, reference, tok, world.review_prompts(), samples, seed=seed + 1)
    return {"true_reward": ev["true_reward"], "malformed": ev["malformed"], "kl": kl,
            "examples": ev["examples"]}


banner("1. The SFT model, measured as every trained policy will be")
before = measure(sft, sft, args.samples, args.seed, args.device)
sft_reward = before["true_reward"]
print(f"SFT model: r* {sft_reward:+.3f}, malformed {before['malformed']:.1%}, KL {before['kl']:.3f}")


# %% 2. Training: each algorithm at each beta, from the same SFT model
# PPO and DPO run their stage's ``main`` with its defaults except the step counts, chosen so that
# the whole sweep fits in a few minutes on a laptop CPU. GRPO's stage trains on arithmetic; here
# it runs E14's loop itself on the review prompts, each iteration one ``grpo.grpo_iteration``
# whose reward is the reward model's score (``reward_model.reward_function``: r_phi at the EOS,
# -7 for an answer cut off before it). Each run writes ``<out>/compare/<algorithm>_beta<beta>/``.
def train(algorithm: str, beta: float, args, sft: Path, rm: Path) -> Path:
    out = Path(args.out) / "compare" / f"{algorithm}_beta{beta:g}"
    # many short runs: their bars only with --progress; a rerun replaces the sweep's last run
    common = dict(out=str(out), init=str(sft), beta=beta, seed=args.seed, device=args.device,
                  progress=bool(args.progress), overwrite=True)
    if algorithm == "ppo":
        from minialign.stages.ppo import PPOConfig, main
        main(PPOConfig(reward_model=str(rm), steps=args.ppo_steps, eval_every=args.ppo_steps,
                       eval_samples=2, final_eval_samples=2, **common))
        return out / "ppo" / "model.pt"
    if algorithm == "dpo":
        from minialign.stages.dpo import DPOConfig, main
        main(DPOConfig(steps=args.dpo_steps, lr=args.dpo_lr, num_pairs=args.dpo_steps * 64,
                       eval_every=args.dpo_steps, eval_pairs=16, eval_samples_per_prompt=2, **common))
        return out / "dpo" / "model.pt"
    return train_grpo_on_reviews(args, sft, rm, **common)


def train_grpo_on_reviews(args, sft: Path, rm: Path, **common) -> Path:
    """E14 on the six review prompts: G answers each, scored by r_phi, group baseline, clipped update."""
    import copy

    import torch

    from minialign.grpo import grpo_iteration
    from minialign.reward_model import RewardModel, reward_function
    from minialign.runtime.devices import resolve_device, seed_everything
    from minialign.runtime.loading import load_policy, save_policy
    from minialign.runtime.optim import gradient_update, make_optimizer
    from minialign.runtime.run import progress
    from minialign.stages.grpo import GRPOConfig
    from minialign.toyworld import ToyWorld

    world = ToyWorld()
    prompts = world.review_prompts()
    config = GRPOConfig(steps=args.grpo_steps, questions=len(prompts), group_size=args.group_size,
                        batch_size=len(prompts) * args.group_size, max_new_tokens=24, lr=args.grpo_lr, **common)
    seed_everything(config.seed)
    device = resolve_device(config.device)
    policy, tok = load_policy(sft, device, world.tokenizer)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)            # pi_ref: the SFT model
    reward_model, _ = RewardModel.load(rm, device, tok)
    reward = reward_function(reward_model.eval(), tok)                          # r_phi, not the hidden r*
    optimizer = make_optimizer(policy, config)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    policy.train()
    for step in progress(range(config.steps), config, f"grpo beta={config.beta:g}"):
        update = gradient_update(policy, policy, optimizer, config, step)      # one optimizer step per call
        grpo_iteration(policy, reference, tok, reward, [{"prompt": p} for p in prompts], config, generator, update,
                       config.dtype)
    path = Path(config.out) / "grpo" / "model.pt"
    save_policy(policy, tok, path)
    return path


banner(f"2. Training {', '.join(a.upper() for a in algorithms)} at beta = {', '.join(f'{b:g}' for b in args.betas)}")
points = []
for algorithm in algorithms:
    for beta in args.betas:
        t = time.time()
        trained = train(algorithm, beta, args, sft, rm)
        m = measure(trained, sft, args.samples, args.seed, args.device)
        points.append(Point(algorithm, beta, m["kl"], m["true_reward"], m["malformed"], time.time() - t))
        print(f"{algorithm.upper():>4} beta {beta:<5g}: r* {m['true_reward']:+.3f}, KL {m['kl']:7.3f} nats, "
              f"malformed {m['malformed']:5.1%}   ({time.time() - t:.0f} s)")


# %% 3. The reward-KL figure
# One point per (algorithm, beta), joined in order of KL; the SFT model at KL 0. A point up and to
# the left of another is better: more hidden reward for less distance from the reference.
def best_per_nat(points: list[Point], sft_reward: float) -> Point | None:
    """The run that gained the most r* per nat of KL (among those that moved at least 0.01 nats)."""
    moved = [p for p in points if p.kl > 0.01]
    return max(moved, key=lambda p: p.gain_per_nat(sft_reward), default=None)


def plot(points: list[Point], sft_reward: float, path: Path) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_per_nat(points, sft_reward)
    fig, ax = plt.subplots(figsize=(7, 5))
    for algorithm in ALGORITHMS:
        mine = sorted((p for p in points if p.algorithm == algorithm), key=lambda p: p.kl)
        if not mine:
            continue
        ax.plot([0.0] + [p.kl for p in mine], [sft_reward] + [p.true_reward for p in mine], "o-",
                color=COLORS[algorithm], label=algorithm.upper())
        for p in mine:
            ax.annotate(f"beta {p.beta:g}", (p.kl, p.true_reward), textcoords="offset points",
                        xytext=(5, -10), fontsize=8, color=COLORS[algorithm])
    ax.plot([0.0], [sft_reward], "ks", label=f"SFT model (pi_ref), r* = {sft_reward:.2f}")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("KL(pi || pi_ref), nats per response (sampled; symlog scale)")
    ax.set_ylabel("mean hidden reward r* of sampled reviews")
    verdict = "no run moved far enough from pi_ref to tell"
    if best is not None:
        verdict = (f"most r* per nat of KL here: {best.algorithm.upper()} at beta {best.beta:g} "
                   f"(+{best.gain_per_nat(sft_reward):.2f} r* per nat)")
    ax.set_title(f"reward-KL: every algorithm from the same SFT model\n{verdict}", fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return verdict


banner("3. Hidden reward against KL")
verdict = plot(points, sft_reward, folder / "reward_vs_kl.png")
print(f"{'algorithm':>9} {'beta':>6} {'KL':>8} {'r*':>7} {'r* gained per nat':>18}")
for p in points:
    print(f"{p.algorithm.upper():>9} {p.beta:>6g} {p.kl:8.3f} {p.true_reward:+7.3f} {p.gain_per_nat(sft_reward):18.2f}")
print(f"\n{verdict}")
(folder / "points.json").write_text(json.dumps({"sft_true_reward": sft_reward,
                                                "points": [p.__dict__ for p in points]}, indent=1))
print(f"\nplot: {folder / 'reward_vs_kl.png'}; points: {folder / 'points.json'}; total {time.time() - start:.0f} s")

# %% Try this
TRY_THIS = """
Try this (their seeded outcomes are in docs/course.md, session 6):
  python tutorials/09_compare.py --dpo-steps 240 --algorithms dpo --out runs/compare_long_dpo
      DPO four times as long: does it keep climbing along its curve, or stop where its pairs are learned?
"""
print(TRY_THIS)
best = best_per_nat(points, sft_reward)
summary("09_compare", r_star_sft=f"{sft_reward:.3f}",
        best_per_nat=f"{best.algorithm}_beta{best.beta:g}" if best else "none",
        **{f"{p.algorithm}_beta{p.beta:g}": f"{p.true_reward:.3f}@{p.kl:.2f}" for p in points})
