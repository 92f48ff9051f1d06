"""Cohere's (and Jina's) API: POST /v1/rerank, /v2/rerank, and /v2/embed.

Rerank takes `model`, `query`, `documents` (strings, or objects with a `text`), `top_n`,
`return_documents`, `max_tokens_per_doc` and our `instruction` (the reranker's task; default: the model
card's web-search one); over-long documents are cut, as Cohere cuts them. It answers {"id", "model",
"results": [{"index", "relevance_score", "document"?}], "usage", "meta"}, best first.

Embed takes `texts`, `input_type` (search_query: the checkpoint's query prompt; search_document,
classification, clustering: no prompt; our `instruction` instead of either), `embedding_types` (float,
int8, uint8, binary, ubinary, base64: sentence-transformers' quantize_embeddings semantics, int8 and
uint8 calibrated on the server's calibration texts), `truncate` (END, START or NONE), `max_tokens`,
`output_dimension` (MRL). It answers {"id", "embeddings": {type: [...]}, "texts", "meta",
"response_type": "embeddings_by_type"}.
"""

from __future__ import annotations

import uuid
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt

from qwen3_jax.engine.reranking import DEFAULT_INSTRUCTION as WEB_SEARCH_TASK
from qwen3_jax.engine.reranking import best_first
from qwen3_jax.quantize import CALIBRATED, quantize
from qwen3_jax.serve.client import caller_of, service_of
from qwen3_jax.serve.errors import APIError, family_route
from qwen3_jax.serve.fields import Text
from qwen3_jax.serve.openai_api import encoded
from qwen3_jax.serve.service import Service

router = APIRouter(route_class=family_route("cohere"))
INPUT_TYPES = {"search_query": "query", "search_document": None, "classification": None, "clustering": None}
EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary", "base64")


class Document(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: Text


class CohereRerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    query: Text
    documents: list[Text | Document]
    model: Text | None = None
    top_n: StrictInt | None = None
    return_documents: StrictBool = False
    max_tokens_per_doc: StrictInt | None = None
    instruction: Text | None = None


class CohereEmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    texts: list[Text]
    input_type: Text | None = None
    model: Text | None = None
    embedding_types: list[Text] = ["float"]
    truncate: Literal["END", "START", "NONE"] = "END"
    max_tokens: StrictInt | None = None
    output_dimension: StrictInt | None = None
    instruction: Text | None = None


def _meta(tokens: int) -> dict:
    return {"api_version": {"version": "2"}, "billed_units": {"input_tokens": tokens}}


@router.post("/v1/rerank")
@router.post("/v2/rerank")
async def rerank(body: CohereRerankRequest, request: Request, service: Service = Depends(service_of)) -> dict:
    service.require("rerank", body.model)
    if body.top_n is not None and body.top_n < 1:
        raise APIError(400, f"top_n={body.top_n} must be at least 1", code="invalid_top_n", param="top_n")
    if body.max_tokens_per_doc is not None and body.max_tokens_per_doc < 1:
        raise APIError(400, f"max_tokens_per_doc={body.max_tokens_per_doc} must be at least 1",
                       code="invalid_request", param="max_tokens_per_doc")
    documents = given = [d if isinstance(d, str) else d.text for d in body.documents]
    if body.max_tokens_per_doc is not None:
        documents = service.bounded("rerank", documents, truncate=True, side="right", param="documents")
        documents = await service.off_loop(_cut_to_tokens, service.reranking.tokenizer, documents,
                                           body.max_tokens_per_doc)
    hidden, tokens = await service.rerank([body.query] * len(documents), documents, instruction=body.instruction,
                                          truncate=True, caller=caller_of(request))
    scores = service.reranking.scores(hidden)
    results = [{"index": i, "relevance_score": float(scores[i]),
                **({"document": {"text": given[i]}} if body.return_documents else {})}
               for i in best_first(scores)[:body.top_n]]
    return {"id": str(uuid.uuid4()), "model": service.reranker_name, "results": results,
            "usage": {"total_tokens": tokens}, "meta": _meta(tokens)}


@router.post("/v2/embed")
async def embed(body: CohereEmbedRequest, request: Request, service: Service = Depends(service_of)) -> dict:
    service.require("embedding", body.model)
    if body.input_type is not None and body.input_type not in INPUT_TYPES:
        raise APIError(400, f"input_type={body.input_type!r}: choose one of {', '.join(INPUT_TYPES)}",
                       code="invalid_input_type", param="input_type")
    unknown = [kind for kind in body.embedding_types if kind not in EMBEDDING_TYPES]
    if unknown or not body.embedding_types:
        raise APIError(400, f"embedding_types={body.embedding_types!r}: choose from {', '.join(EMBEDDING_TYPES)}",
                       code="invalid_embedding_types", param="embedding_types")
    if body.max_tokens is not None and body.max_tokens < 1:
        raise APIError(400, f"max_tokens={body.max_tokens} must be at least 1", code="invalid_request",
                       param="max_tokens")
    dim = service.check_dim(body.output_dimension)
    ranges = service.quantization_ranges(dim) if set(body.embedding_types) & set(CALIBRATED) else None
    prompt_name, instruction = INPUT_TYPES.get(body.input_type) if body.instruction is None else None, body.instruction
    if prompt_name is not None and prompt_name not in service.embedding.prompts:
        prompt_name, instruction = None, WEB_SEARCH_TASK            # a checkpoint without its prompts file
    side, truncate = "left" if body.truncate == "START" else "right", body.truncate != "NONE"
    texts = body.texts
    if body.max_tokens is not None:
        texts = service.bounded("embedding", texts, truncate=truncate, side=side, param="texts")
        texts = await service.off_loop(_cut_to_tokens, service.embedding.tokenizer, texts, body.max_tokens, side=side)
    hidden, tokens = await service.embed(texts, prompt_name=prompt_name, instruction=instruction, truncate=truncate,
                                         side=side, param="texts", caller=caller_of(request))

    def respond() -> dict:
        vectors = service.embedding.vectors(hidden, dim)
        embeddings = {}
        for kind in dict.fromkeys(body.embedding_types):
            if kind == "base64":
                embeddings[kind] = [encoded(v, "base64") for v in vectors]
            else:
                embeddings[kind] = quantize(vectors, "float32" if kind == "float" else kind, ranges).tolist()
        return {"id": str(uuid.uuid4()), "embeddings": embeddings, "texts": body.texts, "meta": _meta(tokens),
                "response_type": "embeddings_by_type"}
    return await run_in_threadpool(respond)


def _cut_to_tokens(tokenizer, texts: list[str], limit: int, side: str = "right") -> list[str]:
    """Texts of more than `limit` tokens cut to that many (their end, or with side "left" their start)."""
    out = []
    for text, encoding in zip(texts, tokenizer.tokenizer.encode_batch(texts, add_special_tokens=False)):
        offsets = encoding.offsets
        if len(offsets) <= limit:
            out.append(text)
        elif side == "right":
            out.append(text[:offsets[limit - 1][1]])
        else:
            out.append(text[offsets[len(offsets) - limit][0]:])
    return out
