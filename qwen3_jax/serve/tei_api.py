"""Text Embeddings Inference's API: POST /embed, /embed_all, /similarity, /rerank, /predict, /tokenize,
/decode, GET /info, and TEI's catch-all routes POST / and POST /invocations (huggingface_hub's
InferenceClient posts to the bare URL).

/embed takes `inputs` (a string or strings), `normalize` (true), `truncate` (false: an over-long text
is refused with 413), `truncation_direction` (right or left), `prompt_name`, `dimensions`, and our
`instruction`; it answers a list of vectors. /rerank takes `query`, `texts`, `raw_scores` (false:
P("yes"); true: the yes-no logit margin), `return_text`, `truncate`, `truncation_direction`, and our
`instruction`; it answers [{"index", "score", "text"?}], best first. POST / and /invocations embed
on a server with an embedding model and rerank on one with only a reranker (or when the body has a
`query`); a body whose `inputs` is {"source_sentence", "sentences"} is /similarity's. /tokenize answers
each text's tokens as the model reads them, /decode the text of token ids.

/embed_all answers every token's final hidden state of each text ([texts][tokens][hidden], the prompt's
tokens and <|endoftext|> included, not normalised); its texts run one at a time beside the queue, padded to
a power of two (a program per such length, compiled on its first use). /similarity answers the cosine of
`source_sentence` with each of `sentences`. /predict scores a reranker's [query, document] pairs:
[{"label": "yes", "score": P("yes")}] a pair (the yes-no logit margin with `raw_scores`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, ValidationError

from qwen3_jax.engine.reranking import best_first
from qwen3_jax.serve.client import caller_of, service_of
from qwen3_jax.serve.errors import APIError, family_route
from qwen3_jax.serve.fields import Direction, Text
from qwen3_jax.serve.service import Service

router = APIRouter(route_class=family_route("tei"))


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: Text | list[Text]
    normalize: StrictBool = True
    truncate: StrictBool | None = False
    truncation_direction: Direction = "right"
    prompt_name: Text | None = None
    dimensions: StrictInt | None = None
    encoding_format: Text = "float"
    instruction: Text | None = None


class EmbedAllRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: Text | list[Text]
    truncate: StrictBool | None = False
    truncation_direction: Direction = "right"
    prompt_name: Text | None = None
    instruction: Text | None = None


class Sentences(BaseModel):
    source_sentence: Text
    sentences: list[Text]


class SimilarityRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: Sentences
    truncate: StrictBool | None = False
    truncation_direction: Direction = "right"
    prompt_name: Text | None = None
    instruction: Text | None = None


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: Text | list[Text] | list[Text | list[Text]]
    raw_scores: StrictBool = False
    truncate: StrictBool | None = False
    truncation_direction: Direction = "right"
    instruction: Text | None = None


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    query: Text
    texts: list[Text]
    raw_scores: StrictBool = False
    return_text: StrictBool = False
    truncate: StrictBool | None = False
    truncation_direction: Direction = "right"
    instruction: Text | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: Text | list[Text]
    add_special_tokens: StrictBool = True
    prompt_name: Text | None = None


class DecodeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ids: list[StrictInt] | list[list[StrictInt]]
    skip_special_tokens: StrictBool = True


@router.post("/embed")
async def embed(body: EmbedRequest, request: Request, service: Service = Depends(service_of)) -> JSONResponse:
    service.require("embedding")
    if body.encoding_format != "float":
        raise APIError(400, f"encoding_format={body.encoding_format!r}: TEI's routes answer floats; POST "
                       "/v1/embeddings for base64", code="invalid_encoding_format", param="encoding_format")
    dim = service.check_dim(body.dimensions)
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    hidden, _ = await service.embed(texts, prompt_name=body.prompt_name, instruction=body.instruction,
                                    truncate=bool(body.truncate), side=body.truncation_direction, param="inputs",
                                    caller=caller_of(request))
    vectors = service.embedding.vectors
    return await run_in_threadpool(lambda: JSONResponse(vectors(hidden, dim, body.normalize).tolist()))


@router.post("/embed_all")
async def embed_all(body: EmbedAllRequest, request: Request, service: Service = Depends(service_of)) -> JSONResponse:
    service.require("embedding")
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    states = await service.embed_tokens(texts, prompt_name=body.prompt_name, instruction=body.instruction,
                                        truncate=bool(body.truncate), side=body.truncation_direction,
                                        param="inputs")
    return await run_in_threadpool(lambda: JSONResponse([state.tolist() for state in states]))


@router.post("/similarity")
async def similarity(body: SimilarityRequest, request: Request, service: Service = Depends(service_of)) -> list[float]:
    service.require("embedding")
    texts = [body.inputs.source_sentence, *body.inputs.sentences]
    if not body.inputs.sentences:
        raise APIError(400, "inputs.sentences is empty: give at least one sentence to compare with",
                       code="empty_input", param="inputs.sentences")
    hidden, _ = await service.embed(texts, prompt_name=body.prompt_name, instruction=body.instruction,
                                    truncate=bool(body.truncate), side=body.truncation_direction, param="inputs",
                                    caller=caller_of(request))
    vectors = service.embedding.vectors(hidden)
    return [float(score) for score in vectors[1:] @ vectors[0]]


@router.post("/predict")
async def predict_pairs(body: PredictRequest, request: Request, service: Service = Depends(service_of)) -> list:
    """A reranker's score of each [query, document] pair: one pair gives one list, several a list of them."""
    service.require("rerank")
    single = bool(body.inputs) and all(isinstance(item, str) for item in body.inputs)
    pairs = [body.inputs] if single or isinstance(body.inputs, str) else body.inputs
    for i, pair in enumerate(pairs):
        if isinstance(pair, str) or len(pair) != 2:
            raise APIError(422, f"inputs[{i}] is not a [query, document] pair: a reranker scores pairs",
                           code="invalid_request", param="inputs")
    hidden, _ = await service.rerank([q for q, _ in pairs], [d for _, d in pairs], instruction=body.instruction,
                                     truncate=bool(body.truncate), side=body.truncation_direction,
                                     caller=caller_of(request))
    scores = service.reranking.scores(hidden, raw=body.raw_scores)
    answers = [[{"label": "yes", "score": float(score)}] for score in scores]
    return answers[0] if single else answers


@router.post("/rerank")
async def rerank(body: RerankRequest, request: Request, service: Service = Depends(service_of)) -> list[dict]:
    service.require("rerank")
    hidden, _ = await service.rerank([body.query] * len(body.texts), body.texts, instruction=body.instruction,
                                     truncate=bool(body.truncate), side=body.truncation_direction,
                                     caller=caller_of(request))
    scores = service.reranking.scores(hidden, raw=body.raw_scores)
    return [{"index": i, "score": float(scores[i]), **({"text": body.texts[i]} if body.return_text else {})}
            for i in best_first(scores)]


@router.post("/")
@router.post("/invocations")
async def predict(request: Request, payload: Any = Body(...), service: Service = Depends(service_of)):
    """TEI's route for whatever the server's model does: embed, or rerank."""
    if not isinstance(payload, dict):
        raise APIError(422, "the body must be a JSON object with inputs (to embed) or query and texts (to rerank)",
                       code="invalid_request")
    reranks = service.reranking is not None and (service.embedding is None or "query" in payload)
    schema, endpoint = (RerankRequest, rerank) if reranks else (EmbedRequest, embed)
    if isinstance(payload.get("inputs"), dict):
        schema, endpoint = SimilarityRequest, similarity
    try:
        body = schema.model_validate(payload)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None
    return await endpoint(body, request, service)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, service: Service = Depends(service_of)) -> list[list[dict]]:
    """Each text's tokens as the model reads it: id, text, special, and the characters [start, stop) it
    covers (the prompt's included); with add_special_tokens, the appended <|endoftext|>."""
    engine = service.embedding or service.reranking
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    service.check_count(len(texts), "inputs")
    if body.prompt_name is not None and service.embedding is None:
        raise APIError(400, "prompt_name applies to an embedding model's texts", code="invalid_prompt",
                       param="prompt_name")
    prefix = service.embedding.prefix(body.prompt_name) if service.embedding is not None else ""
    kind = "embedding" if service.embedding is not None else "rerank"
    texts = service.bounded(kind, texts, truncate=False, side="right", param="inputs")

    def pieces() -> list[list[dict]]:
        tokenizer = engine.tokenizer
        out = []
        for text, encoding in zip(texts, tokenizer.tokenizer.encode_batch([prefix + t for t in texts],
                                                                          add_special_tokens=False)):
            whole = prefix + text
            tokens = [{"id": token, "text": whole[start:stop], "special": False, "start": start, "stop": stop}
                      for token, (start, stop) in zip(encoding.ids, encoding.offsets)]
            if body.add_special_tokens:
                tokens.append({"id": tokenizer.end_of_text_id, "text": "<|endoftext|>", "special": True,
                               "start": None, "stop": None})
            out.append(tokens)
        return out
    return await service.off_loop(pieces)


@router.post("/decode")
async def decode(body: DecodeRequest, service: Service = Depends(service_of)) -> list[str]:
    engine = service.embedding or service.reranking
    rows = body.ids if body.ids and isinstance(body.ids[0], list) else [body.ids]
    vocabulary = engine.model.config.vocab_size
    service.check_count(len(rows), "ids")
    for i, row in enumerate(rows):
        if any(not 0 <= token < vocabulary for token in row):
            raise APIError(400, f"ids[{i}] holds token ids outside 0..{vocabulary - 1}", code="invalid_tokens",
                           param="ids")
    return await service.off_loop(engine.tokenizer.tokenizer.decode_batch, rows,
                                  skip_special_tokens=body.skip_special_tokens)


@router.get("/info")
async def info(service: Service = Depends(service_of)) -> dict:
    engine = service.embedding or service.reranking
    settings = service.settings
    return {"model_id": service.embedding_name or service.reranker_name, "model_dtype": str(engine.model.dtype),
            "model_type": {"embedding": service.embedding is not None, "reranker": service.reranking is not None},
            "max_input_length": engine.max_length, "max_batch_tokens": service.batch_tokens,
            "max_client_batch_size": settings.max_client_batch_size, "max_queue_tokens": service.queue_tokens,
            "payload_limit": settings.payload_limit, "max_input_chars": settings.input_chars(engine.max_length),
            "version": "qwen3-jax"}
