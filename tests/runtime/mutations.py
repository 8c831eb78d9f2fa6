"""The mutation pass: is every formula guarded by a test that fails when the formula is wrong?

Each mutation below breaks one formula of an algorithm file in a small way (a flipped sign, a
dropped term, a sum for a mean, a shift off by one), writes it into the source, runs that file's
mirrored test file in ``tests/equations/`` (``-m "not slow"``) and puts the source back. A mutation
the tests do not catch is a formula no test guards.

    python tests/runtime/mutations.py                 # every mutation, about 6 minutes on 2 loaded cores
    python tests/runtime/mutations.py --only grpo,E5  # those whose file or description contains "grpo" or "E5"
    python tests/runtime/mutations.py --list          # the list, nothing run

The source is restored after every mutation, also on Ctrl-C; the script refuses to start if a
file it mutates has uncommitted changes (so a restore can never lose your work). Not collected
by pytest (the name does not start with ``test_``): it runs pytest itself, once per mutation.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EQUATIONS = ROOT / "tests" / "equations"     # where a formula's guard is: the hand-computed tests
RUNTIME = ROOT / "tests" / "runtime"         # where a stage runner's guard is (a mutation of stages/*.py)


def test_path(file: str, test_file: str) -> Path:
    """The test file that guards a mutation of ``minialign/<file>``: an equation test for the reading
    list, a runtime test for a stage runner."""
    return (RUNTIME if file.startswith("stages/") else EQUATIONS) / test_file

# (file, original text (must occur exactly once), mutated text, what is broken, its test file: test_path)
MUTATIONS = [
    # ops.py: the shared math
    ("ops.py", "F.log_softmax(upcast(logits) / temperature, dim=-1)", "F.log_softmax(upcast(logits), dim=-1)",
     "token_logps ignores the temperature", "test_ops.py"),
    ("ops.py", "return token_logps(logits[:, :-1], input_ids[:, 1:], temperature)",
     "return token_logps(logits[:, 1:], input_ids[:, 1:], temperature)",
     "model_token_logps: logits one position late (off-by-one shift)", "test_ops.py"),
    ("ops.py", "return masked_sum(logps, response_mask[:, 1:], dim=1)",
     "return masked_sum(logps, response_mask[:, :-1], dim=1)",
     "sequence_logps (plain forward): response mask not shifted with the targets", "test_ops.py"),
    ("ops.py", "x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))", "pass",
     "masked_sum ignores the mask", "test_ops.py"),
    ("ops.py", "return masked_sum(x, mask, dim) / count", "return masked_sum(x, mask, dim) / mask.shape[-1]",
     "masked_mean divides by the width, not the token count", "test_ops.py"),
    ("ops.py", "var = var * n / (n - 1)", "var = var", "masked_var: the biased variance", "test_ops.py"),
    ("ops.py", "whitened = (x - mean) * torch.rsqrt(var + eps)", "whitened = x * torch.rsqrt(var + eps)",
     "masked_whiten does not subtract the mean", "test_ops.py"),
    ("ops.py", "return float(1 - masked_var(returns - values, mask) / var_r)",
     "return float(1 - masked_var(returns, mask) / masked_var(values, mask))",
     "explained variance from the wrong variances", "test_ops.py"),
    ("ops.py", "    return logp - logq\n", "    return logq - logp\n", "k1 with its sign flipped", "test_ops.py"),
    ("ops.py", "return 0.5 * (logp - logq) ** 2", "return (logp - logq) ** 2", "k2 without its 1/2", "test_ops.py"),
    ("ops.py", "log_r = logq - logp", "log_r = logp - logq", "k3 of the other direction (p/q for q/p)",
     "test_ops.py"),
    ("ops.py", "return torch.exp(log_r) - 1 - log_r", "return torch.exp(log_r) - log_r", "k3 without its -1",
     "test_ops.py"),
    ("ops.py", "return -torch.where(p > 0, p * logp, 0.0).sum(-1)", "return torch.where(p > 0, p * logp, 0.0).sum(-1)",
     "entropy with its sign flipped", "test_ops.py"),
    ("ops.py", "return -torch.where(p > 0, p * logp, 0.0).sum(-1)", "return -(p * logp).sum(-1)",
     "entropy's 0 * -inf left as NaN", "test_ops.py"),
    # reward_model.py: E3, E4, the reward read at the EOS
    ("reward_model.py", "return torch.sigmoid(upcast(r_w) - upcast(r_l))  # E3",
     "return torch.sigmoid(upcast(r_l) - upcast(r_w))  # E3", "E3 with chosen and rejected swapped",
     "test_reward_model.py"),
    ("reward_model.py", "return torch.sigmoid(upcast(r_w) - upcast(r_l))  # E3",
     "return torch.sigmoid(upcast(r_w))  # E3", "E3 without r_l", "test_reward_model.py"),
    ("reward_model.py", "return -F.logsigmoid(margin).mean()  # E4", "return -F.logsigmoid(margin).sum()  # E4",
     "E4: sum over pairs instead of the mean", "test_reward_model.py"),
    ("reward_model.py", "return -F.logsigmoid(margin).mean()  # E4", "return F.logsigmoid(margin).mean()  # E4",
     "E4 with its sign flipped", "test_reward_model.py"),
    ("reward_model.py", "return -F.logsigmoid(margin).mean()  # E4",
     "return -torch.log(torch.sigmoid(margin)).mean()  # E4", "E4 as log(sigmoid(.)): -inf for large gaps",
     "test_reward_model.py"),
    ("reward_model.py", "return T - 1 - real.flip(1).long().argmax(dim=1)  # (B,)",
     "return real.long().argmax(dim=1)  # (B,)", "r_phi read at the first real token, not the last",
     "test_reward_model.py"),
    ("reward_model.py", "return T - 1 - real.flip(1).long().argmax(dim=1)  # (B,)",
     "return T - 2 - real.flip(1).long().argmax(dim=1)  # (B,)", "r_phi read one token before the EOS",
     "test_reward_model.py"),
    ("reward_model.py", "return ((upcast(r_w) + upcast(r_l)) ** 2).mean()",
     "return ((upcast(r_w) - upcast(r_l)) ** 2).mean()",
     "centring term on the gap (it would fight E4) instead of the level", "test_reward_model.py"),
    ("reward_model.py", "return ((upcast(r_w) + upcast(r_l)) ** 2).mean()",
     "return ((upcast(r_w) + upcast(r_l)) ** 2).sum()", "centring term summed over pairs, not averaged",
     "test_reward_model.py"),
    # dpo.py: E7, E8, E9, E10
    ("dpo.py", "return torch.softmax(torch.log(ref_probs) + rewards / beta, dim=0)",
     "return torch.softmax(torch.log(ref_probs) + rewards * beta, dim=0)", "E7 with r * beta for r / beta",
     "test_dpo.py"),
    ("dpo.py", "return torch.softmax(torch.log(ref_probs) + rewards / beta, dim=0)",
     "return torch.softmax(rewards / beta, dim=0)", "E7 without pi_ref", "test_dpo.py"),
    ("dpo.py", "return torch.logsumexp(torch.log(ref_probs) + rewards / beta, dim=0)",
     "return torch.logsumexp(rewards / beta, dim=0)", "log Z without pi_ref", "test_dpo.py"),
    ("dpo.py", "return beta * (torch.log(pi_star) - torch.log(ref_probs))  # E8",
     "return torch.log(pi_star) - torch.log(ref_probs)  # E8", "E8 without beta", "test_dpo.py"),
    ("dpo.py", "return beta * (torch.log(pi_star) - torch.log(ref_probs))  # E8",
     "return beta * (torch.log(ref_probs) - torch.log(pi_star))  # E8", "E8 with the ratio upside down",
     "test_dpo.py"),
    ("dpo.py", "chosen_rewards = beta * (pi_w - ref_w)", "chosen_rewards = (pi_w - ref_w)",
     "E10: r_w without beta", "test_dpo.py"),
    ("dpo.py", "chosen_rewards = beta * (pi_w - ref_w)", "chosen_rewards = beta * (pi_w + ref_w)",
     "E10: r_w adds log pi_ref instead of subtracting it", "test_dpo.py"),
    ("dpo.py", "rejected_rewards = beta * (pi_l - ref_l)", "rejected_rewards = beta * (pi_l - ref_w)",
     "E10: r_l against the chosen response's reference", "test_dpo.py"),
    ("dpo.py", "loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()",
     "loss = -F.logsigmoid(chosen_rewards - rejected_rewards).sum()", "E9: sum over pairs instead of the mean",
     "test_dpo.py"),
    ("dpo.py", "loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()",
     "loss = -F.logsigmoid(rejected_rewards - chosen_rewards).mean()", "E9 with chosen and rejected swapped",
     "test_dpo.py"),
    ("dpo.py", "weight = beta * torch.sigmoid(r_l - r_w) / r_w.numel()",
     "weight = beta * torch.sigmoid(r_w - r_l) / r_w.numel()", "the analytic gradient's weight reversed",
     "test_dpo.py"),
    ("dpo.py", "return logps[:B], logps[B:]", "return logps[B:], logps[:B]",
     "chosen_rejected_logps returns the halves swapped", "test_dpo.py"),
    # stages/evaluate.py: the KL to the reference, measured on the policy's own samples beside training
    ("stages/evaluate.py", "return masked_sum(logp - logq, rollout.response_mask, dim=1).mean().item()",
     "return masked_sum(logq - logp, rollout.response_mask, dim=1).mean().item()",
     "sampled_kl with its sign flipped", "test_evaluate.py"),
    # ppo.py: E2/E6 per-token rewards, GAE, E6's r - V(x), E5, the value loss
    ("ppo.py", "rewards = -beta * kl ", "rewards = beta * kl ", "per-token KL penalty with its sign flipped",
     "test_ppo.py"),
    ("ppo.py", "last = last_token_index(mask)  ", "last = mask.long().argmax(1)  ",
     "r_phi paid at the first response token, not the EOS", "test_ppo.py"),
    ("ppo.py", "delta = rewards[:, t] + gamma * next_value - values[:, t]",
     "delta = rewards[:, t] + next_value - values[:, t]", "GAE's TD error without gamma", "test_ppo.py"),
    ("ppo.py", "adv = delta + gamma * lam * next_adv", "adv = delta + lam * next_adv", "GAE without gamma in the decay",
     "test_ppo.py"),
    ("ppo.py", "next_value = torch.where(m[:, t], values[:, t], zero)", "next_value = values[:, t]",
     "GAE bootstraps from the value of a padding column", "test_ppo.py"),
    ("ppo.py", "returns = torch.where(m, advantages + values, torch.zeros_like(values))",
     "returns = torch.where(m, advantages, torch.zeros_like(values))", "GAE returns without + V",
     "test_ppo.py"),
    ("ppo.py", "first = m.long().argmax(1)  ", "first = m.long().argmax(1) + 1  ",
     "E6: V(x) read one token late (off by one)", "test_ppo.py"),
    ("ppo.py", "advantages = torch.where(m, r - v_x[:, None], torch.zeros_like(values))",
     "advantages = torch.where(m, r - values, torch.zeros_like(values))", "E6: A = r - V(s_t) per token, not r - V(x)",
     "test_ppo.py"),
    ("ppo.py", "returns = torch.where(m, r, torch.zeros_like(values))",
     "returns = torch.where(m, r - v_x[:, None], torch.zeros_like(values))", "E6: value target r - V(x), not r",
     "test_ppo.py"),
    ("ppo.py", "surrogate = torch.minimum(unclipped, clipped)", "surrogate = torch.maximum(unclipped, clipped)",
     "E5: max for min", "test_ppo.py"),
    ("ppo.py", "clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages",
     "clipped = torch.clamp(ratio, 1 - clip_eps, 1 + 2 * clip_eps) * advantages", "E5: upper clip at 1 + 2 eps",
     "test_ppo.py"),
    ("ppo.py", "loss = -masked_mean(surrogate, mask)", "loss = masked_mean(surrogate, mask)",
     "E5: the loss maximised (sign)", "test_ppo.py"),
    ("ppo.py", "loss = -masked_mean(surrogate, mask)", "loss = -surrogate.mean()",
     "E5: padding tokens counted in the mean", "test_ppo.py"),
    ("ppo.py", "log_ratio = logps - old_logps.detach()", "log_ratio = logps - old_logps",
     "E5: gradient flows into pi_old", "test_ppo.py"),
    ("ppo.py", "\"approx_kl\": masked_mean((ratio - 1) - log_ratio, mask)", "\"approx_kl\": masked_mean(ratio - log_ratio, mask)",
     "approx_kl (k3) without its -1", "test_ppo.py"),
    ("ppo.py", "loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)",
     "loss = 0.5 * masked_mean(torch.minimum(err, err_clipped), mask)", "value loss: min for max",
     "test_ppo.py"),
    ("ppo.py", "loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)",
     "loss = masked_mean(torch.maximum(err, err_clipped), mask)", "value loss without its 1/2", "test_ppo.py"),
    ("ppo.py", "self.beta *= 1 + error * n / self.horizon", "self.beta *= 1 + error / self.horizon",
     "adaptive beta ignores the batch size n", "test_ppo.py"),
    ("ppo.py", "rewards = per_token_rewards(score, old_logps, ref_logps, mask, beta)",
     "rewards = per_token_rewards(score, old_logps, ref_logps, mask, 0.0)",
     "ppo_iteration: the rollout pays no KL penalty", "test_ppo.py"),
    ("ppo.py", "score = torch.where(finished, rm_score,", "score = torch.where(~finished, rm_score,",
     "ppo_iteration: r_phi read where there is no EOS", "test_ppo.py"),
    # grpo.py: E11, E12, E13, E14
    ("grpo.py", "baseline = r.mean(dim=1, keepdim=True)", "baseline = r.mean()",
     "E11: one baseline for the batch, not per group", "test_grpo.py"),
    ("grpo.py", "r = rewards.view(-1, group_size)", "r = rewards.view(group_size, -1).t()",
     "groups taken as interleaved rows, not consecutive", "test_grpo.py"),
    ("grpo.py", "advantages = advantages / (r.std(dim=1, keepdim=True) + eps)",
     "advantages = advantages / (r.std(dim=1, keepdim=True, correction=0) + eps)",
     "E12 with the population std (divides by G)", "test_grpo.py"),
    ("grpo.py", "advantages = advantages / (r.std(dim=1, keepdim=True) + eps)",
     "advantages = advantages / r.std(dim=1, keepdim=True)", "E12 without its epsilon", "test_grpo.py"),
    ("grpo.py", "advantages = torch.where(spread, advantages, torch.zeros_like(advantages))", "pass",
     "E12: no explicit 0 for an all-equal group", "test_grpo.py"),
    ("grpo.py", "per_token = torch.minimum(ratio * A, clipped * A)", "per_token = torch.maximum(ratio * A, clipped * A)",
     "E13: max for min", "test_grpo.py"),
    ("grpo.py", "clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)",
     "clipped = torch.clamp(ratio, 1 - 2 * clip_eps, 1 + clip_eps)", "E13: lower clip at 1 - 2 eps",
     "test_grpo.py"),
    ("grpo.py", "per_token = per_token - beta * kl", "per_token = per_token + beta * kl",
     "E13: KL term with its sign flipped", "test_grpo.py"),
    ("grpo.py", "kl = None if ref_logps is None else kl_k3(logps, ref_logps.to(dtype).detach())",
     "kl = None if ref_logps is None else kl_k3(ref_logps.to(dtype).detach(), logps)",
     "E13: k3 of the other direction", "test_grpo.py"),
    ("grpo.py", "objective = masked_mean(per_token, mask, dim=1).mean()", "objective = masked_mean(per_token, mask)",
     "E13 (answer_mean) as a token mean", "test_grpo.py"),
    ("grpo.py", "objective = masked_sum(per_token, mask) / mask.sum()",
     "objective = masked_sum(per_token, mask) / mask.shape[0]", "token_mean divides by answers", "test_grpo.py"),
    ("grpo.py", "objective = masked_sum(per_token, mask) / (mask.shape[0] * max_len)",
     "objective = masked_sum(per_token, mask) / max_len", "constant (Dr. GRPO) without B", "test_grpo.py"),
    ("grpo.py", "loss = -objective", "loss = objective", "E13: the objective minimised (sign)", "test_grpo.py"),
    ("grpo.py", "logps, old_logps = logps.to(dtype), old_logps.to(dtype).detach()",
     "logps, old_logps = logps.to(dtype), old_logps.to(dtype)", "E13: gradient flows into pi_old", "test_grpo.py"),
    ("grpo.py", "kl_k3(logps, ref_logps.to(dtype).detach())", "kl_k3(logps, ref_logps.to(dtype))",
     "E13: gradient flows into pi_ref", "test_grpo.py"),
    ("grpo.py", "return rewards - beta * kl  # E14", "return rewards + beta * kl  # E14",
     "E14: KL added to the reward", "test_grpo.py"),
    ("grpo.py", "return masked_sum(per_token, mask, dim=1)\n", "return masked_mean(per_token, mask, dim=1)\n",
     "E14: the answer's KL averaged over tokens, not summed", "test_grpo.py"),
    ("grpo.py", "reference.load_state_dict(policy.state_dict())", "pass",
     "E14's pi_ref <- pi_theta does nothing", "test_grpo.py"),
    ("grpo.py", "hp.clip_eps, hp.beta, hp.kl_in", "hp.clip_eps, 0.0, hp.kl_in",
     "grpo_iteration: E13's KL term dropped from the loss", "test_grpo.py"),
    ("grpo.py", "for _ in range(hp.inner_updates):", "for _ in range(1):",
     "grpo_iteration: one pass instead of inner_updates", "test_grpo.py"),
    # preference.py: the preference family, each a small change to E9; best_of_n.py
    ("preference.py", "losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)",
     "losses = -(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)",
     "cDPO: the flipped label's term with its sign flipped (rDPO's numerator)", "test_preference.py"),
    ("preference.py", "* -F.logsigmoid(-beta * h)) / (1 - 2 * eps)", "* -F.logsigmoid(-beta * h))",
     "rDPO without its 1 / (1 - 2 eps)", "test_preference.py"),
    ("preference.py", "losses = (h - 1 / (2 * beta)) ** 2", "losses = (h - 1 / beta) ** 2",
     "IPO's target margin 1/beta for 1/(2 beta)", "test_preference.py"),
    ("preference.py", "logps = [logps[0] / n_w, logps[1] / n_w, logps[2] / n_l, logps[3] / n_l]",
     "logps = [logps[0] / n_w, logps[1] / n_l, logps[2] / n_l, logps[3] / n_w]",
     "IPO mean: reference log-probs divided by the other response's length", "test_preference.py"),
    ("preference.py", "losses = -F.logsigmoid(r_w - r_l - gamma)", "losses = -F.logsigmoid(r_w - r_l + gamma)",
     "SimPO's margin with its sign flipped", "test_preference.py"),
    ("preference.py", "r_w = beta * pi_w / chosen_lengths.to(pi_w.dtype)", "r_w = beta * pi_w",
     "SimPO's chosen reward not length-normalised", "test_preference.py"),
    ("preference.py", "desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0))),",
     "desirable_weight * (1 - torch.sigmoid(beta * (logratio + z0))),",
     "KTO: desirable responses judged against -z0", "test_preference.py"),
    ("preference.py", "undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio))))",
     "undesirable_weight * (1 - torch.sigmoid(beta * (logratio - z0))))",
     "KTO: undesirable responses valued like desirable ones", "test_preference.py"),
    ("preference.py", "return (upcast(kl_policy_logps) - upcast(kl_ref_logps)).mean().clamp_min(0).detach()",
     "return (upcast(kl_policy_logps) - upcast(kl_ref_logps)).mean().clamp_min(0)",
     "KTO's reference point z0 not detached", "test_preference.py"),
    ("preference.py", "sft = -pi_w.sum() / n_w.sum()", "sft = -(pi_w / n_w).mean()",
     "ORPO's SFT term: a mean of per-response means, not E0b over the chosen tokens", "test_preference.py"),
    ("preference.py", "losses = -F.logsigmoid(r_w - r_l)                                # (B,) L_OR per pair",
     "losses = -F.logsigmoid(r_l - r_w)                                # (B,) L_OR per pair",
     "ORPO's odds ratio with chosen and rejected swapped", "test_preference.py"),
    ("best_of_n.py", "P = F_le ** n - F_lt.clamp_min(0) ** n", "P = F_le ** n - F_lt.clamp_min(0) ** (n - 1)",
     "best-of-N's law: P(best = v) with the wrong power below v", "test_best_of_n.py"),
    ("best_of_n.py", "index = (rewards == best).to(torch.uint8).argmax(-1)",
     "index = (rewards == best).to(torch.uint8).flip(-1).argmax(-1)",
     "best_of_n: ties go to the wrong sample (an index from the end)", "test_best_of_n.py"),
    ("best_of_n.py", "return float((law * values).sum()), best_of_n_kl(ref, scores, n)",
     "return float((ref * values).sum()), best_of_n_kl(ref, scores, n)",
     "best-of-N from samples: pi_ref's mean for the best's", "test_best_of_n.py"),
    ("best_of_n.py", "order = torch.sort(rewards, dim=1, descending=True, stable=True).indices",
     "order = torch.sort(rewards, dim=1, descending=False, stable=True).indices",
     "rejection sampling keeps the worst samples", "test_best_of_n.py"),
    ("best_of_n.py", "completions = [texts[i * N:(i + 1) * N] for i in range(len(prompts))]",
     "completions = [texts[i::len(prompts)] for i in range(len(prompts))]",
     "rejection_sampling_round: samples given to the wrong prompts", "test_best_of_n.py"),
    ("best_of_n.py", "law = best_of_n_distribution(ref, scores, n)", "law = best_of_n_distribution(ref, values, n)",
     "best-of-N from samples ranked by the value it reports, not by the score", "test_best_of_n.py"),
    # the rejection-sampling runner (stages/): what ranks, what is reported, what is fine-tuned on
    ("stages/rollout_tasks.py", "best_of_n_from_samples(samples.rewards[i], truth[i], n)",
     "best_of_n_from_samples(truth[i], samples.rewards[i], n)",
     "best-of-N at sampling time ranked by r* and reporting the scorer's reward (score and value swapped)",
     "test_rejection_sampling.py"),
    ("stages/rejection_sampling.py", 'sft_step(policy, [rows[i]["prompt_ids"] for i in pick], [rows[i]["response_ids"] for i in pick],',
     'sft_step(policy, [rows[i]["response_ids"] for i in pick], [rows[i]["prompt_ids"] for i in pick],',
     "rejection sampling fine-tunes on the prompts of the kept rows (prompt and response swapped)",
     "test_rejection_sampling.py"),
    ("stages/rollout_tasks.py", '"response_ids": self.tok.response(r["completion"])',
     '"response_ids": self.tok.response(r["prompt"])',
     "rejection sampling fine-tunes on the prompt text as the response", "test_rejection_sampling.py"),
    ("stages/rollout_tasks.py", "        if not kept.rows:\n", "        if False:\n",
     "rejection sampling: a round that keeps no sample is not refused", "test_rejection_sampling.py"),
    # pretrain.py (E0a) and sft.py (E0b)
    ("pretrain.py", "logps = token_logps(logits[:, :-1], input_ids[:, 1:])",
     "logps = token_logps(logits[:, 1:], input_ids[:, 1:])", "LM loss: logits one position late",
     "test_pretrain.py"),
    ("pretrain.py", "return -masked_mean(logps, response_mask[:, 1:])", "return -masked_mean(logps, response_mask[:, :-1])",
     "LM loss: the mask not shifted with the targets", "test_pretrain.py"),
    ("pretrain.py", "return -masked_mean(logps, response_mask[:, 1:])", "return -masked_sum(logps, response_mask[:, 1:])",
     "LM loss: sum for mean", "test_pretrain.py"),
    ("pretrain.py", "return -masked_mean(logps, response_mask[:, 1:])", "return -logps.mean()",
     "E0b: prompt and padding counted (SFT = pre-training)", "test_sft.py"),
    # dpo.py: dpo_step, and the family's members through it
    ("dpo.py", "return loss, len(micro), len(rows) * distributed.world_size(), stats",
     "return loss, len(rows), len(rows) * distributed.world_size(), stats",
     "dpo_step: each micro-batch weighted as the whole batch", "test_dpo.py"),
    ("dpo.py", 'return reference[prefix + "chosen"][idx], reference[prefix + "rejected"][idx]',
     'return reference[prefix + "rejected"][idx], reference[prefix + "chosen"][idx]',
     "dpo_step: the precomputed reference log-probs of chosen and rejected swapped", "test_dpo.py"),
    ("dpo.py", "rejected_lengths=lengths[len(micro):]", "rejected_lengths=lengths[:len(micro)]",
     "dpo_step: the rejected responses given the chosen ones' lengths (SimPO, ORPO, IPO mean)",
     "test_dpo_family.py"),
    ("dpo.py", 'kl = {"kl_policy_logps": torch.cat([kl_w, kl_l])', 'kl = {"kl_policy_logps": torch.cat([kl_w, kl_w])',
     "dpo_step: KTO's z_0 from the mismatched chosen responses twice", "test_dpo_family.py"),
    # kto.py: kto_step, KTO on unpaired examples
    ("kto.py", 'out = kto_loss(logps, reference_logps(batch, micro, "completion"), desirable',
     'out = kto_loss(logps, reference_logps(batch, micro, "kl_completion"), desirable',
     "kto_step: the examples' log-ratios taken against the reference's log-probs of the mismatched completions",
     "test_kto.py"),
    ("kto.py", 'z0 = kto_reference_point(kl_logps, reference_logps(kl_batch, micro, "kl_completion"))',
     'z0 = kto_reference_point(logps.detach(), reference_logps(batch, micro, "completion"))',
     "kto_step: z_0 from the examples' own completions, not the mismatched ones", "test_kto.py"),
    ("kto.py", "hp.desirable_weight, hp.undesirable_weight)\n        stats", "hp.desirable_weight)\n        stats",
     "kto_step: the undesirable examples' weight lambda_U dropped", "test_kto.py"),
    # policy_gradient.py: the family's members (issue 20)
    ("policy_gradient.py", "per_token = -A * upcast(logps)", "per_token = A * upcast(logps)",
     "REINFORCE: the sign of -A log pi flipped", "test_policy_gradient.py"),
    ("policy_gradient.py", "return masked_sum_over(per_token, mask, B)  ", "return masked_sum_over(per_token, mask, mask.sum())  ",
     "REINFORCE's sequence_sum as a token mean", "test_policy_gradient.py"),
    ("policy_gradient.py", "return masked_sum_over(per_token, mask, B * max_len)", "return masked_sum_over(per_token, mask, max_len)",
     "aggregate 'constant' (Dr. GRPO) without B", "test_policy_gradient.py"),
    ("policy_gradient.py", "    return r - r.mean()\n", "    return r\n", "batch_mean without its baseline",
     "test_policy_gradient.py"),
    ("policy_gradient.py", "others = (groups.sum(dim=1, keepdim=True) - groups) / (G - 1)",
     "others = (groups.sum(dim=1, keepdim=True) - groups) / G", "RLOO divides the others' sum by G",
     "test_policy_gradient.py"),
    ("policy_gradient.py", "others = (groups.sum(dim=1, keepdim=True) - groups) / (G - 1)",
     "others = groups.sum(dim=1, keepdim=True) / G", "RLOO's baseline includes the answer itself",
     "test_policy_gradient.py"),
    ("policy_gradient.py", "kl_to_go = k1.flip(1).cumsum(1).flip(1)", "kl_to_go = k1",
     "REINFORCE++: each token's own KL, not the KL to go", "test_policy_gradient.py"),
    ("policy_gradient.py", "returns = returns - beta * kl_to_go", "returns = returns + beta * kl_to_go",
     "REINFORCE++: the KL added to the reward", "test_policy_gradient.py"),
    ("policy_gradient.py", "whitened = (returns - mean) / (std + eps)", "whitened = returns - mean",
     "REINFORCE++: not divided by the batch's std", "test_policy_gradient.py"),
    ("policy_gradient.py", "clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)",
     "clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_low)", "DAPO: clip-higher ignored (eps_high = eps_low)",
     "test_policy_gradient.py"),
    ("policy_gradient.py", "return torch.minimum(ratio * advantages, clipped * advantages)",
     "return torch.maximum(ratio * advantages, clipped * advantages)", "decoupled clip: max for min",
     "test_policy_gradient.py"),
    ("policy_gradient.py", "loss = -aggregate(per_token, mask, \"token_mean\")", "loss = -aggregate(per_token, mask, \"answer_mean\")",
     "DAPO averaged per answer, not over the batch's tokens", "test_policy_gradient.py"),
    ("policy_gradient.py", "return torch.exp(masked_mean(log_ratio, mask, dim=1))",
     "return torch.exp(masked_sum(log_ratio, mask, dim=1))", "GSPO: the product of the ratios, not its 1/|y| power",
     "test_policy_gradient.py"),
    ("policy_gradient.py", "loss = -per_answer.mean()", "loss = per_answer.mean()", "GSPO: the objective minimised (sign)",
     "test_policy_gradient.py"),
    ("policy_gradient.py", "weight = torch.clamp(ratio, 1 - eps_low, 1 + eps_high).detach()",
     "weight = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)", "CISPO: the weight's gradient not stopped",
     "test_policy_gradient.py"),
    ("policy_gradient.py", "loss = aggregate(-weight * A * logps, mask, \"token_mean\")",
     "loss = aggregate(-A * logps, mask, \"token_mean\")", "CISPO without its clipped weight", "test_policy_gradient.py"),
    # policy_gradient_sampling.py: the zero-spread share, DAPO's dynamic sampling and overlong handling
    ("policy_gradient_sampling.py", "return (~signal_groups(rewards, group_size)).float().mean().item()",
     "return signal_groups(rewards, group_size).float().mean().item()",
     "zero_spread_fraction counts the groups with spread", "test_policy_gradient_sampling.py"),
    ("policy_gradient_sampling.py", "return groups.max(dim=1).values > groups.min(dim=1).values",
     "return groups.max(dim=1).values >= groups.min(dim=1).values", "dynamic sampling: every group carries a signal",
     "test_policy_gradient_sampling.py"),
    ("policy_gradient_sampling.py", "drawn = int((kept_so_far < questions).sum()) + 1",
     "drawn = int((kept_so_far < questions).sum())", "dynamic sampling: the question that filled the batch not counted",
     "test_policy_gradient_sampling.py"),
    ("policy_gradient_sampling.py", "return mask * finished.bool()[:, None].to(mask.dtype)", "return mask",
     "overlong filter keeps the truncated answers", "test_policy_gradient_sampling.py"),
    ("policy_gradient_sampling.py", "(soft_start - y) / cache_len)", "(soft_start - y) / max_len)",
     "overlong penalty falls over L_max, not L_cache", "test_policy_gradient_sampling.py"),
    ("policy_gradient_sampling.py", "torch.full_like(y, -1.0))  # |y| > L_max", "penalty)  # |y| > L_max",
     "overlong penalty: a truncated answer not given -1", "test_policy_gradient_sampling.py"),
    # grpo.py: the members as options of the step
    ("grpo.py", "    if member.advantage == \"grpo\":\n", "    if True:\n", "grpo_iteration ignores --advantage", "test_grpo.py"),
    ("grpo.py", "        if member.loss == \"grpo\":\n", "        if True:\n", "grpo_iteration ignores --loss", "test_grpo.py"),
    ("grpo.py", "mask, hp.beta, member.kl_estimator)", "mask, hp.beta)", "the KL in the reward ignores --kl-estimator",
     "test_grpo.py"),
    ("policy_gradient_sampling.py", "while not filled.full and len(sampled) <= max_draws:", "while False:",
     "dynamic sampling draws no more questions", "test_grpo.py"),
    ("stages/rollout_tasks.py", "config.questions <= len(task.train),", "True,",
     "grpo_task: --questions above the questions there are not refused", "test_grpo_stage.py"),
    ("stages/rollout_tasks.py", "config.questions <= len(task.train),", "config.questions < len(task.train),",
     "grpo_task: --questions equal to the questions there are refused", "test_grpo_stage.py"),
    ("stages/rollout_tasks.py", "not config.dynamic_sampling or distributed.world_size() == 1,", "True,",
     "grpo_task: --dynamic-sampling under torchrun not refused", "test_grpo_stage.py"),
    ("grpo.py", "        mask = overlong_filter(mask, rollout.finished)\n", "        pass\n",
     "grpo_iteration ignores --overlong filter", "test_grpo.py"),
    ("grpo.py", "total_reward = total_reward + overlong_penalty(", "total_reward = total_reward - 0 * overlong_penalty(",
     "grpo_iteration ignores --overlong penalty", "test_grpo.py"),
    ("grpo.py", "aggregation = PG.effective_aggregation(member.loss, hp.aggregation)", "aggregation = hp.aggregation",
     "DAPO's token mean accumulated over answers, not tokens", "test_grpo.py"),
    # generation.py: draws joined for dynamic sampling
    ("generation.py", "pad(g.sequences, left, right, pad_id)", "pad(g.sequences, right, left, pad_id)",
     "cat_generations pads the prompts on the wrong side", "test_generation.py"),
]


def run_one(path: Path, original: str, mutated: str, test: Path, timeout: int) -> tuple[str, float]:
    source = path.read_text()
    if source.count(original) != 1:
        return f"NOT APPLIED (the original occurs {source.count(original)} times)", 0.0
    t0 = time.time()
    try:
        path.write_text(source.replace(original, mutated))
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                               "-m", "not slow", str(test)],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        outcome = {0: "MISSED", 1: "caught"}.get(proc.returncode, f"caught (pytest exit {proc.returncode})")
        if proc.returncode == 1:
            failed = [l.split(" ")[1] for l in proc.stdout.splitlines() if l.startswith("FAILED ")]
            outcome += f" by {failed[0].split('::')[-1]}" if failed else ""
    except subprocess.TimeoutExpired:
        outcome = "caught (timed out)"
    finally:
        path.write_text(source)
    return outcome, time.time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated: run the mutations whose file or description contains one of these")
    parser.add_argument("--list", action="store_true", help="print the mutations, run nothing")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per test run")
    args = parser.parse_args()
    wanted = args.only.split(",")
    chosen = [m for m in MUTATIONS if any(w in m[0] or w in m[3] for w in wanted)]
    files = sorted({ROOT / "minialign" / m[0] for m in chosen})
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *map(str, files)], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    if dirty and not args.list:
        raise SystemExit(f"commit or stash these first (the pass rewrites them):\n{dirty}")
    print("| file | mutation | test file | outcome |\n|---|---|---|---|")
    missed = 0
    for file, original, mutated, what, test_file in chosen:
        if args.list:
            print(f"| {file} | {what} | {test_file} | |")
            continue
        outcome, seconds = run_one(ROOT / "minialign" / file, original, mutated, test_path(file, test_file), args.timeout)
        missed += not outcome.startswith("caught")
        print(f"| {file} | {what} | {test_file} | {outcome} ({seconds:.0f} s) |", flush=True)
    if not args.list:
        print(f"\n{len(chosen) - missed} of {len(chosen)} mutations caught")
        raise SystemExit(1 if missed else 0)


if __name__ == "__main__":
    main()
