"""Batching shared by every stage: (prompt, response) token lists -> padded tensors with masks.

Every stage sees the same layout. A pre-training document is a "response" to the one-token
prompt ``<bos>``, so E0a (all tokens) and E0b (response tokens only) are the same loss over
``response_mask``::

    input_ids      <bos> <user> review the movie <assistant> the movie was good . <eos> <pad>
    attention_mask   1     1      1     1    1        1       1    1    1   1   1   1     0
    response_mask    0     0      0     0    0        0       1    1    1   1   1   1     0

Batches are right-padded: with causal attention a pad after the real tokens cannot change them.
Nothing is ever truncated: a sequence longer than the model's context is an error.
"""

from __future__ import annotations

import torch


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
            block_size: int | None = None, device=None) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``response_mask`` (all (B, T), long)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("cannot collate an empty batch")
    for i, (x, y) in enumerate(zip(prompts, responses)):
        if len(x) == 0:
            raise ValueError(f"example {i} has an empty prompt (it needs at least <bos>)")
        if len(y) == 0:
            raise ValueError(f"example {i} has an empty response")
        if block_size is not None and len(x) + len(y) > block_size:
            raise ValueError(f"example {i} has {len(x)} prompt + {len(y)} response tokens, more "
                             f"than the model's context of {block_size}; nothing is truncated")
    T = max(len(x) + len(y) for x, y in zip(prompts, responses))
    B = len(prompts)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    response_mask = torch.zeros((B, T), dtype=torch.long)
    for i, (x, y) in enumerate(zip(prompts, responses)):
        n = len(x) + len(y)
        input_ids[i, :n] = torch.tensor(x + y)
        attention_mask[i, :n] = 1
        response_mask[i, len(x):n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask (B, P): generation appends new tokens on the right of every row."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("left_pad needs a non-empty list of non-empty sequences")
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, P - len(s):] = torch.tensor(s)
        mask[i, P - len(s):] = 1
    return ids.to(device), mask.to(device)


def minibatches(n: int, batch_size: int, generator: torch.Generator | None = None,
                drop_last: bool = False):
    """Shuffled index tensors covering range(n) once (one epoch)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    perm = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        if drop_last and len(idx) < batch_size:
            break
        yield idx


class InfiniteMinibatches:
    """Minibatches over range(n), epoch after epoch, each epoch reshuffled (drop_last).

    An iterator with ``state_dict``/``load_state_dict`` (the epoch's permutation, the position in
    it, the generator's state), so that a resumed run draws exactly the batches it would have drawn.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator | None = None):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if n < batch_size:
            raise ValueError(f"dataset of {n} examples is smaller than batch_size={batch_size}")
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.perm, self.pos = None, 0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.perm is None or self.pos + self.batch_size > self.n:  # a new epoch (the rest is dropped)
            self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
        idx = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"perm": self.perm, "pos": self.pos,
                "generator": None if self.generator is None else self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.perm, self.pos = state["perm"], state["pos"]
        if self.generator is not None:
            self.generator.set_state(state["generator"])
