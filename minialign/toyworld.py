"""The toy world: every dataset minialign trains on, generated from a seed, with exact truths.

Why a toy world: on real data nobody knows the true entropy of text, the true reward of an
answer, or how often an annotator's label is right. Here all three are known exactly, so every
stage can be measured against the truth it approximates.

**The grammar.** Every line of text is drawn from a small probabilistic grammar built from three
kinds of node (``Word``, ``Seq``, ``Choice``). Each derivation gives a distinct string, so the
probability of a string is the product of the choices that made it, and the grammar's entropy is
exact: H(Choice) = H(p) + sum_i p_i H(child_i), H(Seq) = sum of its parts'. Two kinds of line:

- reviews: ``the movie was very good and the music was not bad .``: one to three clauses, an
  optional modifier (``very``, ``not``) before each adjective;
- arithmetic: ``3 + 4 = 7``; with probability ``arithmetic_noise`` the line is wrong, its answer
  one or two too high (the web contains wrong arithmetic; imitation learns it, RL can fix it).

**Stage data.**
- pre-training: lines of the grammar (reviews and arithmetic, mixed), E0a;
- SFT: instructions ``review the movie`` -> a review of the movie, and ``what is 3 + 4 ?`` ->
  ``7`` (with the same noise), E0b;
- preferences: two reviews of the same item, labelled by sampling Bradley-Terry with the hidden
  reward (E3): P(first preferred) = sigma(r*(x, y_1) - r*(x, y_2)), as the DPO paper labelled
  IMDb pairs with a sentiment classifier;
- prompts for PPO (review instructions) and GRPO (arithmetic questions, with a train/held-out
  split of operand pairs).

**The hidden reward r*(x, y).**
- for ``review the ITEM``: the sentiment of the response, sum over clauses of
  polarity(adjective) x modifier (``very`` x2, ``not`` x-1), if the response is a well-formed
  review of the requested item; otherwise ``malformed_reward`` (default -7, below every
  well-formed review, so reward hacking into gibberish shows in r*);
- for ``what is a + b ?``: 1 if the response is the number a + b, else 0 (a verifiable reward).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------
# A probabilistic grammar with exact probabilities and entropy
# ----------------------------------------------------------------------------------------------


class Node:
    """A piece of the grammar: it samples token lists and knows its exact entropy."""

    def sample(self, rng: random.Random) -> tuple[list[str], float]:
        """(tokens, log-probability of this derivation)."""
        raise NotImplementedError

    def entropy(self) -> float:
        """Exact entropy in nats of the token string this node emits."""
        raise NotImplementedError

    def mean_length(self) -> float:
        """Expected number of tokens."""
        raise NotImplementedError

    def parses(self, tokens: list[str], i: int, memo: dict) -> list[tuple[int, float]]:
        """Every way to read ``tokens[i:j]`` with this node: a list of (j, log-probability).

        ``memo`` caches (node, i) -> parses within one ``logprob`` call (shared subtrees such as
        the adjective list are read once per position).
        """
        key = (id(self), i)
        if key not in memo:
            memo[key] = self._parses(tokens, i, memo)
        return memo[key]

    def _parses(self, tokens, i, memo):
        raise NotImplementedError

    def logprob(self, tokens: list[str]) -> float:
        """log P(tokens) under this node (-inf if the node cannot emit exactly these tokens)."""
        ps = [lp for j, lp in self.parses(tokens, 0, {}) if j == len(tokens)]
        return math.log(sum(math.exp(lp) for lp in ps)) if ps else -math.inf


class Word(Node):
    def __init__(self, *tokens: str):
        self.tokens = list(tokens)

    def sample(self, rng):
        return list(self.tokens), 0.0

    def entropy(self):
        return 0.0

    def mean_length(self):
        return float(len(self.tokens))

    def _parses(self, tokens, i, memo):
        n = len(self.tokens)
        return [(i + n, 0.0)] if tokens[i:i + n] == self.tokens else []


class Seq(Node):
    def __init__(self, *parts: Node):
        self.parts = list(parts)

    def sample(self, rng):
        out, lp = [], 0.0
        for part in self.parts:
            toks, l = part.sample(rng)
            out += toks
            lp += l
        return out, lp

    def entropy(self):
        return sum(p.entropy() for p in self.parts)

    def mean_length(self):
        return sum(p.mean_length() for p in self.parts)

    def _parses(self, tokens, i, memo):
        states = [(i, 0.0)]
        for part in self.parts:
            states = [(k, lp + l) for j, lp in states for k, l in part.parses(tokens, j, memo)]
            if not states:
                break
        return states


class Choice(Node):
    def __init__(self, options: list[tuple[float, Node]]):
        total = sum(p for p, _ in options)
        if abs(total - 1.0) > 1e-9 or any(p <= 0 for p, _ in options):
            raise ValueError(f"choice probabilities must be positive and sum to 1, got {total}")
        self.options = options
        self._cum = []
        acc = 0.0
        for p, _ in options:
            acc += p
            self._cum.append(acc)
        self._entropy = None

    def sample(self, rng):
        u = rng.random()
        k = next((i for i, c in enumerate(self._cum) if u < c), len(self.options) - 1)
        p, node = self.options[k]
        toks, lp = node.sample(rng)
        return toks, lp + math.log(p)

    def entropy(self):
        if self._entropy is None:  # cached: subtrees are shared
            self._entropy = sum(p * (-math.log(p) + node.entropy()) for p, node in self.options)
        return self._entropy

    def mean_length(self):
        return sum(p * node.mean_length() for p, node in self.options)

    def _parses(self, tokens, i, memo):
        return [(j, lp + math.log(p)) for p, node in self.options for j, lp in node.parses(tokens, i, memo)]


def uniform(nodes: list[Node]) -> Choice:
    return Choice([(1.0 / len(nodes), n) for n in nodes])


def number(n: int) -> Word:
    """An integer as digit tokens: 15 -> ``1 5``."""
    return Word(*str(n))


# ----------------------------------------------------------------------------------------------
# The world
# ----------------------------------------------------------------------------------------------

ITEMS = ["movie", "book", "song", "game", "show", "meal"]
ASPECTS = ["story", "music", "ending", "acting", "price", "service"]
POLARITY = {  # the hidden sentiment lexicon
    "great": 1.0, "wonderful": 1.0, "good": 0.5, "nice": 0.5, "fun": 0.5,
    "okay": 0.0, "long": 0.0, "short": 0.0,
    "dull": -0.5, "bad": -0.5, "slow": -0.5, "awful": -1.0, "terrible": -1.0,
}
MODIFIERS = {"": 1.0, "very": 2.0, "not": -1.0}
MODIFIER_PROBS = {"": 0.6, "very": 0.25, "not": 0.15}
CLAUSE_COUNT_PROBS = {1: 0.4, 2: 0.35, 3: 0.25}
CONJUNCTIONS = {"and": 0.6, "but": 0.4}


@dataclass
class WorldConfig:
    seed: int = 0                    # fixes the held-out split of arithmetic questions
    p_arithmetic: float = 0.25       # fraction of pre-training lines that are arithmetic
    max_operand: int = 9             # arithmetic questions a + b with 0 <= a, b <= max_operand
    arithmetic_noise: float = 0.4    # probability that a demonstration's answer is wrong
    heldout_fraction: float = 0.2    # fraction of (a, b) pairs GRPO never trains on
    malformed_reward: float = -7.0   # r* of a response that is not a well-formed review of the item


class ToyWorld:
    """Generators, the hidden reward r* and the exact truths of one toy world."""

    def __init__(self, config: WorldConfig | None = None):
        self.config = c = config or WorldConfig()
        if not 0 <= c.arithmetic_noise < 1:
            raise ValueError("arithmetic_noise must be in [0, 1)")
        if not 0 < c.p_arithmetic < 1:
            raise ValueError("p_arithmetic must be in (0, 1)")
        pairs = [(a, b) for a in range(c.max_operand + 1) for b in range(c.max_operand + 1)]
        random.Random(c.seed).shuffle(pairs)
        n_held = max(1, round(c.heldout_fraction * len(pairs)))
        self.heldout_pairs = sorted(pairs[:n_held])
        self.train_pairs = sorted(pairs[n_held:])
        self._review_grammars: dict[str, Node] = {}
        self._review_rewards: dict[tuple[str, str], float] = {}

    # --- vocabulary -----------------------------------------------------------------------------
    @cached_property
    def tokenizer(self) -> Tokenizer:
        words = ["the", "was", ".", "review", "what", "is", "+", "=", "?"]
        words += ITEMS + ASPECTS + list(POLARITY) + [m for m in MODIFIERS if m] + list(CONJUNCTIONS)
        words += [str(d) for d in range(10)]
        return Tokenizer(words)

    # --- grammar --------------------------------------------------------------------------------
    @staticmethod
    def _assessment() -> Node:
        """``[very|not] ADJ``."""
        adjectives = uniform([Word(a) for a in POLARITY])
        mods = [(p, Seq(Word(m), adjectives) if m else adjectives) for m, p in MODIFIER_PROBS.items()]
        return Choice(mods)

    def review_grammar(self, item: str | None = None) -> Node:
        """A review: ``the ITEM was [mod] ADJ`` then 0-2 clauses ``CONJ the ASPECT was [mod] ADJ``, ``.``."""
        assess = self._assessment()
        subject = Word(item) if item is not None else uniform([Word(i) for i in ITEMS])
        first = Seq(Word("the"), subject, Word("was"), assess)
        later = Seq(Choice([(p, Word(w)) for w, p in CONJUNCTIONS.items()]),
                    Word("the"), uniform([Word(a) for a in ASPECTS]), Word("was"), assess)
        return Choice([(p, Seq(first, *([later] * (k - 1)), Word("."))) for k, p in CLAUSE_COUNT_PROBS.items()])

    def answer_grammar(self, a: int, b: int) -> Node:
        """The answer to a + b: right with probability 1 - noise, else one or two too high."""
        c, eta = a + b, self.config.arithmetic_noise
        if eta == 0:
            return number(c)
        return Choice([(1 - eta, number(c)), (eta / 2, number(c + 1)), (eta / 2, number(c + 2))])

    @cached_property
    def arithmetic_grammar(self) -> Node:
        """``a + b = c`` over every operand pair."""
        m = self.config.max_operand
        return uniform([Seq(number(a), Word("+"), number(b), Word("="), self.answer_grammar(a, b))
                        for a in range(m + 1) for b in range(m + 1)])

    @cached_property
    def corpus_grammar(self) -> Node:
        p = self.config.p_arithmetic
        return Choice([(1 - p, self.review_grammar()), (p, self.arithmetic_grammar)])

    # --- exact truths ---------------------------------------------------------------------------
    def corpus_entropy(self) -> dict:
        """The floor of the pre-training loss (E0a), exactly.

        A document is ``<bos> line <eos>``; the model predicts every token after ``<bos>``, the
        EOS included (``L + 1`` predictions for a line of ``L`` tokens). The best possible mean
        loss per predicted token over a large corpus is H(line) / (E[L] + 1) nats: the EOS
        costs nothing extra, because where a line ends is part of which line it is.
        """
        g = self.corpus_grammar
        h, mean_len = g.entropy(), g.mean_length()
        return {"nats_per_line": h, "mean_tokens": mean_len + 1, "nats_per_token": h / (mean_len + 1)}

    def sft_entropy(self) -> dict:
        """The floor of the SFT loss (E0b): H(response | prompt) per response token, exactly.

        Mixes reviews (the item is given by the prompt) and answers to the train-split questions
        in the proportions of ``sft_dataset``; each response ends with a predicted EOS.
        """
        p = self.config.p_arithmetic
        review = self.review_grammar(ITEMS[0])  # every item's review grammar has the same shape
        answers = [self.answer_grammar(a, b) for a, b in self.train_pairs]
        h_ans = sum(g.entropy() for g in answers) / len(answers)
        len_ans = sum(g.mean_length() for g in answers) / len(answers)
        h = (1 - p) * review.entropy() + p * h_ans
        tokens = (1 - p) * (review.mean_length() + 1) + p * (len_ans + 1)
        return {"nats_per_response": h, "mean_tokens": tokens, "nats_per_token": h / tokens}

    # --- stage data -----------------------------------------------------------------------------
    def pretrain_corpus(self, n: int, seed: int = 0) -> list[str]:
        """``n`` lines of text (E0a data)."""
        rng = random.Random(seed)
        return [Tokenizer.join(self.corpus_grammar.sample(rng)[0]) for _ in range(n)]

    def review_prompt(self, item: str) -> str:
        return f"review the {item}"

    def arithmetic_prompt(self, a: int, b: int) -> str:
        return f"what is {a} + {b} ?"

    def review_prompts(self) -> list[str]:
        """Prompts for PPO and for sampling after DPO."""
        return [self.review_prompt(i) for i in ITEMS]

    def arithmetic_questions(self, split: str = "train") -> list[dict]:
        """``[{"prompt": "what is 3 + 4 ?", "answer": "7"}, ...]``; split is "train" or "heldout"."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        pairs = self.train_pairs if split == "train" else self.heldout_pairs
        return [{"prompt": self.arithmetic_prompt(a, b), "answer": str(a + b)} for a, b in pairs]

    def sft_dataset(self, n: int, seed: int = 0, p_arithmetic: float | None = None) -> list[dict]:
        """``n`` instruction/response pairs (E0b data): reviews and arithmetic (train split only)."""
        rng = random.Random(seed)
        p = self.config.p_arithmetic if p_arithmetic is None else p_arithmetic
        out = []
        for _ in range(n):
            if rng.random() < p:
                a, b = rng.choice(self.train_pairs)
                toks, _ = self.answer_grammar(a, b).sample(rng)
                out.append({"prompt": self.arithmetic_prompt(a, b), "response": Tokenizer.join(toks)})
            else:
                item = rng.choice(ITEMS)
                out.append({"prompt": self.review_prompt(item), "response": self.sample_review(item, rng)})
        return out

    def sample_review(self, item: str, rng: random.Random) -> str:
        return Tokenizer.join(self.review_grammar(item).sample(rng)[0])

    def preference_dataset(self, n: int, seed: int = 0) -> list[dict]:
        """``n`` pairs ``{"prompt", "chosen", "rejected"}``, labels sampled from Bradley-Terry with r*.

        Two reviews y_1, y_2 of the same item are drawn; y_1 is "chosen" with probability
        sigma(r*(x, y_1) - r*(x, y_2)) (E3 with the true reward). Pairs with two identical
        responses are redrawn: they carry no preference.
        """
        rng = random.Random(seed)
        out = []
        while len(out) < n:
            item = rng.choice(ITEMS)
            prompt = self.review_prompt(item)
            y1, y2 = self.sample_review(item, rng), self.sample_review(item, rng)
            if y1 == y2:
                continue
            gap = self.true_reward(prompt, y1) - self.true_reward(prompt, y2)
            if rng.random() < sigmoid(gap):
                out.append({"prompt": prompt, "chosen": y1, "rejected": y2})
            else:
                out.append({"prompt": prompt, "chosen": y2, "rejected": y1})
        return out

    def bayes_optimal_accuracy(self, pairs: list[dict]) -> float:
        """Expected accuracy of the best possible classifier on these pairs' sampled labels.

        Knowing r*, the best guess is the response with the higher r*; it matches a label sampled
        from Bradley-Terry with probability sigma(|r*_1 - r*_2|). The mean over pairs is the
        ceiling for any reward model's accuracy on these labels.
        """
        gaps = [self.true_reward(p["prompt"], p["chosen"]) - self.true_reward(p["prompt"], p["rejected"])
                for p in pairs]
        return bayes_optimal_accuracy(gaps)

    # --- the hidden reward ----------------------------------------------------------------------
    def true_reward(self, prompt: str, response: str, finished: bool = True) -> float:
        """r*(x, y). ``finished=False`` marks a response cut off before its EOS: it is malformed."""
        words = prompt.split()
        if words[:1] == ["review"] and len(words) == 3 and words[2] in ITEMS:
            if not finished:
                return self.config.malformed_reward
            return self.review_reward(words[2], response)
        if words[:2] == ["what", "is"] and len(words) == 6:
            a, b = int(words[2]), int(words[4])
            return 1.0 if finished and response.strip() == str(a + b) else 0.0
        raise ValueError(f"prompt {prompt!r} is not a toy-world prompt")

    def review_reward(self, item: str, response: str) -> float:
        """Sentiment of a well-formed review of ``item``; ``malformed_reward`` otherwise."""
        key = (item, response)
        if key not in self._review_rewards:  # parsing is the slow part: each response once
            self._review_rewards[key] = self._review_reward(item, response)
        return self._review_rewards[key]

    def _review_reward(self, item: str, response: str) -> float:
        tokens = Tokenizer.split(response)
        if item not in self._review_grammars:
            self._review_grammars[item] = self.review_grammar(item)
        if self._review_grammars[item].logprob(tokens) == -math.inf:
            return self.config.malformed_reward
        score, modifier = 0.0, 1.0
        for w in tokens:
            if w in MODIFIERS:
                modifier = MODIFIERS[w]
            elif w in POLARITY:
                score += modifier * POLARITY[w]
                modifier = 1.0
        return score

    def is_correct(self, prompt: str, response: str) -> bool:
        return self.true_reward(prompt, response) == 1.0



def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def bayes_optimal_accuracy(gaps) -> float:
    """mean_i sigma(|gap_i|): the best accuracy on labels sampled as P(1 wins) = sigma(gap)."""
    gaps = list(gaps)
    if not gaps:
        raise ValueError("bayes_optimal_accuracy of no pairs")
    return sum(sigmoid(abs(g)) for g in gaps) / len(gaps)


# ----------------------------------------------------------------------------------------------
# JSONL files
# ----------------------------------------------------------------------------------------------


def write_jsonl(path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path, required: tuple[str, ...] = ()) -> list[dict]:
    """Rows of a JSONL file; a malformed line or a missing field is an error naming file and line."""
    from .runtime.datafiles import read_rows

    rows, bad = read_rows(path)
    bad += [(where, f"missing or non-string field(s) {missing}") for where, row in rows
            if (missing := [k for k in required if not isinstance(row.get(k), str)])]
    if bad:
        where, why = min(bad, key=lambda b: int(b[0].split()[1]))
        raise ValueError(f"{path}:{where.split()[1]}: {why}")
    return [row for _, row in rows]
