"""Qwen3Embedder against sentence-transformers on the same checkpoint files."""

import json
import shutil

import numpy as np
import pytest

from qwen3_jax import Qwen3Embedder
from tests.conftest import CORPUS, long_text

# The published config_sentence_transformers.json's query prompt, written here from the model card.
CARD_QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
from tests.reference import cosine_rows

TASK = "Given a web search query, retrieve relevant passages that answer the query"
MIXED = ["", long_text(), *CORPUS]


def test_queries_match_sentence_transformers(embedder, sentence_transformer):
    ours = embedder.encode(MIXED, prompt_name="query", batch_size=4)
    ref = sentence_transformer.encode(MIXED, prompt_name="query", batch_size=4)
    assert ours.shape == ref.shape == (len(MIXED), 64) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-4
    by_instruction = embedder.encode(MIXED, instruction=TASK)
    assert np.abs(by_instruction - ref).max() <= 1e-4


def test_documents_match_sentence_transformers(embedder, sentence_transformer):
    ours = embedder.encode(MIXED, batch_size=32)
    ref = sentence_transformer.encode(MIXED, batch_size=3)
    assert np.abs(ours - ref).max() <= 1e-4
    assert np.abs(embedder.encode(MIXED, prompt_name="document") - ref).max() <= 1e-4


def test_older_tokenizer_without_appended_token_gives_the_same_vectors(checkpoint_base_tokenizer,
                                                                       sentence_transformer):
    model = Qwen3Embedder.from_pretrained(checkpoint_base_tokenizer)
    ref = sentence_transformer.encode(CORPUS, prompt_name="query")
    assert np.abs(model.encode(CORPUS, prompt_name="query") - ref).max() <= 1e-4


@pytest.mark.parametrize("dim", [32, 48])
def test_mrl_dims_truncate_then_normalise(embedder, sentence_transformer, dim):
    ref = sentence_transformer.encode(CORPUS, truncate_dim=dim)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    ours = embedder.encode(CORPUS, dim=dim)
    assert ours.shape == (len(CORPUS), dim)
    assert np.abs(ours - ref).max() <= 1e-4


def test_sentence_transformers_truncate_dim_and_normalize_embeddings(embedder, sentence_transformer):
    for normalize_embeddings in (False, True):
        ref = sentence_transformer.encode(CORPUS, truncate_dim=40, normalize_embeddings=normalize_embeddings)
        ours = embedder.encode(CORPUS, truncate_dim=40, normalize_embeddings=normalize_embeddings)
        assert ours.shape == ref.shape == (len(CORPUS), 40)
        assert np.abs(ours - ref).max() <= 1e-4
    assert np.linalg.norm(ours, axis=1).min() > 0.999         # normalised again...
    assert np.linalg.norm(embedder.encode(CORPUS, truncate_dim=40), axis=1).max() < 0.999   # ...only when asked
    with pytest.raises(ValueError, match="not both"):
        embedder.encode(CORPUS, dim=32, truncate_dim=32)


def test_truncate_dim_of_the_model_as_sentence_transformers(checkpoint, embedder):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(checkpoint), device="cpu", truncate_dim=48)
    ours = Qwen3Embedder.from_pretrained(checkpoint, truncate_dim=48)
    assert ours.get_sentence_embedding_dimension() == reference.get_sentence_embedding_dimension() == 48
    assert embedder.get_sentence_embedding_dimension() == 64
    assert np.abs(ours.encode(CORPUS) - reference.encode(CORPUS)).max() <= 1e-4
    assert ours.encode(CORPUS, truncate_dim=32).shape == (len(CORPUS), 32)      # encode's own wins
    assert ours.encode(CORPUS, dim=64).shape == (len(CORPUS), 64)
    with pytest.raises(ValueError, match="truncate_dim=100 is outside 32..64"):
        Qwen3Embedder.from_pretrained(checkpoint, truncate_dim=100)


def test_encode_query_and_document_use_the_prompts_as_sentence_transformers(embedder, sentence_transformer):
    queries = embedder.encode_query(CORPUS[:4])
    assert np.abs(queries - sentence_transformer.encode_query(CORPUS[:4])).max() <= 1e-4
    assert np.abs(queries - embedder.encode(CORPUS[:4], prompt_name="query")).max() == 0
    assert np.abs(queries - embedder.encode(CORPUS[:4])).max() > 1e-3          # the prompt made a difference
    documents = embedder.encode_document(CORPUS[:4], truncate_dim=32, normalize_embeddings=True)
    ref = sentence_transformer.encode_document(CORPUS[:4], truncate_dim=32, normalize_embeddings=True)
    assert np.abs(documents - ref).max() <= 1e-4
    assert np.abs(embedder.encode_query(CORPUS[:2], instruction="Find it") -
                  embedder.encode(CORPUS[:2], instruction="Find it")).max() == 0       # a given prompt wins


def test_convert_to_tensor_gives_jax_arrays(embedder):
    import jax

    full = embedder.encode(CORPUS[:3])
    tensor = embedder.encode(CORPUS[:3], convert_to_tensor=True)
    assert isinstance(tensor, jax.Array) and tensor.shape == (3, 64)
    assert np.abs(np.asarray(tensor) - full).max() == 0
    rows = embedder.encode(CORPUS[:3], convert_to_numpy=False)
    assert isinstance(rows, list) and len(rows) == 3 and all(isinstance(row, jax.Array) for row in rows)
    assert np.abs(np.stack(rows) - full).max() == 0
    assert isinstance(embedder.encode(CORPUS[0], convert_to_tensor=True), jax.Array)


def test_left_padding_gives_the_same_embeddings(checkpoint, embedder):
    left = Qwen3Embedder.from_pretrained(checkpoint, padding_side="left")
    assert np.abs(left.encode(MIXED) - embedder.encode(MIXED)).max() <= 1e-5


def test_bf16_by_cosine(checkpoint_bf16, sentence_transformer):
    model = Qwen3Embedder.from_pretrained(checkpoint_bf16, dtype="bfloat16")
    ref = sentence_transformer.encode(MIXED, prompt_name="query")
    assert cosine_rows(model.encode(MIXED, prompt_name="query"), ref).min() >= 0.99


def test_similarity_matches_sentence_transformers(embedder, sentence_transformer):
    q = embedder.encode(CORPUS[2:4], prompt_name="query")
    d = embedder.encode(CORPUS[:2])
    ref = sentence_transformer.similarity(sentence_transformer.encode(CORPUS[2:4], prompt_name="query"),
                                          sentence_transformer.encode(CORPUS[:2])).numpy()
    assert np.abs(embedder.similarity(q, d) - ref).max() <= 1e-4


def test_inputs_in_any_order_and_shapes(embedder):
    full = embedder.encode(MIXED)
    one = embedder.encode(MIXED[3])
    assert one.shape == (64,) and np.abs(one - full[3]).max() <= 1e-5
    assert embedder.encode([]).shape == (0, 64)
    assert embedder.encode([], dim=32).shape == (0, 32)
    reordered = embedder.encode(MIXED[::-1], batch_size=3)
    assert np.abs(reordered[::-1] - full).max() <= 1e-5


def test_bad_inputs_get_clear_errors(embedder):
    with pytest.raises(ValueError, match="dim=17 is outside 32..64"):
        embedder.encode(["a"], dim=17)
    with pytest.raises(ValueError, match="dim=65"):
        embedder.encode(["a"], dim=65)
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        embedder.encode(["a", 3])
    with pytest.raises(ValueError, match="prompt_name='nope' is unknown; this model has: query, document"):
        embedder.encode(["a"], prompt_name="nope")
    with pytest.raises(ValueError, match="at most one"):
        embedder.encode(["a"], prompt_name="query", instruction="x")
    with pytest.raises(ValueError, match="batch_size=0"):
        embedder.encode(["a"], batch_size=0)
    with pytest.raises(ValueError, match="batch_size=1.5 must be a whole number"):
        embedder.encode(["a"], batch_size=1.5)
    with pytest.raises(ValueError, match="max_length=0 must be a whole number of tokens of at least 2"):
        embedder.encode(["a"], max_length=0)


def test_a_numpy_array_of_strings_is_accepted(embedder):
    texts = np.array(CORPUS[:4])
    assert np.abs(embedder.encode(texts) - embedder.encode(CORPUS[:4])).max() == 0


def test_unnormalised_output_is_the_raw_last_hidden_state(checkpoint, embedder):
    from tests.reference import transformers_hidden_states

    raw = embedder.encode(CORPUS[:3], normalize=False)
    rows = embedder.tokenizer.encode(CORPUS[:3], embedder.max_length)
    for text, row, ours in zip(CORPUS[:3], rows, raw):
        ids = np.asarray([row])
        _, final = transformers_hidden_states(checkpoint, ids, np.ones_like(ids))
        assert np.abs(ours - final[0, -1]).max() <= 1e-4
    assert np.abs(np.linalg.norm(raw, axis=1) - 1).max() > 1e-2    # really not normalised
    assert np.abs(embedder.encode(CORPUS[:3], normalize=False, dim=32) - raw[:, :32]).max() == 0


def test_default_prompt_name_is_honoured_as_sentence_transformers_does(checkpoint, tmp_path, embedder):
    from sentence_transformers import SentenceTransformer

    folder = tmp_path / "default-query"
    shutil.copytree(checkpoint, folder)
    settings = json.loads((folder / "config_sentence_transformers.json").read_text())
    settings["default_prompt_name"] = "query"
    (folder / "config_sentence_transformers.json").write_text(json.dumps(settings))
    ref = SentenceTransformer(str(folder), device="cpu").encode(CORPUS)
    ours = Qwen3Embedder.from_pretrained(folder)
    assert np.abs(ours.encode(CORPUS) - ref).max() <= 1e-4
    assert np.abs(ours.encode(CORPUS) - embedder.encode(CORPUS, prompt_name="query")).max() == 0
    assert np.abs(ours.encode(CORPUS, prompt="") - embedder.encode(CORPUS)).max() == 0   # an explicit prompt wins


def test_over_long_text_is_truncated_with_one_warning(embedder, sentence_transformer):
    with pytest.warns(UserWarning, match="truncated") as caught:
        ours = embedder.encode([long_text(), long_text(300)], max_length=64)
    assert len(caught) == 1
    sentence_transformer.max_seq_length = 64
    try:
        ref = sentence_transformer.encode([long_text(), long_text(300)])
    finally:
        sentence_transformer.max_seq_length = 1024
    assert np.abs(ours - ref).max() <= 1e-4


def test_default_max_length_comes_from_sentence_bert_config(embedder):
    assert embedder.max_length == 1024


def test_prompts_are_read_from_the_checkpoint(embedder):
    assert embedder.prompts["query"] == CARD_QUERY_PROMPT


def _hub_cache(checkpoint, root, repo="Qwen/Qwen3-Embedding-0.6B"):
    """The folder layout huggingface_hub keeps for a downloaded snapshot."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / ("0" * 40)
    shutil.copytree(checkpoint, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text("0" * 40)


def test_hub_id_offline_uses_the_cache_or_says_what_to_do(checkpoint, tmp_path, monkeypatch, embedder):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="pass a local folder"):
        Qwen3Embedder.from_pretrained("Qwen/Qwen3-Embedding-0.6B", cache_dir=str(tmp_path / "empty"))
    _hub_cache(checkpoint, tmp_path / "cache")
    model = Qwen3Embedder.from_pretrained("Qwen/Qwen3-Embedding-0.6B", cache_dir=str(tmp_path / "cache"))
    assert np.abs(model.encode(CORPUS) - embedder.encode(CORPUS)).max() == 0


def test_missing_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Qwen3Embedder.from_pretrained(tmp_path / "absent")


def test_bf16_on_inputs_of_thousands_of_tokens_keeps_positions_exact(checkpoint_bf16, checkpoint):
    """bf16 compute with float32 RoPE angles stays within 5e-5 of the fp32 reference in cosine on
    1,300-2,700-token inputs; rounding positions to bf16 (a real long-context bug) costs 4-8e-4 here."""
    from tests.reference import transformers_hidden_states

    texts = [long_text(2500), long_text(1200), long_text(3000)[:9000]]
    model = Qwen3Embedder.from_pretrained(checkpoint_bf16, dtype="bfloat16", max_length=4096)
    rows = model.tokenizer.encode(texts, 4096)
    assert min(map(len, rows)) > 1000
    reference = []
    for row in rows:
        ids = np.asarray([row])
        reference.append(transformers_hidden_states(checkpoint, ids, np.ones_like(ids))[1][0, -1])
    assert cosine_rows(model.encode(texts), np.stack(reference)).min() >= 0.9998


def test_progress_bar_counts_every_text_and_tokens(embedder, capsys):
    texts = [f"{t} {i}" for i in range(5) for t in CORPUS]
    embedder.encode(texts, batch_size=1, show_progress_bar=True)
    shown = capsys.readouterr().err
    assert f"{len(texts)}/{len(texts)}" in shown and "tok_s=" in shown
    embedder.encode(texts, batch_size=1)
    assert capsys.readouterr().err == ""
