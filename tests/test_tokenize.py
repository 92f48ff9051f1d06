import pytest
from tokenizers import Tokenizer

from qwen3_jax.tokenization import TextTokenizer, format_instruction
from tests.conftest import CORPUS, long_text


def test_exactly_one_end_of_text_with_either_tokenizer_variant(tokenizers_pair):
    base, appending = (TextTokenizer(Tokenizer.from_str(t.to_str())) for t in tokenizers_pair)
    eot = base.end_of_text_id
    texts = ["", *CORPUS, long_text()]
    a, b = base.encode(texts, 4096), appending.encode(texts, 4096)
    assert a == b
    for row in a:
        assert row[-1] == eot and row.count(eot) == 1
    assert a[0] == [eot]


def test_appending_variant_matches_the_tokenizer_itself(tokenizers_pair):
    appending = Tokenizer.from_str(tokenizers_pair[1].to_str())
    ours = TextTokenizer(Tokenizer.from_str(tokenizers_pair[1].to_str()))
    for text in CORPUS:
        assert ours.encode([text], 4096)[0] == appending.encode(text).ids


def test_truncation_keeps_end_of_text_and_warns_once(tokenizers_pair):
    tok = TextTokenizer(Tokenizer.from_str(tokenizers_pair[1].to_str()))
    with pytest.warns(UserWarning, match="2 text.*max_length=16") as caught:
        rows = tok.encode([long_text(), "short", long_text(100)], 16)
    assert len(caught) == 1
    assert len(rows[0]) == 16 and rows[0][-1] == tok.end_of_text_id
    full = tok.encode([long_text()], 4096)[0]
    assert rows[0][:15] == full[:15]


def test_instruction_format():
    assert format_instruction("Find it") + "what?" == "Instruct: Find it\nQuery:what?"
