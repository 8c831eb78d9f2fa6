"""minialign against TRL, step by step in one process: a DPO step and a GRPO iteration.

    pip install trl==1.16.0        # optional: not a dependency of minialign (brings datasets, accelerate)
    python benchmarks/vs_trl.py --threads 1                   # every setting below, DPO and GRPO
    python benchmarks/vs_trl.py --threads 1 --parts dpo --steps 12

**How it runs.** One freshly initialised GPT-2 (4 layers, 4 heads, 128 wide, the toy world's 53
tokens, 808,320 parameters) is saved to a temporary folder. TRL's trainer loads it from there
(policy and reference); minialign loads the same file into its own GPT (``gpt2.load_gpt2``), so
both start from the same weights. TRL's trainer runs its own loop; a callback times each of its
optimizer steps (``on_step_begin`` to ``on_step_end``: forward, backward, clipping, AdamW, and for
GRPO the sampling and scoring inside the step) and, right after each, runs and times one
minialign step of the same shape: with the shared prompt (minialign's default) and with the
plain forward (``--share-prompt false``). The sides alternate step by step under the same load,
in one process with one thread count, so their ratio holds on a busy machine; the seconds
themselves are whatever the machine gave. The first ``--warmup`` steps of each side are dropped;
each side prints its min and median, and the ratio minialign / TRL of each.

**Shapes.** DPO: 64 pairs per step, each a prompt of 8 tokens and two responses of 22 (21 words
and EOS), random words of the toy vocabulary, the same token ids on both sides (minialign's
batches are built from TRL's tokenized dataset). GRPO: 32 arithmetic questions of the toy world
per step, G = 8 answers each (256 answers), at most 4 answer tokens, temperature 1, the reward
``ToyWorld.true_reward``, the questions tokenized to the same ids (``hf_tokenizer_from_toy``'s
chat template), one optimizer step over all 256 answers on both sides.

**Settings**, each a table row; every setting that differs from a library's defaults is named:

- both sides, all rows: float32 (TRL 1.16 defaults to ``bf16=True``, autocast, when fp16 is not
  set; minialign defaults to float32), the same learning rate (DPO 1e-4, GRPO 1e-3 with weight
  decay 0.1: minialign's defaults; TRL's default is 1e-6; a learning rate does not change the
  time of a step), ``report_to="none"``, ``save_strategy="no"``, no progress bar;
- DPO ``defaults``: TRL's ``DPOConfig`` defaults (gradient checkpointing on, the reference model
  run in every step, ``max_length`` 1024: nothing truncated); minialign with its reference forward
  in every step (``precompute_ref_logps=False``; its default is True);
- DPO ``no-checkpointing``: as ``defaults``, with TRL's ``gradient_checkpointing=False``;
- DPO ``precomputed``: reference log-probs computed once before training on both sides (TRL's
  ``precompute_ref_log_probs=True``, minialign's default), gradient checkpointing off;
- GRPO ``defaults``: TRL's ``GRPOConfig`` defaults (gradient checkpointing on, one pass per
  sampled batch, no old-policy forward) except ``beta=0.04`` with its reference model (TRL's
  default is 0: no reference model; minialign's default is 0.04) and ``loss_type="grpo"`` (E13's
  mean per answer; TRL's default ``"dapo"`` divides by the batch's tokens: the same work);
  minialign with ``inner_updates=1`` (its default is 2 passes) and ``batch_size=256`` (one
  optimizer step over all answers; its default is 128);
- GRPO ``no-checkpointing``: as ``defaults``, with TRL's ``gradient_checkpointing=False``.
  (GRPO has no precomputed-reference setting: its answers are new every iteration.)

**Memory.** ``--malloc glibc`` (the default) leaves glibc's malloc as a process starts: a freed
block above a threshold goes back to the OS and the next step faults its pages back in.
``--malloc keep`` raises the two thresholds first (``keep_freed_memory``, which minialign's stages
call), for both sides, since they share the process. Each side's page faults per step are printed:
they show how much of a step's time was the kernel handing memory back.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

try:
    import datasets
    import transformers
    import trl
    from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, TrainerCallback
except ImportError as e:  # an optional benchmark: say what to install
    raise SystemExit(f"benchmarks/vs_trl.py needs TRL ({e}); install it with: pip install trl==1.16.0")

from minialign.stages.dpo import DPOConfig
from minialign.real.gpt2 import load_gpt2
from minialign.real.hf import hf_tokenizer_from_toy
from minialign.stages.grpo import GRPOConfig
from minialign.tools.bench import dpo_step, grpo_step, spread
from minialign.tools.timing import MALLOC, page_faults, use_malloc
from minialign.toyworld import ToyWorld, WorldConfig

PAIRS, PROMPT_WORDS, RESPONSE_WORDS = 64, 8, 21      # DPO: 8 + (21 + EOS) = 30 tokens per sequence
QUESTIONS, GROUP, ANSWER_TOKENS = 32, 8, 4          # GRPO: 256 answers of <= 4 tokens
DPO_SETTINGS = {"defaults": dict(gradient_checkpointing=True, precompute=False),
                "no-checkpointing": dict(gradient_checkpointing=False, precompute=False),
                "precomputed": dict(gradient_checkpointing=False, precompute=True)}
GRPO_SETTINGS = {"defaults": dict(gradient_checkpointing=True),
                 "no-checkpointing": dict(gradient_checkpointing=False)}
COMMON = dict(report_to="none", save_strategy="no", disable_tqdm=True, seed=0)


def trl_device(device: str, dtype: str) -> dict:
    """TRL's settings for a device and dtype: the CPU in float32, or a GPU with bf16 autocast."""
    return dict(use_cpu=device == "cpu", bf16=dtype == "bfloat16", **COMMON)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # a step's time includes its GPU work


class Alternate(TrainerCallback):
    """Times each TRL optimizer step, then runs and times one step of each minialign side; counts
    the page faults of each step too (``--malloc``)."""

    def __init__(self, sides: dict):
        self.sides, self.times = sides, {"TRL": [], **{name: [] for name in sides}}
        self.faults = {name: [] for name in self.times}
        self.checkpointing, self.threads = set(), set()

    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        self.start_faults, self.start = page_faults(), time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        _sync()
        self.times["TRL"].append(time.perf_counter() - self.start)
        self.faults["TRL"].append(page_faults() - self.start_faults)
        # what TRL's step really ran with (transformers 5.2x renames the flag activation_checkpointing)
        self.checkpointing.add(getattr(model, "is_activation_checkpointing", None)
                               if hasattr(model, "is_activation_checkpointing") else model.is_gradient_checkpointing)
        self.threads.add(torch.get_num_threads())
        for name, step in self.sides.items():
            _sync()
            faults, t = page_faults(), time.perf_counter()
            step()
            _sync()
            self.times[name].append(time.perf_counter() - t)
            self.faults[name].append(page_faults() - faults)


def save_fresh_gpt2(folder: Path, tok, shape: dict | None = None) -> None:
    """The shared starting point: a seeded GPT-2 of the bench shape (or ``shape``: vocab_size,
    n_positions, n_layer, n_head, n_embd) and its tokenizer, on disk."""
    shape = shape or dict(vocab_size=len(tok), n_positions=64, n_layer=4, n_head=4, n_embd=128)
    config = GPT2Config(**shape, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))


def dpo_rows(world: ToyWorld, n: int) -> list[dict]:
    """Random preference pairs of toy words: an 8-word prompt, two 21-word responses."""
    words = [w for w in world.tokenizer.stoi if w.isalpha() and not w.startswith("<")]
    rng = random.Random(0)

    def text(k):
        return " ".join(rng.choice(words) for _ in range(k))
    # the prompt ends with a space, so prompt + response splits into the prompt's words, then the response's
    return [{"prompt": text(PROMPT_WORDS) + " ", "chosen": text(RESPONSE_WORDS), "rejected": text(RESPONSE_WORDS)}
            for _ in range(n)]


def run_dpo(setting: str, folder: Path, world: ToyWorld, tok, steps: int, device: str = "cpu",
            dtype: str = "float32", pairs: int = PAIRS) -> dict:
    """TRL's DPO trainer for ``steps`` steps of ``pairs`` pairs, each followed by one step of each
    minialign side; on ``device`` in ``dtype`` (bfloat16: autocast on both sides)."""
    from trl import DPOConfig as TRLDPOConfig, DPOTrainer

    s = DPO_SETTINGS[setting]
    rows = dpo_rows(world, pairs * steps)
    args = TRLDPOConfig(output_dir=str(folder / "trl_dpo"), per_device_train_batch_size=pairs, max_steps=steps,
                        learning_rate=1e-4, gradient_checkpointing=s["gradient_checkpointing"],
                        precompute_ref_log_probs=s["precompute"], model_init_kwargs={"dtype": torch.float32},
                        **trl_device(device, dtype))
    trainer = DPOTrainer(model=str(folder), args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok)
    data = trainer.train_dataset
    lengths = {(len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])) for r in data.select(range(8))}
    assert lengths == {(PROMPT_WORDS, RESPONSE_WORDS + 1, RESPONSE_WORDS + 1)}, lengths
    sides = {}
    for name, share in (("minialign", True), ("minialign, plain forward", False)):
        policy, reference = load_gpt2(folder, device).train(), load_gpt2(folder, device).requires_grad_(False)
        tokens = {k: list(data[k + "_ids"]) for k in ("prompt", "chosen", "rejected")}
        config = DPOConfig(lr=1e-4, steps=steps, batch_size=pairs, share_prompt=share,
                           precompute_ref_logps=s["precompute"], dtype=dtype, progress=False)
        sides[name] = dpo_step(policy, reference, tokens, config, tok.pad_token_id)
    timer = Alternate(sides)
    trainer.add_callback(timer)
    trainer.remove_callback(PrinterCallback)  # its log lines; the logging itself runs as TRL's defaults say
    trainer.train()
    return {"times": timer.times, "faults": timer.faults, "trl_checkpointing": timer.checkpointing,
            "threads": timer.threads}


def run_grpo(setting: str, folder: Path, world: ToyWorld, tok, steps: int, device: str = "cpu",
             dtype: str = "float32", questions_per_step: int = QUESTIONS) -> dict:
    """TRL's GRPO trainer for ``steps`` iterations of ``questions_per_step`` questions x G answers,
    each followed by one iteration of each minialign side; on ``device`` in ``dtype``."""
    from trl import GRPOConfig as TRLGRPOConfig, GRPOTrainer

    s = GRPO_SETTINGS[setting]
    toy = world.tokenizer
    questions = world.arithmetic_questions("train")
    questions = (questions * (questions_per_step * steps // len(questions) + 1))[:questions_per_step * steps]
    data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": q["prompt"]}],
                                        "question": q["prompt"]} for q in questions])
    ids = tok.apply_chat_template(data[0]["prompt"], add_generation_prompt=True, tokenize=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    assert list(ids) == toy.prompt(questions[0]["prompt"]), "TRL's prompt tokens are not minialign's"

    def reward(prompts, completions, question, **kwargs):
        return [world.true_reward(q, c[0]["content"] if isinstance(c, list) else c) for q, c in zip(question, completions)]

    args = TRLGRPOConfig(output_dir=str(folder / "trl_grpo"), per_device_train_batch_size=questions_per_step * GROUP,
                         num_generations=GROUP, max_completion_length=ANSWER_TOKENS, beta=0.04, loss_type="grpo",
                         learning_rate=1e-3, weight_decay=0.1, max_steps=steps, shuffle_dataset=False,
                         gradient_checkpointing=s["gradient_checkpointing"], model_init_kwargs={"dtype": torch.float32},
                         **trl_device(device, dtype))
    trainer = GRPOTrainer(model=str(folder), reward_funcs=reward, args=args, train_dataset=data, processing_class=tok)
    sides = {}
    for name, share in (("minialign", True), ("minialign, plain forward", False)):
        policy, reference = load_gpt2(folder, device).train(), load_gpt2(folder, device).requires_grad_(False)
        config = GRPOConfig(questions=questions_per_step, group_size=GROUP, batch_size=questions_per_step * GROUP,
                            inner_updates=1, max_new_tokens=ANSWER_TOKENS, beta=0.04, lr=1e-3, weight_decay=0.1, steps=steps,
                            share_prompt=share, device=device, dtype=dtype, progress=False)
        batches = [questions[i:i + questions_per_step] for i in range(0, len(questions), questions_per_step)]
        sides[name] = grpo_step(policy, reference, toy, world, batches, config)
    timer = Alternate(sides)
    trainer.add_callback(timer)
    trainer.remove_callback(PrinterCallback)  # its log lines; the logging itself runs as TRL's defaults say
    trainer.train()
    return {"times": timer.times, "faults": timer.faults, "trl_checkpointing": timer.checkpointing,
            "threads": timer.threads}


def _seconds(x: float) -> str:
    return f"{x:.3f} s" if x >= 0.1 else f"{1e3 * x:.1f} ms"


def report(title: str, result: dict, warmup: int, note=None) -> None:
    """Each side's min and median after ``warmup`` steps and its ratio to TRL; ``note(seconds)``,
    if given, adds a figure of each side's fastest step (``benchmarks/gpu.py``: its MFU)."""
    times = {name: t[warmup:] for name, t in result["times"].items()}
    trl_ = spread(times["TRL"])
    checkpointing = ", ".join(map(str, sorted(result["trl_checkpointing"])))
    print(f"{title} (TRL's gradient checkpointing: {checkpointing}; threads: {sorted(result['threads'])}), "
          f"{len(times['TRL'])} steps timed per side after {warmup} warm-up steps:")
    for name, t in times.items():
        s = spread(t)
        ratio = "" if name == "TRL" else (f"; minialign / TRL: {s['min'] / trl_['min']:.2f} at the min, "
                                          f"{s['median'] / trl_['median']:.2f} at the median")
        extra = f"; {note(s['min'])}" if note else ""
        extra += f"; {statistics.median(result['faults'][name][warmup:]):,.0f} page faults per step (median)"
        print(f"  {name:26s} {_seconds(s['min'])} min, {_seconds(s['median'])} median{extra}{ratio}")
    sys.stdout.flush()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--parts", default="dpo,grpo", help="comma-separated: dpo, grpo")
    parser.add_argument("--dpo-settings", default=",".join(DPO_SETTINGS), help="comma-separated subset")
    parser.add_argument("--grpo-settings", default=",".join(GRPO_SETTINGS), help="comma-separated subset")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per setting, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each side left out of the figures")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for both sides")
    parser.add_argument("--malloc", choices=MALLOC, default="glibc",
                        help="glibc: malloc as the process starts; keep: freed memory kept in the process "
                             "(minialign.runtime.devices.keep_freed_memory, what minialign's stages set), both sides")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    torch.set_num_threads(args.threads)
    use_malloc(args.malloc)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5.2x renames gradient_checkpointing
    world = ToyWorld(WorldConfig(seed=0))
    tok = hf_tokenizer_from_toy(world.tokenizer)
    print(f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), float32 on the CPU; malloc: {args.malloc}")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_fresh_gpt2(folder, tok)
        print(f"model: GPT-2, 4 layers x 128, vocabulary {len(tok)}, "
              f"{sum(p.numel() for p in load_gpt2(folder).parameters()):,} parameters, saved once, loaded by both sides")
        if "dpo" in parts:
            for setting in args.dpo_settings.split(","):
                result = run_dpo(setting, folder, world, tok, args.steps)
                report(f"DPO step, {PAIRS} pairs x {PROMPT_WORDS + RESPONSE_WORDS + 1} tokens, setting '{setting}'",
                       result, args.warmup)
        if "grpo" in parts:
            for setting in args.grpo_settings.split(","):
                result = run_grpo(setting, folder, world, tok, args.steps)
                report(f"GRPO iteration, {QUESTIONS} questions x G={GROUP}, <= {ANSWER_TOKENS} answer tokens, "
                       f"setting '{setting}'", result, args.warmup)


if __name__ == "__main__":
    main()
