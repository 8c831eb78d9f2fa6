"""Checks minialign/runtime/datafiles.py: TRL-format rows, bad rows named by line, --max-length as TRL 1.16."""

import pytest
from conftest import write_rows

from minialign.runtime.datafiles import (DataError, _implicit_prompt, preference_data, prompt_data, read_rows,
                                         sft_data, text_data)


def test_sft_rows_prompt_completion_and_messages(tmp_path, world):
    tok = world.tokenizer
    path = write_rows(tmp_path / "sft.jsonl", [
        {"prompt": "review the movie", "completion": "the movie was good ."},
        {"messages": [{"role": "user", "content": "what is 1 + 2 ?"}, {"role": "assistant", "content": "3"}]},
    ])
    prompts, responses, report = sft_data(path, tok, context=48)
    assert prompts == [tok.prompt("review the movie"), tok.prompt("what is 1 + 2 ?")]
    assert responses == [tok.response("the movie was good ."), tok.response("3")]  # each ends with EOS
    assert (report.rows, report.kept, report.truncated, report.dropped) == (2, 2, 0, 0)


def test_bad_rows_are_counted_and_named_by_line(tmp_path, world):
    path = write_rows(tmp_path / "bad.jsonl", [
        {"prompt": "review the movie", "completion": "the movie was good ."},   # line 1: fine
        {"prompt": "review the movie"},                                         # line 2: no completion
        "",                                                                     # line 3: blank, skipped
        {"prompt": "review the movie", "completion": "   "},                    # line 4: empty
        "{not json",                                                            # line 5
        {"prompt": "review the movie", "completion": "the zebra was good ."},   # line 6: unknown word
        {"prompt": "review the movie", "completion": " ".join(["good"] * 60)},  # line 7: too long
    ])
    with pytest.raises(DataError) as e:
        sft_data(path, world.tokenizer, context=48)
    message = str(e.value)
    assert "5 bad row(s) of 6" in message
    for where, why in [("line 2", "no 'completion'"), ("line 4", "empty 'completion'"),
                       ("line 5", "malformed JSON"), ("line 6", "zebra"),
                       ("line 7", "more than the model's context of 48")]:
        assert f"{where}: " in message and why in message
    assert "line 1" not in message and "line 3" not in message


def test_max_length_keep_start_truncates_and_drops_like_trl(tmp_path, world):
    tok = world.tokenizer
    long = " and ".join(["the movie was good"] * 3) + " ."
    path = write_rows(tmp_path / "sft.jsonl", [{"prompt": "review the movie", "completion": long},
                                          {"prompt": "review the movie", "completion": "the movie was good ."}])
    x = tok.prompt("review the movie")  # 5 tokens
    prompts, responses, report = sft_data(path, tok, context=48, max_length=10)
    # keep_start: prompt + response cut to the first 10 tokens (the EOS of the long one is lost)
    assert responses[0] == tok.response(long)[:10 - len(x)]
    assert responses[1] == tok.response("the movie was good .")[:10 - len(x)]
    assert (report.truncated, report.dropped) == (2, 0)
    # a prompt that alone fills max_length leaves nothing to learn: the row is dropped (TRL 1.16)
    prompts, responses, report = sft_data(path, tok, context=48, max_length=len(x) + 6)
    assert report.truncated == 1 and len(responses) == 2
    with pytest.raises(DataError, match="no usable rows"):
        sft_data(path, tok, context=48, max_length=len(x))
    with pytest.raises(DataError, match="must be in"):
        sft_data(path, tok, context=48, max_length=49)


def test_preferences_dpo_truncates_reward_model_drops(tmp_path, world):
    tok = world.tokenizer
    rows = [{"prompt": "review the movie", "chosen": "the movie was good .", "rejected": "the movie was bad ."},
            {"prompt": "review the movie", "chosen": "the movie was very good and the music was good .",
             "rejected": "the movie was bad ."}]
    path = write_rows(tmp_path / "p.jsonl", rows)
    x = tok.prompt("review the movie")
    limit = len(x) + len(tok.response("the movie was good ."))  # the first pair just fits
    dpo, report = preference_data(path, tok, context=48, max_length=limit)
    assert dpo["chosen"][1] == tok.response(rows[1]["chosen"])[:limit - len(x)]
    assert (report.truncated, report.dropped, report.kept) == (1, 0, 2)
    rm, report = preference_data(path, tok, context=48, max_length=limit, truncate=False)
    assert rm["chosen"] == [tok.response(rows[0]["chosen"])] and (report.dropped, report.kept) == (1, 1)


def test_implicit_prompt_is_the_shared_beginning(tmp_path, world):
    tok = world.tokenizer
    conv = {"chosen": [{"role": "user", "content": "review the movie"},
                       {"role": "assistant", "content": "the movie was good ."}],
            "rejected": [{"role": "user", "content": "review the movie"},
                         {"role": "assistant", "content": "the movie was bad ."}]}
    data, _ = preference_data(write_rows(tmp_path / "c.jsonl", [conv]), tok, context=48)
    assert data["prompt"] == [tok.prompt("review the movie")]
    assert data["chosen"] == [tok.response("the movie was good .")]
    # strings: the answers keep their leading space (BPE tokenizers read " Yes" as one token), as TRL
    assert _implicit_prompt("Is it? Yes.", "Is it? No.") == ("Is it?", " Yes.", " No.")
    with pytest.raises(DataError, match="line 1: no 'prompt'.*share no beginning"):
        preference_data(write_rows(tmp_path / "n.jsonl", [{"chosen": "good", "rejected": "bad"}]), tok, context=48)


def test_prompt_rows_for_grpo_need_an_answer_and_room_to_answer(tmp_path, world):
    tok = world.tokenizer
    path = write_rows(tmp_path / "q.jsonl", [{"prompt": "what is 1 + 2 ?", "answer": "3"},
                                        {"prompt": "what is 2 + 2 ?"}])
    with pytest.raises(DataError, match="line 2: no 'answer'"):
        prompt_data(path, tok, context=48, max_new_tokens=4, required=("answer",))
    rows, report = prompt_data(path, tok, context=48, max_new_tokens=4)  # a user reward may not need it
    assert rows[0]["prompt_ids"] == tok.prompt("what is 1 + 2 ?") and rows[0]["answer"] == "3"
    n = len(tok.prompt("what is 1 + 2 ?"))
    too_long = f"line 1: prompt of {n} tokens \\+ max_new_tokens=4 exceeds the model's context of {n + 3}"
    with pytest.raises(DataError, match=too_long):
        prompt_data(path, tok, context=n + 3, max_new_tokens=4)
    with pytest.raises(DataError, match="no usable rows"):  # a prompt is never cut, only dropped
        prompt_data(path, tok, context=48, max_new_tokens=4, max_length=n + 3)


def test_text_rows_and_file_formats(tmp_path, world):
    tok = world.tokenizer
    prompts, responses, _ = text_data(write_rows(tmp_path / "t.jsonl", [{"text": "3 + 4 = 7"}]), tok, context=48)
    assert prompts == [[tok.bos_id]] and responses == [tok.document("3 + 4 = 7")[1:]]
    with pytest.raises(DataError, match="expected a .jsonl"):
        read_rows(write_rows(tmp_path / "t.csv", ["a,b"]))
    with pytest.raises(DataError, match="no such data file"):
        read_rows(tmp_path / "missing.jsonl")


def test_parquet_rows(tmp_path, world):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist([{"prompt": "review the movie", "completion": "the movie was good ."},
                                         {"prompt": "review the movie", "completion": ""}]),
                   tmp_path / "d.parquet")
    with pytest.raises(DataError, match="row 2: empty 'completion'"):
        sft_data(tmp_path / "d.parquet", world.tokenizer, context=48)


def test_real_data_flags_are_checked_when_the_config_is_made():
    from minialign.stages.dpo import DPOConfig
    from minialign.stages.grpo import GRPOConfig
    from minialign.runtime.loading import load_model
    from minialign.stages.sft import SFTConfig

    with pytest.raises(ValueError, match="--eval-data is held-out data for --data"):
        SFTConfig(eval_data="eval.jsonl")
    with pytest.raises(ValueError, match="--max-length 12 cuts the rows of --data"):
        DPOConfig(max_length=12)
    with pytest.raises(ValueError, match="--max-length 0"):
        DPOConfig(data="d.jsonl", max_length=0)
    with pytest.raises(ValueError, match="--grad-accum must be >= 1"):
        GRPOConfig(grad_accum=0)
    with pytest.raises(ValueError, match="model_impl must be 'minialign' or 'hf'"):
        load_model("anywhere", "vllm")
    assert DPOConfig(data="d.jsonl", eval_data="e.jsonl", max_length=12).max_length == 12


def test_a_file_with_fewer_usable_rows_than_a_step_is_refused_while_a_stage_reads_it(tmp_path, world):
    """Counted after bad rows are named and --max-length has dropped rows; only while a stage runs."""
    from minialign.runtime.datafiles import rows_per_step
    long = {"prompt": "review the movie " * 3, "completion": "the movie was good ."}
    path = write_rows(tmp_path / "sft.jsonl", [long] * 3 + [{"prompt": "review the movie", "completion": "good ."}])
    with rows_per_step(path, 5, "--batch-size"):
        with pytest.raises(DataError, match=r"sft.jsonl: 4 row\(s\), fewer than the 5 one step draws \(--batch-size 5\)"):
            sft_data(path, world.tokenizer, context=48)
    with rows_per_step(path, 2, "--batch-size"):
        with pytest.raises(DataError, match=r"sft.jsonl: 1 usable row\(s\) of 4 \(3 dropped by --max-length 12\), "
                                            r"fewer than the 2 one step draws \(--batch-size 2\)"):
            sft_data(path, world.tokenizer, context=48, max_length=12)
    *_, report = sft_data(path, world.tokenizer, context=48, max_length=12)  # no stage: no such rule
    assert report.kept == 1


def test_a_line_that_is_not_utf8_names_file_and_line_in_every_reader(tmp_path, world):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(b'{"prompt": "review the movie", "completion": "the movie was good ."}\n'
                     b'{"prompt": "review the movie", "completion": "the movie was \xff ."}\n')
    with pytest.raises(DataError, match=r"sft.jsonl: 1 bad row\(s\) of 2: line 2: not UTF-8 text \(byte 0xff"):
        sft_data(path, world.tokenizer, context=48)
