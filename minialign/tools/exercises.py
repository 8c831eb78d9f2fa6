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
expected and received (``expect`` in ``tests/handworked.py``). ``--train`` then runs the tutorial of each
exercise with the student's code and with the reference, and prints their figures side by side.

The registry below holds what a student sees: the equation and the shapes of each exercise. The
markers say where the code is; a test checks that the two agree.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
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
        return f"tests/test_{self.module}.py"


# in course order: foundations, reward model, PPO, DPO, GRPO
EXERCISES = [
    Exercise("lm_loss", "pretrain.py", "E0a, E0b", "the language-modelling loss",
             (r"\mathcal{L}_{LM}(\theta) = -\sum_t \log\pi_\theta(x_t\mid x_{<t})",),
             "logits (B, T, V) from the model on input_ids (B, T); the logits at position t-1 predict "
             "token t; count only the N tokens where response_mask (B, T) is 1 (every token for "
             "pre-training, E0a; the response for SFT, E0b) -> a scalar, nats per token",
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


# ----------------------------------------------------------------------------------------------
# make: the student's copy
# ----------------------------------------------------------------------------------------------


def _source_checkout() -> Path:
    if not (REPO / "tests").is_dir() or not (REPO / "tutorials").is_dir():
        raise FileNotFoundError(f"exercises need minialign's source checkout (tests/ and tutorials/ beside "
                                f"{PACKAGE}): git clone the repository and pip install -e it")
    return REPO


def make(dest, only=None, overwrite: bool = False) -> list[Exercise]:
    """Write the exercise copy to ``dest``: minialign/ with the selected bodies removed, tests/,
    tutorials/, and EXERCISES.md (the sheet). Returns the exercises written."""
    dest = Path(dest)
    exercises = select(only)
    repo = _source_checkout()
    check_registry()
    if (dest / "minialign").exists():
        if not overwrite:
            raise FileExistsError(f"{dest} already holds an exercise copy; --overwrite replaces it "
                                  "(and loses what was written there)")
        for sub in ("minialign", "tests", "tutorials"):
            shutil.rmtree(dest / sub, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(PACKAGE, dest / "minialign", ignore=ignore)
    shutil.copytree(repo / "tests", dest / "tests", ignore=ignore)
    shutil.copytree(repo / "tutorials", dest / "tutorials", ignore=ignore)
    names = {e.name for e in exercises}
    for file in sorted({e.file for e in exercises}):
        path = dest / "minialign" / file
        path.write_text(strip_exercises(path.read_text(), names, str(path)))
    (dest / "exercises.json").write_text(json.dumps({"exercises": [e.name for e in exercises]}, indent=1) + "\n")
    (dest / "EXERCISES.md").write_text(sheet(exercises))
    return exercises


def sheet(exercises: list[Exercise]) -> str:
    """EXERCISES.md: what to write, where, and how it is checked."""
    out = ["# minialign exercises", "",
           "Each exercise below is a function body of minialign that this copy lacks: the file raises",
           "`NotImplementedError` where it was, under a hint with the equation and the shapes. Write the",
           "body, then check it with the same hand-computed tests that check minialign itself:", "",
           "    minialign exercises check .               # every exercise of this copy",
           "    minialign exercises check . dpo_loss      # one exercise (or a file: dpo, grpo, ...)",
           "    minialign exercises check . dpo --train   # then train with your code beside the reference", "",
           "Run it from this folder (or give the folder's path). A failure prints the hand-worked case",
           "and the numbers expected and received. The tests are in tests/ (look for",
           "`@pytest.mark.exercise`); the tutorials in tutorials/ run on this copy.", "",
           "| # | exercise | equations | where | what |", "|---|---|---|---|---|"]
    for i, e in enumerate(exercises, 1):
        out.append(f"| {i} | `{e.name}` | {e.equations} | `minialign/{e.file}` | {e.title} |")
    for i, e in enumerate(exercises, 1):
        out += ["", f"## {i}. `{e.name}` ({e.equations}): {e.title}", ""]
        out += [f"$${latex}$$" for latex in e.latex]
        out += ["", f"Shapes: {e.shapes}.", "",
                f"Graded by the tests marked `exercise(\"{e.name}\")` in `{e.test_file}`; "
                f"`--train` runs `tutorials/{e.tutorial}`."]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------
# check: the mirrored tests against the student's copy
# ----------------------------------------------------------------------------------------------


def _copy_exercises(dest: Path) -> list[str] | None:
    manifest = dest / "exercises.json"
    return json.loads(manifest.read_text())["exercises"] if manifest.is_file() else None


def run_tests(dest, exercises: list[Exercise], timeout: float = 600) -> dict:
    """Run the exercises' tests on the copy in ``dest`` (a subprocess, that copy first on the path);
    return the plugin's report: {"package": path imported, "tests": [...], "errors": [...]}."""
    dest = Path(dest).resolve()
    repo = _source_checkout()
    files = sorted({str(repo / e.test_file) for e in exercises})
    report = dest / ".exercise_report.json"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
           "--exercise", ",".join(e.name for e in exercises), "--exercise-report", str(report), *files]
    env = {**os.environ, "PYTHONPATH": str(dest), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        proc = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the tests ran past {timeout:.0f} s on {dest} (an endless loop?)") from None
    if not report.is_file():
        raise RuntimeError(f"pytest did not run the exercise tests (exit {proc.returncode}):\n"
                           + (proc.stdout + proc.stderr)[-3000:])
    result = json.loads(report.read_text())
    report.unlink()
    if Path(result["package"]).resolve() != (dest / "minialign").resolve():
        raise RuntimeError(f"the tests imported minialign from {result['package']}, not the copy in {dest}")
    return result


def grade(exercises: list[Exercise], result: dict) -> list[dict]:
    """One row per exercise: passed, failed tests (with their report entries), or an import error."""
    rows = []
    for e in exercises:
        tests = [t for t in result["tests"] if e.name in t["exercises"]]
        errors = [x for x in result["errors"] if Path(x["file"]).name == Path(e.test_file).name]
        failed = [t for t in tests if t["outcome"] in ("failed", "error")]
        rows.append({"exercise": e, "tests": tests, "failed": failed, "errors": errors,
                     "passed": bool(tests) and not failed and not errors})
    return rows


_NOT_WRITTEN = re.compile(r"exercise (\w+) \(")


def status(row: dict) -> str:
    """One line for the table: passed, not written yet, waits for another exercise, or FAILED."""
    e, n = row["exercise"], len(row["tests"])
    if row["passed"]:
        return f"passed ({n} test{'s' * (n != 1)})"
    if row["errors"]:
        return f"FAILED: {Path(e.test_file).name} does not import"
    if not row["tests"]:
        return "FAILED: no test is marked for this exercise"
    missing = {m.group(1) for t in row["failed"] if t["error"] == "NotImplementedError"
               for m in [_NOT_WRITTEN.search(t["message"])] if m}
    if all(t["error"] == "NotImplementedError" for t in row["failed"]):
        if e.name in missing:
            return "not written yet (NotImplementedError)"
        return f"waits for exercise {', '.join(sorted(missing))} (NotImplementedError)"
    return f"FAILED ({len(row['failed'])} of {n} tests)"


def format_table(rows: list[dict]) -> str:
    """The table, then for each failed exercise its failing tests: the case, expected, received."""
    width = max(len(r["exercise"].name) for r in rows)
    out = [f"{'exercise':<{width}}  {'equations':<14}  result"]
    for r in rows:
        out.append(f"{r['exercise'].name:<{width}}  {r['exercise'].equations:<14}  {status(r)}")
    for r in rows:
        failed = [t for t in r["failed"] if t["error"] != "NotImplementedError"]
        if not failed and not r["errors"]:
            continue
        out += ["", f"--- {r['exercise'].name} ({r['exercise'].equations}) " + "-" * 40]
        for x in r["errors"]:   # pytest's "E" lines: where the copy fails to import, and why
            out.append(f"{Path(x['file']).name} does not import:")
            out += ["  " + line[1:].strip() for line in x["message"].splitlines() if line.startswith("E ")]
        for t in failed:
            out.append(t["nodeid"].split("tests/")[-1])
            if "hand-worked case:" in t["message"]:          # the message of tests/handworked.py: expect
                out += ["  " + line for line in t["message"].splitlines()[1:]]
            else:
                if t["case"]:
                    out.append("  hand-worked case:")
                    out += [f"      {c}" for c in t["case"]]
                out += ["  " + line for line in f"{t['error']}: {t['message']}".splitlines()[:12]]
            if t["where"]:
                out.append(f"  (raised at {t['where']})")
    return "\n".join(out)


def check(dest, only=None, train: bool = False, runs: str = "runs/tutorial", train_args: str = "",
          out=print) -> int:
    """Grade the copy in ``dest``; 0 when every selected exercise passes (then ``train`` runs)."""
    dest = Path(dest)
    if not (dest / "minialign" / "__init__.py").is_file():
        raise FileNotFoundError(f"{dest} holds no exercise copy: make one with "
                                f"`minialign exercises make {dest}`")
    exercises = select(only if only else _copy_exercises(dest))
    t = time.time()
    result = run_tests(dest, exercises)
    rows = grade(exercises, result)
    passed = sum(r["passed"] for r in rows)
    out(format_table(rows))
    out(f"\n{passed} of {len(rows)} exercises passed ({time.time() - t:.1f} s; tests from "
        f"{Path(result['tests_from']).resolve()}, code from {dest.resolve() / 'minialign'})")
    if passed < len(rows):
        return 1
    if train:
        return train_compare(dest, exercises, runs, train_args, out)
    return 0


# ----------------------------------------------------------------------------------------------
# --train: the tutorial on the student's code beside the reference
# ----------------------------------------------------------------------------------------------

_PINNED = ("import runpy, sys; sys.path.insert(0, sys.argv[1]); import minialign; "
           "assert minialign.__file__.startswith(sys.argv[1]), minialign.__file__; "
           "sys.path.insert(0, sys.argv[2]); sys.argv = sys.argv[3:]; "
           "runpy.run_path(sys.argv[0], run_name='__main__')")


def run_tutorial(package_parent: Path, script: Path, args: list[str], log: Path) -> int:
    """Run a tutorial with the minialign package of ``package_parent`` imported first (pinned: the
    tutorial's own path setup cannot swap it). Output goes to ``log``; returns the exit code."""
    cmd = [sys.executable, "-c", _PINNED, str(package_parent), str(script.parent), str(script), *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=package_parent,
                              env={**os.environ, "PYTHONPATH": str(package_parent)}).returncode


def train_compare(dest, exercises: list[Exercise], runs: str = "runs/tutorial", train_args: str = "",
                  out=print) -> int:
    """Run each selected exercise's tutorial with the copy's code and with the reference, from the
    same prerequisite checkpoints, and print the stage's figures side by side."""
    dest = Path(dest).resolve()
    repo = _source_checkout()
    extra = shlex.split(train_args)
    tutorials = [t for t in TUTORIALS if t in {e.tutorial for e in exercises}]
    status = 0
    for name in tutorials:
        stage, needs, keys, defaults = TUTORIALS[name]
        args = defaults + extra
        sides = {"reference": (REPO, dest / "runs" / "reference"), "yours": (dest, dest / "runs" / "yours")}
        # prerequisites (the SFT model, the reward model): the tutorials' run folder if it has them,
        # else the reference run trains them; the student's run starts from the same files
        for need in needs:
            for _, folder in sides.values():
                src = Path(runs) / need
                if not (folder / need / "model.pt").is_file() and (src / "model.pt").is_file():
                    shutil.copytree(src, folder / need, dirs_exist_ok=True)
        summaries = {}
        for side, (parent, folder) in sides.items():
            if side == "yours":
                for need in needs:
                    ref = sides["reference"][1] / need
                    if not (folder / need / "model.pt").is_file():
                        shutil.copytree(ref, folder / need, dirs_exist_ok=True)
            log = folder / f"{Path(name).stem}.log"
            who = "the reference code" if side == "reference" else f"your code ({dest / 'minialign'})"
            out(f"running tutorials/{name} {' '.join(args)} with {who}; log: {log}")
            t = time.time()
            code = run_tutorial(parent, repo / "tutorials" / name, ["--out", str(folder), *args], log)
            if code != 0:
                out(f"  it failed (exit {code}); the end of its log:\n" + "\n".join(
                    "    " + line for line in log.read_text().splitlines()[-25:]))
                status = 1
                break
            summaries[side] = json.loads((folder / stage / "summary.json").read_text())
            out(f"  done in {time.time() - t:.0f} s")
        if len(summaries) == 2:
            out(f"\n{stage}: {'figure':<26} {'reference':>12} {'yours':>12}")
            for k in keys:
                ref, yours = summaries["reference"].get(k), summaries["yours"].get(k)
                out(f"{'':<{len(stage) + 1}} {k:<26} {_num(ref):>12} {_num(yours):>12}")
            out("")
    return status


def _num(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else str(x)


# ----------------------------------------------------------------------------------------------
# the command line: minialign exercises make|check
# ----------------------------------------------------------------------------------------------


def add_parser(sub) -> list[argparse.ArgumentParser]:
    """The ``exercises`` command and its ``make`` and ``check``; returns those two (the CLI adds
    its shared flags to them)."""
    p = sub.add_parser("exercises", help="course exercises: make a copy with bodies to write, check it",
                       description=__doc__.split("\n\n")[0])
    commands = p.add_subparsers(dest="exercises_command", required=True)
    m = commands.add_parser("make", help="write a copy of minialign with the exercise bodies removed")
    m.add_argument("dir", help="folder to write the copy to")
    m.add_argument("--only", default="", help="comma-separated exercises or files (dpo,grpo); default: all")
    m.add_argument("--overwrite", action="store_true", help="replace an existing copy in DIR")
    c = commands.add_parser("check", help="grade a copy with the hand-computed tests; exit 0 if all pass")
    c.add_argument("dir", help="the folder `exercises make` wrote")
    c.add_argument("only", nargs="*", help="exercises or files to check (default: those of the copy)")
    c.add_argument("--train", action="store_true",
                   help="when all pass, run each exercise's tutorial with this copy and with the reference")
    c.add_argument("--runs", default="runs/tutorial",
                   help="run folder of earlier tutorials: --train starts from its SFT / reward model")
    c.add_argument("--train-args", default="", help="extra flags for the tutorials run by --train")
    return [m, c]


def cli_main(args: argparse.Namespace) -> int:
    if args.exercises_command == "make":
        written = make(args.dir, [t for t in args.only.split(",") if t], args.overwrite)
        print(f"wrote {args.dir}: {len(written)} exercise(s) to write, listed in {args.dir}/EXERCISES.md")
        for e in written:
            print(f"  {e.name:<26} {e.equations:<14} minialign/{e.file}")
        print(f"check them with: minialign exercises check {args.dir}")
        return 0
    return check(args.dir, args.only, args.train, args.runs, args.train_args)
