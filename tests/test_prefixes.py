"""Shared prefixes (prefixes.py, attention/prefix.py): texts that begin with the same token ids attend to one
copy of that prefix and compute only their own tokens, with the vectors and scores of computing each text
whole (1e-6 in float32) and of sentence-transformers / transformers (1e-4), on every kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax import Qwen3Embedder, Qwen3Reranker, make_mesh
from qwen3_jax.attention import attention_with_logsumexp, dense_attention
from qwen3_jax.attention.prefix import merge_attention, prefix_attention
from qwen3_jax.backend import KERNEL_PLATFORMS, Backend
from qwen3_jax.engine.embedding import normalize_rows
from qwen3_jax.prefixes import MIN_SHARED, PrefixCache, common_length, shared_groups
from tests.conftest import CORPUS
from tests.reference import cosine_rows

TASK = "Given a web search query, retrieve relevant passages that answer the query"
OTHER_TASK = "Given a claim, find documents that refute it"
QUERIES = ["What is the capital of China?", "Explain gravity", "how do plants make food from sunlight", "x",
           "which river runs through Paris", "largest mammal"]


def query(task: str, text: str) -> str:
    return f"Instruct: {task}\nQuery:{text}"


def unshared(model):
    """The same model computing every text whole (sharing switched off)."""
    model.runner.prefixes = None
    return model


def rows_of(model, texts, max_length=512, side="right"):
    return model.tokenizer.encode(texts, max_length, side=side)


# --- the kernels ----------------------------------------------------------------------------------------

KERNELS = ["dense", "blockwise", "pallas", "splash"]


def _backend(impl):
    return Backend.resolve(impl, platform=KERNEL_PLATFORMS.get(impl, "cpu"))


@pytest.mark.parametrize("impl", KERNELS)
def test_every_kernel_with_a_prefix_table_equals_attention_over_the_whole_texts(impl):
    """Three texts packed in one row continue two prefixes (one of them only in part) or none; merged by
    log-sum-exp, each text's attention equals dense attention over its prefix tokens and its own, and
    never reaches another text's prefix or tokens. Pallas and splash run interpreted."""
    rng = np.random.default_rng(0)
    heads, kv_heads, h = 4, 2, 32
    prefix_lengths = {1: 12, 2: 9}
    table_keys = rng.normal(size=(24, kv_heads, h)).astype(np.float32)
    table_values = rng.normal(size=(24, kv_heads, h)).astype(np.float32)
    entry = np.zeros(24, np.int32)
    entry[:12], entry[12:21] = 1, 2
    position = np.concatenate([np.arange(12), np.arange(9), np.zeros(3)]).astype(np.int32)
    texts = [(1, 12, 20), (2, 5, 13), (0, 0, 10), (1, 7, 30)]          # (prefix, its tokens seen, own tokens)
    length = 128
    q = rng.normal(size=(1, length, heads, h)).astype(np.float32)
    k = rng.normal(size=(1, length, kv_heads, h)).astype(np.float32)
    v = rng.normal(size=(1, length, kv_heads, h)).astype(np.float32)
    segments = np.zeros((1, length), np.int32)
    text_entry = np.zeros((1, length), np.int32)
    offset = np.zeros((1, length), np.int32)
    start = 0
    for n, (e, m, own) in enumerate(texts):
        segments[0, start:start + own], text_entry[0, start:start + own], offset[0, start:start + own] = n + 1, e, m
        start += own
    backend = _backend(impl)
    visible = ((entry[None, None] == text_entry[..., None]) & (text_entry[..., None] > 0)
               & (position[None, None] < offset[..., None]))
    interpret = {"interpret": True} if impl in ("pallas", "splash") else {}
    merged = merge_attention((attention_with_logsumexp(q, k, v, jnp.asarray(segments), backend=backend, **interpret),
                              prefix_attention(jnp.asarray(q), table_keys, table_values, jnp.asarray(visible))),
                             jnp.float32)
    start = 0
    for e, m, own in texts:
        first = 0 if e == 1 else 12
        whole = lambda own_part, table: np.concatenate([table[first:first + m], own_part[0, start:start + own]])[None]
        pad_q = np.concatenate([np.zeros((m, heads, h), np.float32), q[0, start:start + own]])[None]
        ref = dense_attention(pad_q, whole(k, table_keys), whole(v, table_values), jnp.ones((1, m + own), jnp.int32))
        assert np.abs(np.asarray(merged)[0, start:start + own] - np.asarray(ref)[0, m:]).max() <= 2e-6
        start += own


# --- finding what is shared --------------------------------------------------------------------------------

def test_groups_save_the_most_tokens_and_split_where_their_prefixes_part():
    a, b = list(range(100, 130)), list(range(100, 110)) + list(range(300, 320))
    texts = [a + [1, 2], a + [3], b + [4], b + [5, 6], [7] * 20]
    groups = sorted((shared, sorted(members)) for shared, members in shared_groups(texts))
    assert groups == [(30, [0, 1]), (30, [2, 3])]           # not one group of the 10 ids all four share
    assert shared_groups([list(range(MIN_SHARED - 1)) + [1], list(range(MIN_SHARED - 1)) + [2]]) == []


def test_a_known_prefix_is_shared_as_far_as_the_ids_agree():
    computed = []
    cache = PrefixCache(lambda prefixes: computed.extend(prefixes) or
                        [(np.zeros((1, len(p), 1, 2)),) * 2 for p in prefixes])
    prompt = tuple(range(10, 30))
    cache.register(prompt)
    text = prompt[:-1] + (999, 5, 6)                        # the prompt's last id merged with the text's
    sharing = cache.share([text])
    assert sharing.offset == [19] and sharing.own == [(999, 5, 6)] and computed == [prompt]
    assert cache.share([prompt[:12]]).offset == [11]       # truncated into the prefix: one own token left
    assert computed == [prompt]                              # computed once


# --- the embedder -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_model(checkpoint):
    return Qwen3Embedder.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def whole_model(checkpoint):
    return unshared(Qwen3Embedder.from_pretrained(checkpoint))


def test_instruction_queries_equal_the_whole_texts_and_sentence_transformers(checkpoint, whole_model,
                                                                               sentence_transformer):
    model = Qwen3Embedder.from_pretrained(checkpoint)
    ours = model.encode(QUERIES, instruction=TASK, batch_size=4)
    assert model.runner.prefixes.prefix_tokens_computed > 0
    whole = whole_model.encode(QUERIES, instruction=TASK, batch_size=4)
    assert np.abs(ours - whole).max() <= 1e-6
    ref = sentence_transformer.encode([query(TASK, q) for q in QUERIES])
    assert np.abs(ours - ref).max() <= 1e-4


def test_fewer_tokens_are_computed_and_a_lone_query_computes_only_its_own(checkpoint):
    model = Qwen3Embedder.from_pretrained(checkpoint)
    rows = rows_of(model, [query(TASK, q) for q in QUERIES])
    model.encode(QUERIES, instruction=TASK)
    prefix = model.runner.prefixes.prefix_tokens_computed
    shared = min(model.runner.share(rows).offset)
    assert shared >= MIN_SHARED
    before = model.runner.tokens_embedded, model.runner.tokens_computed
    model.encode(["the capital of France"], instruction=TASK)          # the kept prefix: nothing recomputed
    assert model.runner.prefixes.prefix_tokens_computed == prefix
    lone = rows_of(model, [query(TASK, "the capital of France")])[0]
    assert model.runner.tokens_embedded - before[0] == len(lone)
    assert model.runner.tokens_computed - before[1] <= 16 < len(lone)         # its own tokens, in one short row


def test_a_batch_of_several_prefixes_plain_texts_and_cut_prefixes(shared_model, whole_model):
    """Two instructions, documents without one, a text shorter than its prefix, texts cut (right and
    left) into their prefix, a prompt that tokenizes differently where the text joins it."""
    texts = ([query(TASK, q) for q in QUERIES] + [query(OTHER_TASK, q) for q in QUERIES[:3]] + CORPUS[:3]
             + [query(TASK, "")[:-1], "Instruct: " + TASK + "\nQuery: spaced", "Instruct: " + TASK + "\nQuery:é"])
    for max_length, side in ((512, "right"), (12, "right"), (20, "left")):
        rows = rows_of(shared_model, texts, max_length, side)
        sharing = shared_model.runner.share(rows)
        assert len({e for e in sharing.entry if e}) >= (2 if max_length == 512 else 1)
        for row, own, offset in zip(rows, sharing.own, sharing.offset):
            assert list(own) == list(row[offset:]) and len(own) >= 1
        ours = shared_model.runner(rows, batch_size=2)
        whole = whole_model.runner(rows, batch_size=2)
        assert np.abs(ours - whole).max() <= 1e-6 * max(1.0, np.abs(whole).max())


def test_mrl_dims_and_the_reference_documents(shared_model, whole_model, sentence_transformer):
    for dim in (32, None):
        ours = shared_model.encode(QUERIES, prompt_name="query", dim=dim)
        assert np.abs(ours - whole_model.encode(QUERIES, prompt_name="query", dim=dim)).max() <= 1e-6
    assert np.abs(shared_model.encode(QUERIES, prompt_name="query")
                  - sentence_transformer.encode(QUERIES, prompt_name="query")).max() <= 1e-4


def test_bfloat16_by_cosine(checkpoint_bf16, sentence_transformer):
    model = Qwen3Embedder.from_pretrained(checkpoint_bf16, dtype="bfloat16")
    ours = model.encode(QUERIES, instruction=TASK)
    assert model.runner.prefixes.prefix_tokens_computed > 0
    whole = unshared(Qwen3Embedder.from_pretrained(checkpoint_bf16, dtype="bfloat16")).encode(QUERIES, instruction=TASK)
    assert cosine_rows(ours, whole).min() >= 0.999
    assert cosine_rows(ours, sentence_transformer.encode([query(TASK, q) for q in QUERIES])).min() >= 0.99


def test_on_a_sharded_mesh(checkpoint, whole_model):
    mesh = make_mesh(data=4, model=2, devices=jax.devices()[:8])
    model = Qwen3Embedder.from_pretrained(checkpoint, mesh=mesh)
    ours = model.encode(QUERIES, instruction=TASK)
    assert model.runner.prefixes.prefix_tokens_computed > 0
    assert np.abs(ours - whole_model.encode(QUERIES, instruction=TASK)).max() <= 1e-5


def test_a_32k_token_text_after_a_shared_instruction():
    """Positions continue after the prefix 32,000 tokens on (one narrow layer keeps the test short)."""
    from flax import nnx

    from qwen3_jax.config import Qwen3Config
    from qwen3_jax.model import Qwen3Model
    from qwen3_jax.runner import LastTokenRunner

    cfg = Qwen3Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_theta=1e6, rms_norm_eps=1e-6,
                      max_position_embeddings=40960)
    model = Qwen3Model(cfg, rngs=nnx.Rngs(0))
    shared, whole = LastTokenRunner(model, pad_id=0), LastTokenRunner(model, pad_id=0, share_prefixes=False)
    rng = np.random.default_rng(0)
    head = list(rng.integers(1, 512, 19))
    rows = [head + list(rng.integers(1, 512, 32_000)), head + [5, 6, 7]]
    ours = shared(rows, batch_size=64)
    assert shared.share(rows).offset == [19, 19] and shared.prefixes.prefix_tokens_computed == 19
    expected = whole(rows, batch_size=64)
    assert np.abs(ours - expected).max() <= 1e-6 * max(1.0, np.abs(expected).max())


# --- the reranker ---------------------------------------------------------------------------------------------

def test_reranking_shares_the_query_prompt_and_scores_as_the_whole_prompts(reranker_folder):
    reranker = Qwen3Reranker.from_pretrained(reranker_folder)
    documents = CORPUS[:6]
    ours = reranker.score("What is the capital of China?", documents)
    rows = reranker.prompt_ids([("What is the capital of China?", d) for d in documents])
    sharing = reranker.runner.share(rows)
    assert min(sharing.offset) >= common_length(rows[0], rows[1]) - 1 >= MIN_SHARED
    whole = Qwen3Reranker.from_pretrained(reranker_folder)
    unshared(whole)
    assert np.abs(ours - whole.score("What is the capital of China?", documents)).max() <= 1e-6


def test_new_parameter_values_forget_the_kept_prefixes(checkpoint):
    """Training's evaluation gives its runner the new values after each step: no prefix computed with the
    old ones is used again."""
    from qwen3_jax.loader import load_model

    model = Qwen3Embedder.from_pretrained(checkpoint)
    model.encode(QUERIES, instruction=TASK)
    changed = load_model(checkpoint)
    changed.layers.attn.wv[...] = changed.layers.attn.wv[...] * 1.5      # (keys would be normed back: QK-norm)
    model.runner.use(changed)
    whole = unshared(Qwen3Embedder.from_pretrained(checkpoint))
    whole.runner.use(changed)
    assert np.abs(model.encode(QUERIES, instruction=TASK) - whole.encode(QUERIES, instruction=TASK)).max() <= 1e-6


def test_a_servers_instruction_seen_again_is_shared_from_its_second_use(checkpoint, whole_model):
    """Through a server's scheduler (which remembers earlier calls), lone queries with a client's own
    instruction: the first is computed whole, the ones after it share the instruction once the programs
    for its table are compiled (in the background); every vector as computed whole."""
    import time

    from qwen3_jax.serve.scheduler import Scheduler

    model = Qwen3Embedder.from_pretrained(checkpoint)
    scheduler = Scheduler(model.runner, max_batch_tokens=512, max_queue_tokens=100_000).start()
    questions = ["what do bees eat", "where do whales sleep", "how tall is the tallest tree", "why do cats purr"]
    deadline = time.time() + 300
    for number in range(1000):
        question = questions[number % len(questions)]
        row = rows_of(model, [query(OTHER_TASK, question)])
        computed = model.runner.tokens_computed
        got = scheduler.submit(row).future.result(timeout=120)
        assert np.abs(normalize_rows(got) - normalize_rows(whole_model.runner(row, batch_size=1))).max() <= 1e-6
        if number == 0:
            assert model.runner.tokens_computed - computed >= len(row[0])          # computed whole
        elif model.runner.tokens_computed - computed < len(row[0]):
            break
        assert time.time() < deadline, "the instruction was never shared"
        time.sleep(0.2)
    scheduler.close(timeout=60)
    assert model.runner.prefixes.prefix_tokens_computed >= MIN_SHARED


def test_a_call_gives_the_same_bits_whatever_was_computed_before(checkpoint):
    """Outside a server, what is shared depends on a call's texts and the known prefixes alone: a corpus
    job's resumed shard equals its first run bit for bit."""
    fresh = Qwen3Embedder.from_pretrained(checkpoint).encode(QUERIES[3:], instruction=OTHER_TASK)
    model = Qwen3Embedder.from_pretrained(checkpoint)
    model.encode(QUERIES[:4], instruction=OTHER_TASK)
    model.encode(QUERIES, instruction=TASK)
    assert np.array_equal(model.encode(QUERIES[3:], instruction=OTHER_TASK), fresh)


def test_a_new_prefix_must_share_more_than_a_kept_one():
    """A query whose first words a recent one had shares the kept instruction, not a new prefix a few
    ids longer (which would compute the instruction again); a much longer common start is a new prefix."""
    computed = []
    cache = PrefixCache(lambda prefixes: computed.extend(prefixes) or
                        [(np.zeros((1, len(p), 1, 2)),) * 2 for p in prefixes])
    instruction = tuple(range(10, 30))
    cache.register(instruction)
    cache.share([instruction + (5, 6, 7, 100)], remember=True)
    assert cache.share([instruction + (5, 6, 7, 200)], remember=True).offset == [20]
    assert computed == [instruction]
    long = tuple(range(300, 340))
    cache.share([instruction + long + (1,)], remember=True)
    assert cache.share([instruction + long + (2,)], remember=True).offset == [60]
    assert computed == [instruction, instruction + long]
