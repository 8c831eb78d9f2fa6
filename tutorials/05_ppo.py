"""Tutorial 05: PPO with a value head against the learned reward model (E2, E5, E6).

Starts from the SFT model of tutorial 02 and the reward model of tutorial 03 (trained now if
missing), runs PPO, and shows:

1. the hidden true reward r* of the policy's samples rising above the SFT model's,
2. the KL to the SFT model (E2's penalty) staying bounded,
3. the learned reward r_phi beside r*: if the policy found a way to please r_phi that r* does not
   like (reward hacking), the two curves would part.

    python tutorials/05_ppo.py                 # after tutorials 02 and 03
    python tutorials/05_ppo.py --steps 100 --beta 0.02

Plots go to ``<out>/ppo/``: ``overview.png`` (the three panels), and the stage's own
``reward.png``, ``kl.png``, ``objective.png``, ``ppo_stats.png``, ``losses.png``.

A script and a notebook: each ``# %%`` line starts a cell (Jupyter, VS Code, Jupytext).
"""

# %%
from __future__ import annotations

import json
import time
from pathlib import Path

from _common import banner, base_parser, ensure_reward_model, ensure_sft, parse_args, summary

from minialign.runtime.plots import plot_panels, standardise
from minialign.stages.ppo import PPOConfig, main as ppo

parser = base_parser(__doc__.split("\n")[0])
d = PPOConfig()
parser.add_argument("--steps", type=int, default=d.steps, help="PPO iterations (one rollout each)")
parser.add_argument("--batch-size", type=int, default=d.batch_size, help="responses per rollout")
parser.add_argument("--beta", type=float, default=d.beta, help="KL strength of E2")
parser.add_argument("--advantage", choices=["gae", "source"], default=d.advantage,
                    help="per-token GAE, or the source's one-number A = r - V(x)")
parser.add_argument("--shared-trunk", action="store_true",
                    help="value head on the policy's own trunk (cheaper, less stable here)")
args = parse_args(parser)


# %% The plots and the samples

def overview_plot(rows: list[dict], sft_true: float, batch_size: int, path: Path) -> None:
    step = [r["step"] for r in rows]
    ev = [(r["step"], r["true_reward"]) for r in rows if "true_reward" in r]
    x = f"PPO iteration (a rollout of {batch_size} responses)"
    plot_panels(path, [
        {"title": "1. hidden true reward r*", "xlabel": x, "ylabel": "hidden reward r* (-7 malformed, up to +6)",
         "curves": [(step, [r["rollout/true_reward"] for r in rows], "r* of each rollout (noisy)"),
                    ([e[0] for e in ev], [e[1] for e in ev], "r* of fresh samples of every prompt", "o-")],
         "hlines": [(sft_true, f"SFT model, r* = {sft_true:.3f}")]},
        {"title": "2. KL to the SFT model (E2's penalty)", "xlabel": x, "ylabel": "KL, nats per response",
         "curves": [(step, [r["kl"] for r in rows], "KL(pi_theta || pi_ref) of the rollout")]},
        {"title": "3. learned r_phi beside hidden r*, standardised", "xlabel": x,
         "ylabel": "standard deviations from the run's mean",
         "curves": [(step, standardise([r["score"] for r in rows]), "learned r_phi (what PPO maximises)"),
                    (step, standardise([r["rollout/true_reward"] for r in rows]), "hidden r*")]},
    ], caption="r* climbs above the SFT model's while the KL levels off. r_phi's scale is arbitrary, so panel 3 "
               "standardises both: reward hacking would show as r_phi rising while r* falls.")


def what_the_samples_show(policy_path: Path, sft_path: Path, device: str, seed: int, per_prompt: int = 16) -> None:
    """Has the policy settled on one phrase for every item, and does it answer about the wrong item?
    Fresh samples of the PPO policy and of the SFT model it started from, side by side."""
    from collections import Counter

    import torch

    from minialign.runtime.devices import resolve_device
    from minialign.runtime.loading import load_policy
    from minialign.stages.evaluate import sample_texts
    from minialign.toyworld import ITEMS, ToyWorld, WorldConfig

    world, dev = ToyWorld(WorldConfig()), resolve_device(device)
    prompts = [p for p in world.review_prompts() for _ in range(per_prompt)]

    def samples(path):
        model, tok = load_policy(path, dev, world.tokenizer)
        return [y for y, _ in sample_texts(model, tok, prompts, 24, 1.0, torch.Generator(device=dev).manual_seed(seed))]

    ppo, sft = samples(policy_path), samples(sft_path)

    def phrases(text):  # the three-word phrases of a review that do not name an item
        words = text.split()
        return {" ".join(words[i:i + 3]) for i in range(len(words) - 2) if not set(words[i:i + 3]) & set(ITEMS)}

    phrase, _ = Counter(p for y in ppo for p in phrases(y)).most_common(1)[0]
    share_ppo = sum(phrase in phrases(y) for y in ppo) / len(ppo)
    share_sft = sum(phrase in phrases(y) for y in sft) / len(sft)

    def about_another_item(prompt, review):  # "review the game" -> "the book was ..."
        words = review.split()
        return len(words) > 1 and words[1] in ITEMS and words[1] != prompt.split()[-1]

    off_item = sum(about_another_item(x, y) for x, y in zip(prompts, ppo)) / len(ppo)
    banner("what the samples show")
    print(f"{len(ppo)} fresh samples of each model ({per_prompt} per item). The PPO policy's most common phrase,\n"
          f"{phrase!r}, is in {share_ppo:.0%} of its reviews and in {share_sft:.0%} of the SFT model's; "
          f"{off_item:.0%} of its reviews\nare about another item than the one asked for.")
    if share_ppo >= 0.3 and share_ppo >= 2 * share_sft:
        print("PPO has settled on the phrase r_phi likes best and says it about every item: high r*, little variety.\n"
              "Nothing in r_phi rewards variety; only the KL penalty keeps some of the SFT model's (a larger --beta\n"
              "keeps more, at a lower r*).")
    else:
        print("No single phrase dominates yet: the policy is still varied. Nothing in r_phi rewards variety, only\n"
              "the KL penalty keeps it: run longer or with a smaller --beta and watch this share grow.")
    if off_item >= 0.05:
        print("Reviewing another item is reward hacking: r_phi was trained only on reviews of the requested item, so\n"
              "it never learnt that the item must match, and rates such a review highly; r* scores it -7 (malformed).")


t0 = time.time()
sft = ensure_sft(args.out, args.device, args.seed)
rm = ensure_reward_model(args.out, args.device, args.seed)

# %% PPO from the SFT model, against the reward model
banner("PPO: sample, score with r_phi at the EOS, per-token KL penalty, GAE, clipped updates")
config = PPOConfig(out=args.out, init=str(sft), reward_model=str(rm), device=args.device, seed=args.seed,
                   steps=args.steps, batch_size=args.batch_size, beta=args.beta,
                   advantage=args.advantage, shared_trunk=args.shared_trunk, progress=args.progress,
                   overwrite=True)
result = ppo(config)
run = Path(args.out) / "ppo"
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
overview_plot(rows, result["true_reward_before"], args.batch_size, run / "overview.png")

# %% What happened
banner("what happened")
print(f"hidden true reward r* of sampled reviews: SFT {result['true_reward_before']:+.3f} -> "
      f"PPO {result['true_reward']:+.3f}")
print(f"malformed reviews (r* = -7):             SFT {result['malformed_before']:.3f} -> "
      f"PPO {result['malformed']:.3f}")
print(f"learned reward r_phi on the rollouts:    first {result['score_first']:+.3f} -> "
      f"last {result['score_last']:+.3f}")
print(f"KL(pi || pi_ref) per response:           last {result['kl_last']:.3f} nats "
      f"(max {result['kl_max']:.3f}), beta = {result['beta_last']:.3f}")
print(f"explained variance of the value head:    {result['explained_variance_last10']:.3f} "
      "(mean over the last 10 iterations)")
print("\nsamples of the SFT model, then of the PPO policy:")
for (prompt, before), (_, after) in zip(result["examples_before"], result["examples"]):
    print(f"  {prompt:18s} SFT -> {before}\n  {'':18s} PPO -> {after}")
what_the_samples_show(run / "model.pt", sft, args.device, args.seed)
print(f"\nplots: {run / 'overview.png'} (and reward.png, kl.png, objective.png, ppo_stats.png, losses.png)")
print(f"total time {time.time() - t0:.0f} s")

# %% Try this
TRY_THIS = """
Try this (their seeded outcomes are in docs/course.md, session 3):
  python tutorials/05_ppo.py --advantage source --out runs/ppo_source
      the source's E6, one advantage per answer A = r - V(x), instead of per-token GAE: every token of
      an answer gets the same credit, so learning is noisier; compare r*, the KL and the value head.
  python tutorials/05_ppo.py --beta 0.02 --out runs/ppo_beta002
      a five times weaker KL penalty: the policy moves further from pi_ref; does r* follow r_phi there?
"""
print(TRY_THIS)
summary("05_ppo", beta=args.beta, advantage=args.advantage, r_star_sft=f"{result['true_reward_before']:.3f}",
        r_star=f"{result['true_reward']:.3f}", malformed=f"{result['malformed']:.3f}",
        r_phi_last=f"{result['score_last']:.3f}", kl_last=f"{result['kl_last']:.3f}",
        explained_variance=f"{result['explained_variance_last10']:.3f}")
