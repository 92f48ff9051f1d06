"""vLLM's score API for cross-encoders: POST /score (also /v1/score).

Takes `text_1` (a query, or queries) and `text_2` (documents): one text_1 is scored against every
text_2, otherwise the two lists pair up one to one (as vLLM pairs them); `model`,
`truncate_prompt_tokens` (-1: documents cut so that each prompt fits the model's limit; absent: an
over-long prompt is refused), and our `instruction`. Answers {"id", "object": "list", "created", "model", "data": [{"index", "object":
"score", "score"}], "usage"}, in input order, each score P("yes") as the reranker gives it.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, StrictInt

from qwen3_jax.serve.client import caller_of, service_of
from qwen3_jax.serve.errors import APIError, family_route
from qwen3_jax.serve.fields import Text
from qwen3_jax.serve.service import Service

router = APIRouter(route_class=family_route("vllm"))


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text_1: Text | list[Text]
    text_2: Text | list[Text]
    model: Text | None = None
    truncate_prompt_tokens: StrictInt | None = None
    instruction: Text | None = None


@router.post("/score")
@router.post("/v1/score")
async def score(body: ScoreRequest, request: Request, service: Service = Depends(service_of)) -> dict:
    service.require("rerank", body.model)
    queries = [body.text_1] if isinstance(body.text_1, str) else body.text_1
    documents = [body.text_2] if isinstance(body.text_2, str) else body.text_2
    if len(queries) == 1:
        queries = queries * len(documents)
    if len(queries) != len(documents):
        raise APIError(400, f"text_1 holds {len(queries)} texts and text_2 {len(documents)}: give one text_1, or "
                       "as many as text_2", code="invalid_request", param="text_1")
    limit, model_limit = body.truncate_prompt_tokens, service.reranking.max_length
    if limit is not None and limit != -1 and limit < model_limit:
        raise APIError(400, f"truncate_prompt_tokens={limit}: this server cuts prompts at the model's limit of "
                       f"{model_limit} tokens; give -1 (or {model_limit}), or leave it out to refuse longer ones",
                       code="invalid_request", param="truncate_prompt_tokens")
    hidden, tokens = await service.rerank(queries, documents, instruction=body.instruction, truncate=limit is not None,
                                          caller=caller_of(request))
    scores = service.reranking.scores(hidden)
    return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
            "model": service.reranker_name,
            "data": [{"index": i, "object": "score", "score": float(s)} for i, s in enumerate(scores)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
