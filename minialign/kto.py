r"""KTO on unpaired examples: each example is one response marked desirable or undesirable, with no
pair. Read ``preference.py`` first: ``kto_loss`` (the value function against the reference point
$z_0$), ``kto_reference_point`` and ``kto_mismatched_index`` are there, with every other member of
DPO's family; this file holds what single examples add to them.

- ``unpair_preference_rows``: pairs -> TRL's unpaired rows ``{prompt, completion, label}``, so the
  toy world's pairs can be compared like for like (``minialign dpo --loss kto --kto-unpaired``);
- ``tokenize_unpaired``: those rows as token lists;
- ``kto_step``: one optimizer step on a batch of single examples, returning ``KTOStepResult``.

**Differs from KTO on pairs** (``dpo.dpo_step`` with ``preference.preference_loss``): a batch holds
desirable and undesirable examples in whatever proportion the draw gives, not one of each per
prompt. Checked in ``tests/equations/test_kto.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .data import collate
from .ops import inference, sequence_logps
from .preference import PreferenceHyperparams, kto_loss, kto_reference_point
from .runtime import distributed
from .runtime.devices import autocast


def unpair_preference_rows(rows: list[dict]) -> list[dict]:
    """Pairs ``[{"prompt", "chosen", "rejected"}]`` -> KTO's unpaired rows ``[{"prompt", "completion",
    "label"}]``: every chosen response as a desirable example (``label`` true), then every rejected
    one as an undesirable example, TRL's ``unpair_preference_dataset`` on the whole list (TRL does
    it in chunks of 1,000 pairs). Chosen first, then rejected: ``kto_mismatched_index`` then pairs
    each prompt with another pair's response, not with the other response of its own pair."""
    missing = [i for i, r in enumerate(rows) if not {"prompt", "chosen", "rejected"} <= set(r)]
    if missing:
        raise ValueError(f"preference pairs {missing[:5]} lack 'prompt', 'chosen' or 'rejected'")
    return ([{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in rows]
            + [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in rows])


def tokenize_unpaired(tok, rows: list[dict]) -> dict[str, list]:
    """``[{"prompt", "completion", "label"}]`` -> token lists ``{"prompt", "completion"}`` (completions
    end with EOS) and ``"desirable"``, the labels (``dpo.tokenize_pairs`` for single responses)."""
    return {"prompt": [tok.prompt(r["prompt"]) for r in rows], "completion": [tok.response(r["completion"]) for r in rows],
            "desirable": [bool(r["label"]) for r in rows]}


@dataclass
class KTOStepResult:
    """What one ``kto_step`` did, on this rank (``distributed.mean_over_ranks`` averages ``metrics``)."""
    loss: float                     # the batch's mean KTO loss over every rank's examples
    grad_norm: float                # before clipping
    chosen_rewards: torch.Tensor    # (B_D,) beta log(pi_theta / pi_ref) of this rank's desirable examples
    rejected_rewards: torch.Tensor  # (B_U,) likewise of its undesirable ones (B_D + B_U = B)
    chosen_logps: torch.Tensor      # (B_D,) log pi_theta(y | x) before the step
    rejected_logps: torch.Tensor    # (B_U,)
    reference_point: float          # z_0, the mean over this rank's micro-batches
    metrics: dict[str, float] = field(default_factory=dict)


def kto_step(policy, reference, tokenizer, examples: dict[str, list], rows: list[int], hp: PreferenceHyperparams,
             update, dtype: str = "float32", share_prompt: bool = True) -> KTOStepResult:
    r"""One optimizer step of KTO (``kto_loss``) on the unpaired examples ``rows`` (this rank's share).

    ``examples``: token lists ``{"prompt", "completion", "kl_completion"}`` and ``"desirable"`` (bools)
    of every example; ``kl_completion`` of example $i$ is the completion of example
    ``kto_mismatched_index``$[i]$, whose log-probs under $\pi_\theta$ (no gradient) and $\pi_{ref}$ give
    the batch's reference point $z_0$ (``kto_reference_point``). ``reference``: $\pi_{ref}$, or its
    log-probs precomputed, ``{"completion": (N,), "kl_completion": (N,)}``. ``update`` and ``dtype`` as
    in ``dpo.dpo_step``; ``hp``: ``beta``, ``desirable_weight``, ``undesirable_weight``.

    **Differs from KTO on pairs** (``dpo_step`` with ``preference_loss``): a batch is B single
    examples drawn without their pairs, desirable and undesirable in whatever proportion the draw
    gives; $z_0$ is estimated on each micro-batch, on this rank (TRL averages it over the ranks).
    """
    device = next(policy.parameters()).device
    block = policy.config.block_size

    def batch_of(micro, key):  # B rows (x_i, y_i) with y_i = examples[key][i]
        return collate([examples["prompt"][i] for i in micro], [examples[key][i] for i in micro],
                       tokenizer.pad_id, block, device)

    def logps_of(model, batch):  # E1, (B,)
        return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                              share_prompt=share_prompt)

    def reference_logps(batch, micro, key):
        if isinstance(reference, dict):  # precomputed
            return reference[key][torch.tensor(micro, device=device)]
        with autocast(device, dtype):  # no gradient: inference mode (``ops.inference``), as in dpo.dpo_step
            return inference(logps_of, reference, batch)

    def loss_of(micro: list[int]):
        batch, kl_batch = batch_of(micro, "completion"), batch_of(micro, "kl_completion")
        with autocast(device, dtype):
            logps = logps_of(policy, batch)                                          # (B,) log pi_theta(y | x)
        with autocast(device, dtype):
            kl_logps = inference(logps_of, policy, kl_batch)                         # (B,) mismatched, for z_0
        z0 = kto_reference_point(kl_logps, reference_logps(kl_batch, micro, "kl_completion"))
        desirable = torch.tensor([examples["desirable"][i] for i in micro], device=device)
        out = kto_loss(logps, reference_logps(batch, micro, "completion"), desirable, z0, hp.beta,
                       hp.desirable_weight, hp.undesirable_weight)
        stats = {"loss": out.loss.detach(), "chosen_rewards": out.chosen_rewards.detach(),
                 "rejected_rewards": out.rejected_rewards.detach(), "chosen_logps": logps[desirable].detach(),
                 "rejected_logps": logps[~desirable].detach(), "reference_point": out.reference_point}
        return out.loss, len(micro), len(rows) * distributed.world_size(), stats

    done = update(rows, loss_of)
    parts = done.extras
    total = len(rows) * distributed.world_size()
    loss = distributed.global_mean([(p["loss"], len(p["chosen_logps"]) + len(p["rejected_logps"])) for p in parts], total)
    r_w, r_l, pi_w, pi_l = (torch.cat([p[k] for p in parts]) for k in
                            ("chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps"))
    z0 = torch.stack([p["reference_point"] for p in parts]).mean().item()
    metrics = {"loss": loss, "reference_point": z0}
    # each class's means over every rank's examples of it; left out where the batch held none of a class
    n_w, n_l = distributed.sum_over_ranks(len(r_w)), distributed.sum_over_ranks(len(r_l))
    for name, n, r, pi in (("chosen", n_w, r_w, pi_w), ("rejected", n_l, r_l, pi_l)):
        if n:
            metrics[f"rewards/{name}"] = distributed.sum_over_ranks(r.sum().item()) / n
            metrics[f"logps/{name}"] = distributed.sum_over_ranks(pi.sum().item()) / n
    if n_w and n_l:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return KTOStepResult(loss, done.grad_norm, r_w, r_l, pi_w, pi_l, z0, metrics)
