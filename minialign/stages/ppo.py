"""``minialign ppo``: the run around ``ppo.ppo_iteration`` (flags, run folder, loop, summary; the
figures in ``ppo_plots.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..runtime import distributed, files
from ..runtime.loading import load_policy_and_reference, load_reward_model, same_tokenizer, save_model
from ..ppo import AdaptiveKLController, PolicyWithValueHead, PPOHyperparams, ppo_iteration
from ..reward_model import RewardModel
from ..toyworld import ToyWorld, WorldConfig
from ..runtime.config import TrainConfig, check_range
from ..runtime.devices import resolve_device, seed_everything
from ..runtime.folders import input_path
from ..runtime.optim import gradient_update, make_optimizer
from ..runtime.run import Run
from ..runtime.stage import stage
from .ppo_plots import plots
from .rollout_tasks import ppo_task


@dataclass
class PPOConfig(PPOHyperparams, TrainConfig):
    """Align the SFT model with PPO and a value head against the learned reward model (E2, E5, E6).

    Reads OUT/sft/model.pt (or --init, or a --model folder; also pi_ref) and
    OUT/reward_model/model.pt (or --reward-model), and your prompts with --data. Writes OUT/ppo/:
    model.pt (the aligned policy; a model/ folder after --model), value_head.pt, metrics.jsonl,
    the plots, summary.json, status.json.

    ``steps`` counts PPO iterations (one rollout each); each iteration makes
    ``ppo_epochs * ceil(batch_size / minibatch_size)`` optimizer steps; the learning-rate
    schedule follows the iterations.
    """
    init: str = ""                      # policy to start from (and pi_ref); default out/sft/model.pt
    reward_model: str = ""              # default out/reward_model/model.pt
    steps: int = 60                     # PPO iterations (rollouts)
    batch_size: int = 32                # responses per rollout
    lr: float = 3e-4                    # AdamW's learning rate
    warmup_steps: int = 0               # iterations of linear warm-up
    min_lr_ratio: float = 1.0           # constant learning rate
    log_every: int = 1
    eval_every: int = 10                # iterations between review_eval measurements of r*
    eval_samples: int = 16              # samples per review prompt in those measurements
    final_eval_samples: int = 32        # samples per review prompt for the summary's r*

    INPUTS = {"init": "sft", "reward_model": "reward_model"}
    SPLITS = {"batch_size": False, "minibatch_size": True}  # rollouts over ranks; minibatches over micro-batches too
    ROWS_PER_STEP = None  # a rollout draws its prompts with replacement

    def validate(self) -> None:
        super().validate()
        check_range(self, "minibatch_size", 1, self.batch_size)
        for name in ("eval_every", "eval_samples", "final_eval_samples"):
            check_range(self, name, 1)


def _load_reward_model(path, impl: str, device, tokenizer) -> RewardModel:
    r"""The frozen $r_\phi$ of ``reward_model.py``; it must share the policy's tokenizer."""
    rm, rm_tok = load_reward_model(path, impl, device)
    if not same_tokenizer(rm_tok, tokenizer):
        raise ValueError(f"reward model {path} was trained with another tokenizer than the policy")
    return rm


@stage("ppo")
def main(config: PPOConfig) -> dict:
    """Train the SFT policy with PPO against the reward model; save ``out/ppo/model.pt``.

    ``--model`` starts the policy, pi_ref and the critic from a Hugging Face folder; ``--data``
    samples your prompts (``{"prompt"}``), and with no r* the plots show the reward model's score
    and the KL to pi_ref.
    """
    data_generator = seed_everything(config.seed)             # prompt picks and minibatch order (CPU)
    device = resolve_device(config.device)
    world = ToyWorld(WorldConfig(seed=config.world_seed))
    policy, reference, tok = load_policy_and_reference(config, device, world.tokenizer)  # pi_ref: the frozen SFT model
    reward_model = _load_reward_model(input_path(config, "reward_model"), config.model_impl, device, tok)
    task = ppo_task(world, tok, config, policy.config.block_size)  # the prompts and how they are measured
    actor_critic = PolicyWithValueHead(policy, config.shared_trunk).to(device)
    optimizer = make_optimizer(actor_critic, config)
    parallel = distributed.wrap(actor_critic)  # DDP under torchrun
    kl_ctl = AdaptiveKLController(config.beta, config.kl_target, config.kl_horizon)
    run = Run(config, "ppo")
    generator = distributed.sampling_generator(device, config.seed)  # this rank's share of the rollout

    before = task.evaluate(policy, config.final_eval_samples)  # the SFT model, measured as the final policy
    after = {}  # the last iteration's measurement (final_eval_samples per prompt), for the summary
    bar = run.loop(config.steps, "ppo", model=actor_critic, optimizer=optimizer, kl_ctl=kl_ctl,  # resume.pt's names
                   generator=generator, data_generator=data_generator)
    for step in bar:
        pick = torch.randint(len(task.train), (config.batch_size,), generator=data_generator).tolist()
        rows = [task.train[i] for i in distributed.local_share(pick)]  # this rank's share of the rollout
        update = gradient_update(actor_critic, parallel, optimizer, config, step)
        result = ppo_iteration(actor_critic, reference, reward_model, tok, [r["prompt_ids"] for r in rows], config,
                               kl_ctl.beta, generator, data_generator, update, config.dtype)
        completions = [tok.decode(y) for y in result.rollout.responses()]
        measured = task.measure(rows, completions, result.rollout.finished.tolist())  # r* of the rollout
        metrics = distributed.mean_over_ranks({**result.metrics, **measured})
        kl_ctl.update(metrics["kl"], config.batch_size)
        last = step == config.steps - 1
        if (step + 1) % config.eval_every == 0 or last:  # the last one is the summary's, with more samples
            evaluated = task.evaluate(policy, config.final_eval_samples if last else config.eval_samples)
            if last:
                after = evaluated
            metrics.update({k: v for k, v in evaluated.items() if k != "examples"})
        if step % config.log_every == 0 or (step + 1) % config.eval_every == 0 or last:
            run.log(step, **metrics)
        bar.set_postfix(score=f"{metrics['score']:.2f}",
                        true=f"{metrics.get('rollout/true_reward', float('nan')):.2f}", kl=f"{metrics['kl']:.2f}")

    save_model(policy, tok, run.dir)
    if run.writes:
        files.torch_save({"value_head": actor_critic.value_head.state_dict(),
                          "critic": None if actor_critic.critic is None else actor_critic.critic.state_dict()},
                         run.dir / "value_head.pt")
    plots(run, config, before.get("true_reward"))
    logged = run.rows
    last10 = [r["explained_variance"] for r in logged[-10:] if math.isfinite(r["explained_variance"])]
    summary = {
        "true_reward_before": before.get("true_reward"), "true_reward": after.get("true_reward"),
        "malformed_before": before.get("malformed"), "malformed": after.get("malformed"),
        "score_first": logged[0]["score"], "score_last": logged[-1]["score"],
        "kl_last": logged[-1]["kl"], "kl_max": max(r["kl"] for r in logged), "beta_last": logged[-1]["beta"],
        "explained_variance_last10": sum(last10) / len(last10) if last10 else float("nan"),
        "examples_before": before.get("examples"), "examples": after.get("examples"),
        "seconds": logged[-1]["time"], **{name: report.as_dict() for name, report in task.reports.items()},
    }
    run.finish(summary)
    return summary
