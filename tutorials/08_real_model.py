"""Tutorial 08: the same stage commands on a real model folder and your own data files.

    python tutorials/08_real_model.py     # offline, after tutorials 01-02; without their
                                          # SFT model it trains it first: _common.ensure_sft

What a user with a GPT-2 or Qwen folder does, on a model small enough for a laptop:

1. ``minialign export`` writes the toy SFT model as a Hugging Face GPT-2 folder (config.json,
   model.safetensors, the toy tokenizer as a ``transformers`` tokenizer): ``transformers`` loads
   it like any checkpoint.
2. The toy world writes data files in TRL's formats: preference pairs ``{"prompt", "chosen",
   "rejected"}`` for DPO and GSM8K-style questions ``{"prompt", "answer": "... #### 7"}`` for GRPO.
3. ``minialign dpo --model FOLDER --data FILE`` and ``minialign grpo --model FOLDER --data FILE``
   run from the command line twice: through ``transformers`` (``--model-impl hf``) and through
   minialign's own GPT (``--model-impl minialign``). The two implementations of the same weights
   give the same losses step for step (``<out>/real_model/same_losses.png``).
4. The trained folder is a Hugging Face model: ``transformers`` samples from it directly.

With real data the hidden r* of the toy world is not available, so the stages plot what can be
measured: DPO's loss, the implicit reward's held-out accuracy and the KL to pi_ref; GRPO's
reward, held-out answer accuracy and KL.

A script and a notebook: each ``# %%`` line starts a cell (Jupyter, VS Code, Jupytext).
"""

# %%
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import banner, base_parser, ensure_sft, parse_args, summary

from minialign.runtime.plots import plot_panels
from minialign.toyworld import ToyWorld, WorldConfig, write_jsonl


def cli(*words) -> None:
    """One ``minialign`` command, as a user types it (``python -m minialign`` = ``minialign``), with
    this tutorial's ``--threads`` when given to a stage (``export`` trains nothing and has no such flag)."""
    words = (*words, "--threads", args.threads) if args.threads and words[0] != "export" else words
    print("$ minialign " + " ".join(str(a) for a in words))
    subprocess.run([sys.executable, "-m", "minialign", *map(str, words)], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"})


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# %%
parser = base_parser(__doc__.split("\n")[0])
parser.add_argument("--dpo-steps", type=int, default=30, help="DPO steps of 16 pairs")
parser.add_argument("--grpo-steps", type=int, default=15, help="GRPO iterations of 8 questions x 8 answers")
parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (both stages)")
args = parse_args(parser)
here = Path(args.out) / "real_model"
sft = ensure_sft(args.out, args.device, args.seed)

# %% 1. the toy SFT model as a Hugging Face folder
banner("1. minialign export: the toy SFT model as a Hugging Face GPT-2 folder")
folder = here / "gpt2_sft"
if not folder.is_dir():
    cli("export", sft.parent, folder)
print(f"{folder}: " + ", ".join(sorted(p.name for p in folder.iterdir())))
try:
    import transformers
except ImportError:
    raise SystemExit("this tutorial needs the hf extra: pip install -e '.[hf]'") from None
hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
print(f"transformers loads it: {type(hf).__name__}, {hf.num_parameters():,} parameters")

# %% 2. data files in TRL's formats
banner("2. data files the toy world writes, in TRL's formats")
world = ToyWorld(WorldConfig(seed=0))
pairs = world.preference_dataset(args.dpo_steps * 16 + 64, seed=args.seed + 1)
write_jsonl(here / "prefs.jsonl", pairs[:-64])
write_jsonl(here / "prefs_eval.jsonl", pairs[-64:])
gsm8k = [{"prompt": q["prompt"], "answer": f"{q['prompt'][8:-2]} is {q['answer']}. #### {q['answer']}"}
         for q in world.arithmetic_questions("train")]
write_jsonl(here / "qa.jsonl", gsm8k)
write_jsonl(here / "qa_eval.jsonl", world.arithmetic_questions("heldout"))
print(f"prefs.jsonl ({len(pairs) - 64} pairs), e.g. {json.dumps(pairs[0])}")
print(f"qa.jsonl ({len(gsm8k)} questions), e.g. {json.dumps(gsm8k[0])}")
print("GRPO's built-in reward: exact match of the final number (GSM8K's answer after ####)")

# %% 3. DPO and GRPO from the command line, through transformers and through minialign's GPT
banner("3. the same stages through transformers (--model-impl hf) and minialign's GPT")
losses, seconds = {}, {}
for impl in ("hf", "minialign"):
    out = here / impl
    t = time.time()
    cli("dpo", "--model", folder, "--model-impl", impl, "--data", here / "prefs.jsonl",
        "--eval-data", here / "prefs_eval.jsonl", "--out", out, "--steps", args.dpo_steps, "--batch-size", 16,
        "--log-every", 1, "--eval-every", 10, "--eval-samples-per-prompt", 8, "--device", args.device,
        "--seed", args.seed, "--grad-accum", args.grad_accum, "--no-progress",
        "--overwrite")  # a rerun replaces the tutorial's last run
    cli("grpo", "--model", folder, "--model-impl", impl, "--data", here / "qa.jsonl",
        "--eval-data", here / "qa_eval.jsonl", "--out", out, "--steps", args.grpo_steps, "--questions", 8,
        "--group-size", 8, "--batch-size", 64, "--eval-every", 5, "--eval-samples", 4,
        "--final-eval-samples", 8, "--device", args.device, "--seed", args.seed, "--grad-accum", args.grad_accum,
        "--no-progress", "--overwrite")
    seconds[impl] = time.time() - t
    losses[impl] = {stage: [r for r in rows(out / stage / "metrics.jsonl") if "loss" in r]
                    for stage in ("dpo", "grpo")}
print(f"\n{'':>14} {'DPO loss, hf':>14} {'minialign':>12} {'|diff|':>9}   "
      f"{'GRPO loss, hf':>14} {'minialign':>12} {'|diff|':>9}")
worst = {}
for stage in ("dpo", "grpo"):
    a, b = ([r["loss"] for r in losses[impl][stage]] for impl in ("hf", "minialign"))
    worst[stage] = max(abs(x - y) for x, y in zip(a, b))
for i in (0, 1, 2, 5, 10):
    line = f"{'step ' + str(i):>14}"
    for stage in ("dpo", "grpo"):
        a, b = (losses[impl][stage] for impl in ("hf", "minialign"))
        line += (f" {a[i]['loss']:>14.6f} {b[i]['loss']:>12.6f} {abs(a[i]['loss'] - b[i]['loss']):>9.1e}   "
                 if i < len(a) else " " * 40)
    print(line)
print(f"largest difference over all steps: DPO {worst['dpo']:.1e}, GRPO {worst['grpo']:.1e} "
      f"(float32 rounding; the weights move the same way)")
print(f"wall time of both stages: transformers {seconds['hf']:.0f} s, minialign's GPT {seconds['minialign']:.0f} s")
for stage, key in (("dpo", "heldout/accuracy"), ("grpo", "heldout/accuracy")):
    s = json.loads((here / "hf" / stage / "summary.json").read_text())
    print(f"{stage}: held-out {'implicit-reward accuracy' if stage == 'dpo' else 'answer accuracy'} "
          f"{s['heldout_accuracy_before']:.3f} -> {s['heldout_accuracy']:.3f}"
          + (f", KL(pi || pi_ref) {s['kl']:.3f} nats" if stage == "dpo" else f", KL per token {s['kl_last']:.4f}"))
panels = []
for stage, title in (("dpo", "DPO loss (E9)"), ("grpo", "GRPO loss (E13)")):
    curves = [([r["step"] for r in losses[impl][stage]], [r["loss"] for r in losses[impl][stage]],
               f"--model-impl {impl}", fmt) for impl, fmt in (("hf", "-"), ("minialign", "o"))]
    panels.append({"title": title, "xlabel": "step (optimizer step; GRPO: iteration)", "ylabel": "loss (nats)",
                   "curves": curves})
caption = ("the same GPT-2 folder trained through transformers (line) and minialign's GPT (dots): "
           "the curves lie on each other")
print(f"plot: {plot_panels(here / 'same_losses.png', panels, caption)}")

# %% 4. the result is a Hugging Face model
banner("4. transformers samples from the GRPO-trained folder")
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
trained = here / "hf" / "grpo" / "model"
model = transformers.AutoModelForCausalLM.from_pretrained(str(trained))
tok = transformers.AutoTokenizer.from_pretrained(str(trained))
for q in world.arithmetic_questions("heldout")[:4]:
    ids = tok.apply_chat_template([{"role": "user", "content": q["prompt"]}], add_generation_prompt=True,
                                  tokenize=True, return_tensors="pt")
    ids = ids if hasattr(ids, "shape") else ids["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    print(f"{q['prompt']:<22} -> {tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)!r:<8} "
          f"(right answer {q['answer']})")

# %% Try this
TRY_THIS = """
Try this (its seeded outcome is in docs/course.md, beyond the course):
  python tutorials/08_real_model.py --grad-accum 4 --out runs/real_model_accum
      each optimizer step from four micro-batches (a quarter of the memory per forward pass): the
      same losses as above up to float rounding, and again the same through transformers.
Beyond one process: torchrun --nproc_per_node 2 -m minialign dpo --model FOLDER --data FILE ...
(the same weights as one process: tests/runtime/test_distributed.py); --max-length 12 cuts rows as TRL does.
"""
print(TRY_THIS)
summary("08_real_model", grad_accum=args.grad_accum, dpo_max_diff=f"{worst['dpo']:.1e}",
        grpo_max_diff=f"{worst['grpo']:.1e}", dpo_first_loss=f"{losses['hf']['dpo'][0]['loss']:.4f}",
        dpo_last_loss=f"{losses['hf']['dpo'][-1]['loss']:.4f}")
