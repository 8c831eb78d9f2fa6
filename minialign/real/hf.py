"""The model interface every algorithm uses, and an adapter for Hugging Face causal LMs.

**The interface** (``CausalLM`` below). The reward model, PPO, DPO and GRPO never look inside
the policy; they only call

    model(input_ids, attention_mask=None, cache=None) -> logits (B, T, V)    # E1, one factor per t
    model.hidden(input_ids, attention_mask=None, cache=None) -> (B, T, C)   # reward / value heads
    model.lm_head(hidden) -> logits                                          # PPO's shared trunk
    model.new_cache(batch_size, max_len) -> a cache with ``.length``         # generation
    cache.select(rows) -> the cache with row i = old row rows[i]             # shared prompts
    model.config.block_size / .vocab_size / .n_embd
    and the ``nn.Module`` basics: parameters(), train(), eval(), .training, state_dict()

with two conventions: ``attention_mask`` (B, S) is 1 on real tokens and covers every token the
model has seen, the cached ones included (S = cache.length + T); and positions count real tokens
only, so a left-padded prompt starts at position 0 (``generation.generate`` left-pads prompts).
``model.GPT`` implements it natively; ``HFCausalLM`` wraps any ``transformers`` causal LM
(GPT-2, Llama, Qwen, Mistral, ...) to implement it, and ``HFTokenizer`` gives a Hugging Face
tokenizer the toy tokenizer's methods (``prompt``, ``response``, ``decode``, ``pad_id``, ``eos_id``).

**No downloads.** Models and tokenizers load from a local folder (``save_pretrained`` output,
or a snapshot copied there beforehand) with ``local_files_only=True``.

**Optional.** This module imports ``transformers`` only inside the functions that need it, so
``import minialign`` and every other module work without it (``pip install 'minialign[hf]'``).

Choices made here, each for a reason:

- ``HFCausalLM.forward`` is ``lm_head(hidden(...))``: the base model's final hidden states, then
  the output embedding, as ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` compute it. One path for
  logits and hidden states means PPO's ``policy.lm_head(policy.hidden(x))`` equals ``policy(x)``.
  Models that post-process logits (``final_logit_softcapping``, ``logit_scale``) are refused.
- positions are passed explicitly, ``cumsum(attention_mask) - 1``, so left padding gives the same
  numbers as no padding (the Hugging Face default already does this for some models, not all).
- the cache is Hugging Face's own ``past_key_values`` (a ``DynamicCache`` that grows), held in
  ``HFCache`` with the ``length`` that ``generate`` and the checks need; ``max_len`` is checked,
  not preallocated. ``HFCache.select`` copies a prompt's cache to the rows that answer it
  (``ops.response_hidden``), keeping it in the autograd graph.
- dropout is switched off at load (``disable_dropout``): RL compares log-probs of the same tokens
  computed at different times (ratios to pi_old, KL to pi_ref); with dropout they would differ
  by noise. ``GPTConfig.dropout`` is 0 for the same reason.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn


# ----------------------------------------------------------------------------------------------
# the interface
# ----------------------------------------------------------------------------------------------


@runtime_checkable
class CausalLM(Protocol):
    """What the algorithms need from a policy; ``model.GPT`` and ``HFCausalLM`` both have it."""

    config: "LMConfig"   # block_size, vocab_size, n_embd
    lm_head: nn.Module   # final hidden states (..., C) -> logits (..., V)
    training: bool

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 cache=None) -> torch.Tensor: ...

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               cache=None) -> torch.Tensor: ...

    def new_cache(self, batch_size: int, max_len: int): ...

    def parameters(self, recurse: bool = True): ...

    def train(self, mode: bool = True): ...

    def eval(self): ...


@dataclass
class LMConfig:
    """The three numbers of a model's config that the algorithms read."""
    block_size: int   # longest sequence the model takes (max_position_embeddings)
    vocab_size: int   # rows of the output head: logits are (B, T, vocab_size)
    n_embd: int       # width of the hidden states: reward and value heads read (B, T, n_embd)


# ----------------------------------------------------------------------------------------------
# the model adapter
# ----------------------------------------------------------------------------------------------


class HFCache:
    """Hugging Face's ``past_key_values`` plus the number of tokens it holds (``length``)."""

    def __init__(self, batch_size: int, max_len: int):
        self.batch_size, self.max_len = batch_size, max_len
        self.length = 0
        self.past = None  # set by the first forward (a DynamicCache, or tuples in old versions)

    def select(self, rows: torch.Tensor) -> "HFCache":
        """Keep the rows ``rows`` (B',), repeats allowed: new row i is old row ``rows[i]``. In place.

        The cached keys and values are selected with ``index_select`` and later concatenated with
        new ones, so gradients flow back into them (the shared-prompt forward needs it), summed over
        repeated rows in a fixed order.
        """
        if self.past is None:
            pass
        elif hasattr(self.past, "layers"):  # DynamicCache: index_select, as KVCache.select does (its own
            for layer in self.past.layers:  # batch_select_indices indexes: atomic adds in the backward)
                if getattr(layer, "keys", None) is not None and layer.keys.numel():
                    layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
        elif hasattr(self.past, "batch_select_indices"):
            self.past.batch_select_indices(rows)
        else:  # legacy tuples ((k, v) per layer)
            self.past = tuple(tuple(t.index_select(0, rows) for t in layer) for layer in self.past)
        self.batch_size = len(rows)
        return self


def disable_dropout(module: nn.Module) -> None:
    """p = 0 in every dropout layer, and in attention modules that keep their own rate."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for name in ("attention_dropout", "dropout"):  # e.g. LlamaAttention.attention_dropout
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)


class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM behind minialign's interface (``CausalLM``).

    ``model`` is e.g. ``AutoModelForCausalLM.from_pretrained(folder)`` or a fresh
    ``GPT2LMHeadModel(config)``; ``from_pretrained`` loads one from a local folder.
    """

    def __init__(self, model: nn.Module, keep_dropout: bool = False):
        super().__init__()
        self.model = model
        cfg = model.config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        for name in ("final_logit_softcapping", "logit_scale"):
            if getattr(text, name, None) not in (None, 1, 1.0):
                raise ValueError(f"{type(model).__name__} post-processes its logits ({name}="
                                 f"{getattr(text, name)}); HFCausalLM computes lm_head(hidden) only")
        if model.get_output_embeddings() is None:
            raise ValueError(f"{type(model).__name__} has no output embedding: not a causal LM")
        if model.base_model is model:
            raise ValueError(f"{type(model).__name__} has no separate base model to read hidden states from")
        block_size = next((getattr(text, k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                           if isinstance(getattr(text, k, None), int)), None)
        if block_size is None:
            raise ValueError(f"{type(model).__name__}'s config names no context length "
                             f"(max_position_embeddings / n_positions)")
        self.config = LMConfig(block_size=block_size, vocab_size=self.lm_head.weight.shape[0],
                               n_embd=self.lm_head.weight.shape[1])
        params = inspect.signature(self.base.forward).parameters
        self._takes_positions = "position_ids" in params
        # transformers >= 5.2x names the KV cache argument ``cache``; older versions ``past_key_values``
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        if not keep_dropout:
            disable_dropout(model)

    @classmethod
    def from_pretrained(cls, folder, device="cpu", dtype: torch.dtype = torch.float32,
                        keep_dropout: bool = False, **kwargs) -> "HFCausalLM":
        """Load ``AutoModelForCausalLM`` from a local ``folder`` (never from the network).

        ``dtype`` float32 (default) keeps float32 master weights for training under bf16
        autocast; load a frozen reference model in bfloat16 to halve its memory.
        """
        from transformers import AutoModelForCausalLM

        folder = _local_folder(folder, "config.json")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, **kwargs)
        except (RuntimeError, OSError) as e:  # its weights do not fit its config.json, or are unreadable
            raise ValueError(f"transformers cannot load the model in {folder}: {' '.join(str(e).split())[:200]} "
                             "(does config.json, e.g. its vocab_size, match the weights?)") from e
        return cls(model.to(device=device, dtype=dtype), keep_dropout=keep_dropout)

    # views into ``model``, not submodules of their own (so state_dict has each weight once)
    @property
    def lm_head(self) -> nn.Module:
        """The output embedding: hidden states (..., C) -> logits (..., V)."""
        return self.model.get_output_embeddings()

    @property
    def base(self) -> nn.Module:
        """The transformer without its head (``model.transformer`` for GPT-2, ``model.model`` for Llama)."""
        return self.model.base_model

    def save_pretrained(self, folder) -> None:
        self.model.save_pretrained(str(folder))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size: int, max_len: int) -> HFCache:
        if max_len > self.config.block_size:
            raise ValueError(f"a cache of {max_len} tokens exceeds block_size={self.config.block_size}")
        return HFCache(batch_size, max_len)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               cache: HFCache | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C) of ``input_ids`` (B, T); mask and cache as ``model.GPT``."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        limit = min(self.config.block_size, cache.max_len) if cache is not None else self.config.block_size
        if past + T > limit:
            raise ValueError(f"sequence of {past + T} tokens exceeds the model's context "
                             f"(block_size={self.config.block_size}"
                             + (f", cache max_len={cache.max_len})" if cache is not None else ")"))
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"cache was made for batch {cache.batch_size}, got a batch of {B}")
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"expected {(B, past + T)} (cached + new tokens)")
        kwargs = {}
        if self._takes_positions:
            # positions count real tokens only: a left-padded prompt starts at position 0
            kwargs["position_ids"] = (attention_mask.long().cumsum(1) - 1).clamp(min=0)[:, past:]  # (B, T)
        kwargs[self._cache_arg] = cache.past if cache is not None else None
        out = self.base(input_ids=input_ids, attention_mask=attention_mask,
                        use_cache=cache is not None, **kwargs)
        if cache is not None:
            cache.past = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            cache.length += T
        return out.last_hidden_state  # (B, T, C), after the final norm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: HFCache | None = None) -> torch.Tensor:
        """Logits (B, T, V): row t gives pi_theta(. | input_ids[:, :t+1]) (E1)."""
        return self.lm_head(self.hidden(input_ids, attention_mask, cache))


# ----------------------------------------------------------------------------------------------
# the tokenizer adapter
# ----------------------------------------------------------------------------------------------


# the files a tokenizer is read from: fast (tokenizer.json), BPE (vocab.json + merges.txt),
# WordPiece (vocab.txt), SentencePiece (tokenizer.model, spiece.model)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")


class HFTokenizer:
    """A Hugging Face tokenizer with the toy tokenizer's methods, so every stage can use it.

    - ``prompt(instruction)``: the model's chat template with a generation prompt, if it has one
      (an instruct model), else ``<bos>`` (if the tokenizer has one) + the instruction's tokens.
    - ``response(text)``: the text's tokens + EOS, so the policy learns to stop, as in the toy
      world. Prompt and response are tokenized apart (as TRL does): the ids at the boundary can
      differ from tokenizing the joined string, which does not matter to a model trained on them.
    - ``pad_id``: the tokenizer's pad token; if it has none (GPT-2), the EOS id. Every minialign
      function finds padding through ``attention_mask`` / ``response_mask``, never by comparing
      ids with ``pad_id``, so a pad equal to EOS cannot hide a real EOS.
    """

    def __init__(self, tokenizer, use_chat_template: bool | None = None):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token: a response could never end")
        self.tokenizer = tokenizer
        self.eos_id: int = tokenizer.eos_token_id
        self.bos_id: int | None = tokenizer.bos_token_id
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise ValueError("use_chat_template=True, but the tokenizer has no chat template")
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template

    @classmethod
    def from_pretrained(cls, folder, use_chat_template: bool | None = None, **kwargs) -> "HFTokenizer":
        from transformers import AutoTokenizer

        folder = _local_folder(folder, None)
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            # transformers would build an empty tokenizer from config.json alone and encode every text to []
            raise FileNotFoundError(f"{folder} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): "
                                    "a model folder needs the tokenizer it was trained with "
                                    "(tokenizer.save_pretrained(folder) writes them)")
        return cls(AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs),
                   use_chat_template)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)  # base vocabulary + added tokens

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt(self, instruction: str) -> list[int]:
        if self.use_chat_template:
            return self.chat_prompt([{"role": "user", "content": instruction}])
        return ([self.bos_id] if self.bos_id is not None else []) + self.encode(instruction)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """A conversation (``[{"role", "content"}]``) ending where the assistant answers next."""
        if self.use_chat_template:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids if isinstance(ids, list) else ids["input_ids"])  # newer: a BatchEncoding
        roles = [m.get("role") for m in messages]
        if roles != ["user"]:
            raise ValueError(f"the tokenizer has no chat template, so only one user message can be a "
                             f"prompt; got roles {roles}")
        return self.prompt(messages[0]["content"])

    def response(self, text: str) -> list[int]:
        return self.encode(text) + [self.eos_id]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def load_hf(folder, device="cpu", dtype: torch.dtype = torch.float32,
            use_chat_template: bool | None = None) -> tuple[HFCausalLM, HFTokenizer]:
    """(model, tokenizer) from one local folder; a tokenizer larger than the model is an error."""
    model = HFCausalLM.from_pretrained(folder, device, dtype)
    tok = HFTokenizer.from_pretrained(folder, use_chat_template)
    check_tokenizer_fits(model, tok, folder)
    return model, tok


def check_tokenizer_fits(model, tokenizer, source="") -> None:
    """Every id the tokenizer can produce must have a row in the model's output head."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{source + ': ' if source else ''}tokenizer has {tokenizer.vocab_size} tokens but the "
                         f"model's head only {model.config.vocab_size} (vocab_size): they do not belong together")


def hf_tokenizer_from_toy(tok):
    """The toy world's ``Tokenizer`` as a ``transformers`` fast tokenizer with the same ids.

    Word-level, digits split one per token (the toy split rule), and a chat template that gives
    ``<bos> <user> instruction <assistant>``: a Hugging Face model can be trained on the toy world
    with either tokenizer, and ``HFTokenizer`` can be tested against the toy one.
    """
    from tokenizers import Regex
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ..tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS

    raw = RawTokenizer(models.WordLevel(vocab=dict(tok.stoi), unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    # decode as Tokenizer.join: a space between tokens, none between two digits ("1 5" -> "15")
    raw.decoder = decoders.Sequence([decoders.Replace(Regex("$"), " "), decoders.Fuse(),
                                     decoders.Replace(Regex(r"(?<=\d) (?=\d)"), ""),
                                     # the trailing space; not decoders.Strip, which panics on an
                                     # empty sequence (an answer that is only <eos>)
                                     decoders.Replace(Regex(" $"), "")])
    raw.add_special_tokens(list(SPECIAL_TOKENS))
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 additional_special_tokens=list(SPECIAL_TOKENS[3:]))
    hf.chat_template = ("{{ bos_token }}{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
                        "{% if add_generation_prompt %}<assistant>{% endif %}")
    return hf


def _local_folder(folder, must_have: str | None) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a local folder; minialign loads Hugging Face models "
                                f"from disk only (save_pretrained, or copy a snapshot there first)")
    if must_have is not None and not (folder / must_have).is_file():
        raise FileNotFoundError(f"{folder} has no {must_have}")
    return folder
