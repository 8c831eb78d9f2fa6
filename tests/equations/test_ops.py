"""Checks minialign/ops.py: E1 token log-probs, masked reductions, KL estimators, entropy."""

import math

import pytest
import torch
from handworked import expect

from minialign.ops import (check_choice, check_in_range, check_nonempty_rows, check_nonnegative, check_per_sequence,
                           check_positive, check_sequence_logps, check_token_tensors, entropy_from_logits,
                           explained_variance, kl_k1, kl_k2, kl_k3, masked_mean, masked_sum, masked_sum_over,
                           masked_var, masked_whiten, model_token_logps, sequence_logps, token_logps)


@pytest.mark.exercise("token_logps")
def test_token_logps_by_hand():
    logits = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])  # (B=1, T=2, V=3)
    tokens = torch.tensor([[0, 2]])
    # log softmax([2,1,0])[0] = 2 - log(e^2 + e^1 + e^0) = 2 - log(11.107) = 2 - 2.4076 = -0.4076
    # log softmax([0,0,0])[2] = -log 3 = -1.0986
    got = token_logps(logits, tokens)
    expect(got, [[-0.4076, -1.0986]], abs=1e-4)
    # at temperature 2: log softmax([1, .5, 0])[0] = 1 - log(e + e^.5 + 1) = 1 - log(5.3670) = -0.6802
    expect(token_logps(logits, tokens, temperature=2.0)[0, 0], -0.6802, abs=1e-4)
    # E1: log pi(y|x) is the sum of the token terms: -0.4076 + -1.0986 = -1.5062
    expect(got.sum(), -1.5062, abs=1e-4)


@pytest.mark.exercise("token_logps")
def test_token_logps_float32_under_bf16_and_errors():
    logits = torch.randn(2, 3, 5).bfloat16()
    assert token_logps(logits, torch.zeros(2, 3, dtype=torch.long)).dtype == torch.float32
    with pytest.raises(ValueError, match="do not align"):
        token_logps(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_logps(logits, torch.zeros(2, 3, dtype=torch.long), temperature=0)
    with pytest.raises(ValueError, match="from 0 to 5, outside the vocabulary of 5"):
        token_logps(logits, torch.tensor([[0, 1, 5], [0, 0, 0]]))  # ids 0..4 exist
    with pytest.raises(ValueError, match="from -1 to 0"):
        token_logps(logits, torch.tensor([[0, -1, 0], [0, 0, 0]]))


@pytest.mark.exercise("token_logps")
def test_token_logps_gradcheck():
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([[0, 1, 3], [2, 2, 0]])
    assert token_logps(logits, tokens).dtype == torch.float64  # float64 is kept, not cast down
    assert torch.autograd.gradcheck(lambda z: token_logps(z, tokens, 0.7), (logits,))


@pytest.mark.exercise("token_logps")
def test_model_and_sequence_logps_line_up(tiny_model):
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])  # response = tokens 2..4
    per_token = model_token_logps(tiny_model, ids)  # (1, 4): column j predicts token j+1
    logits = tiny_model(ids)
    # column j is log softmax(logits at position j)[token j+1]: the logits of position 0 predict token 1
    columns = [torch.log_softmax(logits[0, j], -1)[ids[0, j + 1]] for j in range(4)]
    expect(per_token, [[c.item() for c in columns]], abs=1e-5)
    # E1 over the response tokens 6, 7, 2 (positions 2..4), predicted at positions 1..3
    by_hand = columns[1] + columns[2] + columns[3]
    for share_prompt in (True, False):  # the shared-prompt path and the plain forward give the same sum
        expect(sequence_logps(tiny_model, ids, None, mask, share_prompt=share_prompt), by_hand.item(), abs=1e-5)


def test_masked_sum_mean_by_hand():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_sum(x, m).item() == 7.0            # 1 + 2 + 4, the NaN is masked out
    assert masked_mean(x, m).item() == pytest.approx(7 / 3)  # = 2.3333
    assert masked_mean(x, m, dim=1).tolist() == [1.5, 4.0]
    with pytest.raises(ValueError, match="empty mask"):
        masked_mean(x, torch.zeros_like(m))
    with pytest.raises(ValueError, match="shape"):
        masked_sum(x, m[:, :2])


def test_masked_sum_over_a_constant_by_hand():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # (1 + 2 + 4) / 6 = 1.166667: the masked sum over a constant (Dr. GRPO: B * max_len = 2 * 3)
    expect(masked_sum_over(x, m, 6), 1.166667, abs=1e-6)
    # per row over the constant 4: (1 + 2) / 4 = 0.75, 4 / 4 = 1
    expect(masked_sum_over(x, m, 4, dim=1), [0.75, 1.0], abs=0)
    # over the token count (3, or per row 2 and 1) it is masked_mean
    expect(masked_sum_over(x, m, 3), masked_mean(x, m).item(), abs=1e-7)
    expect(masked_sum_over(x, m, m.sum(1), dim=1), masked_mean(x, m, dim=1), abs=0)
    for bad in (0, -2.0, float("nan")):
        with pytest.raises(ValueError, match="constant must be > 0"):
            masked_sum_over(x, m, bad)


def test_masked_var_and_whiten():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    m = torch.tensor([1, 1, 1, 0])
    # mean 2, squared deviations 1 + 0 + 1 = 2, unbiased variance 2 / (3 - 1) = 1
    assert masked_var(x, m).item() == pytest.approx(1.0)
    w = masked_whiten(x, m)
    assert w.tolist()[:3] == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6) and w[3] == 0
    assert masked_whiten(x, m, shift_mean=False).tolist()[:3] == pytest.approx([1.0, 2.0, 3.0], abs=1e-6)


def test_explained_variance():
    mask = torch.tensor([[1, 1, 1, 0]])
    returns = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    # constant V: Var(R - V) = Var(R) -> 0
    assert explained_variance(torch.full((1, 4), 7.0), returns, mask) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.exercise("kl_estimators")
def test_kl_estimators_by_hand():
    logp, logq = torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))
    # k1 = log(0.5/0.25) = ln 2 = 0.6931
    expect(kl_k1(logp, logq), 0.6931, abs=1e-4)
    # k2 = (ln 2)^2 / 2 = 0.4805 / 2 = 0.2402
    expect(kl_k2(logp, logq), 0.2402, abs=1e-4)
    # k3 = q/p - 1 - log(q/p) = 0.5 - 1 + 0.6931 = 0.1931
    expect(kl_k3(logp, logq), 0.1931, abs=1e-4)


@pytest.mark.exercise("kl_estimators")
def test_kl_estimators_expectations():
    # p = (0.5, 0.5), q = (0.25, 0.75): KL(p||q) = 0.5 ln 2 + 0.5 ln(2/3) = 0.3466 - 0.2027 = 0.1438
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    kl = (p * (p / q).log()).sum().item()
    assert kl == pytest.approx(0.1438, abs=1e-4)
    def mean_under_p(k):  # the exact expectation E_{x~p}[k(x)]
        return (p * k(p.log(), q.log())).sum()
    # unbiased: E_p[k1] = KL; E_p[k3] = KL too, since E_p[q/p - 1] = 1 - 1 = 0
    expect(mean_under_p(kl_k1), kl, rel=1e-6)
    expect(mean_under_p(kl_k3), kl, rel=1e-6)
    # k2 is biased: 0.5 * (0.5 * 0.4805 + 0.5 * 0.1644) = 0.1612
    expect(mean_under_p(kl_k2), 0.1612, abs=1e-4)
    assert (kl_k3(p.log(), q.log()) >= 0).all() and (kl_k2(p.log(), q.log()) >= 0).all()


def test_entropy_by_hand():
    assert entropy_from_logits(torch.zeros(4)).item() == pytest.approx(math.log(4))  # 1.3863
    # p = (1, 0): entropy 0 (a -inf logit contributes nothing, not NaN)
    assert entropy_from_logits(torch.tensor([0.0, -1e9])).item() == pytest.approx(0.0, abs=1e-6)
    # a masked-out logit (-inf, as top-k leaves it): p = 0 contributes 0, not 0 * -inf = NaN
    assert entropy_from_logits(torch.tensor([[0.0, -math.inf]])).tolist() == [0.0]
    # (1/2, 1/2, 0): log 2 = 0.6931
    assert entropy_from_logits(torch.tensor([0.0, 0.0, -math.inf])).item() == pytest.approx(math.log(2))


def test_input_checks_name_the_problem():
    x = torch.zeros(2, 3)
    check_token_tensors(a=x, b=x, c=None)                     # None entries are skipped
    with pytest.raises(ValueError, match=r"differ in shape.*'b': \(2, 4\)"):
        check_token_tensors(a=x, b=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"must be \(B, T\)"):
        check_token_tensors(a=torch.zeros(6))
    check_sequence_logps(a=torch.zeros(2), b=torch.zeros(2))
    with pytest.raises(ValueError, match="batch sizes differ"):
        check_sequence_logps(a=torch.zeros(2), b=torch.zeros(3))
    with pytest.raises(ValueError, match=r"b must be a non-empty \(B,\) tensor"):
        check_sequence_logps(a=torch.zeros(2), b=torch.zeros(2, 1))
    with pytest.raises(ValueError, match="b must be a tensor"):
        check_sequence_logps(a=torch.zeros(2), b=[0.0, 0.0])
    check_per_sequence(2, score=torch.zeros(2))
    with pytest.raises(ValueError, match=r"score must be \(B,\) = \(2,\)"):
        check_per_sequence(2, score=torch.zeros(3))
    check_nonempty_rows(torch.tensor([[0, 1], [1, 1]]))
    with pytest.raises(ValueError, match=r"response\(s\) \[1\] are empty"):
        check_nonempty_rows(torch.tensor([[0, 1], [0, 0]]))
    check_positive(beta=0.1)
    check_nonnegative(beta=0.0)
    check_in_range(0, 1, gamma=1.0, lam=0.0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="beta must be > 0"):
            check_positive(beta=bad)
    for bad in (-1e-9, float("nan")):
        with pytest.raises(ValueError, match="beta must be >= 0"):
            check_nonnegative(beta=bad)
        with pytest.raises(ValueError, match=r"lam must be in \[0, 1\]"):
            check_in_range(0, 1, gamma=0.5, lam=bad)
    check_choice("kl_in", "loss", ("loss", "reward"))
    with pytest.raises(ValueError, match="kl_in must be one of"):
        check_choice("kl_in", "value", ("loss", "reward"))


def test_value_checks_pass_meta_tensors_and_still_refuse_bad_values():
    """benchmarks/memory.py counts activations on the meta device (shapes, no values): the value
    checks have nothing to check there, and must not stop it; on real tensors they still refuse."""
    from minialign.ops import check_finite, check_mask, masked_sum
    mask = torch.ones(2, 3, device="meta")
    check_mask(mask)
    check_finite(torch.empty(4, device="meta"), "rewards")
    assert masked_sum(torch.empty(2, 3, device="meta"), mask, dim=1).shape == (2,)
    with pytest.raises(ValueError, match="only 0 and 1"):
        check_mask(torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="must be finite"):
        check_finite(torch.tensor([1.0, float("nan")]), "rewards")


def test_inference_hands_back_normal_tensors_that_autograd_can_save():
    """``ops.inference`` runs a no-gradient pass in inference mode; its results (a tensor, a tuple, a
    dataclass's fields) are normal tensors with the values of ``no_grad``, so a later differentiated
    step may save them (an embedding lookup saves its indices: an inference tensor there raises)."""
    from dataclasses import dataclass

    from minialign.ops import inference

    @dataclass
    class Result:
        ids: torch.Tensor
        logps: torch.Tensor
        n: int

    table = torch.nn.Embedding(5, 3)
    ids = torch.tensor([[1, 4, 2]])
    out = inference(lambda: Result(ids.clone(), table(ids).sum(-1), 3))
    pair = inference(lambda: (ids + 0, [ids * 1]))
    for t in (out.ids, out.logps, pair[0], pair[1][0]):
        assert not t.is_inference() and not t.requires_grad
    with torch.no_grad():
        assert torch.equal(out.logps, table(ids).sum(-1)) and out.n == 3
    table(out.ids).sum().backward()  # saved for the backward: fine for a normal tensor
    assert table.weight.grad[4].sum() == 3
    with torch.inference_mode():
        raw = ids.clone()
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        table(raw).sum().backward()  # what the clone prevents
