"""OpenAI's embeddings API: POST /v1/embeddings (also /embeddings) and GET /v1/models.

Request fields as OpenAI takes them (`input` a string, strings, token ids or lists of token ids;
`model`, `dimensions`, `encoding_format` float or base64, `user`), plus three of ours for what OpenAI has
no field for: `instruction` (a query's task, formatted as Qwen3-Embedding was trained), `prompt_name`
(a prompt of the checkpoint, e.g. "query") and `truncate` (cut over-long texts instead of refusing
them). The openai client sends them with `extra_body={...}`.
"""

from __future__ import annotations

import base64
import time

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt

from qwen3_jax.serve.client import caller_of, service_of
from qwen3_jax.serve.errors import APIError, family_route
from qwen3_jax.serve.fields import Text
from qwen3_jax.serve.service import Service

router = APIRouter(route_class=family_route("openai"))
ENCODINGS = ("float", "base64")


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: Text | list[Text] | list[StrictInt] | list[list[StrictInt]]
    model: Text | None = None
    dimensions: StrictInt | None = None
    encoding_format: Text = "float"
    user: Text | None = None
    instruction: Text | None = None
    prompt_name: Text | None = None
    truncate: StrictBool = False


def encoded(vector: np.ndarray, encoding_format: str):
    """A vector as OpenAI returns it: a list of floats, or base64 of its little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


@router.post("/v1/embeddings")
@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request, service: Service = Depends(service_of)) -> JSONResponse:
    service.require("embedding", body.model)
    if body.encoding_format not in ENCODINGS:
        raise APIError(400, f"encoding_format={body.encoding_format!r}: choose float or base64",
                       code="invalid_encoding_format", param="encoding_format")
    dim = service.check_dim(body.dimensions)
    given = [body.input] if isinstance(body.input, str) else body.input
    tokenized = bool(given) and not isinstance(given[0], str)
    if tokenized and isinstance(given[0], int):
        given = [given]                                     # one text given as its token ids
    if tokenized:
        if body.instruction is not None or body.prompt_name is not None:
            raise APIError(400, "instruction and prompt_name apply to text inputs; put the prompt's tokens in the "
                           "token ids instead", code="invalid_request", param="instruction")
        hidden, tokens = await service.embed_ids(given, truncate=body.truncate, param="input",
                                                 caller=caller_of(request))
    else:
        hidden, tokens = await service.embed(given, prompt_name=body.prompt_name, instruction=body.instruction,
                                             truncate=body.truncate, param="input", caller=caller_of(request))

    def respond() -> JSONResponse:
        vectors = service.embedding.vectors(hidden, dim)
        return JSONResponse({
            "object": "list", "model": service.embedding_name,
            "data": [{"object": "embedding", "index": i, "embedding": encoded(v, body.encoding_format)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
    return await run_in_threadpool(respond)


@router.get("/v1/models")
@router.get("/models")
async def models(service: Service = Depends(service_of)) -> dict:
    created = int(time.time())
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "qwen3-jax",
                                        "type": kind} for name, kind in service.served()]}
