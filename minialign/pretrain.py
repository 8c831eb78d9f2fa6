r"""Stage 1, pre-training: the base model learns the toy world's text (E0a). The source post's
introduction names the stage (language modelling on unlabelled text, giving a base model).

E0a, language modelling over every token of a document:

$$\mathcal{L}_{LM}(\theta) = -\sum_t \log\pi_\theta(x_t\mid x_{<t})$$

The same loss, counted on response tokens only, is SFT (E0b, ``sft.py``): a document here is a
"response" to the one-token prompt ``<bos>``, so both stages share ``lm_loss`` and ``pretrain_step``
(the runners in ``minialign/stages/`` share their loop, ``stages.language_model.fit_lm``).

**Where this differs from the source**

- E0a is this project's: the source describes pre-training in words and states no formula.
- ``lm_loss`` is the mean over predicted tokens, not the sum: the sum divided by the number of
  tokens, so the loss reads in nats per token and can be compared with the corpus's exact entropy
  floor ``ToyWorld.corpus_entropy()`` (no model can do better on fresh text than
  $H(\text{line}) / (\mathbb{E}[\text{length}] + 1)$). The minimiser is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import collate
from .ops import masked_mean, masked_sum_over, token_logps
from .runtime import distributed
from .runtime.devices import autocast


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor,
            constant: float | None = None) -> torch.Tensor:
    r"""E0a, E0b: the mean of $-\log\pi_\theta(x_t\mid x_{<t})$ over the tokens where ``response_mask`` is 1.

    logits (B, T, V) from the model on ``input_ids`` (B, T); position t-1 predicts token t.
    ``constant`` $C$, if given, replaces the mean by the sum over those tokens divided by $C$
    (``ops.masked_sum_over``, Dr. GRPO's normaliser; SFT's ``--loss-aggregation constant``).
    """
    # Exercise lm_loss (E0a, E0b): from here to the end of the function.
    logps = token_logps(logits[:, :-1], input_ids[:, 1:])  # (B, T-1), E1 per token
    if constant is not None:  # the token sum over a constant: a token's weight does not depend on the batch
        return -masked_sum_over(logps, response_mask[:, 1:], constant)
    return -masked_mean(logps, response_mask[:, 1:])


@dataclass
class LMStepResult:
    """What one ``pretrain_step`` (or ``sft.sft_step``) did."""
    loss: float                     # the loss over the global batch (E0a's mean per token, or its sum over C)
    grad_norm: float                # before clipping


def pretrain_step(model, prompts: list[list[int]], responses: list[list[int]], update, pad_id: int = 0,
                  dtype: str = "float32", constant: int | None = None) -> LMStepResult:
    """One optimizer step of ``lm_loss`` on the global batch of (prompt, response) token lists.

    Pre-training's prompt is ``<bos>`` and its response the document; SFT's are the chat prompt
    and the answer (E0b). This rank takes its share of the rows (``distributed.local_share``).
    ``update(rows, loss_of) -> Update`` (``runtime.optim.gradient_update``) makes the optimizer step
    from ``loss_of(micro) -> (mean loss, units, total units, stats)``; it hides the optimizer, the
    schedule, ``--grad-accum`` and DDP. The loss is the mean over every response token of the
    global batch, or with ``constant`` $C$ the token sum over $C$ per row (``lm_loss``).
    """
    device = next(model.parameters()).device
    block = model.config.block_size

    def units(rows) -> int:  # what the loss of ``rows`` averages over: their tokens, or C per row
        return sum(len(responses[i]) for i in rows) if constant is None else len(rows) * constant

    total = units(range(len(prompts)))

    def loss_of(micro: list[int]):  # one micro-batch: positions in the global batch
        b = collate([prompts[i] for i in micro], [responses[i] for i in micro], pad_id, block, device)
        with autocast(device, dtype):
            logits = model(b["input_ids"], b["attention_mask"])  # (b, T, V)
        n = units(micro)  # tokens = response_mask[:, 1:].sum(), or C per row
        loss = lm_loss(logits, b["input_ids"], b["response_mask"], None if constant is None else n)  # E0a, E0b
        return loss, n, total, (loss.detach(), n)

    done = update(distributed.local_share(list(range(len(prompts)))), loss_of)
    return LMStepResult(distributed.global_mean(done.extras, total), done.grad_norm)
