"""Tutorial 03: a Bradley-Terry reward model learns the hidden reward from noisy preferences (E3, E4).

    python tutorials/03_reward_model.py            # after tutorial 02

What it shows:
1. the preference data: two reviews of one item, and which one the (simulated) annotator chose;
   labels are sampled from Bradley-Terry with the hidden reward r* (E3), so they are noisy;
2. the ceiling: the Bayes-optimal accuracy of those labels, E[sigma(|r*_w - r*_l|)];
3. training r_phi (the SFT trunk + a scalar head read at the EOS) on E4, starting from the SFT
   model of tutorial 02; held-out accuracy against the ceiling, and Pearson(r_phi, r*) on
   held-out responses (the real question: did it learn r*?);
4. Z(x) cancelling: adding any c(x) to both rewards changes no preference probability.

Plots (in <out>/reward_model/): loss.png, accuracy.png (with the Bayes-optimal line),
pearson.png and scatter.png (learned reward against r*).

A script and a notebook: each ``# %%`` line starts a cell (Jupyter, VS Code, Jupytext).
"""

# %%
from __future__ import annotations

import torch
from _common import banner, base_parser, ensure_sft, parse_args, summary

from minialign.reward_model import RewardModel, bradley_terry_probability, reward_model_loss
from minialign.stages.reward_model import RewardModelConfig, main
from minialign.toyworld import ToyWorld, WorldConfig

parser = base_parser(__doc__.splitlines()[0])
defaults = RewardModelConfig()
parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="pairs per step")
parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
parser.add_argument("--num-pairs", type=int, default=defaults.num_pairs, help="training pairs")
parser.add_argument("--eval-pairs", type=int, default=defaults.eval_pairs, help="held-out pairs")
args = parse_args(parser)
world = ToyWorld(WorldConfig())  # the world is fixed; --seed varies training

# %% 1. Preference pairs and their noisy labels (E3)
banner("1. Preference pairs: labels sampled from Bradley-Terry with the hidden reward r* (E3)")
for p in world.preference_dataset(4, seed=123):
    r_w, r_l = world.true_reward(p["prompt"], p["chosen"]), world.true_reward(p["prompt"], p["rejected"])
    p_label = bradley_terry_probability(torch.tensor([r_w]), torch.tensor([r_l])).item()
    print(f"  {p['prompt']!r}\n    chosen   (r* = {r_w:+.1f}): {p['chosen']}\n"
          f"    rejected (r* = {r_l:+.1f}): {p['rejected']}\n"
          f"    P(this label) = sigma({r_w:+.1f} - {r_l:+.1f}) = {p_label:.3f}")
held_out = world.preference_dataset(args.eval_pairs, seed=args.seed + 10_000)  # the stage's held-out pairs
gaps = [world.true_reward(p["prompt"], p["chosen"]) - world.true_reward(p["prompt"], p["rejected"])
        for p in held_out]
print(f"  Of the {len(gaps)} held-out labels, {sum(g < 0 for g in gaps) / len(gaps):.1%} prefer the answer with "
      f"the LOWER r* and {sum(g == 0 for g in gaps) / len(gaps):.1%} are coin flips between equal r*:\n"
      f"  the annotator is noisy, as people are. No model can beat the Bayes-optimal accuracy "
      f"E[sigma(|gap|)] = {world.bayes_optimal_accuracy(held_out):.3f} on these labels.")

# %% 2. Training r_phi on E4
banner("2. Training r_phi: GPT trunk from SFT + scalar head at the EOS, loss E4")
sft_path = ensure_sft(args.out, args.device, args.seed)
config = RewardModelConfig(out=args.out, init=str(sft_path), seed=args.seed, device=args.device, overwrite=True,
                           steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           num_pairs=args.num_pairs, eval_pairs=args.eval_pairs, progress=args.progress)
print(f"  {config.num_pairs} training pairs, {config.steps} steps of {config.batch_size} pairs, lr {config.lr}")
s = main(config)

# %% 3. Held-out results against the ceiling and against r*
banner("3. Held-out results: accuracy against the ceiling, correlation with the hidden r*")
print(f"  held-out accuracy        {s['heldout_accuracy_before']:.3f} (before)  ->  {s['heldout_accuracy']:.3f}")
print(f"  Bayes-optimal accuracy   {s['bayes_optimal_accuracy']:.3f}  (knowing r* exactly; no model beats it)")
print(f"  accuracy / Bayes-optimal {s['accuracy_vs_bayes']:.3f}   (target >= 0.95)")
print(f"  held-out loss (E4)       {s['heldout_loss']:.3f}   (E4 with r* itself: {s['true_reward_loss']:.3f})")
print(f"  Pearson(r_phi, r*)       {s['pearson_before']:.3f} (before)  ->  {s['pearson']:.3f}   "
      f"(target >= 0.9; {s['num_heldout_responses']} held-out responses)")
print(f"  agreement with r*'s order on pairs r* decides: {s['true_order_accuracy']:.3f}")

# %% 4. Learned reward against the hidden one
banner("4. A few reviews of the movie: learned reward against the hidden one")
rm, tok = RewardModel.load(f"{args.out}/reward_model/model.pt", device="cpu", tokenizer=world.tokenizer)
rm.eval()
examples = [("review the movie", "the movie was very great ."),
            ("review the movie", "the movie was good and the story was nice ."),
            ("review the movie", "the movie was okay ."),
            ("review the movie", "the movie was not good ."),
            ("review the movie", "the movie was bad but the music was great ."),
            ("review the movie", "the movie was very awful and the acting was terrible .")]
ids = [tok.prompt(x) + tok.response(y) for x, y in examples]
T = max(map(len, ids))
input_ids = torch.tensor([s_ + [tok.pad_id] * (T - len(s_)) for s_ in ids])
mask = torch.tensor([[1] * len(s_) + [0] * (T - len(s_)) for s_ in ids])
with torch.no_grad():
    rewards = rm(input_ids, mask)
for (x, y), r in zip(examples, rewards.tolist()):
    print(f"  r* = {world.true_reward(x, y):+5.1f}   r_phi = {r:+6.2f}   {y}")

# %% 5. Z(x) cancels (E3)
banner("5. Z(x) cancels: add c(x) to both rewards of a pair, no probability changes (E3)")
r_w, r_l = rewards[:3], rewards[3:]
for c in (0.0, 10.0, -3.7):
    p = bradley_terry_probability(r_w + c, r_l + c)
    print(f"  c(x) = {c:+5.1f}: P = {[round(v, 4) for v in p.tolist()]}, "
          f"E4 = {reward_model_loss(r_w + c, r_l + c).item():.4f}")
print("  Only differences of rewards are learned; the level is pinned by the small centring term.")

print(f"\nPlots: {args.out}/reward_model/{{loss,accuracy,pearson,scatter}}.png; "
      f"metrics: {args.out}/reward_model/metrics.jsonl; took {s['seconds']:.0f} s of training.")

# %% Try this
TRY_THIS = """
Try this (its seeded outcome is in docs/course.md, session 2):
  python tutorials/03_reward_model.py --steps 250 --out runs/short_reward_model
      a quarter of the steps: how much of the held-out accuracy (against the Bayes-optimal ceiling)
      and of the correlation with r* is learnt already?
"""
print(TRY_THIS)
summary("03_reward_model", steps=args.steps, accuracy=f"{s['heldout_accuracy']:.3f}",
        bayes_optimal=f"{s['bayes_optimal_accuracy']:.3f}", heldout_loss=f"{s['heldout_loss']:.3f}",
        true_reward_loss=f"{s['true_reward_loss']:.3f}", pearson=f"{s['pearson']:.3f}")
