"""The toy world's tokenizer: word-level, with every digit its own token.

Why word-level: the toy world's sentences are built from a few dozen words, so a word per token
keeps sequences short (about 20 tokens) and a tiny GPT trains in minutes on a laptop CPU. Why a
token per digit: numbers then need no vocabulary of their own, and "15" is the two tokens
``1 5``, as sub-word tokenizers of real models split numbers too.

Text is split by the regular expression ``\\d|[^\\s\\d]+``: each digit, and each run of other
non-space characters, is one token. ``decode`` joins tokens with a space except between two
digits, so ``decode(encode(s)) == s`` for every canonical string of the toy world.

Special tokens (ids 0-4): ``<pad>`` fills batches and is never a target; ``<bos>`` starts every
sequence; ``<eos>`` ends every document and every response, and it *is* a target: the policy
must learn to emit it (pad and EOS are different tokens on purpose). ``<user>`` and
``<assistant>`` make the chat template::

    <bos> <user> review the movie <assistant> the movie was good . <eos>
    |------------- prompt x --------------| |------ response y ------|
"""

from __future__ import annotations

import re

PAD, BOS, EOS, USER, ASSISTANT = "<pad>", "<bos>", "<eos>", "<user>", "<assistant>"
SPECIAL_TOKENS = (PAD, BOS, EOS, USER, ASSISTANT)
_SPLIT = re.compile(r"\d|[^\s\d]+")


class Tokenizer:
    """Maps text to token ids and back; the vocabulary is a fixed list of words."""

    def __init__(self, words: list[str]):
        words = [w for w in words if w not in SPECIAL_TOKENS]
        for w in words:
            if _SPLIT.fullmatch(w) is None:
                raise ValueError(f"vocabulary word {w!r} is not a single token under the split rule")
        if len(set(words)) != len(words):
            raise ValueError("vocabulary has duplicate words")
        self.itos: list[str] = list(SPECIAL_TOKENS) + list(words)
        self.stoi: dict[str, int] = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id, self.user_id, self.assistant_id = range(5)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    @staticmethod
    def split(text: str) -> list[str]:
        return _SPLIT.findall(text)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added); an unknown word is an error."""
        ids = []
        for piece in self.split(text):
            if piece not in self.stoi or piece in SPECIAL_TOKENS:
                raise ValueError(f"unknown symbol {piece!r} in text {text!r}: it is not in the "
                                 f"toy world's vocabulary of {self.vocab_size} tokens")
            ids.append(self.stoi[piece])
        return ids

    def decode(self, ids) -> str:
        """Text of the ids; special tokens are dropped (``decode`` of a response is its text)."""
        return self.join([self.itos[int(i)] for i in ids if int(i) >= len(SPECIAL_TOKENS)])

    @staticmethod
    def join(words: list[str]) -> str:
        """Words to text: a space between words, none between two digits (inverse of ``split``)."""
        out = ""
        for prev, w in zip([None] + words[:-1], words):
            out += ("" if prev is None or (prev.isdigit() and w.isdigit()) else " ") + w
        return out

    # --- templates: where each stage's sequences come from -------------------------------------
    def document(self, text: str) -> list[int]:
        """A pre-training sequence: ``<bos> text <eos>`` (E0a counts every token after <bos>)."""
        return [self.bos_id] + self.encode(text) + [self.eos_id]

    def prompt(self, instruction: str) -> list[int]:
        """The chat prompt x: ``<bos> <user> instruction <assistant>``."""
        return [self.bos_id, self.user_id] + self.encode(instruction) + [self.assistant_id]

    def response(self, text: str) -> list[int]:
        """The response y: ``text <eos>``; EOS is part of y, so the policy learns to stop."""
        return self.encode(text) + [self.eos_id]

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """``prompt`` of a conversation (``[{"role", "content"}]``): the toy template has one user turn."""
        roles = [m.get("role") for m in messages]
        if roles != ["user"]:
            raise ValueError(f"the toy chat template holds one user message, got roles {roles}")
        return self.prompt(messages[0]["content"])

    def state_dict(self) -> dict:
        return {"itos": list(self.itos)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Tokenizer":
        itos = list(state["itos"])
        if tuple(itos[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError("tokenizer state does not start with minialign's special tokens")
        return cls(itos[len(SPECIAL_TOKENS):])

    def __eq__(self, other) -> bool:
        return isinstance(other, Tokenizer) and self.itos == other.itos


def checkpoint_tokenizer(ckpt: dict, path, tokenizer: Tokenizer | None = None) -> Tokenizer:
    """The tokenizer saved in a checkpoint ``ckpt`` (read from ``path``), checked against ``tokenizer`` (if
    given) and the model's ``vocab_size``: a policy's or a reward model's ``model.pt``."""
    if "tokenizer" not in ckpt:
        raise ValueError(f"{path} has no tokenizer state; save it with minialign.runtime.loading.save_policy")
    saved_tok = Tokenizer.from_state_dict(ckpt["tokenizer"])
    if tokenizer is not None and saved_tok != tokenizer:
        raise ValueError(f"{path} was trained with another tokenizer ({saved_tok.vocab_size} tokens) "
                         f"than the one given ({tokenizer.vocab_size} tokens)")
    if ckpt["config"]["vocab_size"] != saved_tok.vocab_size:
        raise ValueError(f"{path}: model vocab_size {ckpt['config']['vocab_size']} != tokenizer's "
                         f"{saved_tok.vocab_size}")
    return saved_tok
