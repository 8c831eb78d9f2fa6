"""Tutorial 07: the theory lab. Where does each alignment objective converge, exactly?

No model and no sampling: one prompt, a handful of possible responses, pi_ref and the true reward
given as tables (``minialign.theory``). Every expectation is a weighted sum over all samples, so
each algorithm's loss (imported from dpo.py, ppo.py, grpo.py) is run with its exact expected
gradient until it stops moving. Printed and saved (into <out>/theory/):

1. E7's pi* and the reward-KL frontier as beta varies;
2. the KL estimators k1, k2, k3: exact bias and std, and the expected gradient of each when used
   as a loss or in the reward, against the gradient of the KL itself (estimators.png);
3. and 4. the landing tables, on a graded reward and on a verifiable 0/1 reward: reward, KL,
   distance to pi*, and the fixed point derived for each algorithm with the distance to it
   (landings.json, frontier_*.png with every landing point, convergence_*.png, policies_*.png);
5. two follow-ups: GRPO-k3-in-the-loss's effective beta against the group size, and which
   responses survive GRPO-k3-in-the-reward as beta varies.

Run:  python tutorials/07_theory_lab.py          (no model, no sampling: the fastest tutorial)

A script and a notebook: each ``# %%`` line starts a cell (Jupyter, VS Code, Jupytext).
"""

# %%
from __future__ import annotations

import json
import time
from pathlib import Path

import _common  # (puts the source checkout on sys.path)
import torch

from minialign import theory as T
from minialign.runtime.plots import plot_panels

parser = _common.base_parser(__doc__.splitlines()[0])
parser.add_argument("--beta", type=float, default=0.5, help="KL coefficient of the graded problem")
parser.add_argument("--group-size", type=int, default=4, help="GRPO's G (groups are enumerated exactly)")
parser.add_argument("--steps", type=int, default=800, help="max gradient steps per exact run")
args = _common.parse_args(parser)
torch.manual_seed(args.seed)
out = Path(args.out) / "theory"
out.mkdir(parents=True, exist_ok=True)
t0 = time.time()
graded = T.graded_problem(args.beta)


def fmt_policy(p) -> str:
    return "[" + " ".join(f"{float(x):.3f}" for x in p) + "]"


# %% 1. E7: pi* and the reward-KL frontier

def frontier_section(pb: T.Problem, out: Path) -> dict:
    _common.banner(f"1. E7: pi* and the reward-KL frontier  ({pb.name} problem, beta = {pb.beta})")
    print(f"pi_ref  = {fmt_policy(pb.ref_probs)}")
    print(f"r       = {pb.rewards.tolist()}")
    star = T.pi_star(pb)
    print(f"pi*     = {fmt_policy(star)}   E[r] = {float(T.expected_reward(star, pb.rewards)):.4f}   "
          f"KL(pi*||pi_ref) = {float(T.kl(star, pb.ref_probs)):.4f}   E2 objective = {float(T.objective(star, pb)):.4f}")
    betas = torch.logspace(-3, 3, 121, dtype=torch.float64)
    f = T.frontier(pb, betas)
    print(f"\n{'beta':>8} {'E[r]':>8} {'KL':>8}   pi*")
    for b in (1e-3, 0.1, 0.5, 1.0, 2.0, 10.0, 1e3):
        p = T.pi_star(pb, b)
        print(f"{b:8.3g} {float(T.expected_reward(p, pb.rewards)):8.4f} {float(T.kl(p, pb.ref_probs)):8.4f}   {fmt_policy(p)}")
    print(f"end points: beta -> 0 gives argmax r (E[r] = {float(pb.rewards.max()):.1f}, KL = -log pi_ref(best) = "
          f"{float(-torch.log(pb.ref_probs[pb.rewards.argmax()])):.4f}); beta -> inf gives pi_ref "
          f"(E[r] = {float(T.expected_reward(pb.ref_probs, pb.rewards)):.4f}, KL = 0)")
    return f

f = frontier_section(graded, out)


# %% 2. The KL estimators k1, k2, k3
def estimator_section(pb: T.Problem, out: Path) -> None:
    _common.banner("2. KL estimators k1, k2, k3 (exact, x ~ pi, estimating KL(pi || pi_ref))")
    print("Schulman's (2020) Gaussians, discretised: bias and std of ONE sample, relative to the true KL")
    print(f"{'pi vs pi_ref':>22} {'KL':>8} | {'k1 bias':>8} {'k1 std':>8} | {'k2 bias':>8} {'k2 std':>8} | "
          f"{'k3 bias':>8} {'k3 std':>8}")
    for r in T.gaussian_estimator_table():
        print(f"{r['pair']:>22} {r['kl']:8.4f} | {r['k1_bias']:8.4f} {r['k1_std']:8.3f} | {r['k2_bias']:8.4f} "
              f"{r['k2_std']:8.3f} | {r['k3_bias']:8.4f} {r['k3_std']:8.3f}")

    rows = T.estimator_gradient_table(pb, ts=(0.1, 0.25, 0.5, 1.0, 2.0, 4.0))
    print(f"\nThe {pb.name} problem's responses, pi_t = softmax(log pi_ref + t r): absolute bias and std")
    print(f"{'t':>5} {'KL':>8} | {'k1 bias':>8} {'k1 std':>8} | {'k2 bias':>8} {'k2 std':>8} | {'k3 bias':>8} {'k3 std':>8}")
    for r in rows:
        print(f"{r['t']:5.2f} {r['kl']:8.4f} | {r['k1_bias']:8.1e} {r['k1_std']:8.4f} | {r['k2_bias']:8.4f} "
              f"{r['k2_std']:8.4f} | {r['k3_bias']:8.1e} {r['k3_std']:8.4f}")
    names = ["k1_loss", "k2_loss", "k3_loss", "k1_reward", "k3_reward", "k3_both"]
    print("\nExpected gradient w.r.t. the logits vs grad KL(pi || pi_ref): cosine / norm ratio")
    print(f"{'t':>5} " + " ".join(f"{n:>15}" for n in names))
    for r in rows:
        print(f"{r['t']:5.2f} " + " ".join(f"{r[n + '_cos']:7.3f}/{r[n + '_norm']:7.3f}" for n in names))
    print("k1 as a loss has zero expected gradient; k2 as a loss is exact; k3 as a loss is the gradient of\n"
          "the forward KL(pi_ref || pi) (= pi - pi_ref); in the reward (score function) k1 is exact and k3 is\n"
          "grad KL(pi||pi_ref) - grad KL(pi_ref||pi); only k3's two paths together give the true gradient.")

    kls = [r["kl"] for r in rows]
    x = "KL(pi || pi_ref), nats (log scale)"

    def gradient_error(r, n):  # |E[grad k] - grad KL| / |grad KL| from the cosine and the norm ratio
        return max(1 + r[n + "_norm"] ** 2 - 2 * r[n + "_norm"] * r[n + "_cos"], 0.0) ** 0.5

    plot_panels(out / "estimators.png", [
        {"title": "spread of one sample", "xlabel": x, "ylabel": "std / KL (log scale)", "xscale": "log",
         "yscale": "log", "curves": [(kls, [r[f"{n}_std"] / r["kl"] for r in rows], n, fmt)
                                     for n, fmt in (("k1", "o-"), ("k2", "s--"), ("k3", "^:"))]},
        {"title": "bias of one sample", "xlabel": x, "ylabel": "bias / KL", "xscale": "log",
         "curves": [(kls, [r["k2_bias"] / r["kl"] for r in rows], "k2 (k1 and k3 are unbiased: 0)", "s--")]},
        {"title": "expected gradient, used as a loss or in the reward", "xlabel": x,
         "ylabel": "|E grad - grad KL(pi || pi_ref)| / |grad KL|", "xscale": "log",
         "curves": [(kls, [gradient_error(r, n) for r in rows], label, fmt) for n, label, fmt in (
             ("k1_loss", "k1 as a loss (no gradient at all)", "o-"),
             ("k3_loss", "k3 as a loss: grad KL(pi_ref || pi)", "^-"),
             ("k3_reward", "k3 in the reward", "v--"))]},
    ], caption="k1 is unbiased but spreads most near pi_ref, where k2 and k3 spread alike; k2 as a loss, k1 in the "
               "reward and k3 by both paths have the exact gradient (error 0, not drawn).")

estimator_section(graded, out)


# %% 3. and 4. Where each algorithm lands
def where_they_land(rows: list[dict], pb: T.Problem, cap: int, tol: float = 1e-6) -> str:
    """The frontier plot's caption, read off the landings (each problem has its own): at pi*
    (total variation below ``tol``), on the frontier elsewhere (another beta's pi*, or the
    frontier's end), below it, or still moving when the step cap stopped the run."""
    moving = [r for r in rows if r["steps"] >= cap and r["tv_to_pi_star"] >= tol]
    landed = [r for r in rows if r not in moving]
    at_star = [r for r in landed if r["tv_to_pi_star"] < tol]
    on = [r for r in landed if r not in at_star and T.frontier_reward_at(pb, r["kl"]) - r["reward"] < tol]
    below = [r for r in landed if r not in at_star and r not in on]
    names = lambda group: "; ".join(r["algorithm"] for r in group)  # noqa: E731
    parts = ["No policy lies above the frontier.", f"At pi*: {names(at_star)}." if at_star else "None lands at pi*."]
    if on:
        parts.append(f"On the frontier away from pi* (the pi* of another beta, or the frontier's end): {names(on)}.")
    parts.append(f"Below the frontier: {names(below)}." if below else "None lands below it.")
    if moving:
        parts.append(f"Still moving at the {cap}-step cap: " + "; ".join(
            f"{r['algorithm']} (TV to pi* {r['tv_to_pi_star']:.0e})" for r in moving) + ".")
    return " ".join(parts)


def landing_section(number: int, pb: T.Problem, G: int, steps: int, out: Path, f: dict) -> list[dict]:
    _common.banner(f"{number}. Where each algorithm lands: {pb.name} problem, beta = {pb.beta}, G = {G}")
    t0 = time.time()
    results = T.landings(pb, G=G, max_steps=steps)
    rows = [T.landing_row(r, pb) for r in results]
    print(f"{'algorithm':<36} {'E[r]':>7} {'KL':>7} {'E2':>7} {'TV(pi*)':>8} {'KL(.||pi*)':>10} "
          f"{'steps':>5} {'TV(pred)':>8}  policy")
    for r in rows:
        print(f"{r['algorithm']:<36} {r['reward']:7.4f} {r['kl']:7.4f} {r['objective']:7.4f} {r['tv_to_pi_star']:8.1e} "
              f"{r['kl_to_pi_star']:10.1e} {r['steps']:5d} {r['tv_to_prediction']:8.1e}  {r['policy']}")
    print("\nthe derived fixed point of each (TV(pred) above is the distance to it):")
    for r in rows:
        extra = f" (fixed-point equation residual {r['residual']:.1e})" if "a(y)" in r["prediction"] else ""
        print(f"  {r['algorithm']:<36} {r['prediction']}{extra}")
    print(f"[{time.time() - t0:.0f} s]")

    # frontier with the landing points: the whole curve, and a zoom around pi*
    star = T.pi_star(pb)
    star_kl, star_r = float(T.kl(star, pb.ref_probs)), float(T.expected_reward(star, pb.rewards))
    markers = "os^vD<>ph"
    points = [([r["kl"]], [r["reward"]], r["algorithm"], markers[i % len(markers)]) for i, r in enumerate(rows)]
    # pi* last, large and hollow: the algorithms that land on it would hide it otherwise
    curves = [(f["kl"].tolist(), f["reward"].tolist(), "frontier: pi*(beta) of E7", "k-")] + points + [
        ([star_kl], [star_r], f"pi* at beta = {pb.beta}", "k*",
         {"markersize": 22, "markerfacecolor": "none", "markeredgewidth": 1.5, "zorder": 5})]
    near = [r for r in rows if abs(r["kl"] - star_kl) < 0.5]
    kls = [r["kl"] for r in near] + [star_kl]
    rws = [r["reward"] for r in near] + [star_r]
    pad_k, pad_r = max(0.02, 0.3 * (max(kls) - min(kls))), max(0.02, 0.3 * (max(rws) - min(rws)))
    axes = {"xlabel": "KL(pi || pi_ref), nats", "ylabel": "expected reward E_pi[r]"}
    plot_panels(out / f"frontier_{pb.name}.png", [
        {"title": f"where each algorithm lands ({pb.name}, beta = {pb.beta})", **axes, "curves": curves,
         "legend": "lower right"},
        {"title": "zoom around pi*", **axes, "curves": curves, "legend": False,
         "xlim": (min(kls) - pad_k, max(kls) + pad_k), "ylim": (min(rws) - pad_r, max(rws) + pad_r)}],
        width=6.5, height=5, caption=where_they_land(rows, pb, steps))

    # convergence: E2's objective along each run
    plot_panels(out / f"convergence_{pb.name}.png", [
        {"title": f"exact gradient flows ({pb.name})", "xlabel": "gradient step (log scale)", "xscale": "log",
         "ylabel": "E2: E[r] - beta KL(pi || pi_ref)", "hlines": [(float(T.objective(star, pb)), "E2 at pi*")],
         "legend": "outside",
         "curves": [([s for s, _, _ in res.run.history], [rw - pb.beta * k for _, rw, k in res.run.history],
                     res.algorithm, "-") for res in results]}],
        width=11, caption="The runs that land on pi* climb to E2's maximum; the others settle below it.")

    # the policies themselves
    xs = list(range(pb.K))
    plot_panels(out / f"policies_{pb.name}.png", [
        {"title": f"converged policies ({pb.name})", "xlabel": "response y (its reward r)",
         "ylabel": "probability pi(y)", "legend": "outside",
         "xticks": (xs, [f"y{k}, r = {float(v):g}" for k, v in enumerate(pb.rewards)]),
         "bars": [(xs, pb.ref_probs.tolist(), "pi_ref"), (xs, star.tolist(), "pi*")]
                 + [(xs, r["policy"], r["algorithm"]) for r in rows]}],
        width=13, caption="Each bar is one algorithm's converged probability of a response, beside pi_ref and pi*.")
    return rows

results = {"graded": landing_section(3, graded, args.group_size, args.steps, out, f)}
verifiable = T.verifiable_problem()
results["verifiable"] = landing_section(4, verifiable, args.group_size, args.steps, out,
                                        T.frontier(verifiable, torch.logspace(-3, 3, 121, dtype=torch.float64)))


# %% 5. Two follow-ups
def followups(pb: T.Problem, steps: int) -> dict:
    _common.banner("5a. GRPO, k3 in the loss: the effective beta against the group size G")
    theta0 = torch.log(pb.ref_probs)
    out = {"group_size": [], "k3_reward_beta": []}
    print(f"{'G':>3} {'std':>5} {'TV(pi*)':>8} {'fixed-pt res':>12} {'beta_eff':>9} {'TV(fwd-KL opt @ beta_eff)':>26}")
    for G in (2, 4, 8):
        groups = T.GroupEnumeration(pb.K, G)
        for std in (False, True):
            run = T.run_to_convergence(lambda th: T.grpo_expected_loss(th, pb, groups, "loss", scale_by_std=std),
                                       theta0, pb, lr=0.5, max_steps=steps, tol=1e-10)
            p = run.policy
            b = T.grpo_k3_loss_effective_beta(p, pb, G, std)
            row = {"G": G, "std": std, "tv_to_pi_star": float(T.tv(p, T.pi_star(pb))),
                   "residual": T.grpo_k3_loss_fixed_point_residual(p, pb, groups, scale_by_std=std),
                   "beta_eff": b, "tv_to_forward_opt": float(T.tv(p, T.forward_kl_optimum(pb, b)))}
            out["group_size"].append(row)
            print(f"{G:3d} {str(std):>5} {row['tv_to_pi_star']:8.4f} {row['residual']:12.1e} {b:9.4f} "
                  f"{row['tv_to_forward_opt']:26.1e}")
    print("no std: exactly argmax E r - beta G/(G-1) KL(pi_ref||pi). With std: the self-consistent\n"
          "pi = pi_ref / (1 - a(y)/beta) holds; beta * std_pi(r) * G/(G-1) is only an approximation.")

    _common.banner("5b. GRPO, k3 in the reward: which responses survive, as beta varies")
    print("(without E12's std, which converges fast; section 3 shows that at beta = 0.5 the std version lands at the same place)")
    print(f"{'beta':>5} {'std':>5} {'TV(pi*)':>8} {'c':>8} {'TV(pred)':>9}  policy")
    for beta in (0.25, 0.5, 1.0, 2.0, 4.0):
        p_b = T.Problem(pb.ref_probs, pb.rewards, beta, pb.name)
        groups = T.GroupEnumeration(p_b.K, 4)
        for std in (False,):
            run = T.run_to_convergence(lambda th: T.grpo_expected_loss(th, p_b, groups, "reward", scale_by_std=std),
                                       theta0, p_b, lr=0.5, max_steps=steps, tol=1e-10,
                                       lr_decay=0.1 if std else 0.0)
            p = run.policy
            pred, c = T.grpo_k3_reward_fixed_point(p_b, p > 1e-6)
            row = {"beta": beta, "std": std, "tv_to_pi_star": float(T.tv(p, T.pi_star(p_b))), "c": c,
                   "tv_to_prediction": float(T.tv(p, pred)), "policy": [round(float(x), 4) for x in p]}
            out["k3_reward_beta"].append(row)
            print(f"{beta:5.2f} {str(std):>5} {row['tv_to_pi_star']:8.4f} {c:8.4f} {row['tv_to_prediction']:9.1e}  "
                  f"{fmt_policy(p)}")
    print("the low-reward responses die (pi -> 0) whatever pi_ref gives them: k3 = pi_ref/pi - 1 - log(pi_ref/pi)\n"
          "grows as pi falls, so an under-sampled response is penalised MORE and falls further.")
    return out


results["followups"] = followups(graded, args.steps)
results["gaussian_estimators"] = T.gaussian_estimator_table()
results["estimator_gradients"] = T.estimator_gradient_table(graded, ts=(0.1, 0.25, 0.5, 1.0, 2.0, 4.0))
(out / "landings.json").write_text(json.dumps(results, indent=1))
print(f"\nsaved {', '.join(sorted(p.name for p in out.glob('*.png')))} and landings.json into {out} "
      f"[{time.time() - t0:.0f} s]")

# %% Try this
TRY_THIS = """
Try this (their seeded outcomes are in docs/course.md, session 6):
  python tutorials/07_theory_lab.py --group-size 8 --out runs/theory_g8
      GRPO's groups enumerated with G = 8: the k3-in-the-loss landing moves towards pi* (its effective
      beta, beta G / (G - 1), approaches beta), while DPO and the policy gradients stay on pi*.
  python tutorials/07_theory_lab.py --beta 0.1 --out runs/theory_beta01
      a smaller beta: pi* moves further from pi_ref (more reward, more KL), and the distances between
      the GRPO variants' landings and pi* change with it.
"""
print(TRY_THIS)


def landed(marker: str) -> dict:
    return next(r for r in results["graded"] if marker in r["algorithm"])


star = T.pi_star(graded)
_common.summary("07_theory_lab", beta=args.beta, G=args.group_size,
                pi_star_reward=f"{float(T.expected_reward(star, graded.rewards)):.4f}",
                pi_star_kl=f"{float(T.kl(star, graded.ref_probs)):.4f}",
                tv_dpo=f"{landed('(E9)')['tv_to_pi_star']:.1e}", tv_pg=f"{landed('(E2/E6)')['tv_to_pi_star']:.1e}",
                tv_grpo_k3_loss=f"{landed('(E13)')['tv_to_pi_star']:.3f}",
                tv_grpo_k3_reward=f"{landed('(E14)')['tv_to_pi_star']:.3f}")
