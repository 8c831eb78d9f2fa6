"""Tutorial 01: pre-training a base model (E0a), measured against the exact entropy floor.

    python tutorials/01_pretrain.py

What it shows:
1. the toy corpus: lines from a small probabilistic grammar, so the best possible loss (the
   corpus's entropy per token) is known exactly;
2. pre-training the tiny GPT with the language-modelling loss E0a, its held-out loss approaching
   that floor (plot: runs/tutorial/pretrain/loss.png);
3. what the base model writes: samples, and how many of them the grammar itself could have
   produced. It continues text; it does not follow instructions yet (that is tutorial 02).

A script and a notebook: each ``# %%`` line starts a cell (Jupyter, VS Code, Jupytext).
"""

# %%
import math
import random

import torch
from _common import banner, base_parser, parse_args, summary

from minialign.generation import generate
from minialign.stages.pretrain import PretrainConfig, main as pretrain
from minialign.runtime.devices import resolve_device
from minialign.runtime.loading import load_policy
from minialign.stages.evaluate import sample_texts
from minialign.tokenizer import Tokenizer
from minialign.toyworld import ToyWorld, WorldConfig

parser = base_parser(__doc__.split("\n")[0])
parser.add_argument("--steps", type=int, default=PretrainConfig.steps, help="pre-training steps")
args = parse_args(parser)
world = ToyWorld(WorldConfig())  # the world is fixed; --seed varies training

# %% 1. The toy corpus and its exact entropy floor
banner("1. The toy corpus and its exact entropy floor")
for line in world.pretrain_corpus(6, seed=123):
    toks = Tokenizer.split(line)
    print(f"  p = {math.exp(world.corpus_grammar.logprob(toks)):.2e}   {line}")
floor = world.corpus_entropy()
print(f"\nH(line) = {floor['nats_per_line']:.4f} nats over E[tokens + EOS] = {floor['mean_tokens']:.4f}"
      f" -> floor = {floor['nats_per_token']:.4f} nats/token. No model can beat it on fresh text.")

# %% 2. Pre-training with E0a
banner("2. Pre-training: L_LM = -sum_t log pi_theta(x_t | x_<t)   (E0a)")
result = pretrain(PretrainConfig(out=args.out, device=args.device, seed=args.seed, steps=args.steps,
                                 progress=args.progress, overwrite=True))
print(f"\nheld-out loss {result['heldout_loss']:.4f} vs floor {result['entropy_floor']:.4f}: "
      f"{100 * result['gap_to_floor']:.2f}% above the floor, {result['params']:,} parameters, "
      f"{result['seconds']:.0f} s.  Plot: {args.out}/pretrain/loss.png")

# %% 3. What the base model writes
banner("3. What the base model writes")
device = resolve_device(args.device)
model, tok = load_policy(f"{args.out}/pretrain/model.pt", device, world.tokenizer)
rollout = generate(model, [[tok.bos_id]] * 200, 24, tok.eos_id, tok.pad_id,
                   generator=torch.Generator(device=device).manual_seed(args.seed))
lines = [tok.decode(r) for r in rollout.responses()]
grammatical = [world.corpus_grammar.logprob(Tokenizer.split(s)) > float("-inf") for s in lines]
for s in random.Random(0).sample(lines, 5):
    print("  ", s)
print(f"\n{sum(grammatical)} of {len(lines)} sampled lines ({100 * sum(grammatical) / len(lines):.1f}%) "
      "are sentences the grammar can produce.")
print("\nAsked an instruction, the base model just continues the text (no chat template learnt yet):")
for prompt, (text, _) in zip(["review the movie", "what is 3 + 4 ?"],
                             sample_texts(model, tok, ["review the movie", "what is 3 + 4 ?"], 16)):
    print(f"  {prompt!r} -> {text!r}")

# %% Try this
TRY_THIS = """
Try this (their seeded outcomes are in docs/course.md, session 1):
  python tutorials/01_pretrain.py --steps 200 --out runs/short_pretrain
      a quarter of the steps: the held-out loss stays further above the floor, and fewer samples
      are sentences of the grammar.
  python tutorials/02_sft.py --out runs/short_pretrain
      then fine-tune that weaker base model: does the instruct model pay for it (its loss against
      the SFT floor, r* of its reviews, its arithmetic)?
"""
print(TRY_THIS)
summary("01_pretrain", steps=args.steps, heldout_loss=f"{result['heldout_loss']:.4f}",
        floor=f"{result['entropy_floor']:.4f}", gap_to_floor=f"{100 * result['gap_to_floor']:.2f}%",
        grammatical=f"{sum(grammatical) / len(lines):.3f}")
