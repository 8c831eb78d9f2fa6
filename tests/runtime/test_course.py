"""Checks the course kit's pages (docs/reading_guide.md, course.md, course_answers.md, glossary.md):
every function, test, tutorial and exercise they name exists."""

import ast
import math
import re
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from minialign.tools import exercises

ROOT = Path(__file__).resolve().parents[2]
PAGES = ["reading_guide.md", "course.md", "course_answers.md", "glossary.md"]


@lru_cache(maxsize=None)
def defined_names(path: Path) -> frozenset:
    """Top-level functions and classes of a Python file, and Class.method for their methods."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{n.name}" for n in node.body if isinstance(n, ast.FunctionDef)}
    return frozenset(names)


def page(name: str) -> str:
    path = ROOT / "docs" / name
    if not path.is_file():
        pytest.skip(f"docs/{name} is not written yet")
    return path.read_text()


@pytest.mark.parametrize("name", PAGES)
def test_every_function_test_and_tutorial_named_exists(name):
    text = page(name)
    functions = re.findall(r"`minialign/([\w/]+)\.py: ([\w.]+)`", text)
    tests = re.findall(r"`(tests/[\w/]+\.py)::(test_\w+)", text)
    files = re.findall(r"`((?:tutorials|minialign|tests)/[\w/]+\.py)", text)
    assert functions or tests or files, f"{name} names no code"
    missing = [f"minialign/{f}.py: {fn}" for f, fn in functions
               if fn not in defined_names(ROOT / "minialign" / f"{f}.py")]
    missing += [f"{f}::{t}" for f, t in tests if not (ROOT / f).is_file() or t not in defined_names(ROOT / f)]
    missing += [f for f in files if not (ROOT / f).is_file()]
    assert not missing, f"docs/{name} names what does not exist: {missing}"


def test_the_reading_guide_names_each_exercise_where_its_equation_is():
    text = page("reading_guide.md")
    last_column = [row.rstrip().rstrip("|").rsplit("|", 1)[-1] for row in text.splitlines()
                   if row.startswith("| E") or row.startswith("| GAE") or row.startswith("| the value loss")]
    named = {n for cell in last_column for n in re.findall(r"`(\w+)`", cell)}
    assert named == set(exercises.BY_NAME), set(exercises.BY_NAME) ^ named
    for eq in ["E0a", "E0b"] + [f"E{i}" for i in range(1, 15)]:
        assert re.search(rf"^\| {eq}\b", text, re.M), f"the reading guide has no row for {eq}"


def test_the_doc_pages_link_to_the_glossary():
    glossary = page("glossary.md")
    anchors = set(re.findall(r'<a id="([\w-]+)"></a>', glossary))
    for path in sorted((ROOT / "docs").glob("*.md")):
        if path.name == "glossary.md":
            continue
        text = path.read_text()
        assert "glossary.md" in text, f"docs/{path.name} does not link to the glossary"
        for anchor in re.findall(r"glossary\.md#([\w-]+)", text):
            assert anchor in anchors, f"docs/{path.name} links to glossary.md#{anchor}, which does not exist"


# ----------------------------------------------------------------------------------------------
# the course plan's questions whose answer is a number: each is computed here, from the toy world's
# truth or the library's functions, and the answer key (docs/course_answers.md) must quote the
# same numbers under the question's id
# ----------------------------------------------------------------------------------------------

QUESTIONS = {}   # question id -> a function of the world that returns the numbers, as the key writes them


def question(qid: str):
    def register(fn):
        QUESTIONS[qid] = fn
        return fn
    return register


@question("1.1")
def entropy_floor(world):
    return [f"{world.corpus_entropy()['nats_per_token']:.4f}"]                  # 1.0676


@question("1.2")
def uniform_model_loss(world):
    V = world.tokenizer.vocab_size
    return [str(V), f"{math.log(V):.3f}"]                                         # 53, ln 53 = 3.970


@question("1.3")
def sft_floor(world):
    return [f"{world.sft_entropy()['nats_per_token']:.4f}"]                     # 0.8427


@question("1.4")
def perfect_imitator_accuracy(world):
    # a demonstration's answer is wrong with probability arithmetic_noise: an exact imitator,
    # sampling at temperature 1, is right with probability 1 - noise
    return [f"{world.config.arithmetic_noise:.1f}", f"{1 - world.config.arithmetic_noise:.1f}"]  # 0.4, 0.6


@question("1.5")
def token_logps_by_hand(world):
    from minialign.ops import token_logps
    logits, tokens = torch.tensor([[[2.0, 1.0, 0.0]]]), torch.tensor([[0]])
    return [f"{token_logps(logits, tokens).item():.4f}",                          # -0.4076
            f"{token_logps(logits, tokens, temperature=2.0).item():.4f}"]         # -0.6802


def heldout_pairs(world):
    """The reward model's held-out pairs: RewardModelConfig's eval_pairs at seed + 10000 (seed 0)."""
    from minialign.stages.reward_model import RewardModelConfig
    c = RewardModelConfig()
    return world.preference_dataset(c.eval_pairs, seed=c.seed + 10_000)


@question("2.1")
def bayes_optimal_accuracy(world):
    return [f"{world.bayes_optimal_accuracy(heldout_pairs(world)):.3f}"]        # 0.748


@question("2.2")
def noisy_labels(world):
    gaps = [world.true_reward(p["prompt"], p["chosen"]) - world.true_reward(p["prompt"], p["rejected"])
            for p in heldout_pairs(world)]
    return [f"{sum(g < 0 for g in gaps) / len(gaps):.1%}",                       # against r*: 19.8%
            f"{sum(g == 0 for g in gaps) / len(gaps):.1%}"]                      # ties: 11.7%


@question("2.3")
def loss_of_the_true_reward(world):
    from minialign.reward_model import reward_model_loss
    pairs = heldout_pairs(world)
    r_w = torch.tensor([world.true_reward(p["prompt"], p["chosen"]) for p in pairs])
    r_l = torch.tensor([world.true_reward(p["prompt"], p["rejected"]) for p in pairs])
    return [f"{reward_model_loss(r_w, r_l).item():.3f}"]                         # 0.509


@question("2.4")
def bradley_terry_by_hand(world):
    from minialign.reward_model import bradley_terry_probability, reward_model_loss
    r_w, r_l = torch.tensor([1.5]), torch.tensor([0.5])
    p = bradley_terry_probability(r_w, r_l).item()
    assert bradley_terry_probability(r_w + 100, r_l + 100).item() == pytest.approx(p, abs=1e-6)
    return [f"{p:.4f}", f"{reward_model_loss(r_w, r_l).item():.4f}",             # sigma(1) = 0.7311, 0.3133
            f"{bradley_terry_probability(r_w + 100, r_l).item():.4f}"]           # 1.0000


@question("3.1")
def clipped_surrogate_by_hand(world):
    from minialign.ppo import clipped_surrogate_loss
    out = []
    for rho, A in ((1.5, 1.0), (1.5, -1.0), (0.5, 1.0), (0.5, -1.0)):
        logp = torch.tensor([[math.log(rho)]], requires_grad=True)
        loss, _ = clipped_surrogate_loss(logp, torch.zeros(1, 1), torch.tensor([[A]]), torch.ones(1, 1), 0.2)
        loss.backward()
        # the objective's term and its derivative in log pi: 1.2 / 0, -1.5 / -1.5, 0.5 / 0.5, -0.8 / 0
        out.append(f"{-loss.item():.1f} / {-logp.grad.item():.1f}".replace("-0.0", "0.0"))
    return out


def three_token_response():
    from minialign.ppo import per_token_rewards
    logps = torch.tensor([[-1.0, -2.0, -0.5]])
    ref_logps = torch.tensor([[-1.5, -1.0, -0.5]])                               # log-ratios 0.5, -1, 0
    mask = torch.ones(1, 3)
    return per_token_rewards(torch.tensor([2.0]), logps, ref_logps, mask, beta=0.1), mask


@question("3.2")
def per_token_rewards_by_hand(world):
    rewards, _ = three_token_response()
    return [", ".join(f"{r:.2f}" for r in rewards[0].tolist()),                  # -0.05, 0.10, 2.00
            f"{rewards.sum().item():.2f}"]                                        # 2.05


@question("3.3")
def gae_one_one_is_r_minus_v(world):
    from minialign.ppo import gae
    rewards, mask = three_token_response()
    adv, _ = gae(rewards, torch.tensor([[0.5, 0.4, 0.3]]), mask, gamma=1.0, lam=1.0)
    return [f"{adv[0, 0].item():.2f}"]                                            # 2.05 - 0.5 = 1.55


@question("3.4")
def best_and_typical_review(world):
    from minialign.toyworld import CLAUSE_COUNT_PROBS, MODIFIERS, POLARITY
    best = max(CLAUSE_COUNT_PROBS) * max(MODIFIERS.values()) * max(POLARITY.values())
    assert world.true_reward("review the movie", "the movie was very great and the story was very great "
                             "and the music was very great .") == best
    # a review drawn from the grammar: each clause's polarity averages 0 over the lexicon
    return [f"{best:.1f}", f"{sum(POLARITY.values()) / len(POLARITY):.1f}",      # 6.0, 0.0
            f"{world.config.malformed_reward:.1f}"]                               # -7.0


TUTORIAL_04 = (torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64),        # pi_ref
               torch.tensor([-1.0, 0.0, 0.5, 1.0], dtype=torch.float64))        # r


@question("4.1")
def optimal_policy_of_tutorial_04(world):
    from minialign.dpo import optimal_policy
    ref, r = TUTORIAL_04
    pi = optimal_policy(ref, r, beta=1.0)
    return [", ".join(f"{p:.3f}" for p in pi.tolist()),                           # 0.140, 0.286, 0.314, 0.259
            f"{(pi * r).sum().item():.3f}", f"{(pi * (pi / ref).log()).sum().item():.3f}"]  # 0.276, 0.229


@question("4.2")
def implied_reward_offset(world):
    from minialign.dpo import implied_reward, log_partition, optimal_policy
    ref, r = TUTORIAL_04
    offset = implied_reward(optimal_policy(ref, r, 0.3), ref, 0.3) - r
    assert torch.allclose(offset, offset[0].expand(4), atol=1e-12)             # the same for every y
    assert offset[0].item() == pytest.approx(-0.3 * log_partition(ref, r, 0.3).item(), abs=1e-12)
    return [f"{offset[0].item():.3f}"]                                            # -beta log Z = -0.429


@question("4.3")
def dpo_loss_at_the_start(world):
    from minialign.dpo import dpo_loss
    x = torch.tensor([-3.0, -7.5])
    return [f"{dpo_loss(x, x - 1, x, x - 1, beta=0.1)[0].item():.4f}"]           # ln 2 = 0.6931


@question("4.4")
def dpo_pair_weight(world):
    from minialign.dpo import dpo_loss_gradients
    # beta = 1, B = 1, a pair whose implicit-reward margin is 1: weight sigma(-1); 1/2 at the start
    g_w, _ = dpo_loss_gradients(torch.tensor([0.0]), torch.tensor([-1.0]), torch.tensor([0.0]),
                                torch.tensor([0.0]), beta=1.0)
    g0, _ = dpo_loss_gradients(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]),
                               torch.tensor([0.0]), beta=1.0)
    return [f"{-g_w.item():.4f}", f"{-g0.item():.1f}"]                            # 0.2689, 0.5


@question("5.1")
def group_advantages_by_hand(world):
    from minialign.grpo import group_advantages
    A = group_advantages(torch.tensor([1.0, 0.0, 0.0, 3.0]), group_size=4)
    same = group_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0]), group_size=4)
    return [", ".join(f"{a:.3f}" for a in A.tolist()),                            # 0.000, -0.707, -0.707, 1.414
            f"{same.abs().sum().item():.1f}"]                                     # 0.0


@question("5.2")
def zero_spread_groups(world):
    from minialign.grpo import GRPOHyperparams
    from minialign.policy_gradient_sampling import zero_spread_fraction
    G = GRPOHyperparams().group_size
    out = [str(G)]
    groups = torch.cartesian_prod(*[torch.tensor([0.0, 1.0], dtype=torch.float64)] * G)  # all 2^G groups
    spread0 = torch.tensor([zero_spread_fraction(g, G) for g in groups])
    for p in (0.5, 0.9):
        exact = p ** G + (1 - p) ** G                                            # all right, or all wrong
        prob = torch.prod(torch.where(groups == 1, torch.tensor(p, dtype=torch.float64), 1 - p), dim=1)
        assert (prob * spread0).sum().item() == pytest.approx(exact, abs=1e-12)
        out.append(f"{exact:.4f}")                                               # 0.0078, 0.4305
    return out


@question("5.3")
def k1_and_k3_by_hand(world):
    from minialign.ops import kl_k1, kl_k3
    out = []
    for p, q in ((0.5, 0.25), (0.25, 0.5)):
        lp, lq = torch.tensor(math.log(p)), torch.tensor(math.log(q))
        out += [f"{kl_k1(lp, lq).item():.4f}", f"{kl_k3(lp, lq).item():.4f}"]   # 0.6931, 0.1931; -0.6931, 0.3069
    return out


@question("5.4")
def heldout_questions(world):
    held, train = world.arithmetic_questions("heldout"), world.arithmetic_questions("train")
    assert not {q["prompt"] for q in held} & {q["prompt"] for q in train}
    return [str(len(held)), str(len(held) + len(train))]                         # 20 of 100


@question("6.1")
def graded_problem_optimum(world):
    from minialign import theory as T
    pb = T.graded_problem(beta=0.5)
    star = T.pi_star(pb)
    return [f"{T.expected_reward(star, pb.rewards).item():.4f}", f"{T.kl(star, pb.ref_probs).item():.4f}"]


@question("6.2")
def grpo_k3_effective_beta(world):
    from minialign import theory as T
    beta, G = 0.5, 4
    pb = T.graded_problem(beta=beta)
    beta_eff = beta * G / (G - 1)
    # without the std, GRPO's k3-in-the-loss fixed point is the forward-KL optimum at beta G / (G - 1)
    p = T.forward_kl_optimum(pb, beta_eff)
    assert T.grpo_k3_loss_fixed_point_residual(p, pb, T.GroupEnumeration(pb.K, G), scale_by_std=False) < 1e-9
    return [f"{beta_eff:.4f}"]                                                    # 0.6667


@pytest.mark.parametrize("qid", sorted(QUESTIONS))
def test_the_answer_key_quotes_the_computed_numbers(qid, world):
    numbers = QUESTIONS[qid](world)
    answers = dict(re.findall(r"^### Q(\d\.\d)\b(.*?)(?=^### |\Z)", page("course_answers.md"), re.M | re.S))
    assert qid in answers, f"docs/course_answers.md has no answer for Q{qid}"
    for n in numbers:
        assert n in answers[qid], f"the answer to Q{qid} in docs/course_answers.md does not quote {n}"
    assert re.search(rf"\*\*Q{re.escape(qid)}\*\*", page("course.md")), f"docs/course.md does not ask Q{qid}"
