"""Checks minialign/tokenizer.py: splitting, round trips, templates and unknown symbols."""

import pytest

from minialign.tokenizer import SPECIAL_TOKENS, Tokenizer


@pytest.fixture
def tok(world):
    return world.tokenizer


def test_digits_are_tokens_and_decode_inverts_encode(tok):
    assert Tokenizer.split("12 + 3 = 15") == ["1", "2", "+", "3", "=", "1", "5"]
    for s in ["12 + 3 = 15", "the movie was very good and the music was not bad .", "what is 9 + 9 ?"]:
        assert tok.decode(tok.encode(s)) == s


def test_special_tokens_and_templates(tok):
    assert tok.itos[:5] == list(SPECIAL_TOKENS)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.pad_id != tok.eos_id  # EOS is a real token, never the pad
    p = tok.prompt("review the movie")
    assert p[:2] == [tok.bos_id, tok.user_id] and p[-1] == tok.assistant_id
    r = tok.response("the movie was good .")
    assert r[-1] == tok.eos_id and tok.decode(r) == "the movie was good ."
    d = tok.document("1 + 2 = 3")
    assert d[0] == tok.bos_id and d[-1] == tok.eos_id


def test_unknown_symbol_is_named(tok):
    with pytest.raises(ValueError, match="unknown symbol 'fantastic'"):
        tok.encode("the movie was fantastic .")
    with pytest.raises(ValueError, match="unknown symbol '<eos>'"):
        tok.encode("good <eos>")  # special tokens cannot be smuggled in as text


def test_state_dict_roundtrip_and_bad_vocab(tok):
    assert Tokenizer.from_state_dict(tok.state_dict()) == tok
    with pytest.raises(ValueError, match="duplicate"):
        Tokenizer(["a", "a"])
    with pytest.raises(ValueError, match="not a single token"):
        Tokenizer(["two words"])
