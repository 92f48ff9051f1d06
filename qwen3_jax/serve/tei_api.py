"""Text Embeddings Inference's API: POST /embed, POST /rerank, GET /info.

/embed takes `inputs` (a string or strings), `normalize` (true), `truncate` (false: an over-long text
is refused with 413), `prompt_name`, `dimensions`, and our `instruction`; it answers a list of vectors.
/rerank takes `query`, `texts`, `raw_scores` (false: P("yes"); true: the yes-no logit margin),
`return_text`, `truncate`, and our `instruction`; it answers [{"index", "score", "text"?}], best first.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

from qwen3_jax.reranker import yes_probability
from qwen3_jax.serve.errors import APIError
from qwen3_jax.serve.service import Service, ranked, service_of

router = APIRouter()


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: StrictStr | list[StrictStr]
    normalize: StrictBool = True
    truncate: StrictBool = False
    truncation_direction: StrictStr = "Right"
    prompt_name: StrictStr | None = None
    dimensions: StrictInt | None = None
    instruction: StrictStr | None = None


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    query: StrictStr
    texts: list[StrictStr]
    raw_scores: StrictBool = False
    return_text: StrictBool = False
    truncate: StrictBool = False
    truncation_direction: StrictStr = "Right"
    instruction: StrictStr | None = None


def _right_only(direction: str) -> None:
    if direction != "Right":
        raise APIError(400, f"truncation_direction={direction!r}: only Right is supported (the end of a text is "
                       "cut, its <|endoftext|> kept)", code="invalid_request", param="truncation_direction")


@router.post("/embed")
async def embed(body: EmbedRequest, request: Request, service: Service = Depends(service_of)) -> JSONResponse:
    service.require("embedding")
    _right_only(body.truncation_direction)
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    service.check_count(len(texts), "inputs")
    dim = service.check_dim(body.dimensions)
    rows = await run_in_threadpool(service.embedding_rows, texts, prompt_name=body.prompt_name,
                                   instruction=body.instruction, truncate=body.truncate, status=413)
    hidden = await service.run("embedding", request, rows)
    return await run_in_threadpool(lambda: JSONResponse(service.vectors(hidden, dim, body.normalize).tolist()))


@router.post("/rerank")
async def rerank(body: RerankRequest, request: Request, service: Service = Depends(service_of)) -> list[dict]:
    service.require("rerank")
    _right_only(body.truncation_direction)
    margins, _ = await service.rerank_margins(request, body.query, body.texts, instruction=body.instruction,
                                              truncate=body.truncate, status=413)
    scores = margins if body.raw_scores else yes_probability(margins)
    return [{"index": i, "score": float(scores[i]), **({"text": body.texts[i]} if body.return_text else {})}
            for i in ranked(scores)]


@router.get("/info")
async def info(service: Service = Depends(service_of)) -> dict:
    model = service.embedder or service.reranker
    return {"model_id": service.embedding_name or service.reranker_name, "model_dtype": str(model.model.dtype),
            "model_type": {"embedding": bool(service.embedder), "reranker": bool(service.reranker)},
            "max_input_length": model.max_length, "max_batch_tokens": service.batch_tokens,
            "max_client_batch_size": service.settings.max_texts_per_request,
            "max_queue_tokens": service.queue_tokens, "version": "qwen3-jax"}
