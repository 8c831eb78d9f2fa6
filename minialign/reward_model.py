r"""The reward model: learn $r_\phi(x, y)$ from human preferences (E3, E4). The source post's
section 0.

People cannot write down the reward of an answer, but they can say which of two answers they
prefer. The Bradley-Terry model turns such comparisons into a scalar reward: a preference is a
coin flip whose bias grows with the reward gap,

$$P_\phi(y_w \succ y_l\mid x) = \frac{e^{r_\phi(x,y_w)}}{e^{r_\phi(x,y_w)} + e^{r_\phi(x,y_l)}} = \sigma\big(r_\phi(x,y_w) - r_\phi(x,y_l)\big) \qquad \text{(E3)}$$

and the reward model maximises the likelihood of the observed labels ($y_w$ the chosen answer,
$y_l$ the rejected one), a logistic regression on the reward gap:

$$\mathcal{L}_R(\phi) = -\mathbb{E}_{(x,y_w,y_l)}\big[\log\sigma\big(r_\phi(x,y_w) - r_\phi(x,y_l)\big)\big] \qquad \text{(E4)}$$

Only the gap enters E3, so adding any $c(x)$ to both rewards of a prompt changes nothing: the
reward is identified up to a per-prompt constant. That is the $Z(x)$ of E7-E8 cancelling, and why
DPO (``dpo.py``) needs no reward model at all.

**The model.** The SFT policy's transformer trunk (it already reads these texts) with its
language-model head replaced by a linear scalar head. The reward is read at the last real token
of each sequence, the EOS that ends the response: with causal attention it is the only position
that has seen the whole prompt and the whole answer. Its index is the last position where
``attention_mask`` is 1, so left-padded batches (as generation makes them) and right-padded ones
(as ``data.collate`` makes them) give the same rewards.

**The toy world.** Preference pairs are two reviews of the same item, labelled by sampling E3
with the hidden sentiment reward $r^*$. The labels are noisy (the worse review wins with
probability $\sigma(-|r^*_w - r^*_l|)$), so no model can agree with every label: the ceiling is the
Bayes-optimal accuracy $\mathbb{E}[\sigma(|r^*_w - r^*_l|)]$ (``ToyWorld.bayes_optimal_accuracy``).
The reward model's held-out accuracy is reported against that ceiling, and its Pearson
correlation with $r^*$ on held-out responses: its real job is to recover $r^*$, not the labels.

**Where this differs from the source**

- E4 gets a centring term, TRL's ``center_rewards_coefficient`` $\cdot\,\mathbb{E}[(r_w + r_l)^2]$
  (Eisenstein et al. 2023; default 0.01, 0 gives pure E4). It pins the mean reward near 0 without
  changing any E3 probability, so PPO sees rewards of a known scale (``centring_penalty``). The
  logged ``loss`` is E4 alone.
- The expectation is a mean over a batch of pairs; the trunk starts from the SFT model.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed, files
from .data import InfiniteMinibatches, collate
from .datafiles import preference_data
from .loading import load_model, save_reward_model
from .model import GPT, GPTConfig, load_checkpoint
from .ops import align_responses, check_mask, response_hidden, upcast
from .tokenizer import Tokenizer
from .toyworld import ToyWorld, WorldConfig
from .train import (Run, TrainConfig, accumulated_step, autocast, check_range, checkpoint_tokenizer, input_path,
                    make_optimizer, plot_scatter, require, resolve_device, running_mean, seed_everything, stage)

# ----------------------------------------------------------------------------------------------
# The pure functions: E3 and E4
# ----------------------------------------------------------------------------------------------


def _check_pair(r_w: torch.Tensor, r_l: torch.Tensor) -> None:
    if r_w.shape != r_l.shape:
        raise ValueError(f"chosen rewards {tuple(r_w.shape)} and rejected rewards {tuple(r_l.shape)} "
                         "differ in shape: each chosen answer needs its rejected answer")
    if r_w.numel() == 0:
        raise ValueError("no preference pairs: rewards are empty")


def bradley_terry_probability(r_w: torch.Tensor, r_l: torch.Tensor) -> torch.Tensor:
    r"""E3: $P(y_w \succ y_l\mid x) = \sigma(r_w - r_l)$, elementwise."""
    _check_pair(r_w, r_l)
    # Exercise bradley_terry_probability (E3): from here to the end of the function.
    return torch.sigmoid(upcast(r_w) - upcast(r_l))  # E3


def reward_model_loss(r_w: torch.Tensor, r_l: torch.Tensor) -> torch.Tensor:
    r"""E4: $\mathcal{L}_R = \operatorname{mean}_{\text{pairs}} -\log\sigma(r_w - r_l)$, a scalar.

    ``logsigmoid`` rather than ``log(sigmoid(.))``: for a gap of -100 the sigmoid underflows to 0
    and its log is -inf, while logsigmoid returns -100 exactly. Gradient:
    $\partial\mathcal{L}_R/\partial r_w = -(1 - \sigma(r_w - r_l))/B$, $\partial\mathcal{L}_R/\partial r_l = +(1 - \sigma(r_w - r_l))/B$.
    """
    _check_pair(r_w, r_l)
    # Exercise reward_model_loss (E4): from here to the end of the function.
    margin = upcast(r_w) - upcast(r_l)  # (B,)
    return -F.logsigmoid(margin).mean()  # E4


def centring_penalty(r_w: torch.Tensor, r_l: torch.Tensor) -> torch.Tensor:
    r"""TRL's reward centring, $\mathbb{E}[(r_w + r_l)^2]$: 0 when the two rewards of every pair sum to 0.

    E3 sees only $r_w - r_l$, so the level of the rewards is free; this term, added to E4 with
    weight ``center_rewards_coefficient``, pins it near 0 so that PPO sees rewards of a known scale.
    """
    _check_pair(r_w, r_l)
    return ((upcast(r_w) + upcast(r_l)) ** 2).mean()


# ----------------------------------------------------------------------------------------------
# The model: GPT trunk + scalar head read at the last real token (the EOS)
# ----------------------------------------------------------------------------------------------


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last position where ``attention_mask`` (B, T) is 1.

    Works for right padding (``1 1 1 0 0`` -> 2) and left padding (``0 0 1 1 1`` -> 4) alike.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, T), got shape {tuple(attention_mask.shape)}")
    check_mask(attention_mask, "attention_mask")
    real = attention_mask.bool()
    if not real.any(dim=1).all():
        raise ValueError("a row of attention_mask has no real token: there is nothing to score")
    T = attention_mask.size(1)
    # argmax returns the first maximum, so search the reversed mask for its first 1
    return T - 1 - real.flip(1).long().argmax(dim=1)  # (B,)


class RewardModel(nn.Module):
    r"""$r_\phi(x, y)$: a trunk ``body`` and a linear ``score_head`` on its final hidden state.

    ``body`` is any model with the interface of ``hf.CausalLM`` (minialign's ``GPT`` or a
    Hugging Face causal LM behind ``hf.HFCausalLM``): only ``body.hidden`` and
    ``body.config.n_embd`` are used. A ``GPTConfig`` builds a fresh GPT trunk.
    """

    def __init__(self, body: "nn.Module | GPTConfig"):
        super().__init__()
        self.body = GPT(body) if isinstance(body, GPTConfig) else body
        self.config = self.body.config
        n_embd = self.config.n_embd
        self.score_head = nn.Linear(n_embd, 1)
        # unit-variance rewards at the start (the final LayerNorm gives features of scale 1); a
        # much smaller head would starve the trunk of gradient, which flows through its weights
        nn.init.normal_(self.score_head.weight, std=1.0 / (n_embd + 1) ** 0.5)
        nn.init.zeros_(self.score_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (B,) float32 of sequences ``prompt + response`` (B, T), read at the last real token.

        With ``response_mask`` (1 on response tokens) rows that share a prompt compute it once
        (``ops.prefill``; the same rewards): the two answers of a pair, the samples of a prompt.
        """
        if input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask "
                             f"{tuple(attention_mask.shape)} differ in shape")
        if response_mask is None:
            h = self.body.hidden(input_ids, attention_mask)        # (B, T, C)
            last = last_token_index(attention_mask)                # (B,)
        else:
            ids, mask, P = align_responses(input_ids, attention_mask, response_mask)
            h = response_hidden(self.body, ids, mask, P)           # (B, 1 + T', C) from the prompt's last token
            last = mask[:, P:].sum(1)                              # (B,) the last response token's column
        h_last = h[torch.arange(h.size(0), device=h.device), last]  # (B, C): the EOS position
        return self.score_head(h_last).squeeze(-1).float()         # (B,)

    @classmethod
    def from_policy(cls, policy) -> "RewardModel":
        """A reward model whose trunk starts as a copy of the (SFT) ``policy``; a fresh head."""
        if isinstance(policy, GPT):
            model = cls(policy.config)  # a fresh GPT, then the policy's weights into it
            model.body.load_weights(policy.state_dict(), source="the policy")
        else:
            model = cls(copy.deepcopy(policy))
        p = next(policy.parameters())
        return model.to(device=p.device, dtype=p.dtype)

    # --- checkpoints ----------------------------------------------------------------------------
    def save(self, path, tokenizer: Tokenizer) -> None:
        """Write config, weights and the tokenizer's state to ``path`` (a GPT body and the toy
        tokenizer; ``loading.save_reward_model`` writes any other body as a folder)."""
        if not isinstance(self.body, GPT):
            raise ValueError("RewardModel.save writes a GPT body; use loading.save_reward_model")
        if tokenizer.vocab_size != self.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the model "
                             f"{self.config.vocab_size}: they do not belong together")
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        files.torch_save({"kind": "reward_model", "config": dataclasses.asdict(self.config), "model": state,
                          "tokenizer": tokenizer.state_dict()}, path)  # atomic

    @classmethod
    def load(cls, path, device="cpu", tokenizer: Tokenizer | None = None) -> tuple["RewardModel", Tokenizer]:
        """(reward model, its tokenizer) from ``path`` (``weights_only`` loading: no code runs).

        ``tokenizer``, if given, must equal the saved one.
        """
        ckpt = load_checkpoint(path)  # torch.load(weights_only=True), checks 'config' and 'model'
        if ckpt.get("kind") != "reward_model":
            raise ValueError(f"{path} is not a reward-model checkpoint (a policy? build one from a "
                             "policy with RewardModel.from_policy)")
        saved_tok = checkpoint_tokenizer(ckpt, path, tokenizer)
        model = cls(GPTConfig(**ckpt["config"]))
        state = ckpt["model"]
        body = {k[len("body."):]: v for k, v in state.items() if k.startswith("body.")}
        head = {k[len("score_head."):]: v for k, v in state.items() if k.startswith("score_head.")}
        unexpected = [k for k in state if not k.startswith(("body.", "score_head."))]
        if unexpected or set(head) != {"weight", "bias"}:
            raise ValueError(f"{path} does not match the reward model: unexpected {unexpected[:4]}, "
                             f"score_head has {sorted(head)}")
        model.body.load_weights(body, source=str(path))
        model.score_head.load_state_dict(head)
        return model.to(device), saved_tok


# ----------------------------------------------------------------------------------------------
# Preference data: text pairs -> token pairs -> one padded batch
# ----------------------------------------------------------------------------------------------


def encode_pairs(pairs: list[dict], tokenizer: Tokenizer) -> list[tuple[list[int], list[int], list[int]]]:
    """``[{"prompt", "chosen", "rejected"}]`` -> ``[(prompt ids, chosen ids, rejected ids)]``.

    Responses end with EOS (``tokenizer.response``), the token the reward is read at. A missing
    field, an empty prompt or an empty response is an error naming the pair.
    """
    out = []
    for i, row in enumerate(pairs):
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"preference pair {i} has no string field {key!r}")
            if not row[key].strip():
                raise ValueError(f"preference pair {i} has an empty {key!r}: an empty response has no "
                                 "content to prefer, and a pair needs a prompt")
        out.append((tokenizer.prompt(row["prompt"]), tokenizer.response(row["chosen"]),
                    tokenizer.response(row["rejected"])))
    return out


def collate_pairs(prompts_w: list[list[int]], chosen: list[list[int]], prompts_l: list[list[int]],
                  rejected: list[list[int]], pad_id: int, block_size: int | None = None,
                  device=None) -> dict[str, torch.Tensor]:
    """One right-padded batch (2B, T): rows 0..B-1 are ``x + y_w``, rows B..2B-1 are ``x + y_l``.

    Both halves of a pair must answer the same prompt: E3 compares two answers *to one x* (the
    c(x) that cancels is the same on both sides only then). One forward pass scores both halves.
    """
    if not (len(prompts_w) == len(chosen) == len(prompts_l) == len(rejected)):
        raise ValueError(f"pairs do not line up: {len(prompts_w)} chosen prompts, {len(chosen)} chosen, "
                         f"{len(prompts_l)} rejected prompts, {len(rejected)} rejected")
    for i, (x_w, y_w, x_l, y_l) in enumerate(zip(prompts_w, chosen, prompts_l, rejected)):
        if list(x_w) != list(x_l):
            raise ValueError(f"pair {i}: chosen and rejected answer different prompts; Bradley-Terry "
                             "compares two answers to the same prompt")
        if len(y_w) == 0 or len(y_l) == 0:
            raise ValueError(f"pair {i} has an empty {'chosen' if len(y_w) == 0 else 'rejected'} response")
    return collate(list(prompts_w) + list(prompts_l), list(chosen) + list(rejected), pad_id, block_size,
                   device)


def pair_rewards(model: RewardModel, pairs, pad_id: int, device,
                 share_prompt: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_w, r_l), each (B,), for encoded ``pairs`` [(x, y_w, y_l)] in one forward pass.

    ``share_prompt``: x runs once for both answers (``ops.prefill``).
    """
    x, y_w, y_l = zip(*pairs)
    b = collate_pairs(x, y_w, x, y_l, pad_id, model.config.block_size, device)
    rewards = model(b["input_ids"], b["attention_mask"], b["response_mask"] if share_prompt else None)  # (2B,)
    return rewards[:len(pairs)], rewards[len(pairs):]


@torch.no_grad()
def score(model: RewardModel, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
          batch_size: int = 512, share_prompt: bool = True) -> torch.Tensor:
    r"""$r_\phi$ of (prompt ids, response ids) lists, (N,) float32 on the CPU."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        b = collate(prompts[i:i + batch_size], responses[i:i + batch_size], pad_id,
                    model.config.block_size, device)
        out.append(model(b["input_ids"], b["attention_mask"], b["response_mask"] if share_prompt else None).cpu())
    model.train(was_training)
    return torch.cat(out)


def reward_function(model: RewardModel, tokenizer: Tokenizer, missing_eos_score: float = -7.0):
    r"""$r_\phi$ as a reward function with TRL's signature (``rewards.py``), for GRPO on a task with no
    verifiable answer, as the source's E14 writes it: $r_i = r_\phi(x, y_i) - \beta D_{KL}$.

    An answer cut off before its EOS scores ``missing_eos_score``: the reward model reads its score
    at the EOS, which such an answer lacks (PPO does the same, ``PPOConfig.missing_eos_score``).
    """
    def reward(prompts, completions, finished, **columns) -> list[float]:
        rewards = score(model, [tokenizer.prompt(x) for x in prompts], [tokenizer.response(y) for y in completions],
                        tokenizer.pad_id)
        return [r if done else missing_eos_score for r, done in zip(rewards.tolist(), finished)]
    return reward


def pearson(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------


@dataclass
class RewardModelConfig(TrainConfig):
    """Train a Bradley-Terry reward model r_phi (E3, E4) on the toy world's preference pairs.

    Reads OUT/sft/model.pt (or --init, or a --model folder), whose trunk it starts from, and your
    pairs with --data. Writes OUT/reward_model/: model.pt (the reward model; a model/ folder after
    --model), metrics.jsonl, loss.png, accuracy.png, pearson.png, scatter.png, summary.json,
    status.json."""
    init: str = ""                # SFT checkpoint the trunk starts from; default: out/sft/model.pt
    steps: int = 1000
    batch_size: int = 32          # preference pairs per step (2 x batch_size sequences)
    lr: float = 2e-3
    weight_decay: float = 0.0
    num_pairs: int = 20_000       # training pairs, labelled by sampling E3 with the hidden r*
    eval_pairs: int = 2_000       # fresh held-out pairs
    eval_every: int = 250
    center_rewards_coefficient: float = 0.01  # TRL's term c * E[(r_w + r_l)^2]; 0 = pure E4
    share_prompt: bool = True     # run x once for y_w and y_l (exact; ops.prefill)

    INPUTS = {"init": "sft"}

    def validate(self) -> None:
        super().validate()
        for name in ("eval_pairs", "eval_every"):
            check_range(self, name, 1)
        check_range(self, "center_rewards_coefficient", 0)
        require(self, "num_pairs", self.data or self.num_pairs >= self.batch_size,
                f">= --batch-size ({self.batch_size})")


@torch.no_grad()
def heldout_metrics(model: RewardModel, encoded, pad_id: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """E4 loss, accuracy and margin on encoded pairs [(x, y_w, y_l)]: what real data can measure.
    Also returns r_w and r_l, (N,) each."""
    x, y_w, y_l = zip(*encoded)
    r_w, r_l = score(model, list(x), list(y_w), pad_id), score(model, list(x), list(y_l), pad_id)  # (N,), (N,)
    return {"heldout_loss": reward_model_loss(r_w, r_l).item(),
            "heldout_accuracy": (r_w > r_l).float().mean().item(),
            "heldout_margin": (r_w - r_l).mean().item()}, r_w, r_l


@torch.no_grad()
def evaluate(model: RewardModel, world: ToyWorld, tokenizer: Tokenizer, pairs: list[dict],
             encoded=None) -> dict:
    r"""Held-out metrics: E4 loss, accuracy, margin, and agreement of $r_\phi$ with the hidden $r^*$.

    - ``accuracy``: fraction of pairs where $r_\phi(x, y_w) > r_\phi(x, y_l)$ (the labels are noisy);
    - ``bayes_optimal_accuracy``: the best any model can do on these labels, $\mathbb{E}[\sigma(|r^*_w - r^*_l|)]$;
    - ``true_reward_loss``: E4 with $r^*$ itself, the floor of the loss in expectation;
    - ``pearson``: correlation of $r_\phi$ and $r^*$ over the distinct held-out (prompt, response)s;
      ``pearson_within_prompt`` first removes each prompt's mean (the $c(x)$ E3 cannot see).
    """
    encoded = encoded if encoded is not None else encode_pairs(pairs, tokenizer)
    measured, r_w, r_l = heldout_metrics(model, encoded, tokenizer.pad_id)
    true_w = torch.tensor([world.true_reward(p["prompt"], p["chosen"]) for p in pairs])
    true_l = torch.tensor([world.true_reward(p["prompt"], p["rejected"]) for p in pairs])

    # the distinct responses of these pairs, with their learned and true rewards
    seen: dict[tuple[str, str], tuple[float, float]] = {}
    for p, rw, rl, tw, tl in zip(pairs, r_w.tolist(), r_l.tolist(), true_w.tolist(), true_l.tolist()):
        seen[(p["prompt"], p["chosen"])] = (rw, tw)
        seen[(p["prompt"], p["rejected"])] = (rl, tl)
    keys = list(seen)
    learned = np.array([seen[k][0] for k in keys])
    true = np.array([seen[k][1] for k in keys])
    prompts = np.array([k[0] for k in keys])
    centred_learned, centred_true = learned.copy(), true.copy()
    for prompt in set(prompts.tolist()):
        m = prompts == prompt
        centred_learned[m] -= learned[m].mean()
        centred_true[m] -= true[m].mean()

    true_gap = true_w - true_l
    decided = true_gap != 0  # pairs where r* prefers one answer
    return {
        **measured,
        "bayes_optimal_accuracy": world.bayes_optimal_accuracy(pairs),
        "true_reward_loss": reward_model_loss(true_w, true_l).item(),
        "true_order_accuracy": ((r_w - r_l).sign() == true_gap.sign())[decided].float().mean().item(),
        "pearson": pearson(learned, true),
        "pearson_within_prompt": pearson(centred_learned, centred_true),
        "responses": (learned.tolist(), true.tolist()),
    }


@stage("reward_model")
def main(config: RewardModelConfig) -> dict:
    """Train r_phi from the SFT checkpoint on preference pairs; save ``out/reward_model/model.pt``.

    ``--model`` takes the trunk from a Hugging Face folder; ``--data`` trains on your pairs
    (``{"prompt", "chosen", "rejected"}``), and then the held-out metrics are those of
    ``--eval-data`` without r*: E4 loss, accuracy and margin.
    """
    generator = seed_everything(config.seed)  # pair order
    device = resolve_device(config.device)
    world = ToyWorld(WorldConfig(seed=config.world_seed))
    policy, tok = load_model(input_path(config, "init"), config.model_impl, device, world.tokenizer)
    model = RewardModel.from_policy(policy)
    del policy
    block = model.config.block_size

    reports, held_out = {}, None
    if config.data:  # refused here, before the run folder exists, if a row is bad
        data, reports["data"] = preference_data(config.data, tok, block, config.max_length, truncate=False)
        train_pairs = list(zip(data["prompt"], data["chosen"], data["rejected"]))
        held_out_encoded = None
        if config.eval_data:
            data, reports["eval_data"] = preference_data(config.eval_data, tok, block, config.max_length,
                                                         truncate=False)
            held_out_encoded = list(zip(data["prompt"], data["chosen"], data["rejected"]))
        for r in reports.values():
            distributed.print_main(r.describe())
    run = Run(config, "reward_model")
    if not config.data:
        train_pairs = encode_pairs(world.preference_dataset(config.num_pairs, seed=config.seed), tok)
        held_out = world.preference_dataset(config.eval_pairs, seed=config.seed + 10_000)
        held_out_encoded = encode_pairs(held_out, tok)

    last_eval: dict = {}

    def held_out_metrics() -> dict:
        last_eval.clear()
        if held_out is not None:  # the toy world: r* too
            last_eval.update(evaluate(model, world, tok, held_out, held_out_encoded))
        elif held_out_encoded is not None:
            last_eval.update(heldout_metrics(model, held_out_encoded, tok.pad_id)[0])
        return {k: v for k, v in last_eval.items() if k != "responses"}

    before = held_out_metrics()  # the SFT trunk and a random head: about chance
    optimizer = make_optimizer(model, config)
    parallel = distributed.wrap(model, find_unused_parameters=True)  # DDP under torchrun; the LM head is unused
    distributed.check_divisible(config.batch_size, config.grad_accum)
    batches = InfiniteMinibatches(len(train_pairs), config.batch_size, generator)

    def loss_of(rows: list[int]):
        with autocast(device, config.dtype):
            r_w, r_l = pair_rewards(model, [train_pairs[i] for i in rows], tok.pad_id, device,
                                    config.share_prompt)  # (B,), (B,)
        bt_loss = reward_model_loss(r_w, r_l)  # E4
        loss = bt_loss
        if config.center_rewards_coefficient > 0:  # pins the level E3 cannot see; no E3 probability changes
            loss = loss + config.center_rewards_coefficient * centring_penalty(r_w, r_l)
        return loss, len(rows), config.batch_size, (r_w.detach(), r_l.detach(), bt_loss.detach(), len(rows))

    model.train()
    bar = run.loop(config.steps, "reward model", model=model, optimizer=optimizer, batches=batches,
                   last_eval=last_eval)
    for step in bar:
        micro = distributed.split(distributed.local_share(next(batches).tolist()), config.grad_accum)
        grad_norm, parts = accumulated_step(model, parallel, optimizer, micro, loss_of, step, config)
        r_w, r_l = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        bt_loss = distributed.global_mean([(p[2], p[3]) for p in parts], config.batch_size)
        last = step == config.steps - 1
        evaluate_now = step % config.eval_every == 0 or last
        if step % config.log_every == 0 or evaluate_now:
            with torch.no_grad():
                metrics = distributed.mean_over_ranks({
                    "loss": bt_loss, "accuracy": (r_w > r_l).float().mean().item(),
                    "margin": (r_w - r_l).mean().item(), "rewards/chosen": r_w.mean().item(),
                    "rewards/rejected": r_l.mean().item()})
                metrics.update(loss=bt_loss, grad_norm=grad_norm, lr=optimizer.param_groups[0]["lr"])
            if step == 0 and not last:  # the step-0 metrics are of the model before its first update, like `before`
                metrics.update(before)
            elif evaluate_now:
                metrics.update(held_out_metrics())
                model.train()
            run.log(step, **metrics)
            bar.set_postfix(loss=f"{bt_loss:.3f}", acc=f"{metrics['accuracy']:.2f}")

    model.eval()
    save_reward_model(model, tok, run.dir)
    final = dict(last_eval)  # the evaluation after the last update
    if held_out is None:  # your own data: what can be measured without r*
        run.plot({"loss": "training batch", "heldout_loss": "held-out pairs"}, "loss.png", "reward-model loss (E4)",
                 ylabel="loss, nats per pair", xlabel="optimizer step",
                 caption="ln 2 = 0.693 is chance; your labels' noise sets how far below it the held-out loss can go.")
        run.plot({"accuracy": "training batch", "heldout_accuracy": "held-out pairs"}, "accuracy.png",
                 "preference accuracy: r_phi(chosen) > r_phi(rejected)", ylabel="fraction of pairs",
                 xlabel="optimizer step", caption="Held-out pairs are the honest measure; training batches are "
                 "the pairs being fit.")
        summary = {**final, "heldout_accuracy_before": before.get("heldout_accuracy"),
                   "loss": run.rows[-1]["loss"], "seconds": run.rows[-1]["time"],
                   **{k: r.as_dict() for k, r in reports.items()}}
        run.finish(summary)
        return summary
    learned, true = final.pop("responses")
    bayes = final["bayes_optimal_accuracy"]
    run.plot({"loss": "training batch", "heldout_loss": "held-out pairs"}, "loss.png", "reward-model loss (E4)",
             hlines={f"E4 of the true r* on the held-out pairs ({final['true_reward_loss']:.3f})":
                     final["true_reward_loss"]}, ylabel="loss, nats per pair", xlabel="optimizer step",
             caption="The held-out loss falls towards that of the hidden reward itself: the labels' own noise.")
    steps, batch_accuracy = run.series("accuracy")
    window = max(1, 100 // config.log_every)
    run.plot_panels("accuracy.png", [{
        "title": "preference accuracy: r_phi(chosen) > r_phi(rejected)", "xlabel": "optimizer step",
        "ylabel": "fraction of pairs", "metrics": {"heldout_accuracy": f"held-out pairs ({config.eval_pairs})"},
        "curves": [(steps, running_mean(batch_accuracy, window),
                    f"training batches of {config.batch_size} pairs, mean of the last {window} logged", "-")],
        "hlines": [(bayes, f"Bayes-optimal accuracy of the labels, {bayes:.3f}")]}],
        caption="Held-out accuracy rises towards the ceiling no model can pass on these noisy labels; "
                "training pairs are the ones being fit, so their accuracy can pass it.")
    run.plot({"pearson": "held-out responses"}, "pearson.png", "Pearson(r_phi, r*): did it learn the hidden reward?",
             ylabel="correlation", xlabel="optimizer step",
             caption="1 would be the hidden reward up to scale and shift; the labels never show r* itself.")
    plot_scatter(run.dir / "scatter.png", true, learned, "hidden reward r*(x, y)", "learned reward r_phi(x, y)",
                 f"{len(true)} held-out responses: Pearson {final['pearson']:.3f}", jitter=0.06,
                 caption="Each point is a review; r* takes few values, so they are spread a little sideways.")
    summary = {**final, "accuracy_vs_bayes": final["heldout_accuracy"] / bayes,
               "heldout_accuracy_before": before["heldout_accuracy"], "pearson_before": before["pearson"],
               "num_heldout_responses": len(true), "seconds": run.rows[-1]["time"]}
    run.finish(summary)
    return summary
