"""The FastAPI application: OpenAI's routes over one model and its `Batcher`.

Routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`,
`GET /v1/models/{id}` and `GET /health`. Every refusal, including unknown routes, comes back
in OpenAI's error shape, so the official clients raise their usual exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import fastapi
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from jtrain import generate
from jtrain.serving import protocol, responses
from jtrain.serving.batcher import Batcher
from jtrain.serving.protocol import ApiError


def create_app(
    generator: generate.Generator, *, model_name: str, max_batch: int = 16, seed: int = 0
) -> fastapi.FastAPI:
    """The server of `generator`'s model under `model_name`; `app.state.batcher` decodes.

    The batcher's worker starts and stops with the application (its lifespan).
    """
    batcher = Batcher(generator, max_batch=max_batch, seed=seed)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_):
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop)

    app = fastapi.FastAPI(title="jtrain", lifespan=lifespan)
    app.state.batcher, app.state.model_name = batcher, model_name
    _add_errors_and_models(app, {"id": model_name, "object": "model", "created": created})

    async def serve(request: fastapi.Request, kind: str):
        parsed = protocol.parse(await _json_body(request), kind, generator, model_name)
        try:
            answer = await asyncio.wrap_future(batcher.submit(parsed))
        except Exception as err:  # the batch failed: the server is at fault, not the request
            body = protocol.error_body(f"decoding failed: {err}", kind="server_error")
            return JSONResponse(body, status_code=500)
        responder = responses.Responder(kind, model_name)
        if not parsed.stream:
            return JSONResponse(responder.body(answer))
        pieces = responses.text_pieces(generator.tokenizer, answer.ids)
        chunks = responder.chunks(answer, pieces, include_usage=parsed.include_usage)
        return StreamingResponse(responses.sse(chunks), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        return await serve(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: fastapi.Request):
        return await serve(request, "chat")

    return app


def _add_errors_and_models(app: fastapi.FastAPI, card: dict) -> None:
    """OpenAI-style bodies for every refusal; /health and the one model's card."""
    card = {**card, "owned_by": "jtrain"}

    @app.exception_handler(ApiError)
    async def _refused(_, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_, err: HTTPException) -> JSONResponse:
        return JSONResponse(protocol.error_body(str(err.detail)), status_code=err.status_code)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != card["id"]:
            message = f"The model {model_id!r} does not exist: this server serves {card['id']!r}"
            raise ApiError(message, param="model", status=404)
        return card


async def _json_body(request: fastapi.Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise ApiError(f"the request body is not valid JSON: {err}") from None
