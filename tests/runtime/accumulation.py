"""The gradient-accumulation identity in float64, where it is exact: micro-batch losses of SFT and
DPO, weighted by their share of the global batch, give the gradient of the whole batch. Imported by
tests/runtime/test_distributed.py, and run by it under torchrun
(``torchrun ... tests/runtime/accumulation.py RUN OUT``) to check the same identity across two processes."""

import sys
from pathlib import Path

import torch

from minialign.runtime import distributed
from minialign.toyworld import ToyWorld, WorldConfig

ROWS = 12


def float64_model(tiny_run):
    from minialign.runtime.loading import load_policy
    model, tok = load_policy(tiny_run / "sft" / "model.pt", "cpu")
    return model.double().train(), tok


def _sft_loss_of(model, world, tok, n_rows):
    """SFT's micro-batch loss as ``pretrain.pretrain_step`` computes it: the mean over response tokens,
    weighted by the micro-batch's share of the global batch's tokens."""
    from minialign.data import collate
    from minialign.pretrain import lm_loss
    rows = world.sft_dataset(n_rows, seed=0)
    prompts, responses = [tok.prompt(r["prompt"]) for r in rows], [tok.response(r["response"]) for r in rows]
    total = sum(len(y) for y in responses)

    def loss_of(idx):
        b = collate([prompts[i] for i in idx], [responses[i] for i in idx], 0, model.config.block_size)
        loss = lm_loss(model(b["input_ids"], b["attention_mask"]), b["input_ids"], b["response_mask"])
        return loss, sum(len(responses[i]) for i in idx), total, None
    return loss_of


def _dpo_loss_of(model, reference, world, tok, n_pairs):
    """DPO's micro-batch loss: the mean of E9 over its pairs, weighted by its share of the pairs."""
    from minialign.dpo import chosen_rejected_logps, dpo_loss, preference_batch, tokenize_pairs
    pairs = tokenize_pairs(tok, world.preference_dataset(n_pairs, seed=0))

    def loss_of(idx):
        batch = preference_batch(*([pairs[k][i] for i in idx] for k in ("prompt", "chosen", "rejected")),
                                 tok.pad_id, model.config.block_size)
        pi_w, pi_l = chosen_rejected_logps(model, batch)
        with torch.no_grad():
            ref_w, ref_l = chosen_rejected_logps(reference, batch)
        return dpo_loss(pi_w, pi_l, ref_w, ref_l, 0.1)[0], len(idx), n_pairs, None
    return loss_of


def _accumulated_gradients(model, loss_of, rows, k):
    model.zero_grad(set_to_none=True)
    distributed.accumulate(distributed.wrap(model), distributed.split(distributed.local_share(rows), k), loss_of)
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])



def perturbed_pair(run):
    """(policy, reference, tokenizer): the reference is ``run``'s SFT model in float64, the policy
    the same moved a little, so that DPO's gradient is not ~0."""
    model, tok = float64_model(run)
    reference, _ = float64_model(run)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    return model, reference, tok


def gradients(run, k: int) -> dict:
    """{"sft", "dpo"}: the gradient over ROWS rows in ``k`` micro-batches per process."""
    world = ToyWorld(WorldConfig(seed=0))
    model, reference, tok = perturbed_pair(run)
    losses = {"sft": _sft_loss_of(model, world, tok, ROWS), "dpo": _dpo_loss_of(model, reference, world, tok, ROWS)}
    return {name: _accumulated_gradients(model, loss_of, list(range(ROWS)), k) for name, loss_of in losses.items()}


if __name__ == "__main__":  # under torchrun: each rank takes its share of the rows
    run, out = Path(sys.argv[1]), Path(sys.argv[2])
    with distributed.process_group("cpu"):
        grads = gradients(run, 2)
        if distributed.is_main():
            torch.save(grads, out)
