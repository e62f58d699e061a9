"""The HTTP layer: FastAPI routes over a `ChatService`, the API key, OpenAI-shaped errors.

Errors are ``{"error": {"message", "type", "param", "code"}}`` as OpenAI sends them, so the
official client raises its usual exceptions (``BadRequestError`` for a 400, with ``param``
naming the field).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from oel_jax.serve.engine import EngineStopped
from oel_jax.serve.protocol import RequestError
from oel_jax.serve.service import ChatService

log = logging.getLogger(__name__)

CONVERSATION_HEADER = "X-Conversation-Id"
"""Names a request's conversation (wins over ``metadata.conversation_id``); every reply
carries it back."""

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "not_found_error", 409: "conflict_error", 503: "service_unavailable"}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
  """An error in OpenAI's shape."""
  return JSONResponse(status_code=status, content={"error": {
      "message": message, "type": _ERROR_TYPES.get(status, "server_error"), "param": param,
      "code": None}})


async def _json_body(request: Request) -> Any:
  raw = await request.body()
  try:
    return json.loads(raw)
  except ValueError as e:
    raise RequestError(None, f"the body is not JSON: {e}") from None


def create_app(service: ChatService, api_key: str | None = None) -> FastAPI:
  """The app serving ``service``; with ``api_key``, every route wants ``Authorization:
  Bearer <api_key>`` (401 otherwise). Shutting the app down closes the service."""

  @contextlib.asynccontextmanager
  async def lifespan(_):
    yield
    service.close()

  app = FastAPI(title="oel_jax", lifespan=lifespan, docs_url=None, redoc_url=None,
                openapi_url=None)

  if api_key:
    expected = f"Bearer {api_key}".encode()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
      given = request.headers.get("authorization", "").encode()
      if not hmac.compare_digest(given, expected):
        return error_response(401, "missing or wrong API key: send 'Authorization: Bearer "
                              "<key>' (the server's --api_key or OEL_API_KEY)")
      return await call_next(request)

  @app.exception_handler(RequestError)
  async def request_error(_, error: RequestError):
    return error_response(error.status, str(error), error.field)

  @app.exception_handler(EngineStopped)
  async def engine_stopped(_, error: EngineStopped):
    return error_response(503, f"the server is not serving: {error}")

  @app.exception_handler(Exception)
  async def server_error(_, error: Exception):
    log.exception("a request failed")
    return error_response(500, f"the server failed: {type(error).__name__}: {error}")

  @app.get("/v1/models")
  async def models():
    return service.models()

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    body, conversation_id = await service.complete(
        await _json_body(request), request.headers.get(CONVERSATION_HEADER))
    headers = {CONVERSATION_HEADER: conversation_id}
    if isinstance(body, list):  # stream=true: server-sent events
      events = "".join(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n" for chunk in body)
      return Response(events + "data: [DONE]\n\n", media_type="text/event-stream",
                      headers=headers)
    return JSONResponse(body, headers=headers)

  @app.post("/v1/feedback")
  async def feedback(request: Request):
    return {"object": "feedback", **await service.feedback(await _json_body(request))}

  @app.post("/admin/reload")
  async def reload(request: Request):
    return await service.reload(await _json_body(request))

  return app
