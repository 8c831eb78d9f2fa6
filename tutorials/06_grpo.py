"""Tutorial 06: GRPO on a verifiable reward, arithmetic (E11-E14).

Starts from the SFT model of tutorial 02 (trained now if missing). Its demonstrations were wrong
40% of the time, so it answers ``what is a + b ?`` right only about half the time. GRPO samples
G answers per question, scores each with the verifiable reward (1 if right, else 0), uses the
group's mean as the baseline (E11, no value head), and updates with the clipped objective (E13).
It trains on the train questions only and is measured on held-out questions it never saw.

It shows:

1. held-out accuracy (sampled at temperature 1) before and after, and over training, beside the
   accuracy of the training rollouts;
2. the answer length over training (EOS included: the policy must keep emitting it);
3. the KL to the SFT model and the fraction of groups with zero spread (all answers right or
   all wrong: those groups teach nothing); the clip fraction is in ``kl_clip.png``.

    python tutorials/06_grpo.py                       # after tutorial 02
    python tutorials/06_grpo.py --no-scale-by-std     # Dr. GRPO: advantage r - mean, no division by the std
    python tutorials/06_grpo.py --kl-in reward --aggregation token_mean

Plots go to ``<out>/grpo/``: ``overview.png`` (the four panels), and the stage's own
``accuracy.png``, ``answer_len.png``, ``kl_clip.png``.

A script and a notebook: each ``# %%`` line starts a cell (Jupyter, VS Code, Jupytext).
"""

# %%
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import banner, base_parser, ensure_sft, parse_args, summary

from minialign.runtime.plots import plot_panels
from minialign.stages.grpo import GRPOConfig, main as grpo

parser = base_parser(__doc__.split("\n")[0])
parser.add_argument("--init", default="", help="SFT checkpoint (default: <out>/sft/model.pt, "
                    "trained now if missing)")
parser.add_argument("--steps", type=int, default=None, help="GRPO iterations (default: GRPOConfig's)")
parser.add_argument("--group-size", type=int, default=None, help="G answers per question")
parser.add_argument("--lr", type=float, default=None, help="AdamW's learning rate")
parser.add_argument("--beta", type=float, default=None, help="KL coefficient")
parser.add_argument("--kl-in", choices=["loss", "reward"], default=None,
                    help="KL in the loss (E13, DeepSeekMath) or in the reward (E14)")
parser.add_argument("--aggregation", choices=["answer_mean", "token_mean", "constant"], default=None,
                    help="E13's mean over tokens: per answer (E13), over the batch's tokens (DAPO), a constant (Dr. GRPO)")
parser.add_argument("--scale-by-std", action=argparse.BooleanOptionalAction, default=None,
                    help="E12's division by the group's std")
parser.add_argument("--ref-reset-every", type=int, default=None, help="E14: pi_ref <- pi_theta every N")
args = parse_args(parser)


# %% The overview plot

def overview_plot(rows: list[dict], path: Path, ref_reset_every: int = 0) -> None:
    train = [r for r in rows if "accuracy" in r]
    held = [(r["step"], r["heldout/accuracy"]) for r in rows if "heldout/accuracy" in r]
    step = [r["step"] for r in train]
    x = "GRPO iteration"
    k = max(1, len(train) // 10)  # the first and last tenth of the run, as the summary compares them
    first, last = (sum(r["accuracy"] for r in part) / len(part) for part in (train[:k], train[-k:]))
    ref = "pi_ref (the SFT model)" if not ref_reset_every else f"pi_ref (reset to the policy every {ref_reset_every})"
    plot_panels(path, [
        {"title": "1. accuracy of sampled answers (temperature 1)", "xlabel": x, "ylabel": "fraction answered right",
         "ylim": (0, 1),
         "curves": [(step, [r["accuracy"] for r in train], "train rollouts (the reward GRPO sees)"),
                    ([h[0] for h in held], [h[1] for h in held], "held-out questions (never trained on)", "o-")],
         "hlines": [(held[0][1], f"SFT model, held-out = {held[0][1]:.3f}")]},
        {"title": "2. answer length", "xlabel": x, "ylabel": "tokens per answer, EOS included",
         "curves": [(step, [r["answer_len"] for r in train], "mean over the rollout")]},
        {"title": f"3. KL from the sampling policy to {ref}", "xlabel": x, "ylabel": "KL, nats per token",
         "curves": [(step, [r["kl"] for r in train], "KL(pi_old || pi_ref), k3 on the rollout's tokens")]},
        {"title": "4. groups that teach nothing", "xlabel": x, "ylabel": "fraction of groups", "ylim": (0, 1),
         "curves": [(step, [r["zero_spread"] for r in train], "all G answers score the same (A = 0)")]},
    ], columns=2, width=6.5, caption=(
        f"Train rollouts {first:.2f} -> {last:.2f} (first and last tenth), held-out {held[0][1]:.2f} -> "
        f"{held[-1][1]:.2f}: the gap between them is what GRPO learned of the train questions alone. As the "
        "train questions are mastered their groups stop teaching (4); the answers keep their length (2)."))


t0 = time.time()
init = args.init or str(ensure_sft(args.out, args.device, args.seed))
options = {k: v for k, v in vars(args).items() if v is not None and k in (
    "steps", "group_size", "lr", "beta", "kl_in", "aggregation", "scale_by_std", "ref_reset_every")}
config = GRPOConfig(out=args.out, init=init, device=args.device, seed=args.seed, progress=args.progress,
                    overwrite=True, **options)

# %% GRPO from the SFT model, on the verifiable arithmetic reward
banner(f"GRPO: {config.questions} questions x G = {config.group_size} answers per iteration, "
       f"{config.steps} iterations\nreward: 1 if the answer is right (verifiable), else 0; "
       f"baseline: the group's mean (E11); KL in the {config.kl_in}")
result = grpo(config)
run = Path(args.out) / "grpo"
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
overview_plot(rows, run / "overview.png", config.ref_reset_every)

# %% What happened
banner("what happened")
gain = result["heldout_accuracy"] - result["heldout_accuracy_before"]
print(f"held-out accuracy (sampled, T = 1):  SFT {result['heldout_accuracy_before']:.3f} -> "
      f"GRPO {result['heldout_accuracy']:.3f}  ({100 * gain:+.1f} points)")
print(f"train rollouts accuracy:             first iterations {result['train_accuracy_first']:.3f} -> "
      f"last {result['train_accuracy_last']:.3f}")
print(f"answer length (tokens, EOS incl.):   {result['answer_len_first']:.2f} -> "
      f"{result['answer_len_last']:.2f}")
print(f"KL(pi || pi_ref) per token, last:    {result['kl_last']:.3f}")
print(f"groups with zero spread, last:       {result['zero_spread_last']:.2f} "
      "(the questions it always gets right no longer teach it anything)")
print("\nsampled answers to held-out questions, before -> after:")
for (q, answer, old), (_, _, new) in zip(result["examples_before"], result["examples"]):
    print(f"  {q:18s} (= {answer:>2s})  SFT: {' '.join(f'{a:>2s}' for a in old)}   "
          f"GRPO: {' '.join(f'{a:>2s}' for a in new)}")
wrong = [(q, answer, a) for q, answer, answers in result["examples"] for a in answers if a != answer]
near = [a for _, answer, a in wrong if a.isdigit() and abs(int(a) - int(answer)) == 1]
total = sum(len(answers) for _, _, answers in result["examples"])
stuck = [q for q, answer, answers in result["examples"]
         if sum(a != answer for a in answers) * 2 >= len(answers) and len({a for a in answers if a != answer}) == 1]
print(f"\nwrong answers left after GRPO: {len(wrong)} of {total} samples above, {len(near)} of them off by one; "
      f"{len(stuck)} of {len(result['examples'])} questions are answered wrong at least half the time with one "
      "and the same wrong answer.")
print("GRPO raises the probability of the answers that scored above their group's mean, so a question's answers\n"
      "become nearly deterministic: right if its group found the right sum often enough, else one wrong sum\n"
      "(often a neighbour) every time. A group that is all wrong has zero spread and teaches nothing, so such a\n"
      "question stays wrong; more samples per question (--group-size) give it more chances.")
print(f"\nplots: {run / 'overview.png'} (and accuracy.png, answer_len.png, kl_clip.png)")
print(f"total time {time.time() - t0:.0f} s")

# %% Try this
TRY_THIS = """
Try this (their seeded outcomes are in docs/course.md, session 5):
  python tutorials/06_grpo.py --group-size 4 --out runs/grpo_g4
      half the group: more groups with zero spread (all right or all wrong) teach nothing, and a
      question whose few answers are all wrong stays wrong.
  python tutorials/06_grpo.py --kl-in reward --out runs/grpo_kl_reward
      the KL in the reward (E14, summed over the answer) instead of in the loss (E13): the 0/1 reward
      is no longer exact, and the policy is held nearer to pi_ref.
"""
print(TRY_THIS)
summary("06_grpo", G=config.group_size, kl_in=config.kl_in, accuracy_sft=f"{result['heldout_accuracy_before']:.3f}",
        accuracy=f"{result['heldout_accuracy']:.3f}", kl_last=f"{result['kl_last']:.4f}",
        zero_spread_last=f"{result['zero_spread_last']:.2f}")
