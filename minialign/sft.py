r"""Stage 2, supervised fine-tuning: the base model becomes an instruct model (E0b). The source
post's introduction: SFT maximises $P(\text{response}\mid\text{instruction})$.

E0b is the language-modelling loss of E0a counted on the response tokens only (the EOS included,
so the model learns to stop):

$$\mathcal{L}_{SFT}(\theta) = -\frac{1}{N}\sum_{t\,\in\,\text{response}} \log\pi_\theta(y_t\mid x, y_{<t}),$$

with $N$ the number of response tokens in the batch. The prompt tokens are in the input, so the
model conditions on them, but they are not targets: ``response_mask`` is 0 over the prompt. That
mask is the whole difference from pre-training, which is why this file reuses ``pretrain.lm_loss``
and ``pretrain.pretrain_step``.

The toy world's SFT data: ``review the ITEM`` $\to$ a review of that item, and ``what is a + b ?``
$\to$ the answer, wrong with probability ``arithmetic_noise`` as in the demonstrations (so the
instruct model answers right only about $1 -$ noise of the time: what RL can improve on).

**The aggregation** (``SFTHyperparams.loss_aggregation``): E0b's $\frac{1}{N}$ is the mean over the
batch's response tokens (``token_mean``, the default). ``constant`` divides the same token sum by a
constant instead, $B\cdot C$ with $C$ the model's context length (Dr. GRPO's normaliser,
``ops.masked_sum_over``):

$$\mathcal{L}_{SFT}^{C}(\theta) = -\frac{1}{B\,C}\sum_{i=1}^{B}\sum_{t\,\in\,\text{response}_i} \log\pi_\theta(y_{i,t}\mid x_i, y_{i,<t}).$$

**Where this differs from the source**

- The source states the goal, maximise $P(\text{response}\mid\text{instruction})$; the loss above
  is its negative log, averaged per response token (the mean, not the sum, as in ``pretrain.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .pretrain import LMStepResult, pretrain_step
from .runtime.config import Config


@dataclass
class SFTHyperparams(Config):
    """What E0b's step needs (``minialign sft`` adds the run's settings to these).

    The trade-off: ``token_mean`` reads in nats per token (comparable with the entropy floor), but
    a token's weight is 1/N, so it depends on how long the other responses of its batch are;
    ``constant`` gives every token the same weight 1/(B C) in every batch (the sum of E0b up to a
    fixed scale), at the price of a loss and gradient that shrink when the responses are short.
    """
    loss_aggregation: Literal["token_mean", "constant"] = "token_mean"  # token_mean: nats per token, weights set by the batch's lengths | constant: sum / (B x context), equal weights, smaller gradient


def sft_step(model, prompts: list[list[int]], responses: list[list[int]], hp: SFTHyperparams, update,
             pad_id: int = 0, dtype: str = "float32") -> LMStepResult:
    """One optimizer step of E0b on the global batch (prompt, response) token lists: pre-training's
    step (``pretrain.pretrain_step``) on the response tokens, aggregated as ``hp.loss_aggregation`` says.

    The prompt tokens are input but not targets: ``data.collate``'s ``response_mask`` is 0 there.
    ``update`` is the hook of ``runtime.optim.gradient_update``.
    """
    constant = model.config.block_size if hp.loss_aggregation == "constant" else None  # C: the longest response
    return pretrain_step(model, prompts, responses, update, pad_id, dtype, constant)
