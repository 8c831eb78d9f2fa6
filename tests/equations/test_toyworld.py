"""Checks minialign/toyworld.py: exact entropies, the hidden reward, BT labels, JSONL files."""

import math
import random

import pytest

from minialign.toyworld import (Choice, Seq, ToyWorld, Word, WorldConfig, bayes_optimal_accuracy,
                                read_jsonl, write_jsonl)


def test_entropy_of_a_tiny_grammar_by_hand():
    # strings: "a" (p=.5), "b c" (p=.5*.25=.125), "b d" (p=.5*.75=.375)
    g = Choice([(0.5, Word("a")), (0.5, Seq(Word("b"), Choice([(0.25, Word("c")), (0.75, Word("d"))])))])
    # H = -(.5 ln .5 + .125 ln .125 + .375 ln .375) = .3466 + .2599 + .3678 = .9743
    # recursively: ln 2 + .5 * H(.25, .75) = .6931 + .5 * .5623 = .9743
    assert g.entropy() == pytest.approx(0.9743, abs=1e-4)
    assert g.mean_length() == pytest.approx(1.5)  # .5 * 1 + .5 * 2
    assert math.exp(g.logprob(["b", "d"])) == pytest.approx(0.375)
    assert g.logprob(["b"]) == -math.inf  # not a sentence of the grammar
    with pytest.raises(ValueError, match="sum to 1"):
        Choice([(0.5, Word("a")), (0.4, Word("b"))])


def test_arithmetic_entropy_by_hand(world):
    # 100 operand pairs, uniform: ln 100 = 4.6052; answer right w.p. .6, +1 or +2 w.p. .2 each:
    # H(.6, .2, .2) = .6 * .5108 + 2 * .2 * 1.6094 = .3065 + .6438 = .9503; total 5.5555 nats
    assert world.arithmetic_grammar.entropy() == pytest.approx(5.5555, abs=1e-4)


def test_corpus_is_unambiguous_and_its_entropy_matches_samples(world):
    """Each derivation's probability equals the parser's probability of the string (no ambiguity)."""
    g, rng = world.corpus_grammar, random.Random(0)
    samples = [g.sample(rng) for _ in range(300)]
    for toks, lp in samples:
        assert g.logprob(toks) == pytest.approx(lp, abs=1e-9)
    mc = -sum(lp for _, lp in (g.sample(rng) for _ in range(5000))) / 5000
    assert mc == pytest.approx(g.entropy(), rel=0.03)
    floor = world.corpus_entropy()
    assert floor["nats_per_token"] == pytest.approx(floor["nats_per_line"] / floor["mean_tokens"])


def test_hidden_reward_by_hand(world):
    x = "review the movie"
    # very good: 2 * .5 = 1; not bad: -1 * -.5 = .5; total 1.5
    assert world.true_reward(x, "the movie was very good and the music was not bad .") == 1.5
    assert world.true_reward(x, "the movie was awful .") == -1.0
    bad = world.config.malformed_reward
    assert world.true_reward(x, "the book was great .") == bad        # wrong item
    assert world.true_reward(x, "the movie was great") == bad         # no final "."
    assert world.true_reward(x, "great great great") == bad           # not a review
    assert world.true_reward(x, "the movie was great .", finished=False) == bad  # cut off before EOS
    assert world.true_reward("what is 3 + 4 ?", "7") == 1.0
    assert world.true_reward("what is 3 + 4 ?", "8") == 0.0
    assert world.true_reward("what is 3 + 4 ?", "7", finished=False) == 0.0
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        world.true_reward("tell me a joke", "no")


def test_bayes_optimal_accuracy_by_hand():
    assert bayes_optimal_accuracy([0.0]) == 0.5                     # sigma(0)
    assert bayes_optimal_accuracy([1.0]) == pytest.approx(0.7311, abs=1e-4)  # sigma(1)
    # (sigma(0) + sigma(2) + sigma(|-2|)) / 3 = (.5 + .8808 + .8808) / 3 = .7539
    assert bayes_optimal_accuracy([0.0, 2.0, -2.0]) == pytest.approx(0.7539, abs=1e-4)


def test_preference_labels_follow_bradley_terry(world):
    pairs = world.preference_dataset(4000, seed=1)
    r = lambda p, y: world.true_reward(p["prompt"], y)  # noqa: E731
    agree = sum(r(p, p["chosen"]) > r(p, p["rejected"]) for p in pairs)
    ties = sum(r(p, p["chosen"]) == r(p, p["rejected"]) for p in pairs)
    # the Bayes-optimal rule (pick the higher r*, a coin on ties) matches the labels at about its
    # expected rate; 4000 pairs give a standard error of about 0.007
    assert (agree + ties / 2) / len(pairs) == pytest.approx(world.bayes_optimal_accuracy(pairs), abs=0.025)
    assert all(p["chosen"] != p["rejected"] for p in pairs)


def test_datasets_are_seeded_and_splits_are_disjoint(world):
    assert world.sft_dataset(50, seed=3) == world.sft_dataset(50, seed=3)
    assert world.sft_dataset(50, seed=3) != world.sft_dataset(50, seed=4)
    train = {q["prompt"] for q in world.arithmetic_questions("train")}
    held = {q["prompt"] for q in world.arithmetic_questions("heldout")}
    assert not train & held and len(train) + len(held) == 100
    sft_math = {r["prompt"] for r in world.sft_dataset(2000) if r["prompt"].startswith("what")}
    assert sft_math <= train  # SFT never sees a held-out question
    tok = world.tokenizer
    for row in world.sft_dataset(200) + world.pretrain_corpus(200):
        texts = row.values() if isinstance(row, dict) else [row]
        assert all(tok.decode(tok.encode(t)) == t for t in texts)


def test_sft_entropy_floor(world):
    h = world.sft_entropy()
    assert 0 < h["nats_per_token"] < world.corpus_entropy()["nats_per_token"]
    noiseless = ToyWorld(WorldConfig(arithmetic_noise=0.0))
    assert noiseless.arithmetic_grammar.entropy() == pytest.approx(math.log(100))


def test_jsonl_roundtrip_and_errors(tmp_path):
    rows = [{"prompt": "review the movie", "response": "the movie was good ."}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    assert read_jsonl(tmp_path / "d.jsonl", ("prompt", "response")) == rows
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        read_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "miss.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"miss.jsonl:1: missing .*response"):
        read_jsonl(tmp_path / "miss.jsonl", ("prompt", "response"))
    (tmp_path / "list.jsonl").write_text('[1, 2]\n')
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_jsonl(tmp_path / "list.jsonl")
