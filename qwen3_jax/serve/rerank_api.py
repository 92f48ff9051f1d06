"""Cohere's and Jina's rerank API: POST /v1/rerank (also /v2/rerank).

Takes `model`, `query`, `documents` (strings, or objects with a `text`), `top_n`, `return_documents` and
our `instruction` (the reranker's task; default: the model card's web-search one); over-long documents
are cut, as Cohere cuts them. Answers {"id", "model", "results": [{"index", "relevance_score",
"document"?}], "usage": {"total_tokens"}}, best first.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

from qwen3_jax.reranker import yes_probability
from qwen3_jax.serve.errors import APIError
from qwen3_jax.serve.service import Service, ranked, service_of

router = APIRouter()


class Document(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: StrictStr


class CohereRerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    query: StrictStr
    documents: list[StrictStr | Document]
    model: StrictStr | None = None
    top_n: StrictInt | None = None
    return_documents: StrictBool = False
    instruction: StrictStr | None = None


@router.post("/v1/rerank")
@router.post("/v2/rerank")
async def rerank(body: CohereRerankRequest, request: Request, service: Service = Depends(service_of)) -> dict:
    service.require("rerank", body.model)
    if body.top_n is not None and body.top_n < 1:
        raise APIError(400, f"top_n={body.top_n} must be at least 1", code="invalid_top_n", param="top_n")
    documents = [d if isinstance(d, str) else d.text for d in body.documents]
    margins, tokens = await service.rerank_margins(request, body.query, documents, instruction=body.instruction,
                                                   truncate=True, status=400)
    scores = yes_probability(margins)
    results = [{"index": i, "relevance_score": float(scores[i]),
                **({"document": {"text": documents[i]}} if body.return_documents else {})}
               for i in ranked(scores)[:body.top_n]]
    return {"id": str(uuid.uuid4()), "model": service.reranker_name, "results": results,
            "usage": {"total_tokens": tokens}}
