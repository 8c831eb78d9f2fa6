"""KTO on unpaired examples from the command line: TRL's ``{prompt, completion, label}`` rows
(``runtime/datafiles.py: unpaired_data``), the toy world's pairs split (``--kto-unpaired``), and
``minialign dpo --loss kto`` on them end to end. The step by hand: ``tests/equations/test_kto.py``."""

import json
import warnings

import pytest
import torch
from conftest import write_rows

from minialign import kto as K
from minialign.runtime.cli import main as cli
from minialign.runtime.datafiles import DataError, preference_data, preference_format, unpaired_data
from minialign.runtime.files import ConfigError
from minialign.stages import dpo as dpo_stage
from minialign.stages.dpo import DPOConfig
from minialign.toyworld import write_jsonl


# ----------------------------------------------------------------------------------------------
# TRL's unpaired rows
# ----------------------------------------------------------------------------------------------


def test_unpaired_rows_standard_and_conversational(tmp_path, world):
    tok = world.tokenizer
    path = write_rows(tmp_path / "kto.jsonl", [
        {"prompt": "review the movie", "completion": "the movie was good .", "label": True},
        {"prompt": [{"role": "user", "content": "review the movie"}],
         "completion": [{"role": "assistant", "content": "the movie was bad ."}], "label": False},
    ])
    assert preference_format(path) == "unpaired"
    data, report = unpaired_data(path, tok, context=48)
    assert data == {"prompt": [tok.prompt("review the movie")] * 2,
                    "completion": [tok.response("the movie was good ."), tok.response("the movie was bad .")],
                    "desirable": [True, False]}
    assert (report.rows, report.kept) == (2, 2)
    # keep_start truncation as for SFT
    x = tok.prompt("review the movie")
    data, report = unpaired_data(path, tok, context=48, max_length=len(x) + 2)
    assert data["completion"][0] == tok.response("the movie was good .")[:2] and report.truncated == 2


def test_bad_unpaired_rows_are_named_by_line(tmp_path, world):
    path = write_rows(tmp_path / "bad.jsonl", [
        {"prompt": "review the movie", "completion": "the movie was good .", "label": True},   # 1: fine
        {"prompt": "review the movie", "completion": "the movie was bad ."},                    # 2: no label
        {"prompt": "review the movie", "completion": "the movie was bad .", "label": 1},        # 3: not a bool
        {"prompt": "review the movie", "completion": "the movie was bad .", "label": "false"},  # 4: a string
        {"prompt": "review the movie", "label": False},                                         # 5: no completion
        {"prompt": "review the movie", "chosen": "good .", "rejected": "bad .", "label": True},  # 6: a pair
        {"prompt": "review the movie", "completion": "   ", "label": False},                    # 7: empty
    ])
    with pytest.raises(DataError) as e:
        unpaired_data(path, world.tokenizer, context=48)
    message = str(e.value)
    assert "6 bad row(s) of 7" in message and "line 1" not in message
    for where, why in [("line 2", "no 'label'"), ("line 3", "'label' must be true (desirable) or false "
                                                            "(undesirable), got 1"),
                       ("line 4", "got 'false'"), ("line 5", "no 'completion'"),
                       ("line 6", "a preference pair among unpaired rows"), ("line 7", "empty 'completion'")]:
        assert f"{where}: " in message and why in message, where


def test_a_file_of_one_class_is_refused(tmp_path, world):
    rows = [{"prompt": "review the movie", "completion": "the movie was good .", "label": True}] * 3
    with pytest.raises(DataError, match="all 3 usable rows are labelled true; KTO needs desirable"):
        unpaired_data(write_rows(tmp_path / "d.jsonl", rows), world.tokenizer, context=48)
    rows = [dict(r, label=False) for r in rows]
    with pytest.raises(DataError, match="labelled false"):
        unpaired_data(write_rows(tmp_path / "u.jsonl", rows), world.tokenizer, context=48)


def test_pairs_readers_refuse_an_unpaired_file_in_one_line(tmp_path, world):
    path = write_rows(tmp_path / "kto.jsonl", [{"prompt": "review the movie", "completion": "good .", "label": True}])
    with pytest.raises(DataError, match=r"unpaired examples \{prompt, completion, label\}.*needs preference pairs") as e:
        preference_data(path, world.tokenizer, context=48)
    assert "\n" not in str(e.value)
    pairs = write_rows(tmp_path / "p.jsonl", ["{not json", {"prompt": "x", "chosen": "good .", "rejected": "bad ."}])
    assert preference_format(pairs) == "pairs"  # decided by the first row that is a JSON object


def test_unpaired_parquet(tmp_path, world):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist([{"prompt": "review the movie", "completion": "the movie was good .",
                                          "label": True},
                                         {"prompt": "review the movie", "completion": "the movie was bad .",
                                          "label": False}]), tmp_path / "k.parquet")
    assert preference_format(tmp_path / "k.parquet") == "unpaired"
    data, _ = unpaired_data(tmp_path / "k.parquet", world.tokenizer, context=48)
    assert data["desirable"] == [True, False]


# ----------------------------------------------------------------------------------------------
# minialign dpo --loss kto on unpaired examples, end to end
# ----------------------------------------------------------------------------------------------


def tiny(tiny_run, out, **flags):
    return DPOConfig(**{**dict(out=str(out), init=str(tiny_run / "sft" / "model.pt"), steps=3, batch_size=8, lr=1e-3,
                               warmup_steps=1, num_pairs=32, eval_pairs=16, eval_every=100, log_every=1,
                               eval_samples_per_prompt=1, max_new_tokens=6, progress=False, device="cpu",
                               loss="kto"), **flags})


def metrics(out):
    return [json.loads(line) for line in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_kto_unpaired_on_the_toy_world_equals_the_same_examples_from_a_file(tiny_run, tmp_path, monkeypatch, world):
    references = []
    step = dpo_stage.kto_step
    monkeypatch.setattr(dpo_stage, "kto_step", lambda policy, reference, tok, examples, *a, **k: (
        references.append((reference, examples)), step(policy, reference, tok, examples, *a, **k))[1])
    toy = dpo_stage.main(tiny(tiny_run, tmp_path / "toy", kto_unpaired=True))
    # the same pairs the toy world drew (num_pairs at --seed), split, as a TRL file
    write_jsonl(tmp_path / "kto.jsonl", K.unpair_preference_rows(world.preference_dataset(32, seed=0)))
    mine = dpo_stage.main(tiny(tiny_run, tmp_path / "file", data=str(tmp_path / "kto.jsonl")))
    a, b = metrics(tmp_path / "toy"), metrics(tmp_path / "file")
    assert len(a) == 3 and [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["reference_point"] for r in a] == [r["reference_point"] for r in b]
    # step 0: the policy is its reference, z_0 = 0 and each example's loss is lambda_y (1 - sigma(0)) = 1/2
    assert a[0]["loss"] == pytest.approx(0.5, abs=1e-6) and a[0]["reference_point"] == 0.0
    assert "true_reward" in toy and "true_reward" not in mine  # r* where the toy world knows it
    assert mine["data"]["rows"] == 64
    # the reference's log-probs of every example and of its mismatched completion were precomputed
    assert len(references) == 6 and all(set(r) == {"completion", "kl_completion"} for r, _ in references)
    reference, examples = references[-1]
    assert len(reference["completion"]) == 64 and sum(examples["desirable"]) == 32
    # each example's mismatched completion is that of the example before it (kto_mismatched_index)
    assert examples["kl_completion"] == examples["completion"][-1:] + examples["completion"][:-1]


def test_kto_unpaired_flags_and_files_are_refused_where_they_do_not_apply(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="--kto-unpaired must be false unless --loss kto on the toy world"):
        DPOConfig(loss="sigmoid", kto_unpaired=True)
    with pytest.raises(ConfigError, match="--kto-unpaired must be false"):
        DPOConfig(loss="kto", kto_unpaired=True, data="x.jsonl")
    path = write_rows(tmp_path / "kto.jsonl", [{"prompt": "review the movie", "completion": "the movie was good .",
                                           "label": True},
                                          {"prompt": "review the movie", "completion": "the movie was bad .",
                                           "label": False}])
    for loss in ("sigmoid", "ipo"):
        with pytest.raises(DataError, match=f"which only --loss kto reads; --loss {loss} needs pairs"):
            dpo_stage.main(tiny(tiny_run, tmp_path / loss, loss=loss, data=str(path)))
    assert not (tmp_path / "sigmoid" / "dpo").exists()  # refused before the run folder


@pytest.mark.slow
def test_the_class_weights_are_checked_as_trl_does(tiny_run, tmp_path):
    rows = [{"prompt": "review the movie", "completion": "the movie was good .", "label": True}] * 6 + \
           [{"prompt": "review the movie", "completion": "the movie was bad .", "label": False}] * 2
    path = write_rows(tmp_path / "kto.jsonl", rows)
    # 6 desirable and 2 undesirable at weights 1, 1: lambda_D n_D / (lambda_U n_U) = 3
    with pytest.warns(UserWarning, match=r"= 3, outside the paper's \[1, 4/3\]: e.g. --desirable-weight 0.333"):
        dpo_stage.main(tiny(tiny_run, tmp_path / "a", data=str(path), steps=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # 6 x 0.4 / (2 x 1) = 1.2: in range, no warning
        dpo_stage.main(tiny(tiny_run, tmp_path / "b", data=str(path), steps=1, desirable_weight=0.4))


def test_help_names_the_unpaired_rows_and_the_flag(capsys):
    with pytest.raises(SystemExit):
        cli(["dpo", "--help"])
    text = capsys.readouterr().out
    assert "{prompt, completion, label}" in text and "--kto-unpaired" in text


@pytest.mark.slow
def test_unpaired_kto_on_a_transformers_model_from_the_command_line(world, tmp_path):
    """TRL's conversational unpaired rows on a tiny random GPT-2 folder (``--model-impl hf``)."""
    transformers = pytest.importorskip("transformers")
    from minialign.real.hf import hf_tokenizer_from_toy

    tok = world.tokenizer
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=tok.vocab_size, n_positions=48, n_embd=32, n_layer=2, n_head=2, bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id, pad_token_id=tok.pad_id))
    folder = tmp_path / "gpt2"
    model.save_pretrained(str(folder))
    hf_tokenizer_from_toy(tok).save_pretrained(str(folder))
    pairs = world.preference_dataset(12, seed=1)
    write_jsonl(tmp_path / "kto.jsonl", [
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "completion": [{"role": "assistant", "content": r["completion"]}], "label": r["label"]}
        for r in K.unpair_preference_rows(pairs[:8])])
    write_jsonl(tmp_path / "prefs_eval.jsonl", pairs[8:])
    assert cli(["dpo", "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress", "--model", str(folder),
                "--model-impl", "hf", "--loss", "kto", "--data", str(tmp_path / "kto.jsonl"), "--eval-data",
                str(tmp_path / "prefs_eval.jsonl"), "--steps", "2", "--batch-size", "4", "--eval-every", "1",
                "--eval-samples-per-prompt", "2", "--max-new-tokens", "6", "--log-every", "1"]) == 0
    rows = metrics(tmp_path / "run")
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-4)  # the policy is its reference: z_0 = 0, each 1/2
    summary = json.loads((tmp_path / "run" / "dpo" / "summary.json").read_text())
    assert summary["data"]["rows"] == 16 and summary["heldout_accuracy"] is not None
    assert (tmp_path / "run" / "dpo" / "model" / "model.safetensors").is_file()
