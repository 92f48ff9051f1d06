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


# The Qwen3-Reranker model card's prompt, written here from the card (never imported from the code
# under test, so a change there cannot pass unnoticed).
CARD_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
               "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
CARD_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
CARD_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def official_rerank_scores(folder, query: str, documents: list[str], instruction: str | None = None,
                           max_length: int = 8192) -> np.ndarray:
    """The Qwen3-Reranker model card's scoring recipe, run with transformers on the same files
    (instruction None: the card's default)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager",
                                                 dtype=torch.float32).eval()
    return card_scores(model, tokenizer, [(query, doc) for doc in documents], instruction, max_length)


def card_scores(model, tokenizer, pairs: list[tuple[str, str]], instruction: str | None = None,
                max_length: int = 8192) -> np.ndarray:
    """The model card's recipe with a loaded causal LM (transformers or peft) and its left-padding tokenizer."""
    import torch

    instruction = CARD_INSTRUCTION if instruction is None else instruction
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    prefix = tokenizer.encode(CARD_PREFIX, add_special_tokens=False)
    suffix = tokenizer.encode(CARD_SUFFIX, add_special_tokens=False)
    texts = [f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}" for query, doc in pairs]
    inputs = tokenizer(texts, padding=False, truncation="longest_first", return_attention_mask=False,
                       max_length=max_length - len(prefix) - len(suffix))
    inputs["input_ids"] = [prefix + ids + suffix for ids in inputs["input_ids"]]
    inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1, :]
    pair = torch.stack([logits[:, no], logits[:, yes]], dim=1)
    return torch.nn.functional.log_softmax(pair, dim=1)[:, 1].exp().numpy()
