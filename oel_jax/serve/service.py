"""What the endpoints do, apart from HTTP: complete a chat, record it, take feedback, reload.

`ChatService` holds the served tokenizer, the decoding `Engine` and the two logs of the workdir
(`oel_jax.serve.records`). The FastAPI app (`oel_jax.serve.app`) only decodes bodies, checks
the API key and turns a `RequestError` into an HTTP error; everything a request does happens
here. A completion is recorded (one line, fsynced) before its reply is returned, so a client
that got a reply can count on its record; a malformed request raises before anything is
queued or recorded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
import uuid
from typing import Any

from oel_jax import chat
from oel_jax.errors import InputError
from oel_jax.serve import append_log, checkpoint, protocol, records
from oel_jax.serve.engine import Engine
from oel_jax.serve.protocol import RequestError
from oel_jax.serve.records import ServedModel
from oel_jax.serve.reply_text import reply_text

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServiceOptions:
  """What the service adds to each request."""

  env_id: str = "chat"
  """The env id recorded for requests that do not declare one (``oel_env``)."""
  enable_thinking: bool = True
  """Thinking when a request does not say (``chat_template_kwargs.enable_thinking``)."""
  fixed_name: bool = False
  """The served name was given (``--served_model_name``): a reload keeps it unless told
  otherwise, so clients go on naming the deployment, and the round tells models apart."""


async def _in_thread(fn, *args):
  """Runs blocking work (decoding text, fsync, loading) off the event loop."""
  return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


class ChatService:
  """The server's state and operations (see the module docstring).

  Args:
    tokenizer: the served checkpoint's tokenizer (every reload must keep it).
    engine: the started decoding engine.
    workdir: where ``served.jsonl`` and ``feedback.jsonl`` are appended.
    load_options: how reloaded checkpoints are loaded.
    options: env id, thinking default, naming.
  """

  def __init__(self, tokenizer: Any, engine: Engine, workdir: str,
               load_options: checkpoint.LoadOptions, options: ServiceOptions = ServiceOptions()):
    self.tokenizer = tokenizer
    self.engine = engine
    self.load_options = load_options
    self.options = options
    served_path, feedback_path = records.workdir_files(workdir)
    # Conversation ids already served (feedback may name any of them), before opening for
    # appends (which cuts a torn last line: it was never answered).
    self._conversations = {record["metadata"]["conversation_id"]
                           for _, record in append_log.read_lines(served_path)
                           if isinstance(record.get("metadata"), dict)
                           and "conversation_id" in record["metadata"]}
    self.served_log = append_log.AppendLog(served_path)
    self.feedback_log = append_log.AppendLog(feedback_path)
    self._reloading = asyncio.Lock()
    self.created = int(time.time())

  def close(self) -> None:
    """Stops the engine and closes the logs."""
    self.engine.stop()
    self.served_log.close()
    self.feedback_log.close()

  # ---- /v1/models ----

  def models(self) -> dict[str, Any]:
    """The ``GET /v1/models`` list: the model serving now."""
    model = self.engine.model
    return {"object": "list", "data": [{
        "id": model.name, "object": "model", "created": self.created, "owned_by": "oel_jax",
        "root": model.path, "oel_round": model.round}]}

  # ---- /v1/chat/completions ----

  async def complete(self, body: Any, header_conversation_id: str | None
                     ) -> tuple[dict[str, Any] | list[dict[str, Any]], str]:
    """Completes a chat and records it; returns the response body (for ``stream``: the
    ``chat.completion.chunk`` events) and the conversation id.

    Raises:
      RequestError: a malformed or unsupported request (nothing is queued or recorded).
    """
    created = time.time()
    request = protocol.parse_chat_request(body, max_tokens=self.engine.options.max_tokens)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    if header_conversation_id is not None:
      conversation_id = protocol.check_conversation_id(header_conversation_id,
                                                       "X-Conversation-Id")
    else:
      conversation_id = request.conversation_id or request_id
    thinking = (self.options.enable_thinking if request.enable_thinking is None
                else request.enable_thinking)
    try:
      prompt = chat.encode_chat(self.tokenizer, list(request.messages), enable_thinking=thinking)
    except Exception as e:  # pylint: disable=broad-except
      raise RequestError("messages", f"the chat template cannot render them: "
                         f"{checkpoint.chat_error(e)}") from None
    sampling = request.sampling
    limit = self.load_options.max_seq_len
    if len(prompt) + sampling.max_tokens > limit:
      raise RequestError("messages", f"the prompt has {len(prompt)} tokens; with max_tokens="
                         f"{sampling.max_tokens} that is more than this server's max_seq_len "
                         f"of {limit}")
    seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
    generated = await asyncio.wrap_future(self.engine.submit(prompt, sampling, seed))
    text, completion_tokens, finish_reason = await _in_thread(
        reply_text, self.tokenizer, generated.tokens, generated.finish_reason, sampling.stop)
    reply = records.Reply(text=text, finish_reason=finish_reason, prompt_tokens=len(prompt),
                          completion_tokens=completion_tokens, enable_thinking=thinking,
                          seed=seed, model=generated.model)
    record = records.served_record(request, reply, conversation_id=conversation_id,
                                   request_id=request_id, created=created,
                                   env_id=self.options.env_id)
    await _in_thread(self.served_log.append, record)
    self._conversations.add(conversation_id)
    if request.stream:
      return _completion_chunks(request_id, created, reply, request.include_usage), \
          conversation_id
    return _completion_body(request_id, created, reply), conversation_id

  # ---- /v1/feedback ----

  async def feedback(self, body: Any) -> dict[str, Any]:
    """Records feedback on a served conversation; returns the line written.

    Raises:
      RequestError: malformed or empty feedback (400), or an unknown conversation id (404).
    """
    line = records.feedback_record(body, created=time.time())
    if line["conversation_id"] not in self._conversations:
      raise RequestError("conversation_id", f"no served conversation has the id "
                         f"{line['conversation_id']!r}", status=404)
    await _in_thread(self.feedback_log.append, line)
    return line

  # ---- /admin/reload ----

  async def reload(self, body: Any) -> dict[str, Any]:
    """Loads the checkpoint ``body["model"]`` and swaps it in (see `Engine.swap`); returns
    the model now served.

    Raises:
      RequestError: a malformed body, a checkpoint that cannot be loaded or whose tokenizer is
        not the served one (400), or a reload already under way (409).
    """
    path, name, round_ = _reload_fields(body)
    if self._reloading.locked():
      raise RequestError(None, "a reload is already under way; retry when it is done",
                         status=409)
    async with self._reloading:
      try:
        tokenizer = await _in_thread(checkpoint.load_tokenizer, path)
      except InputError as e:
        raise RequestError("model", str(e)) from None
      difference = checkpoint.tokenizer_difference(self.tokenizer, tokenizer)
      if difference:
        raise RequestError("model", f"{path}: its tokenizer is not the served one "
                           f"({difference}); a reload keeps the tokenizer: serve this "
                           "checkpoint from a new server")
      try:
        model = await _in_thread(checkpoint.load_model, path, self.load_options)
      except InputError as e:
        raise RequestError("model", checkpoint.chat_error(e)) from None
      current = self.engine.sampler
      new = model if model.config == current.config else checkpoint.make_sampler(
          model, self.tokenizer, self.load_options)
      if name is None:
        name = self.engine.model.name if self.options.fixed_name else path
      served = ServedModel(name=name, round=round_, path=path)
      await asyncio.wrap_future(self.engine.swap(new, served))
      log.info("reloaded %s as %r (round %s)", path, name, round_)
      return {"object": "model", "id": served.name, "root": served.path,
              "oel_round": served.round}


def _reload_fields(body: Any) -> tuple[str, str | None, int | None]:
  """``(model dir, name or None, round or None)`` of a reload body."""
  if not isinstance(body, dict):
    raise RequestError(None, f"the body must be a JSON object, got {type(body).__name__}")
  extra = sorted(set(body) - {"model", "round", "name"})
  if extra:
    raise RequestError(extra[0], "unknown field (model, round, name)")
  path, round_, name = body.get("model"), body.get("round"), body.get("name")
  if not isinstance(path, str) or not path:
    raise RequestError("model", f"required: a checkpoint directory, got {path!r:.80}")
  if round_ is not None and (isinstance(round_, bool) or not isinstance(round_, int)
                             or round_ < 0):
    raise RequestError("round", f"expected an integer >= 0 or null, got {round_!r:.80}")
  if name is not None and (not isinstance(name, str) or not name):
    raise RequestError("name", f"expected a non-empty string, got {name!r:.80}")
  return path, name, round_


def _completion_body(request_id: str, created: float, reply: records.Reply) -> dict[str, Any]:
  """The ``chat.completion`` object (OpenAI's shape; ``oel_model`` names the model and
  round that produced it)."""
  return {
      "id": request_id, "object": "chat.completion", "created": int(created),
      "model": reply.model.name,
      "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                   "finish_reason": reply.finish_reason, "logprobs": None}],
      "usage": {"prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "total_tokens": reply.prompt_tokens + reply.completion_tokens},
      "system_fingerprint": None,
      "oel_model": {"name": reply.model.name, "round": reply.model.round},
  }


def _completion_chunks(request_id: str, created: float, reply: records.Reply,
                       include_usage: bool) -> list[dict[str, Any]]:
  """The reply as ``chat.completion.chunk`` events: its whole text, then its finish reason
  (then the usage, when asked for)."""
  body = _completion_body(request_id, created, reply)
  head = {k: body[k] for k in ("id", "created", "model", "system_fingerprint", "oel_model")}
  head["object"] = "chat.completion.chunk"
  choice = lambda delta, reason: [{"index": 0, "delta": delta, "finish_reason": reason,
                                   "logprobs": None}]
  chunks = [{**head, "choices": choice({"role": "assistant", "content": reply.text}, None)},
            {**head, "choices": choice({}, reply.finish_reason)}]
  if include_usage:
    chunks.append({**head, "choices": [], "usage": body["usage"]})
  return chunks
