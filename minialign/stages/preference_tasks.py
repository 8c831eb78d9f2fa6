"""What a preference stage (DPO and its family) trains on and how it measures its policy: the toy
world's pairs or your own ``--data`` file's, behind one interface, so that the runner has one path.

A task has
- ``train``: token lists ``{"prompt", "chosen", "rejected"}`` of the training pairs; for KTO also
  ``kl_chosen``, ``kl_rejected``: each prompt with the responses of another pair
  (``preference.kto_mismatched_index``), whose log-probs estimate KTO's reference point $z_0$.
  A task with ``unpaired`` True (KTO on single examples: a ``--data`` file of TRL's
  ``{prompt, completion, label}`` rows, or ``--kto-unpaired``, the toy world's pairs split) holds
  ``{"prompt", "completion", "desirable", "kl_completion"}`` instead, for ``kto.kto_step``;
- ``heldout``: pairs never trained on, or None (your data without ``--eval-data``); pairs for
  unpaired training data too (``heldout/accuracy`` orders pairs);
- ``reports``: what was read from each data file ({} in the toy world), for the summary;
- ``evaluate(policy, reference) -> dict``: what is known of the policy: r* and the malformed share
  of its sampled reviews where the toy world knows them, $\\mathrm{KL}(\\pi_\\theta\\Vert\\pi_{ref})$ on its
  own samples, and the held-out pairs ordered by the member's implicit reward (``heldout/accuracy``).
  ``reference()`` gives the reference model, loaded when it is asked for.
"""

from __future__ import annotations

import warnings

import torch

from ..runtime import distributed
from ..dpo import dpo_loss, pair_logps, tokenize_pairs
from ..kto import tokenize_unpaired, unpair_preference_rows
from ..preference import kto_mismatched_index, preference_loss
from ..runtime.config import check_max_new_tokens
from ..runtime.datafiles import DataError, preference_data, preference_format, unpaired_data
from ..runtime.files import ConfigError
from ..runtime.plots import plot_truth_and_kl
from .evaluate import review_eval, sampled_kl


class PreferenceTask:
    """The measurements every source of pairs shares; ``member`` is the family's hyperparameters
    (``preference.PreferenceHyperparams``), None for DPO itself."""
    heldout: dict | None = None
    world = None
    unpaired = False  # True: single examples for kto.kto_step, not pairs

    def __init__(self, tokenizer, config, member, block_size: int):
        self.tokenizer, self.config, self.member, self.block_size = tokenizer, config, member, block_size
        self.reports, self.ref_heldout = {}, None

    def add_mismatched_responses(self) -> None:
        """KTO: ``kl_chosen``/``kl_rejected`` of pair i are the responses of pair ``kto_mismatched_index``[i]
        (unpaired: ``kl_completion`` of example i is the completion of example ``kto_mismatched_index``[i])."""
        t = self.train
        index = kto_mismatched_index(len(t["prompt"])).tolist()
        for key in ("completion",) if self.unpaired else ("chosen", "rejected"):
            t["kl_" + key] = [t[key][j] for j in index]
            longest = max(len(x) + len(y) for x, y in zip(t["prompt"], t["kl_" + key]))
            if longest > self.block_size:
                raise ConfigError(f"--loss kto pairs each prompt with another {'example' if self.unpaired else 'pair'}'s "
                                  f"{key} response, and one such pair has {longest} tokens, more than the model's "
                                  f"context of {self.block_size}")

    def reference_logps(self, reference, train: bool) -> dict | None:
        """log pi_ref of the held-out pairs, kept here, and with ``train`` those of every training pair
        (and of KTO's mismatched ones), returned as ``dpo.dpo_step`` reads them: ``{"chosen": (N,), ...}``
        (unpaired: as ``kto.kto_step`` reads them, ``{"completion": (N,), "kl_completion": (N,)}``)."""
        c, t = self.config, self.train
        if self.heldout is not None:
            self.ref_heldout = pair_logps(reference, self.heldout, self.tokenizer.pad_id, device_of(reference),
                                          c.dtype, share_prompt=c.share_prompt)
        if not train:
            return None
        if self.unpaired:  # each example with its mismatched completion: the same prompt twice, as a pair's
            return dict(zip(("completion", "kl_completion"), pair_logps(
                reference, {"prompt": t["prompt"], "chosen": t["completion"], "rejected": t["kl_completion"]},
                self.tokenizer.pad_id, device_of(reference), c.dtype, share_prompt=c.share_prompt)))
        table = {}
        for k in ("", "kl_") if "kl_chosen" in t else ("",):
            table[k + "chosen"], table[k + "rejected"] = pair_logps(
                reference, {"prompt": t["prompt"], "chosen": t[k + "chosen"], "rejected": t[k + "rejected"]},
                self.tokenizer.pad_id, device_of(reference), c.dtype, share_prompt=c.share_prompt)
        return table

    def check_class_weights(self) -> None:
        """Unpaired KTO: warn, as TRL does, where lambda_D n_D / (lambda_U n_U) leaves [1, 4/3], the
        paper's advice (TRL cites its eq. 8) for n_D desirable and n_U undesirable training examples."""
        c, labels = self.config, self.train["desirable"]
        n_d, n_u = sum(labels), len(labels) - sum(labels)
        ratio = c.desirable_weight * n_d / (c.undesirable_weight * n_u)
        if not 1 <= ratio <= 4 / 3:
            warnings.warn(f"--loss kto: {n_d} desirable and {n_u} undesirable examples with --desirable-weight "
                          f"{c.desirable_weight:g} and --undesirable-weight {c.undesirable_weight:g} give "
                          f"lambda_D n_D / (lambda_U n_U) = {ratio:.3g}, outside the paper's [1, 4/3]: e.g. "
                          f"--desirable-weight {c.undesirable_weight * n_u / n_d:.3g} brings it to 1", stacklevel=2)

    def truth(self, policy) -> dict:
        return {}

    def plot(self, run, x: str, before: dict) -> None:  # your own data: what can be measured without r*
        run.plot({"kl": "KL(pi_theta || pi_ref), sampled"}, "kl.png", "distance from the reference",
                 ylabel="KL, nats per response", xlabel=x,
                 caption="What DPO never sees: how far the policy moved from the reference on its own samples.")
        run.plot({"heldout/accuracy": "held-out pairs"}, "accuracy.png", "implicit-reward accuracy (E10)",
                 ylabel="fraction of pairs with r_w > r_l", xlabel=x, ylim=(0, 1),
                 caption="Pairs it never trained on, ordered by the implicit reward like their labels (ties count half).")

    def summary(self, before: dict, after: dict) -> dict:
        return {name: report.as_dict() for name, report in self.reports.items()}

    def heldout_accuracy(self, policy) -> float:
        """The fraction of held-out pairs whose implicit reward orders them like their label (a tie counts half)."""
        c = self.config
        pi_w, pi_l = pair_logps(policy, self.heldout, self.tokenizer.pad_id, device_of(policy), c.dtype,
                                share_prompt=c.share_prompt)
        ref_w, ref_l = self.ref_heldout or (None, None)
        if self.member is None or self.member.loss == "kto":  # E10: DPO's implicit reward, and KTO's
            _, r_w, r_l = dpo_loss(pi_w, pi_l, ref_w, ref_l, c.beta)
        else:
            n_w, n_l = (torch.tensor([len(y) for y in self.heldout[k]], device=pi_w.device)
                        for k in ("chosen", "rejected"))
            _, r_w, r_l = preference_loss(self.member, pi_w, pi_l, ref_w, ref_l, n_w, n_l)[:3]
        # a tie (as at the start, where every implicit reward of DPO is 0) counts as half right
        return ((r_w > r_l).float() + 0.5 * (r_w == r_l).float()).mean().item()

    def evaluate(self, policy, reference) -> dict:
        c = self.config
        policy.eval()
        out = self.truth(policy)
        if self.kl_prompts:
            out["kl"] = sampled_kl(policy, reference(), self.tokenizer, self.kl_prompts, c.eval_samples_per_prompt,
                                   c.max_new_tokens, seed=c.seed + 1, share_prompt=c.share_prompt)
        if self.heldout is not None:
            out["heldout/accuracy"] = self.heldout_accuracy(policy)
        policy.train()
        if "examples" in out:
            out["examples"] = out.pop("examples")
        return out


def device_of(model) -> torch.device:
    return next(model.parameters()).device


class ToyPairs(PreferenceTask):
    """The toy world's pairs, labelled by Bradley-Terry with its hidden r*; r* scores the policy's reviews."""

    def __init__(self, world, tokenizer, config, member, block_size: int):
        super().__init__(tokenizer, config, member, block_size)
        self.world = world
        self.kl_prompts = world.review_prompts()  # sampled to measure r* and the KL
        check_max_new_tokens(config, [tokenizer.prompt(p) for p in self.kl_prompts], block_size)
        self.train = self.training_data(world.preference_dataset(config.num_pairs, seed=config.seed))
        self.heldout_rows = world.preference_dataset(config.eval_pairs, seed=config.seed + 10_000)
        self.heldout = tokenize_pairs(tokenizer, self.heldout_rows)

    def training_data(self, rows: list[dict]) -> dict:
        return tokenize_pairs(self.tokenizer, rows)

    def truth(self, policy) -> dict:
        c = self.config
        ev = review_eval(policy, self.tokenizer, self.world, c.eval_samples_per_prompt, seed=c.seed,
                         max_new_tokens=c.max_new_tokens)
        return {"true_reward": ev["true_reward"], "malformed": ev["malformed"], "examples": ev["examples"]}

    def summary(self, before: dict, after: dict) -> dict:
        return {"true_reward_before": before["true_reward"], "true_reward": after["true_reward"],
                "malformed_before": before["malformed"], "malformed": after["malformed"],
                "bayes_optimal_accuracy": self.world.bayes_optimal_accuracy(self.heldout_rows),
                "examples": after["examples"]}

    def plot(self, run, x: str, before: dict) -> None:
        truth = {"title": "hidden reward of the policy's samples", "ylabel": "hidden reward r* (-7 malformed, up to +6)",
                 "metrics": {"true_reward": "mean r* of sampled reviews"}}
        plot_truth_and_kl(run, x, truth, before["true_reward"],
                          f"What DPO never sees, measured on {self.config.eval_samples_per_prompt} samples per review "
                          "prompt: the hidden reward it gained, and the KL it paid for it.")


class ToyUnpaired(ToyPairs):
    """``--kto-unpaired``: the toy world's pairs split into unpaired examples, each chosen response
    desirable and each rejected one undesirable (``kto.unpair_preference_rows``), for KTO on
    single examples beside KTO on the same pairs; r* scores the policy as for pairs."""
    unpaired = True

    def training_data(self, rows: list[dict]) -> dict:
        return tokenize_unpaired(self.tokenizer, unpair_preference_rows(rows))


class PairFile(PreferenceTask):
    """Your pairs (``--data``, held out: ``--eval-data``); refused here, before the run folder exists, if a row is bad."""

    def __init__(self, tokenizer, config, member, block_size: int):
        super().__init__(tokenizer, config, member, block_size)
        self.train = self.read("data")
        if config.eval_data:
            self.heldout = self.read("eval_data")
        # KL(pi || pi_ref) is measured on samples for a few distinct prompts that leave room to answer
        fits = [x for x in (self.heldout or self.train)["prompt"] if len(x) + config.max_new_tokens <= block_size]
        self.kl_prompts = list({tuple(x): x for x in fits}.values())[:8]

    def read(self, name: str) -> dict:
        pairs, self.reports[name] = preference_data(getattr(self.config, name), self.tokenizer, self.block_size,
                                                    self.config.max_length)
        distributed.print_main(self.reports[name].describe())
        return pairs


class UnpairedFile(PairFile):
    """Your unpaired examples (``--data`` rows ``{prompt, completion, label}``, TRL's KTO format) for
    ``--loss kto``; held out (``--eval-data``): pairs, as for the other members."""
    unpaired = True

    def read(self, name: str) -> dict:
        if name == "eval_data":
            return super().read(name)
        examples, self.reports[name] = unpaired_data(self.config.data, self.tokenizer, self.block_size,
                                                     self.config.max_length)
        distributed.print_main(self.reports[name].describe() + f" ({sum(examples['desirable'])} desirable)")
        return examples


def preference_task(world, tokenizer, config, member, block_size: int) -> PreferenceTask:
    kto = member is not None and member.loss == "kto"
    if config.data and preference_format(config.data) == "unpaired":
        if not kto:
            raise DataError(f"{config.data}: its rows are unpaired examples {{prompt, completion, label}} (TRL's KTO "
                            f"format), which only --loss kto reads; --loss {config.loss} needs pairs "
                            f"{{prompt, chosen, rejected}}")
        task = UnpairedFile(tokenizer, config, member, block_size)
    elif config.data:
        task = PairFile(tokenizer, config, member, block_size)
    else:
        task = (ToyUnpaired if config.kto_unpaired else ToyPairs)(world, tokenizer, config, member, block_size)
    if kto:
        task.add_mismatched_responses()
    if task.unpaired:
        task.check_class_weights()
    return task
