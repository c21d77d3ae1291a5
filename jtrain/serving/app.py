"""The FastAPI application: OpenAI's routes over one model and its `Batcher`.

Routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`,
`GET /v1/models/{id}` and `GET /health` (503 while the batcher warms up, so a load balancer
waits). Every refusal, including unknown routes, comes back in OpenAI's error shape, so the
official clients raise their usual exceptions. A streaming request's text pieces come from the
worker thread into the request's event stream through the event loop
(`loop.call_soon_threadsafe`), so no thread waits on a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import fastapi
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from jtrain import generate
from jtrain.serving import protocol, responses
from jtrain.serving.batcher import Batcher
from jtrain.serving.protocol import ApiError


def create_app(
    generator: generate.Generator, *, model_name: str, max_batch: int = 16, seed: int = 0,
    stream_every: int = 8, warmup_prompt_tokens: int = 0, warmup_new_tokens: int = 0,
) -> fastapi.FastAPI:  # fmt: skip
    """The server of `generator`'s model under `model_name`; `app.state.batcher` decodes.

    The batcher's worker starts and stops with the application (its lifespan); it first
    compiles the buckets of requests of up to `warmup_prompt_tokens` and `warmup_new_tokens`
    (0: none).
    """
    batcher = Batcher(
        generator, max_batch=max_batch, seed=seed, stream_every=stream_every,
        warmup_prompt_tokens=warmup_prompt_tokens, warmup_new_tokens=warmup_new_tokens,
    )  # fmt: skip
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
        responder = responses.Responder(kind, model_name, include_usage=parsed.include_usage)
        if parsed.stream:
            events = _stream(batcher, parsed, responder)
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            answer = await asyncio.wrap_future(batcher.submit(parsed))
        except Exception as err:  # the batch failed: the server is at fault, not the request
            return JSONResponse(_failed(err), status_code=500)
        return JSONResponse(responder.body(answer))

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        return await serve(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: fastapi.Request):
        return await serve(request, "chat")

    @app.get("/health")
    async def health():
        if not batcher.ready.is_set():
            progress = {"buckets": len(batcher.warmup_buckets), "compiled": batcher.warmed}
            return JSONResponse({"status": "warming up", **progress}, status_code=503)
        return {"status": "ok"}

    return app


async def _stream(
    batcher: Batcher, request: protocol.Request, responder: responses.Responder
) -> AsyncIterator[str]:
    """The request's server-sent events, each piece sent as soon as the worker has it; a batch
    that fails ends the stream with an error event. A client that leaves stops nothing but its
    own stream: its later pieces are dropped."""
    loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
    end = object()  # queued once the future is done, after every piece
    open_ = True

    def post(item) -> None:  # on the worker thread
        if open_:
            with contextlib.suppress(RuntimeError):  # the event loop has closed
                loop.call_soon_threadsafe(pieces.put_nowait, item)

    future = batcher.submit(request, post)
    future.add_done_callback(lambda _: post(end))
    try:
        for chunk in responder.opening():
            yield responses.event(chunk)
        while (piece := await pieces.get()) is not end:
            yield responses.event(responder.piece(piece))
        try:
            chunks = responder.closing(future.result())
        except Exception as err:  # the batch failed
            chunks = [_failed(err)]
        for chunk in chunks:
            yield responses.event(chunk)
        yield responses.DONE
    finally:
        open_ = False
        future.cancel()  # a request still queued is not decoded (a running one cannot stop)


def _failed(err: Exception) -> dict:
    return protocol.error_body(f"decoding failed: {err}", kind="server_error")


def _add_errors_and_models(app: fastapi.FastAPI, card: dict) -> None:
    """OpenAI-style bodies for every refusal; the one model's card."""
    card = {**card, "owned_by": "jtrain"}

    @app.exception_handler(ApiError)
    async def _refused(_, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_, err: HTTPException) -> JSONResponse:
        return JSONResponse(protocol.error_body(str(err.detail)), status_code=err.status_code)

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
