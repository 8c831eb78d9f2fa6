"""The shared-prompt forward (``ops.prefill``, ``ops.response_hidden`` and the log-prob functions
built on it, ``KVCache.select``, ``HFCache.select``): each distinct prompt computed once gives the
plain forward's log-probs and gradients (float64 to 1e-10, float32 to 1e-5), on minialign's GPT and
through the Hugging Face adapter, and the algorithms take the same step with it as without it.

The batches mix what breaks a careless version: prompts of different lengths (left padding in
generation's layout, right padding in a collated batch), a prompt answered once (a group of 1)
and prompts answered G = 3 times, responses of different lengths.
"""

import copy

import pytest
import torch

from minialign.data import collate, left_pad
from minialign.model import GPT, GPTConfig
from minialign.ops import align_responses, masked_sum, response_hidden, response_logps, sequence_logps

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
VOCAB = 20
# (prompt, response) rows: prompt A three times, B once, C three times, D (one token) once
A, B, C, D = [1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11], [1]
ROWS = [(A, [3, 4, 5]), (A, [6]), (A, [7, 8, 9, 10, 11]), (B, [12, 13]), (C, [14]), (C, [15, 16, 17]),
        (C, [18, 19]), (D, [2, 3, 4, 5])]
GROUPINGS = {"mixed": ROWS,
             "one group of G": [(A, y) for _, y in ROWS],
             "groups of 1": [(x + [i % 5], y) for i, (x, y) in enumerate(ROWS)]}  # every prompt distinct


def _model(impl: str, dtype: torch.dtype):
    """A tiny random model whose log-probs are far from uniform (weights scaled up)."""
    torch.manual_seed(0)
    if impl == "minialign":
        model = GPT(GPTConfig(vocab_size=VOCAB, block_size=24, n_layer=2, n_head=2, n_embd=16))
    else:
        transformers = pytest.importorskip("transformers")
        from minialign.real.hf import HFCausalLM
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=24, n_embd=16, n_layer=2, n_head=2,
                                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = HFCausalLM(transformers.GPT2LMHeadModel(config))
    model = model.to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    return model


def _generation_layout(rows):
    """``generate``'s layout: prompts left-padded into P columns, responses right-padded after."""
    prompts, mask = left_pad([x for x, _ in rows], pad_id=0)                    # (B, P)
    T = max(len(y) for _, y in rows)
    responses = torch.tensor([y + [0] * (T - len(y)) for _, y in rows])        # (B, T)
    response_mask = torch.tensor([[1] * len(y) + [0] * (T - len(y)) for _, y in rows])
    return torch.cat([prompts, responses], 1), torch.cat([mask, response_mask], 1), prompts.shape[1]


def _logps_and_grads(model, fn):
    """fn(model) -> per-row values (B,); return them and d(sum_b w_b value_b)/d(parameters)."""
    model.zero_grad()
    values = fn(model)
    weights = torch.arange(1, values.shape[0] + 1, dtype=values.dtype)  # every row its own weight
    (weights * values).sum().backward()
    return values.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _assert_same(a, b, tol):
    (va, ga), (vb, gb) = a, b
    assert va.shape == vb.shape and len(ga) == len(gb) > 0
    assert (va - vb).abs().max() <= tol
    assert max((x - y).abs().max() for x, y in zip(ga, gb)) <= tol * max(1.0, max(x.abs().max() for x in ga))


@pytest.mark.parametrize("impl", ["minialign", "hf"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("grouping", list(GROUPINGS))
def test_response_logps_and_gradients_equal_the_plain_forward(impl, dtype, grouping):
    model = _model(impl, dtype)
    rows = GROUPINGS[grouping]
    seqs, mask, P = _generation_layout(rows)

    def per_row(share):
        def fn(m):
            logps = response_logps(m, seqs, mask, P, share_prompt=share)           # (B, T)
            assert logps.dtype == dtype
            return masked_sum(logps * torch.linspace(1, 2, logps.shape[1], dtype=dtype), mask[:, P:], 1)
        return fn
    plain, shared = _logps_and_grads(model, per_row(False)), _logps_and_grads(model, per_row(True))
    _assert_same(plain, shared, TOL[dtype])
    # and the plain forward is right: row 0 alone, unpadded
    x, y = rows[0]
    alone = response_logps(model, torch.tensor([x + y]), torch.ones(1, len(x) + len(y), dtype=torch.long), len(x))
    ours = response_logps(model, seqs[:1], mask[:1], P)[0, :len(y)]
    assert (alone[0] - ours).abs().max() <= TOL[dtype]


@pytest.mark.parametrize("impl", ["minialign", "hf"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_sequence_logps_of_a_collated_batch_equal_the_plain_forward(impl, dtype):
    """DPO's and the reward model's layout: prompt, response, then padding, each row its own lengths."""
    model = _model(impl, dtype)
    batch = collate([x for x, _ in ROWS], [y for _, y in ROWS], pad_id=0)
    plain, shared = (_logps_and_grads(model, lambda m, s=share: sequence_logps(
        m, batch["input_ids"], batch["attention_mask"], batch["response_mask"], share_prompt=s))
        for share in (False, True))
    _assert_same(plain, shared, TOL[dtype])


def test_response_hidden_columns_start_at_the_prompts_last_token():
    model = _model("minialign", torch.float64)
    seqs, mask, P = _generation_layout(ROWS)
    h = response_hidden(model, seqs, mask, P)                                    # (B, 1 + T, C)
    assert h.shape == (len(ROWS), 1 + seqs.shape[1] - P, 16)
    x, y = ROWS[3]                                                               # B: a 2-token prompt
    alone = model.hidden(torch.tensor([x + y]))[0]                               # (len(x) + len(y), C)
    assert (h[3, :1 + len(y)] - alone[len(x) - 1:]).abs().max() < 1e-10
    with pytest.raises(ValueError, match="prompt_len"):
        response_hidden(model, seqs, mask, seqs.shape[1])                        # no response column


@pytest.mark.parametrize("impl", ["minialign", "hf"])
def test_shared_rows_are_copied_by_index_select_so_seeded_runs_repeat(impl):
    """The rows that share a prompt get its hidden state and cache by ``index_select``. Tensor
    indexing (``h[group]``) would give the same forward, but its backward adds repeated rows with
    atomic adds on the CPU, in an order that changed GRPO's weights from run to run under load."""
    from minialign.ops import prefill
    model = _model(impl, torch.float32)
    seqs, mask, P = _generation_layout(ROWS)
    h_last, cache = prefill(model, seqs[:, :P], mask[:, :P], seqs.shape[1])
    assert type(h_last.grad_fn).__name__.startswith("IndexSelectBackward"), h_last.grad_fn
    if impl == "minialign":
        cached = cache.k + cache.v
    else:
        cached = [t for layer in cache.past.layers for t in (layer.keys, layer.values)]
    assert all(type(t.grad_fn).__name__.startswith("IndexSelectBackward") for t in cached), \
        {type(t.grad_fn).__name__ for t in cached}


def test_align_responses_by_hand():
    # row 0: prompt 1 2 3, response 4 5, pad; row 1: prompt 6, response 7 8 9
    ids = torch.tensor([[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    response = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0]])
    out, mask, P = align_responses(ids, attention, response)
    # the longer prompt (3 tokens) fixes P = 3; row 1 moves 2 columns right; width P + 3 = 6
    assert P == 3
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert (out * mask).tolist() == [[1, 2, 3, 4, 5, 0], [0, 0, 6, 7, 8, 9]]
    bad = [torch.tensor([[0, 0, 0, 1, 0, 1], [0, 1, 1, 1, 0, 0]]),   # a gap inside the response
           torch.tensor([[0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0]]),   # an empty response
           torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0]]),   # a real token after the response
           torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 0, 0]])]   # a response token on padding
    for response_mask in bad:
        with pytest.raises(ValueError, match="one run of real tokens"):
            align_responses(ids, attention, response_mask)


@pytest.mark.parametrize("impl", ["minialign", "hf"])
def test_generation_with_a_shared_prompt_samples_the_same_answers(impl):
    from minialign.generation import generate
    model = _model(impl, torch.float64)
    prompts = [x for x, _ in ROWS]
    runs = [generate(model, prompts, 6, eos_id=19, pad_id=0, generator=torch.Generator().manual_seed(0),
                     share_prompt=share) for share in (False, True)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert (runs[0].logps - runs[1].logps).abs().max() < 1e-10


def test_reward_model_with_a_shared_prompt_gives_the_same_rewards_and_gradients():
    from minialign.reward_model import RewardModel
    torch.manual_seed(0)
    rm = RewardModel.from_policy(_model("minialign", torch.float64))
    batch = collate([x for x, _ in ROWS], [y for _, y in ROWS], pad_id=0)
    plain, shared = (_logps_and_grads(rm, lambda m, r=response: m(batch["input_ids"], batch["attention_mask"], r))
                     for response in (None, batch["response_mask"]))
    _assert_same(plain, shared, 1e-10)


# ----------------------------------------------------------------------------------------------
# the algorithms: one step with and without sharing gives the same weights (float64)
# ----------------------------------------------------------------------------------------------


def _assert_same_weights(a, b, tol=1e-10):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p - q).abs().max() <= tol, name


def test_a_dpo_step_with_and_without_sharing_gives_the_same_weights(world):
    from minialign.dpo import chosen_rejected_logps, dpo_loss, preference_batch, tokenize_pairs
    tok = world.tokenizer
    torch.manual_seed(0)
    start = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=16)).double()
    pairs = tokenize_pairs(tok, world.preference_dataset(12, seed=0))
    batch = preference_batch(pairs["prompt"], pairs["chosen"], pairs["rejected"], tok.pad_id)
    assert len({tuple(x) for x in pairs["prompt"]}) < 12  # some pairs share a prompt, too
    stepped = []
    for share in (False, True):
        policy, reference = copy.deepcopy(start), copy.deepcopy(start).requires_grad_(False)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
        pi_w, pi_l = chosen_rejected_logps(policy, batch, share)
        with torch.no_grad():
            ref_w, ref_l = chosen_rejected_logps(reference, batch, share)
        for _ in range(2):  # two steps: the second has pi != pi_ref, so the loss is not ln 2
            optimizer.zero_grad()
            dpo_loss(pi_w, pi_l, ref_w, ref_l, beta=0.5)[0].backward()
            optimizer.step()
            pi_w, pi_l = chosen_rejected_logps(policy, batch, share)
        stepped.append(policy)
    assert max((p - q).abs().max() for p, q in zip(start.parameters(), stepped[0].parameters())) > 1e-3
    _assert_same_weights(*stepped)


def test_a_grpo_iteration_with_and_without_sharing_gives_the_same_weights(world):
    from minialign.grpo import grpo_iteration
    from minialign.stages.grpo import GRPOConfig
    from minialign.runtime.optim import gradient_update, make_optimizer
    tok = world.tokenizer
    torch.manual_seed(0)
    start = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=16)).double()
    questions = world.arithmetic_questions("train")[:4]
    stepped, metrics = [], []
    for share in (False, True):
        policy = copy.deepcopy(start)
        reference = copy.deepcopy(start).requires_grad_(False)
        with torch.no_grad():  # a reference that differs from the policy, so the KL term is not 0
            for p in reference.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()),
                                          dtype=p.dtype))
        config = GRPOConfig(device="cpu", progress=False, group_size=4, batch_size=8, inner_updates=2,
                            max_new_tokens=4, recompute_old_logps=True, share_prompt=share)
        update = gradient_update(policy, policy, make_optimizer(policy, config), config, 0)
        metrics.append(grpo_iteration(policy, reference, tok, world, questions, config,
                                      torch.Generator().manual_seed(0), update).metrics)
        stepped.append(policy)
    assert metrics[0]["kl"] > 0 and metrics[0]["answer_len"] > 1
    assert max((p - q).abs().max() for p, q in zip(start.parameters(), stepped[0].parameters())) > 1e-4
    _assert_same_weights(*stepped)
    assert metrics[0]["loss"] == pytest.approx(metrics[1]["loss"], abs=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["minialign", "hf"])
def test_cuda_shared_prompt_equals_the_plain_forward(impl):
    model = _model(impl, torch.float32).cuda()
    seqs, mask, P = (t.cuda() if torch.is_tensor(t) else t for t in _generation_layout(ROWS))
    plain = response_logps(model, seqs, mask, P, share_prompt=False)
    shared = response_logps(model, seqs, mask, P, share_prompt=True)
    assert ((plain - shared) * mask[:, P:]).abs().max() < 1e-5
