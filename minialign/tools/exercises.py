r"""Exercises made from the library itself, graded by the same hand-computed tests that check it.

In the algorithm files, a comment marks each body a student should write::

    # Exercise dpo_loss (E9, E10): from here to the end of the function.

or, where the function goes on after the part to write::

    # Exercise grpo_loss (E13): from here to "End of exercise grpo_loss".
    ...
    # End of exercise grpo_loss.

``minialign exercises make DIR`` copies the package, the tests and the tutorials to ``DIR`` and
replaces each marked body by a hint (the equation in LaTeX, as the docs write it, and the shapes:
never the code) and ``raise NotImplementedError``. The copy imports and runs; only the marked
bodies are missing. ``minialign exercises check DIR`` runs the hand-computed tests of each
exercise (the tests marked ``@pytest.mark.exercise("name")`` in the mirrored test file) against
the student's copy, in a subprocess with that copy first on the import path, and prints a table:
exercise, equations, passed or failed, and for a failure the hand-worked case with the numbers
expected and received (``expect`` in ``tests/equations/handworked.py``). ``--train`` then runs the tutorial of each
exercise with the student's code and with the reference, and prints their figures side by side.

The registry below holds what a student sees: the equation and the shapes of each exercise. The
markers say where the code is; a test checks that the two agree. The command that makes a copy
and grades it is ``exercises_command.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent   # the minialign package that runs this code
REPO = PACKAGE.parent                              # its source checkout (tests/, tutorials/)


@dataclass(frozen=True)
class Exercise:
    name: str             # the marker's name, and what `exercises check DIR NAME` selects
    file: str             # the file in minialign/ that holds the marker(s)
    equations: str        # the equation ids, as in the marker
    title: str
    latex: tuple[str, ...]  # the equations as the docs write them
    shapes: str           # what comes in and what goes out
    tutorial: str         # the tutorial `--train` runs

    @property
    def module(self) -> str:
        return Path(self.file).stem

    @property
    def test_file(self) -> str:
        return f"tests/equations/test_{self.module}.py"


# in course order: foundations, reward model, PPO, DPO, GRPO
EXERCISES = [
    Exercise("lm_loss", "pretrain.py", "E0a, E0b", "the language-modelling loss",
             (r"\mathcal{L}_{LM}(\theta) = -\sum_t \log\pi_\theta(x_t\mid x_{<t})",),
             "logits (B, T, V) from the model on input_ids (B, T); the logits at position t-1 predict "
             "token t; count only the N tokens where response_mask (B, T) is 1 (every token for "
             "pre-training, E0a; the response for SFT, E0b) -> a scalar, nats per token; given a "
             "constant C (SFT's --loss-aggregation constant), their sum divided by C instead",
             "01_pretrain.py"),
    Exercise("token_logps", "ops.py", "E1", "the log-probability of each token, a factor of E1",
             (r"\pi_\theta(\mathbf{y}\mid\mathbf{x}) = \prod_t \pi_\theta(y_t \mid \mathbf{x}, \mathbf{y}_{<t})",),
             "logits z (B, T, V) at temperature tau, tokens y (B, T) -> (B, T), the log-prob of each "
             "given token; in float32 at least (ops.upcast): under bf16 a log-softmax loses the small "
             "differences that ratios are made of",
             "04_dpo.py"),
    Exercise("kl_estimators", "ops.py", "k1, k2, k3", "three estimators of the KL divergence from samples",
             (r"k_1 = \log\frac{p(x)}{q(x)}",
              r"k_2 = \frac12(\log\frac{p(x)}{q(x)})^2",
              r"k_3 = \frac{q(x)}{p(x)} - 1 - \log\frac{q(x)}{p(x)}"),
             "logp = log p(x), logq = log q(x): tensors of one shape -> that shape (one estimate per sample)",
             "06_grpo.py"),
    Exercise("bradley_terry_probability", "reward_model.py", "E3", "the Bradley-Terry preference probability",
             (r"P_\phi(y_w \succ y_l \mid x) = \frac{e^{r_\phi(x,y_w)}}{e^{r_\phi(x,y_w)} + e^{r_\phi(x,y_l)}} = \sigma\big(r_\phi(x,y_w) - r_\phi(x,y_l)\big)",),
             "r_w, r_l (B,) -> (B,), in float32 at least (ops.upcast)",
             "03_reward_model.py"),
    Exercise("reward_model_loss", "reward_model.py", "E4", "the reward model's loss",
             (r"\mathcal{L}_R(r_\phi) = -\mathbb{E}_{(x, y_w, y_l)\sim\mathcal{D}}\big[\log \sigma(r_\phi(x,y_w) - r_\phi(x,y_l))\big]",),
             "r_w, r_l (B,) -> a scalar (the mean over pairs), float32 at least; "
             "log sigma(z) of a large negative z must stay finite",
             "03_reward_model.py"),
    Exercise("per_token_rewards", "ppo.py", "E2, E6", "PPO's reward, token by token",
             (r"r_t = -\beta\big(\log\pi_\theta(y_t\mid x, y_{<t}) - \log\pi_{ref}(y_t\mid x, y_{<t})\big) + [t = T]\, r_\phi(x,y)",),
             "score (B,), logps, ref_logps, mask (B, T), the KL coefficient beta -> (B, T), 0 outside "
             "the mask; T is the last response token of each row (the EOS), "
             "reward_model.last_token_index(mask) finds it",
             "05_ppo.py"),
    Exercise("gae", "ppo.py", "GAE", "generalised advantage estimation",
             (r"\delta_t = r_t + \gamma V(s_{t+1}) - V(s_t),\qquad \hat A_t = \delta_t + \gamma\lambda\hat A_{t+1},\qquad \hat R_t = \hat A_t + V(s_t),\qquad V(s_{T+1}) = 0",),
             "rewards, values, mask (B, T) -> (advantages, returns), each (B, T), 0 outside the mask; "
             "V = 0 and A = 0 past the last response token of a row; walk t from the end",
             "05_ppo.py"),
    Exercise("one_step_advantages", "ppo.py", "E6", "the source's advantage, one number per answer",
             (r"A(x,y) = r(x,y) - V(x)",),
             "score (B,) = r(x, y), values, mask (B, T); V(x) is the value at the first response "
             "token -> (advantages, returns), each (B, T): A copied on every response token, "
             "returns r(x, y) there, 0 outside the mask",
             "05_ppo.py"),
    Exercise("clipped_surrogate_loss", "ppo.py", "E5", "PPO's clipped surrogate",
             (r"L^{CLIP}(\theta) = \mathbb{E}\big[\min\big(\rho_t(\theta)\hat A_t,\ \mathrm{clip}(\rho_t(\theta), 1-\epsilon, 1+\epsilon)\,\hat A_t\big)\big],\qquad \rho_t(\theta) = \frac{\pi_\theta(y_t\mid x, y_{<t})}{\pi_{old}(y_t\mid x, y_{<t})}",),
             "logps, old_logps, advantages, mask (B, T) -> (loss = -L^CLIP as a masked mean over "
             "tokens: a scalar, stats): stats holds clip_frac (fraction of tokens where the clipped "
             "term is the smaller), approx_kl (mean of (rho - 1) - log rho) and ratio (mean rho); "
             "no gradient through old_logps",
             "05_ppo.py"),
    Exercise("value_loss", "ppo.py", "PPO value loss", "the clipped value loss",
             (r"L^V = \tfrac12\,\mathbb{E}_t\Big[\max\Big((V_t - \hat R_t)^2,\ \big(V_{old,t} + \mathrm{clip}(V_t - V_{old,t}, -c, c) - \hat R_t\big)^2\Big)\Big]",),
             "values, old_values, returns, mask (B, T), clip_range c (None or 0: no clipping) -> "
             "(a scalar masked mean, stats): stats holds value_clip_frac, the fraction of tokens "
             "where the clipped error is the larger",
             "05_ppo.py"),
    Exercise("optimal_policy", "dpo.py", "E7", "the optimal KL-regularised policy",
             (r"\pi^*(y\mid x) = \frac{1}{Z(x)}\,\pi_{ref}(y\mid x)\exp\Big(\frac{1}{\beta} r(x,y)\Big),\qquad Z(x) = \sum_y \pi_{ref}(y\mid x)\exp\Big(\frac{1}{\beta} r(x,y)\Big)",),
             "ref_probs (K,) and rewards (K,) of one prompt's K responses -> pi* (K,); "
             "exp(r / beta) overflows for large r / beta: work in log space",
             "04_dpo.py"),
    Exercise("implied_reward", "dpo.py", "E8", "the reward as a policy ratio",
             (r"r(x,y) = \beta\log\frac{\pi^*(y\mid x)}{\pi_{ref}(y\mid x)} + \beta\log Z(x)",),
             "pi_star (K,), ref_probs (K,) -> the first term, beta log(pi* / pi_ref), (K,)",
             "04_dpo.py"),
    Exercise("dpo_loss", "dpo.py", "E9, E10", "the DPO loss and its implicit rewards",
             (r"r_w = \beta(\log\pi_\theta(y_w\mid x) - \log\pi_{ref}(y_w\mid x))",
              r"\mathcal{L}_{DPO}(\theta) = -\mathbb{E}_{(x,y_w,y_l)\sim\mathcal{D}}\Big[\log\sigma\Big(\beta\log\frac{\pi_\theta(y_w\mid x)}{\pi_{ref}(y_w\mid x)} - \beta\log\frac{\pi_\theta(y_l\mid x)}{\pi_{ref}(y_l\mid x)}\Big)\Big]"),
             "four (B,) tensors of sequence log-probs (E1), already float32 or float64 -> "
             "(loss: a scalar, the mean over pairs; chosen_rewards r_w (B,); rejected_rewards r_l (B,)); "
             "log sigma(z) of a large negative z must stay finite",
             "04_dpo.py"),
    Exercise("group_advantages", "grpo.py", "E11, E12", "GRPO's group baseline and advantage",
             (r"\bar R(x) = \frac{1}{G}\sum_{i=1}^{G} r(x, y_i),\qquad \hat A(x, y_i) = \frac{r(x, y_i) - \bar R(x)}{\mathrm{std}(\{r_1, \dots, r_G\}) + \epsilon}",),
             "rewards (B,) with B = Q * G, the G answers of question q in rows q*G .. q*G+G-1 -> (B,); "
             "std is the sample std (divides by G - 1); scale_by_std=False keeps r - mean; a group "
             "whose rewards are all equal gets exactly 0",
             "06_grpo.py"),
    Exercise("grpo_loss", "grpo.py", "E13", "GRPO's clipped objective with the KL in the loss",
             (r"J_{GRPO}(\theta) = \mathbb{E}\Big[\frac{1}{G}\sum_{i=1}^{G}\Big(\frac{1}{|y_i|}\sum_{t=1}^{|y_i|}\min\big(\rho_{i,t}(\theta)\hat A_i,\ \mathrm{clip}(\rho_{i,t}(\theta), 1-\epsilon, 1+\epsilon)\,\hat A_i\big) - \beta D_{KL}(\pi_\theta\Vert\pi_{ref})\Big)\Big]",
              r"\frac{\pi_{ref}}{\pi_\theta} - \log\frac{\pi_{ref}}{\pi_\theta} - 1"),
             "logps, old_logps, ref_logps (or None), mask (B, T) and A (B, 1), the advantages, are "
             "given -> define ratio (B, T), clipped = clip(ratio, 1 - clip_eps, 1 + clip_eps) (B, T), "
             "kl (B, T): the per-token k3 of the second line, or None without ref_logps, and loss "
             "(a scalar, -J); the KL term enters the loss only with kl_in='loss' and beta > 0; "
             "aggregation 'answer_mean' is E13, 'token_mean' averages over every token of the batch, "
             "'constant' divides the token sum by B * max_len",
             "06_grpo.py"),
    Exercise("kl_penalised_rewards", "grpo.py", "E14", "GRPO with the KL in the reward",
             (r"r_i = r_\phi(x, y_i) - \beta D_{KL}(\pi_\theta \Vert \pi_{ref})",),
             "rewards (B,), logps, ref_logps, mask (B, T) -> (B,) with no gradient; "
             "sequence_kl(logps, ref_logps, mask, estimator) sums a per-token estimate over each answer",
             "06_grpo.py"),
    # the policy-gradient family (policy_gradient.py): three members as deltas of GRPO
    Exercise("rloo_advantages", "policy_gradient.py", "RLOO", "RLOO's leave-one-out baseline",
             (r"\hat A_i = r_i - \frac{1}{G-1}\sum_{j\ne i} r_j",),
             "r (B,) float rewards with B = Q * G, the G answers of question q in rows q*G .. q*G+G-1, and G "
             "-> (B,); the baseline of answer i is the mean of the G - 1 other answers to its question "
             "(no std); vectorised over the groups, no loop",
             "10_family.py"),
    Exercise("gspo_sequence_ratio", "policy_gradient.py", "GSPO", "GSPO's sequence-level importance ratio",
             (r"s_i = \Big(\frac{\pi_\theta(y_i\mid x)}{\pi_{old}(y_i\mid x)}\Big)^{1/|y_i|} = \exp\Big(\frac{1}{|y_i|}\sum_t \log\frac{\pi_\theta(y_{i,t}\mid\cdot)}{\pi_{old}(y_{i,t}\mid\cdot)}\Big)",),
             "logps, old_logps, mask (B, T) -> s (B,), float32 at least (ops.upcast), float64 kept; no gradient "
             "into old_logps; in log space (ops.masked_mean over each answer's tokens): the product of 2000 "
             "token ratios overflows, their geometric mean does not",
             "10_family.py"),
    Exercise("cispo_loss", "policy_gradient.py", "CISPO", "CISPO's clipped, stopped importance weight",
             (r"L_{CISPO} = -\frac{1}{\sum_i|y_i|}\sum_i\sum_t \mathrm{sg}\big(\mathrm{clip}(\rho_{i,t}, 1-\epsilon_{low}, 1+\epsilon_{high})\big)\,\hat A_i\,\log\pi_\theta(y_{i,t}\mid x, y_{i,<t})",),
             "logps, old_logps, mask (B, T), advantages (B,) or (B, T) -> define ratio (B, T), weight (B, T) "
             "= the clipped ratio with its gradient stopped, and loss (a scalar): the token mean over the "
             "batch (aggregate(..., \"token_mean\")); _token_advantages(advantages, logps) gives A (B, T)",
             "10_family.py"),
    # the preference family (preference.py): each a small change to E9
    Exercise("robust_dpo_loss", "preference.py", "rDPO", "robust DPO, de-biased for labels flipped with probability epsilon",
             (r"\mathcal{L}_{rDPO} = \frac{(1-\epsilon)\,\ell(h) - \epsilon\,\ell(-h)}{1 - 2\epsilon},\qquad \ell(h) = -\log\sigma(\beta h)",),
             "h (B,), the log-ratio difference, and the implicit rewards r_w, r_l (B,) are given; "
             "label_smoothing is epsilon -> PreferenceLossResult(loss: the mean over pairs, r_w, r_l, "
             "losses (B,)); -log sigma must stay finite for a large |beta h| (F.logsigmoid)",
             "11_preference_family.py"),
    Exercise("ipo_loss", "preference.py", "IPO", "IPO's squared loss on the log-ratio difference",
             (r"h = \log\frac{\pi_\theta(y_w\mid x)}{\pi_{ref}(y_w\mid x)} - \log\frac{\pi_\theta(y_l\mid x)}{\pi_{ref}(y_l\mid x)},\qquad \mathcal{L}_{IPO} = \Big(h - \frac{1}{2\beta}\Big)^2",),
             "logps = [policy chosen, ref chosen, policy rejected, ref rejected], each (B,) and already "
             "divided by the lengths under normalise='mean' -> PreferenceLossResult(loss: the mean over "
             "pairs, r_w = beta (log pi_theta(y_w) - log pi_ref(y_w)) (B,), r_l likewise, losses (B,))",
             "11_preference_family.py"),
    Exercise("simpo_loss", "preference.py", "SimPO", "SimPO's reference-free, length-normalised loss with a margin",
             (r"r_w = \frac{\beta}{|y_w|}\log\pi_\theta(y_w\mid x),\quad r_l = \frac{\beta}{|y_l|}\log\pi_\theta(y_l\mid x),\qquad \mathcal{L}_{SimPO} = -\log\sigma(r_w - r_l - \gamma)",),
             "policy_chosen_logps, policy_rejected_logps (B,) sequence log-probs (E1), chosen_lengths, "
             "rejected_lengths (B,) in tokens -> PreferenceLossResult(loss: the mean over pairs, r_w (B,), "
             "r_l (B,), losses (B,)); compute in float32 or float64 (upcast)",
             "11_preference_family.py"),
]
BY_NAME = {e.name: e for e in EXERCISES}

# what --train compares: the stage a tutorial trains, the stages it needs, the summary figures
TUTORIALS = {
    "01_pretrain.py": ("pretrain", [], ["heldout_loss", "entropy_floor"], []),
    "03_reward_model.py": ("reward_model", ["sft"], ["heldout_accuracy", "bayes_optimal_accuracy", "pearson"], []),
    "04_dpo.py": ("dpo", ["sft"], ["true_reward_before", "true_reward", "kl", "heldout_accuracy"],
                  ["--betas", "0.1"]),
    "05_ppo.py": ("ppo", ["sft", "reward_model"], ["true_reward_before", "true_reward", "kl_last"], []),
    "06_grpo.py": ("grpo", ["sft"], ["heldout_accuracy_before", "heldout_accuracy", "kl_last"], []),
}

MARKER = re.compile(r"^(?P<indent>[ \t]*)# Exercise (?P<name>\w+) \((?P<equations>[^)]*)\)")
END_MARKER = re.compile(r"^[ \t]*# End of exercise (?P<name>\w+)\b")


def select(tokens=None) -> list[Exercise]:
    """Exercises by name or by file (``dpo`` = every exercise in dpo.py); None or empty: all."""
    tokens = [t.strip() for t in (tokens or []) if t.strip()]
    if not tokens:
        return list(EXERCISES)
    unknown = [t for t in tokens if t not in BY_NAME and t not in {e.module for e in EXERCISES}]
    if unknown:
        raise ValueError(f"unknown exercise(s) {unknown}: choose names from "
                         f"{[e.name for e in EXERCISES]} or files from {sorted({e.module for e in EXERCISES})}")
    return [e for e in EXERCISES if e.name in tokens or e.module in tokens]


# ----------------------------------------------------------------------------------------------
# markers: where each exercise's body is
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    name: str
    equations: str
    marker: int      # 0-based line of the marker comment (kept)
    end: int         # 0-based line after the last removed line (an end marker there is kept)
    indent: str


def find_regions(source: str, filename: str = "<source>") -> list[Region]:
    """Every marked region of a source file: from the marker to its end marker, or to the end of
    the function the marker stands in."""
    import ast
    import io
    import tokenize

    lines = source.splitlines()
    functions = [n for n in ast.walk(ast.parse(source, filename))
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    # only real comments count (a docstring may quote a marker, as this module's does)
    comments = {t.start[0] - 1 for t in tokenize.generate_tokens(io.StringIO(source).readline)
                if t.type == tokenize.COMMENT}
    regions = []
    for i, line in enumerate(lines):
        m = MARKER.match(line)
        if not m or i not in comments:
            continue
        where = f"{filename}:{i + 1}"
        around = [f for f in functions if f.lineno < i + 1 <= f.end_lineno]
        if not around:
            raise ValueError(f"{where}: exercise marker {m['name']!r} is not inside a function")
        function = max(around, key=lambda f: f.lineno)            # the innermost function
        if len(m["indent"]) != function.body[0].col_offset:
            raise ValueError(f"{where}: exercise marker {m['name']!r} must be indented as the body of "
                             f"{function.name}() (not inside a loop or an if)")
        end = function.end_lineno                                 # 1-based last line = 0-based end
        for j in range(i + 1, function.end_lineno):
            e = END_MARKER.match(lines[j])
            if e and e["name"] == m["name"] and j in comments:
                end = j
                break
        regions.append(Region(m["name"], m["equations"].strip(), i, end, m["indent"]))
    return regions


def hint(exercise: Exercise, indent: str) -> list[str]:
    """The lines that replace a marked body: the equation and the shapes as comments, then the raise."""
    out = [f"{indent}#", f"{indent}#   {exercise.title}:"]
    out += [f"{indent}#   $${latex}$$" for latex in exercise.latex]
    out.append(f"{indent}#")
    words, line = exercise.shapes.split(), f"{indent}#   shapes:"
    for w in words:                                               # wrap the shapes at 100 columns
        if len(line) + 1 + len(w) > 100:
            out.append(line)
            line = f"{indent}#     "
        line += " " + w
    out.append(line)
    out.append(f"{indent}#   check:  minialign exercises check <this folder> {exercise.name}")
    out.append(f'{indent}raise NotImplementedError("exercise {exercise.name} ({exercise.equations}) is not '
               f'written yet: the hint is above this line in minialign/{exercise.file}")')
    return out


def strip_exercises(source: str, names: set[str], filename: str = "<source>") -> str:
    """``source`` with the bodies of the exercises ``names`` replaced by their hint and a raise."""
    lines = source.splitlines()
    for r in sorted(find_regions(source, filename), key=lambda r: -r.marker):  # bottom up: lines stay valid
        if r.name in names:
            lines[r.marker + 1:r.end] = hint(BY_NAME[r.name], r.indent)
    return "\n".join(lines) + "\n"


def package_regions(package: Path = PACKAGE) -> dict[str, list[tuple[str, Region]]]:
    """exercise name -> [(file, region)] over every marker in the package."""
    out: dict[str, list] = {}
    for path in sorted(package.glob("*.py")):
        for r in find_regions(path.read_text(), str(path)):
            out.setdefault(r.name, []).append((path.name, r))
    return out


def check_registry(package: Path = PACKAGE) -> None:
    """Every exercise has its marker(s) in its file with its equations, and every marker an exercise."""
    found = package_regions(package)
    problems = []
    for name, places in found.items():
        if name not in BY_NAME:
            problems.append(f"marker {name!r} in {places[0][0]} is not in exercises.EXERCISES")
            continue
        for file, r in places:
            e = BY_NAME[name]
            if file != e.file or r.equations != e.equations:
                problems.append(f"marker {name!r} in {file} says ({r.equations}); the registry says "
                                f"{e.file} ({e.equations})")
    problems += [f"exercise {e.name!r} has no marker in minialign/{e.file}" for e in EXERCISES
                 if e.name not in found]
    if problems:
        raise ValueError("exercise markers and registry disagree:\n  " + "\n  ".join(problems))
