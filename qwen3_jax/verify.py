"""`qwen3-jax verify`: one checkpoint through transformers and through us, side by side.

This is the command a user runs on the real weights to trust this implementation.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from qwen3_jax.embedder import normalize_rows
from qwen3_jax.extras import require
from qwen3_jax.hub import resolve_model
from qwen3_jax.loader import load_model
from qwen3_jax.tokenize import TextTokenizer, format_instruction, pad_batch

TASK = "Given a web search query, retrieve relevant passages that answer the query"
# The model card's example, then inputs that break naive implementations.
QUERIES = ["What is the capital of China?", "Explain gravity"]
DOCUMENTS = ["The capital of China is Beijing.",
             "Gravity is a force that attracts two bodies towards each other. It gives weight to physical "
             "objects and is responsible for the movement of planets around the sun."]
EXTRA = ["", "机器学习是人工智能的一个分支。", "Emoji 🚀🔥 and code: def f(x): return x * 2"]
TOLERANCE = {"float32": 1e-4}
MIN_COSINE = 0.99


def reference_states(folder: Path, ids: np.ndarray, valid: np.ndarray, dtype: str):
    """transformers' per-layer outputs (all but the last) and final normed states."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder), attn_implementation="eager", dtype=getattr(torch, dtype))
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                    attention_mask=torch.as_tensor(valid, dtype=torch.long), output_hidden_states=True)
    states = [h.float().numpy() for h in out.hidden_states]
    return states[1:-1], out.last_hidden_state.float().numpy()


def verify(model: str, *, dtype: str = "float32", strict: bool = False, out=print) -> int:
    """Prints the comparison; returns 0 when within tolerance, 1 otherwise."""
    require("reference", "qwen3-jax verify (transformers on the same checkpoint)")
    folder = resolve_model(model)
    tokenizer = TextTokenizer.from_folder(folder)
    texts = [format_instruction(TASK) + q for q in QUERIES] + DOCUMENTS + EXTRA
    rows = tokenizer.encode(texts, max_length=8192)
    ids, valid = pad_batch(rows, max(map(len, rows)), len(rows), tokenizer.end_of_text_id)

    ours_model = load_model(folder, dtype=dtype, strict=strict)
    ours_final, ours_layers = ours_model(jnp.asarray(ids), jnp.asarray(valid), return_layer_states=True)
    ours_final = np.asarray(ours_final.astype(jnp.float32))
    ours_layers = np.asarray(ours_layers.astype(jnp.float32))
    ref_layers, ref_final = reference_states(folder, ids, valid, "float32")

    out(f"checkpoint: {folder}\nours: {dtype}   reference: transformers float32 (eager attention)")
    out(f"{'layer':>6} {'max |diff|':>12} {'max |ref|':>12} {'relative':>10}")
    for i, ref in enumerate(ref_layers + [ref_final]):
        ours = ours_layers[i] if i < len(ref_layers) else ours_final
        diff = np.abs(ours[valid] - ref[valid]).max()
        scale = np.abs(ref[valid]).max()
        label = str(i) if i < len(ref_layers) else "final"
        out(f"{label:>6} {diff:12.3e} {scale:12.3e} {diff / scale:10.2e}")

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

    tolerance = TOLERANCE.get(dtype)
    ok = cosine >= MIN_COSINE and (tolerance is None or max_diff <= tolerance)
    rule = f"max |diff| <= {tolerance:g}" if tolerance else f"min cosine >= {MIN_COSINE}"
    out(f"\n{'PASS' if ok else 'FAIL'}: {rule}" + ("" if tolerance is None else f" and min cosine >= {MIN_COSINE}"))
    return 0 if ok else 1
