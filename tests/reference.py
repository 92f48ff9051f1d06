"""The transformers side of the golden tests: the real model run on the same checkpoint files."""

from __future__ import annotations

import numpy as np


def transformers_hidden_states(folder, ids: np.ndarray, mask: np.ndarray, dtype: str = "float32"):
    """(per-layer outputs [L-1, B, T, D] before the last layer, final normed states [B, T, D]) from transformers."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder), attn_implementation="eager", dtype=getattr(torch, dtype))
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask, dtype=torch.long), output_hidden_states=True)
    states = [h.float().numpy() for h in out.hidden_states]
    # transformers returns [embeddings, layer 0, ..., layer L-2, final norm(layer L-1)].
    return np.stack(states[1:-1]), out.last_hidden_state.float().numpy()


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)
