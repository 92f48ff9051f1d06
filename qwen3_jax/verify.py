"""`qwen3-jax verify`: one checkpoint through transformers and through us, side by side.

This is the command a user runs on the real weights to trust this implementation. An embedding checkpoint
is compared layer by layer and by its pooled embeddings; a reranker (a causal LM: its weights carry the
`model.` prefix) layer by layer and by P("yes") of query-document pairs in the official prompt, which
transformers' side builds with its own tokenizer as the model card does.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from qwen3_jax.engine.embedding import normalize_rows
from qwen3_jax.engine.reranking import DEFAULT_INSTRUCTION, PREFIX, SUFFIX, RerankerPrompts, format_pair, \
    yes_no_margins, yes_probability
from qwen3_jax.extras import require
from qwen3_jax.hub import resolve_model
from qwen3_jax.loader import load_model
from qwen3_jax.tokenization import TextTokenizer, format_instruction, pad_batch
from qwen3_jax.weights import CheckpointFolder

TASK = "Given a web search query, retrieve relevant passages that answer the query"
# The model card's example, then inputs that break naive implementations.
QUERIES = ["What is the capital of China?", "Explain gravity"]
DOCUMENTS = ["The capital of China is Beijing.",
             "Gravity is a force that attracts two bodies towards each other. It gives weight to physical "
             "objects and is responsible for the movement of planets around the sun."]
EXTRA = ["", "机器学习是人工智能的一个分支。", "Emoji 🚀🔥 and code: def f(x): return x * 2"]
TOLERANCE = {"float32": 1e-4}
MIN_COSINE = 0.99


def reference_states(folder: Path, ids: np.ndarray, valid: np.ndarray, dtype: str, *, causal_lm: bool = False):
    """transformers' per-layer outputs (all but the last), final normed states, and (`causal_lm`) the
    logits of every position."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    kind = AutoModelForCausalLM if causal_lm else AutoModel
    model = kind.from_pretrained(str(folder), attn_implementation="eager", dtype=getattr(torch, dtype))
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                    attention_mask=torch.as_tensor(valid, dtype=torch.long), output_hidden_states=True)
    states = [h.float().numpy() for h in out.hidden_states]
    logits = out.logits.float().numpy() if causal_lm else None
    return states[1:-1], states[-1], logits


def card_prompt_ids(folder: Path, pairs: list[tuple[str, str]]) -> tuple[list[list[int]], list[int]]:
    """The Qwen3-Reranker model card's prompt as token ids, and the ids of its answers ("no", "yes"), by
    transformers' own tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    prefix, suffix = (tokenizer.encode(part, add_special_tokens=False) for part in (PREFIX, SUFFIX))
    bodies = tokenizer([format_pair(DEFAULT_INSTRUCTION, q, d) for q, d in pairs], add_special_tokens=False)
    return [prefix + body + suffix for body in bodies["input_ids"]], tokenizer.convert_tokens_to_ids(["no", "yes"])


def compare_layers(folder: Path, ids: np.ndarray, valid: np.ndarray, dtype: str, *, strict: bool, out,
                   causal_lm: bool = False):
    """Runs both sides on the same padded ids, prints each layer's difference; returns (our final states,
    transformers' final states, transformers' logits or None, our model)."""
    ours_model = load_model(folder, dtype=dtype, strict=strict, with_lm_head=causal_lm)
    ours_final, ours_layers = ours_model(jnp.asarray(ids), jnp.asarray(valid), return_layer_states=True)
    ours_final = np.asarray(ours_final.astype(jnp.float32))
    ours_layers = np.asarray(ours_layers.astype(jnp.float32))
    ref_layers, ref_final, ref_logits = reference_states(folder, ids, valid, "float32", causal_lm=causal_lm)

    out(f"checkpoint: {folder}\nours: {dtype}   reference: transformers float32 (eager attention)")
    out(f"{'layer':>6} {'max |diff|':>12} {'max |ref|':>12} {'relative':>10}")
    for i, ref in enumerate(ref_layers + [ref_final]):
        ours = ours_layers[i] if i < len(ref_layers) else ours_final
        diff = np.abs(ours[valid] - ref[valid]).max()
        scale = np.abs(ref[valid]).max()
        label = str(i) if i < len(ref_layers) else "final"
        out(f"{label:>6} {diff:12.3e} {scale:12.3e} {diff / scale:10.2e}")
    return ours_final, ref_final, ref_logits, ours_model


def verify(model: str, *, dtype: str = "float32", strict: bool = False, out=print) -> int:
    """Prints the comparison; returns 0 when within tolerance, 1 otherwise."""
    require("reference", "qwen3-jax verify (transformers on the same checkpoint)")
    folder = resolve_model(model)
    tokenizer = TextTokenizer.from_folder(folder)
    if CheckpointFolder(folder).prefixed:
        return verify_reranker(folder, tokenizer, dtype=dtype, strict=strict, out=out)
    texts = [format_instruction(TASK) + q for q in QUERIES] + DOCUMENTS + EXTRA
    rows = tokenizer.encode(texts, max_length=8192)
    ids, valid = pad_batch(rows, max(map(len, rows)), len(rows), tokenizer.end_of_text_id)
    ours_final, ref_final, _, _ = compare_layers(folder, ids, valid, dtype, strict=strict, out=out)

    last = valid.sum(axis=1) - 1                 # right padding: the appended <|endoftext|>
    rows_index = np.arange(len(rows))
    ours_emb = normalize_rows(ours_final[rows_index, last])
    ref_emb = normalize_rows(ref_final[rows_index, last])
    max_diff = float(np.abs(ours_emb - ref_emb).max())
    cosine = float((ours_emb * ref_emb).sum(-1).min())
    out(f"\nembeddings: max |diff| {max_diff:.3e}   min cosine {cosine:.6f}")
    q, d = slice(0, 2), slice(2, 4)
    ours_sim, ref_sim = ours_emb[q] @ ours_emb[d].T, ref_emb[q] @ ref_emb[d].T
    out("\nmodel card similarity (queries x documents)   ours | transformers")
    for i in range(2):
        out(f"  {QUERIES[i][:30]:<30} " + "  ".join(f"{ours_sim[i, j]:.4f} | {ref_sim[i, j]:.4f}" for j in range(2)))
    return _judge(max_diff, cosine, dtype, "max |diff|", out)


def verify_reranker(folder: Path, tokenizer: TextTokenizer, *, dtype: str, strict: bool, out) -> int:
    """A Qwen3-Reranker: each query against each document in the official prompt, layer by layer, then
    P("yes") from the last position's "yes" and "no" logits."""
    pairs = [(q, d) for q in QUERIES for d in DOCUMENTS + EXTRA]
    prompts = RerankerPrompts(tokenizer)
    rows = prompts.ids(pairs)
    card, card_answers = card_prompt_ids(folder, pairs)
    if rows != card:
        first = next(i for i, (a, b) in enumerate(zip(rows, card)) if a != b)
        out(f"FAIL: our prompt of pair {first} differs from the model card's as transformers tokenizes it")
        return 1
    ids, valid = pad_batch(rows, max(map(len, rows)), len(rows), tokenizer.end_of_text_id)
    ours_final, ref_final, ref_logits, ours_model = compare_layers(folder, ids, valid, dtype, strict=strict, out=out,
                                                                   causal_lm=True)
    last, rows_index = valid.sum(axis=1) - 1, np.arange(len(rows))
    ours_rows = np.asarray(ours_model.output_rows([prompts.no_id, prompts.yes_id]), np.float32)
    ours_scores = yes_probability(yes_no_margins(ours_final[rows_index, last], ours_rows))
    no_yes = ref_logits[rows_index, last][:, card_answers]
    ref_scores = np.exp(no_yes[:, 1] - np.logaddexp(no_yes[:, 0], no_yes[:, 1]))      # softmax([no, yes])[1]
    max_diff = float(np.abs(ours_scores - ref_scores).max())
    ours_last, ref_last = normalize_rows(ours_final[rows_index, last]), normalize_rows(ref_final[rows_index, last])
    cosine = float((ours_last * ref_last).sum(-1).min())
    out(f"\nP(yes) of {len(pairs)} pairs in the official prompt: max |diff| {max_diff:.3e}   "
        f"last states' min cosine {cosine:.6f}")
    out("\nscores (query x document)   ours | transformers")
    for k, (query, document) in enumerate(pairs):
        out(f"  {query[:24]:<24} x {document[:24]!r:<26} {ours_scores[k]:.4f} | {ref_scores[k]:.4f}")
    return _judge(max_diff, cosine, dtype, "P(yes) max |diff|", out)


def _judge(max_diff: float, cosine: float, dtype: str, measured: str, out) -> int:
    """PASS within float32's tolerance of `measured` and the cosine floor (bf16: the cosine floor alone)."""
    tolerance = TOLERANCE.get(dtype)
    ok = cosine >= MIN_COSINE and (tolerance is None or max_diff <= tolerance)
    rule = f"{measured} <= {tolerance:g} and min cosine >= {MIN_COSINE}" if tolerance else f"min cosine >= {MIN_COSINE}"
    out(f"\n{'PASS' if ok else 'FAIL'}: {rule}")
    return 0 if ok else 1
