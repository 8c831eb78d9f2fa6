"""Memory a stage needs on a real model: training state computed, activations counted by autograd.

    python benchmarks/memory.py                          # GPT-2 (124M) and Qwen2.5-0.5B shapes
    python benchmarks/memory.py --models gpt2 --seq-len 1024

Nothing is downloaded and nothing is trained: each model is built from its published config on
PyTorch's ``meta`` device (shapes and dtypes, no storage), through ``transformers`` and
minialign's adapter (``hf.HFCausalLM``), so the figures are exact counts, not measurements of a
GPU's allocator. Printed per model:

- **parameters**, counted;
- **training state per stage**, float32 (the stages keep float32 master weights; ``--dtype
  bfloat16`` autocasts the matmuls only): 16 bytes per trained parameter (weights 4, gradients 4,
  AdamW's two moments 8), 4 bytes per frozen one. sft and reward-model train one network; dpo
  adds pi_ref (reloaded to measure the KL; with the default ``--precompute-ref-logps`` it is not
  in memory while the step runs, but it is during the evaluations); grpo keeps pi_ref; ppo trains
  the policy and a critic of the same size (``shared_trunk=False``) and keeps pi_ref and r_phi;
- **activations per token**: the bytes autograd saves for the backward pass in one forward of
  E1's log-probs (``ops.sequence_logps``: hidden states, attention, the float32 logits and their
  log-softmax) on one sequence of ``--seq-len`` tokens, counted with
  ``torch.autograd.graph.saved_tensors_hooks``; a step holds (rows per micro-batch) x that.
  No gradient checkpointing (minialign has none).

The totals leave out the allocator's fragmentation, CUDA's context (about 0.5 GiB) and the
temporaries of one op at a time, so leave 10-20 % of headroom.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from minialign.ops import sequence_logps  # noqa: E402
from minialign.real.hf import HFCausalLM  # noqa: E402

GiB = 2 ** 30


def configs():
    import transformers

    return {
        # GPT-2 small as released (openai-community/gpt2): transformers' defaults are its shape
        "gpt2": transformers.GPT2Config(),
        # Qwen2.5-0.5B(-Instruct)'s config.json
        "qwen2.5-0.5b": transformers.Qwen2Config(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
            tie_word_embeddings=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6),
    }


def saved_activation_bytes(model: HFCausalLM, seq_len: int) -> int:
    """Bytes autograd keeps for backward in one forward of E1 on one sequence (each storage once)."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s._cdata] = s.nbytes()  # a tensor saved twice, or a view, counts once
        return t

    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    mask = torch.ones_like(ids)
    response = torch.ones_like(ids)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sequence_logps(model, ids, mask, response, share_prompt=False)
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="gpt2,qwen2.5-0.5b")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (prompt + response)")
    args = parser.parse_args()
    import transformers

    for name in args.models.split(","):
        with torch.device("meta"):
            model = HFCausalLM(transformers.AutoModelForCausalLM.from_config(configs()[name], attn_implementation="eager"))
        n = sum(p.numel() for p in model.parameters())
        act = saved_activation_bytes(model, args.seq_len)
        per_token = act / args.seq_len
        trained, frozen = 16 * n, 4 * n
        state = {"sft": trained, "reward-model": trained, "dpo": trained + frozen,
                 "grpo": trained + frozen, "ppo": 2 * trained + 2 * frozen}
        print(f"\n{name}: {n:,} parameters; activations {per_token / 2**20:.2f} MiB per token "
              f"({act / GiB:.2f} GiB for one sequence of {args.seq_len} tokens, float32, eager attention)")
        print(f"  {'stage':<13} {'state GiB':>9}   state + activations of k sequences of {args.seq_len} tokens")
        for stage, b in state.items():
            print(f"  {stage:<13} {b / GiB:>9.2f}   " + "  ".join(
                f"k={k}: {(b + k * act) / GiB:.1f}" for k in (1, 4, 8, 16)))


if __name__ == "__main__":
    main()
