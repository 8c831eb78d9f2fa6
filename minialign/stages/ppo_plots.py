"""The figures of ``minialign ppo``: reward.png, kl.png, objective.png, ppo_stats.png, losses.png."""

from __future__ import annotations

from ..runtime.plots import standardise
from ..runtime.run import Run


def plots(run: Run, config, sft_true_reward: float | None) -> None:
    """The stage's figures (drawn by ``runtime.plots.plot_panels``), one panel per unit: r*, r_phi beside r*,
    the KL, PPO's statistics, losses. With your own prompts (no hidden r*) the reward plot is r_phi's."""
    x = f"PPO iteration (a rollout of {config.batch_size} responses)"
    r_star = "hidden reward r* (-7 malformed, up to +6)"
    steps, score = run.series("score")
    _, true = run.series("rollout/true_reward")
    if sft_true_reward is None:
        run.plot({"score": "mean r_phi of the rollout"}, "reward.png", "learned reward r_phi of the rollouts",
                 ylabel="reward-model units per response", xlabel=x,
                 caption="What PPO maximises, before the KL penalty; your prompts have no hidden reward to check it by.")
    else:
        run.plot_panels("reward.png", [
            {"title": "hidden reward r* of the policy's reviews", "xlabel": x, "ylabel": r_star,
             "metrics": {"rollout/true_reward": "each rollout (noisy)",
                         "true_reward": "fresh samples of every review prompt"},
             "hlines": [(sft_true_reward, f"SFT model, {sft_true_reward:.3f}")]},
            {"title": "learned r_phi beside hidden r*, each standardised", "xlabel": x,
             "ylabel": "standard deviations from the run's mean",
             "curves": [(steps, standardise(score), "learned r_phi (what PPO maximises)"),
                        (steps, standardise(true), "hidden r*")]}],
            caption="r_phi's scale is arbitrary (E3 sees only differences), so the right panel standardises both: "
                    "reward hacking would show as r_phi rising while r* falls.")
    run.plot({"kl": "KL(pi_theta || pi_ref) of the rollout"}, "kl.png", "distance from the SFT model (E2's penalty)",
             ylabel="KL, nats per response", xlabel=x,
             caption="Each response pays beta times this in its reward: the KL stays bounded as the reward rises.")
    run.plot({"objective": "r_phi - beta KL of the rollout"}, "objective.png", "E2's objective on the rollouts",
             ylabel="reward-model units per response", xlabel=x,
             caption="What PPO maximises: the learned reward minus the KL penalty (E2).")
    run.plot_panels("ppo_stats.png", [
        {"title": "clipping (E5)", "metrics": {"clip_frac": "tokens whose clip binds"}, "xlabel": x,
         "ylabel": "fraction of response tokens"},
        {"title": "movement within an iteration", "metrics": {"approx_kl": "KL(pi_old || pi_theta), k3"},
         "xlabel": x, "ylabel": "KL, nats per token"},
        {"title": "policy entropy", "metrics": {"entropy": "entropy of pi_theta"}, "xlabel": x,
         "ylabel": "nats per token"},
        {"title": "critic", "metrics": {"explained_variance": "explained variance of the returns"},
         "xlabel": x, "ylabel": "1 - Var(R - V) / Var(R)"}],
        caption="At most a few percent of tokens clipped and a small KL per iteration: the updates stay near the "
                "sampler. The critic explains part of the returns.")
    run.plot_panels("losses.png", [
        {"title": "policy loss -L^CLIP (E5)", "metrics": {"pg_loss": "mean over minibatches"}, "xlabel": x,
         "ylabel": "whitened advantage units"},
        {"title": "value loss", "metrics": {"value_loss": "mean over minibatches"}, "xlabel": x,
         "ylabel": "squared reward units"}],
        caption="The policy loss hovers near 0 (whitened advantages have mean 0); the value loss follows "
                "how fast the returns move.")
