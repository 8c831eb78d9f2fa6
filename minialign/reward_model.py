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
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import collate
from .model import GPT, GPTConfig, load_checkpoint
from .ops import align_responses, check_mask, response_hidden, upcast
from .runtime import distributed, files
from .runtime.config import Config, check_range
from .runtime.devices import autocast
from .tokenizer import Tokenizer, checkpoint_tokenizer


@dataclass
class RewardModelHyperparams(Config):
    """What E4 and one step need (``minialign reward-model`` adds the run's settings to these)."""
    center_rewards_coefficient: float = 0.01  # TRL's term c * E[(r_w + r_l)^2]; 0 = pure E4
    share_prompt: bool = True     # run x once for y_w and y_l (exact; ops.prefill)

    def validate(self) -> None:
        super().validate()
        check_range(self, "center_rewards_coefficient", 0)


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


# ----------------------------------------------------------------------------------------------
# one step: E4 (and the centring term) on a batch of pairs, one optimizer update
# ----------------------------------------------------------------------------------------------


@dataclass
class RewardModelStepResult:
    """What one ``reward_model_step`` did: the rewards of this rank's pairs before the update, E4
    over the whole batch, and the batch's metrics on this rank (``distributed.mean_over_ranks``
    averages them over the ranks)."""
    r_w: torch.Tensor               # (B,) r_phi(x, y_w) of this rank's pairs
    r_l: torch.Tensor               # (B,) r_phi(x, y_l)
    loss: float                     # E4 over the global batch (the centring term left out)
    grad_norm: float                # before clipping
    metrics: dict[str, float] = field(default_factory=dict)


def reward_model_step(model: RewardModel, pairs, hp: RewardModelHyperparams, update, pad_id: int,
                      dtype: str = "float32") -> RewardModelStepResult:
    r"""One optimizer step on E4 $+$ ``center_rewards_coefficient`` $\cdot\,\mathbb{E}[(r_w + r_l)^2]$
    over ``pairs``, the global batch of encoded pairs [(x, y_w, y_l)] (``encode_pairs``).

    This rank takes its share of the pairs (``distributed.local_share``; all of them in one
    process). ``update(rows, loss_of) -> Update`` (``runtime.optim.gradient_update``) makes the
    optimizer step from ``loss_of(micro) -> (mean loss, units, total units, stats)`` over
    ``rows``; it hides the optimizer, the schedule, ``--grad-accum`` and DDP. ``dtype`` is the
    autocast dtype ("float32": none).
    """
    device = next(model.parameters()).device

    def loss_of(micro: list[int]):  # one micro-batch: positions in ``pairs``
        with autocast(device, dtype):
            r_w, r_l = pair_rewards(model, [pairs[i] for i in micro], pad_id, device, hp.share_prompt)  # (b,), (b,)
        bt_loss = reward_model_loss(r_w, r_l)  # E4
        loss = bt_loss
        if hp.center_rewards_coefficient > 0:  # pins the level E3 cannot see; no E3 probability changes
            loss = loss + hp.center_rewards_coefficient * centring_penalty(r_w, r_l)
        return loss, len(micro), len(pairs), (r_w.detach(), r_l.detach(), bt_loss.detach(), len(micro))

    done = update(distributed.local_share(list(range(len(pairs)))), loss_of)
    r_w, r_l = torch.cat([e[0] for e in done.extras]), torch.cat([e[1] for e in done.extras])  # (B,), (B,)
    loss = distributed.global_mean([(e[2], e[3]) for e in done.extras], len(pairs))
    with torch.no_grad():
        metrics = {"accuracy": (r_w > r_l).float().mean().item(), "margin": (r_w - r_l).mean().item(),
                   "rewards/chosen": r_w.mean().item(), "rewards/rejected": r_l.mean().item()}
    return RewardModelStepResult(r_w, r_l, loss, done.grad_norm, metrics)
