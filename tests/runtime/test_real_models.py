"""Every stage from the command line on a Hugging Face model folder and your own data files.

A tiny random GPT-2 with the toy tokenizer (as a ``transformers`` tokenizer) is saved to a
temporary folder; each stage's CLI runs a few steps on it with ``--model`` and ``--data`` (JSONL
written here from the toy world) and writes its run folder. Skips without transformers.
"""

import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minialign.real.gpt2 import load_gpt2  # noqa: E402
from minialign.real.hf import hf_tokenizer_from_toy  # noqa: E402
from minialign.reward_model import RewardModel  # noqa: E402
from minialign.runtime.cli import main  # noqa: E402
from minialign.runtime.loading import load_model, load_reward_model  # noqa: E402
from minialign.toyworld import write_jsonl  # noqa: E402

COMMON = ["--device", "cpu", "--no-progress", "--seed", "0"]


@pytest.fixture(scope="module")
def hf_folder(world, tmp_path_factory):
    """A tiny random GPT-2 on the toy vocabulary, with the toy tokenizer, as a local HF folder."""
    tok = world.tokenizer
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=48, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0, 0.15)  # log-probs away from uniform
    folder = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(str(folder))
    hf_tokenizer_from_toy(tok).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def data(world, tmp_path_factory):
    """Data files in TRL's formats, written from the toy world."""
    d = tmp_path_factory.mktemp("data")
    sft = world.sft_dataset(24, seed=1)
    write_jsonl(d / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["response"]} for r in sft[:16]])
    write_jsonl(d / "sft_eval.jsonl", [{"messages": [{"role": "user", "content": r["prompt"]},
                                                     {"role": "assistant", "content": r["response"]}]}
                                       for r in sft[16:]])
    pairs = world.preference_dataset(24, seed=1)
    write_jsonl(d / "prefs.jsonl", pairs[:16])
    write_jsonl(d / "prefs_eval.jsonl", pairs[16:])
    write_jsonl(d / "text.jsonl", [{"text": t} for t in world.pretrain_corpus(16, seed=1)])
    write_jsonl(d / "prompts.jsonl", [{"prompt": p} for p in world.review_prompts()])
    qs = world.arithmetic_questions("train")
    write_jsonl(d / "qa.jsonl", [{"prompt": q["prompt"], "answer": f"so it is #### {q['answer']}"} for q in qs[:8]])
    write_jsonl(d / "qa_eval.jsonl", world.arithmetic_questions("heldout")[:4])
    return d


def run(stage, out, *flags):
    assert main([stage, "--out", str(out), *COMMON, *map(str, flags)]) == 0
    metrics = [json.loads(line) for line in (out / stage.replace("-", "_") / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / stage.replace("-", "_") / "summary.json").read_text())
    return metrics, summary


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["hf", "minialign"])
def test_sft_dpo_grpo_on_a_model_folder_with_data_files(hf_folder, data, tmp_path, impl):
    m = ["--model", hf_folder, "--model-impl", impl]
    metrics, summary = run("sft", tmp_path, *m, "--data", data / "sft.jsonl", "--eval-data", data / "sft_eval.jsonl",
                           "--steps", 3, "--batch-size", 4, "--eval-every", 2)
    assert summary["data"]["kept"] == 16 and summary["eval_data"]["kept"] == 8
    assert "heldout_loss" in metrics[-1] and metrics[-1]["loss"] > 0
    sft_out = tmp_path / "sft" / "model"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(sft_out))  # what it wrote loads in HF
    assert reloaded.config.n_layer == 2

    # DPO and GRPO start from the SFT stage's folder by default (no --model), with the same impl
    metrics, summary = run("dpo", tmp_path, "--model-impl", impl, "--data", data / "prefs.jsonl",
                           "--eval-data", data / "prefs_eval.jsonl", "--steps", 2, "--batch-size", 4,
                           "--eval-every", 1, "--eval-samples-per-prompt", 2, "--max-new-tokens", 6,
                           "--log-every", 1)
    assert metrics[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at step 0
    assert summary["kl"] is not None and summary["heldout_accuracy"] is not None
    assert "true_reward" not in metrics[-1]  # no hidden r* for your own data
    assert (tmp_path / "dpo" / "model" / "model.safetensors").is_file()

    metrics, summary = run("grpo", tmp_path, "--model-impl", impl, "--data", data / "qa.jsonl",
                           "--eval-data", data / "qa_eval.jsonl", "--steps", 2, "--questions", 2,
                           "--group-size", 4, "--batch-size", 8, "--eval-samples", 2, "--final-eval-samples", 2)
    assert summary["heldout_accuracy"] is not None and summary["data"]["rows"] == 8
    assert (tmp_path / "grpo" / "model" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ipo", "simpo"])
def test_dpo_family_on_a_transformers_model_with_data_files(hf_folder, data, tmp_path, loss):
    metrics, summary = run("dpo", tmp_path, "--model", hf_folder, "--model-impl", "hf", "--loss", loss,
                           "--data", data / "prefs.jsonl", "--eval-data", data / "prefs_eval.jsonl", "--steps", 2,
                           "--batch-size", 4, "--eval-every", 1, "--eval-samples-per-prompt", 2,
                           "--max-new-tokens", 6, "--log-every", 1)
    if loss == "ipo":  # the policy is its reference at step 0: h = 0, (0 - 1 / (2 x 0.1))^2 = 25
        assert metrics[0]["loss"] == pytest.approx(25.0, abs=1e-3)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics)
    # simpo holds no reference model: the KL to the --model folder is measured by loading it then
    assert summary["kl"] is not None and summary["heldout_accuracy"] is not None
    assert (tmp_path / "dpo" / "model" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "dpo" / "config.json").read_text())["loss"] == loss


@pytest.mark.slow
def test_pretrain_reward_model_ppo_on_a_model_folder(hf_folder, data, tmp_path):
    m = ["--model", hf_folder, "--model-impl", "hf"]
    metrics, _ = run("pretrain", tmp_path, *m, "--data", data / "text.jsonl", "--steps", 2, "--batch-size", 4)
    assert metrics[-1]["loss"] > 0 and (tmp_path / "pretrain" / "model" / "config.json").is_file()

    _, summary = run("reward-model", tmp_path, *m, "--data", data / "prefs.jsonl",
                     "--eval-data", data / "prefs_eval.jsonl", "--steps", 2, "--batch-size", 4, "--eval-every", 1)
    assert 0 <= summary["heldout_accuracy"] <= 1 and "pearson" not in summary  # no r* here
    rm, tok = load_reward_model(tmp_path / "reward_model" / "model", "hf")
    assert rm.body.model.config.n_layer == 2 and not any(p.requires_grad for p in rm.parameters())

    metrics, summary = run("ppo", tmp_path, *m, "--data", data / "prompts.jsonl", "--steps", 2,
                           "--batch-size", 4, "--minibatch-size", 2, "--max-new-tokens", 6, "--eval-every", 1)
    assert summary["true_reward"] is None and all("score" in r and "kl" in r for r in metrics)
    assert (tmp_path / "ppo" / "model" / "model.safetensors").is_file()


def test_bad_data_file_is_refused_before_the_run_folder_exists(hf_folder, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "review the movie", "chosen": "the movie was good ."}) + "\n"
                   + json.dumps({"prompt": "review the movie", "chosen": "", "rejected": "bad"}) + "\n")
    assert main(["dpo", "--out", str(tmp_path / "run"), *COMMON, "--model", str(hf_folder), "--data", str(bad)]) == 1
    err = capsys.readouterr().err  # one line, no traceback
    assert re.search("^minialign: error: .*2 bad row.*line 1: no 'rejected'.*line 2: empty 'chosen'.*\n$", err)
    assert not (tmp_path / "run").exists()


def test_reward_model_with_a_hugging_face_body(hf_folder, world):
    """r_phi on any body: the score head reads the HF trunk's hidden state at the last real token."""
    body, tok = load_model(hf_folder, "hf")
    rm = RewardModel(body)
    prompt, response = tok.prompt("review the movie"), tok.response("the movie was good .")
    x = torch.tensor([prompt + response])
    padded = torch.cat([x, torch.zeros(1, 3, dtype=torch.long)], 1)                   # right padding
    mask = torch.cat([torch.ones_like(x), torch.zeros(1, 3, dtype=torch.long)], 1)
    response_mask = torch.zeros_like(mask)
    response_mask[0, len(prompt):x.shape[1]] = 1
    with torch.no_grad():
        h = body.model.transformer(x).last_hidden_state[0, -1]  # transformers' own forward, EOS position
        expected = rm.score_head(h)
        assert torch.allclose(rm(padded, mask), expected, atol=1e-5)
        assert torch.allclose(rm(padded, mask, response_mask), expected, atol=1e-5)  # the shared-prompt path
        assert torch.allclose(rm(x, torch.ones_like(x)), expected, atol=1e-5)


def test_export_writes_a_folder_transformers_loads(tiny_run, world, tmp_path, capsys):
    assert main(["export", str(tiny_run / "sft"), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    own, _ = load_model(tiny_run / "sft" / "model.pt")
    ids = torch.tensor([world.tokenizer.prompt("review the movie")])
    chat = tok.apply_chat_template([{"role": "user", "content": "review the movie"}],
                                   add_generation_prompt=True, tokenize=True)
    assert list(chat if isinstance(chat, list) else chat["input_ids"]) == ids[0].tolist()  # same prompt ids
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, own(ids), atol=1e-5)
    assert torch.equal(load_gpt2(tmp_path / "hf").wte.weight, own.wte.weight)
    assert main(["export", str(tiny_run / "sft"), str(tmp_path / "hf")]) == 1
    assert "exists and is not empty; export into a new folder" in capsys.readouterr().err
    with pytest.raises(FileExistsError):  # --debug: the exception itself
        main(["export", str(tiny_run / "sft"), str(tmp_path / "hf"), "--debug"])


@pytest.mark.slow
def test_hf_and_own_gpt_give_the_same_dpo_and_grpo_losses(hf_folder, data, tmp_path):
    """The same GPT-2 folder through transformers and through minialign's GPT: the same losses,
    step for step (the weights move identically, to float32 rounding)."""
    losses = {}
    for impl in ("hf", "minialign"):
        out = tmp_path / impl
        dpo, _ = run("dpo", out, "--model", hf_folder, "--model-impl", impl, "--data", data / "prefs.jsonl",
                     "--steps", 3, "--batch-size", 4, "--log-every", 1, "--eval-every", 3,
                     "--eval-samples-per-prompt", 1, "--max-new-tokens", 4, "--lr", 1e-2)
        grpo, _ = run("grpo", out, "--model", hf_folder, "--model-impl", impl, "--data", data / "qa.jsonl",
                      "--steps", 3, "--questions", 2, "--group-size", 4, "--batch-size", 8,
                      "--final-eval-samples", 1, "--eval-every", 0)
        losses[impl] = ([r["loss"] for r in dpo], [r["loss"] for r in grpo if "loss" in r])
    (dpo_hf, grpo_hf), (dpo_own, grpo_own) = losses["hf"], losses["minialign"]
    assert len(dpo_hf) == 3 and len(grpo_hf) == 3
    assert dpo_hf[-1] < dpo_hf[0]  # it trained
    assert dpo_hf == pytest.approx(dpo_own, abs=1e-5)
    assert grpo_hf == pytest.approx(grpo_own, abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dpo_and_grpo_on_a_model_folder_on_cuda_in_bf16(hf_folder, data, tmp_path):
    """The same commands on a GPU under bf16 autocast: losses finite, the model folder written."""
    common = ["--model", hf_folder, "--model-impl", "hf", "--device", "cuda", "--dtype", "bfloat16"]
    assert main(["dpo", "--out", str(tmp_path), "--no-progress", *map(str, common), "--data", str(data / "prefs.jsonl"),
                 "--steps", "2", "--batch-size", "4", "--eval-every", "2", "--eval-samples-per-prompt", "1",
                 "--max-new-tokens", "4"]) == 0
    assert main(["grpo", "--out", str(tmp_path), "--no-progress", *map(str, common), "--data", str(data / "qa.jsonl"),
                 "--steps", "2", "--questions", "2", "--group-size", "4", "--batch-size", "8",
                 "--final-eval-samples", "1", "--eval-every", "0"]) == 0
    for stage in ("dpo", "grpo"):
        rows = [json.loads(line) for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)  # no NaN
        assert (tmp_path / stage / "model" / "config.json").is_file()


@pytest.mark.slow
def test_family_members_from_the_command_line_on_a_model_folder(hf_folder, data, tmp_path):
    """Three members of the policy-gradient family (``minialign grpo --advantage/--loss ...``) on a Hugging
    Face folder with --model and your questions with --data: RLOO, DAPO with dynamic sampling, CISPO."""
    members = {"rloo": ["--advantage", "rloo", "--loss", "reinforce", "--kl-in", "reward", "--kl-estimator", "k1"],
               "dapo": ["--loss", "dapo", "--beta", 0, "--dynamic-sampling", "--max-draws", 1],
               "cispo": ["--loss", "cispo", "--beta", 0]}
    for name, flags in members.items():
        out = tmp_path / name
        metrics, summary = run("grpo", out, "--model", hf_folder, "--model-impl", "hf", "--data", data / "qa.jsonl",
                               "--eval-data", data / "qa_eval.jsonl", "--steps", 2, "--questions", 2, "--group-size", 4,
                               "--batch-size", 8, "--eval-samples", 2, "--final-eval-samples", 2, *flags)
        assert summary["heldout_accuracy"] is not None and (out / "grpo" / "model" / "config.json").is_file(), name
        assert all(r["tokens"] >= 8 for r in metrics if "loss" in r), name
