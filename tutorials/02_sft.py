"""Tutorial 02: supervised fine-tuning (E0b): from a base model to an instruct model.

    python tutorials/02_sft.py                 # after tutorial 01

What it shows:
1. the SFT data: instruction -> response pairs in a chat template; the loss counts response
   tokens only (E0b), the EOS included, so the model learns to answer and to stop;
2. the SFT loss against its own exact floor H(response | prompt) (plot: runs/tutorial/sft/loss.png);
3. before and after, measured with the hidden truth: the mean reward r* of sampled reviews and the
   accuracy on held-out arithmetic questions (plot: runs/tutorial/sft/truth.png). Demonstrations
   of arithmetic are wrong 40% of the time, so imitation tops out near 60%: what RL can improve on.

A script and a notebook: each ``# %%`` line starts a cell (Jupyter, VS Code, Jupytext).
"""

# %%

from _common import banner, base_parser, ensure_pretrained, parse_args, summary

from minialign.data import collate
from minialign.stages.sft import SFTConfig, main as sft
from minialign.toyworld import ToyWorld, WorldConfig


parser = base_parser(__doc__.split("\n")[0])
parser.add_argument("--steps", type=int, default=SFTConfig.steps, help="fine-tuning steps")
args = parse_args(parser)
world = ToyWorld(WorldConfig())  # the world is fixed; --seed varies training
tok = world.tokenizer
base = ensure_pretrained(args.out, args.device, args.seed)

# %% 1. The SFT data and what the loss counts

banner("1. SFT data in the chat template; the loss counts response tokens only (E0b)")
ex = world.sft_dataset(3, seed=7)
for row in ex:
    print(f"  {row['prompt']!r:28} -> {row['response']!r}")
b = collate([tok.prompt(ex[0]["prompt"])], [tok.response(ex[0]["response"])], tok.pad_id)
print("\n  token          response_mask")
for i, m in zip(b["input_ids"][0].tolist(), b["response_mask"][0].tolist()):
    print(f"  {tok.itos[i]:14} {m}")
floor = world.sft_entropy()
print(f"\nfloor H(response | prompt) = {floor['nats_per_token']:.4f} nats per response token")

# %% 2. Fine-tuning the base model (E0b)
banner("2. Fine-tuning the base model")
s = sft(SFTConfig(out=args.out, init=str(base), device=args.device, seed=args.seed, steps=args.steps,
                  progress=args.progress, overwrite=True))
print(f"\nheld-out response loss {s['heldout_loss']:.4f} vs floor {s['entropy_floor']:.4f} "
      f"({100 * (s['heldout_loss'] / s['entropy_floor'] - 1):.1f}% above), {s['seconds']:.0f} s")

# %% 3. Base model against instruct model, judged by the hidden truth
banner("3. Base model vs instruct model, judged by the hidden truth")
print(f"  mean r* of sampled reviews:        {s['true_reward_before']:+.3f} -> {s['true_reward']:+.3f}"
      f"   (malformed after SFT: {100 * s['malformed']:.1f}%)")
print(f"  held-out arithmetic accuracy (T=1): {s['heldout_accuracy_before']:.3f} -> {s['heldout_accuracy']:.3f}"
      f"   (demonstrations are right {1 - world.config.arithmetic_noise:.0%} of the time)")
print("  (truth.png's points sample fewer answers per question than this figure, so its last point differs\n"
      "  from it by sampling noise)")
print("\n  samples from the instruct model:")
for prompt, text in s["examples"]:
    print(f"  {prompt!r:22} -> {text!r}")
if s["malformed"] < 0.1:
    print("\n  What they show: the base model only continued text; the instruct model answers in the chat template,\n"
          "  writes a well-formed review of the item it was asked about and stops (EOS). Its reviews are as mixed\n"
          "  as the demonstrations, so their mean r* sits near 0, and it answers the sums right no more often\n"
          "  than the demonstrations did: imitation copies the data's quality at best, and alignment starts here.")
else:
    print(f"\n  What they show: {s['malformed']:.0%} of the sampled reviews are still malformed (off the item, "
          "unfinished or\n  ungrammatical): this run is too short to learn the chat template; train longer (--steps).")
print(f"\nPlots: {args.out}/sft/loss.png, {args.out}/sft/truth.png")

# %% Try this
TRY_THIS = """
Try this (their seeded outcomes are in docs/course.md, session 1):
  python tutorials/02_sft.py --out runs/short_pretrain
      fine-tune the base model that tutorial 01's Try this pre-trained for a quarter of the steps:
      a weaker base model gives a weaker instruct model (loss further above its floor, fewer right sums).
  python tutorials/02_sft.py --steps 200 --out runs/short_sft
      a quarter of the fine-tuning from the full base model: is the chat template learnt already?
"""
print(TRY_THIS)
summary("02_sft", steps=args.steps, heldout_loss=f"{s['heldout_loss']:.4f}", floor=f"{s['entropy_floor']:.4f}",
        r_star_base=f"{s['true_reward_before']:.3f}", r_star=f"{s['true_reward']:.3f}", malformed=f"{s['malformed']:.3f}",
        accuracy_base=f"{s['heldout_accuracy_before']:.3f}", accuracy=f"{s['heldout_accuracy']:.3f}")
