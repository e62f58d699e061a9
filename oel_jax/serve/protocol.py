"""The OpenAI chat-completions request body, checked field by field into a `ChatRequest`.

Every problem is a `RequestError` naming the field (``messages[2].role``, ``temperature``), which
the app turns into a 400 in OpenAI's error shape (``{"error": {"message", "type", "param"}}``),
so a client sees what to fix and nothing is recorded. Parameters we do not implement are refused
rather than ignored when they would change the reply (``n`` > 1, ``tools``, penalties, ...);
fields that only label a request (``user``, ``store``) are accepted and not used.

No web framework here: the app hands in the decoded JSON body.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from oel_jax.prompts import formats

MAX_STOP_STRINGS = 4
"""OpenAI's limit on ``stop`` strings."""

MAX_SEED = 2 ** 64
"""Seeds are in [0, MAX_SEED), as `oel_jax.sampling.Sampler.generate` takes them."""

# Accepted and not used: they label the request, or ask for what we do anyway.
_IGNORED = ("user", "store", "service_tier", "safety_identifier", "prompt_cache_key",
            "parallel_tool_calls")
# Refused unless absent, null or this neutral value: they would change the reply.
_UNSUPPORTED = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {},
                "logprobs": False, "top_logprobs": 0, "tools": [], "tool_choice": "none",
                "functions": [], "function_call": "none", "response_format": {"type": "text"},
                "audio": None, "modalities": ["text"], "prediction": None,
                "reasoning_effort": None, "web_search_options": None, "verbosity": None}
_KNOWN = {"model", "messages", "temperature", "top_p", "top_k", "max_tokens",
          "max_completion_tokens", "seed", "stop", "n", "stream", "stream_options", "metadata",
          "chat_template_kwargs", "oel_prompt", "oel_env", *_IGNORED, *_UNSUPPORTED}


class RequestError(ValueError):
  """A malformed request: ``field`` names what is wrong (None: the whole body)."""

  def __init__(self, field: str | None, problem: str, status: int = 400):
    super().__init__(f"{field}: {problem}" if field else problem)
    self.field = field
    self.problem = problem
    self.status = status


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How a reply is sampled (the settings one `oel_jax.slots.SlotDecoder` holds, and the
  row's own token budget and seed)."""

  temperature: float
  """>= 0; 0 is greedy."""
  top_p: float
  """In (0, 1]."""
  top_k: int
  """>= 0; 0 keeps every token."""
  max_tokens: int
  """Most tokens of the reply (the stop token included)."""
  seed: int | None
  """The request's seed, or None: the server draws one (and records it)."""
  stop: tuple[str, ...]
  """Strings that end the reply's text (not included in it)."""

  @property
  def decoder_key(self) -> tuple[float, float, int]:
    """The settings rows must share to be decoded in one `SlotDecoder`."""
    return (self.temperature, self.top_p, self.top_k)


@dataclasses.dataclass(frozen=True)
class DeclaredPrompt:
  """The ``oel_prompt`` extension: the messages are ``FORMATS[format].messages(content)``."""

  format: str
  """A prompt format id of `oel_jax.prompts.formats.FORMATS`."""
  content: str
  """The knowledge-free content that format renders into the messages."""
  observation: str | None
  """What the turn records as its observation (None: the last user message)."""


@dataclasses.dataclass(frozen=True)
class ChatRequest:
  """A checked ``POST /v1/chat/completions`` body."""

  model: str
  """The ``model`` the client named (any name: the reply says which model served it)."""
  messages: tuple[dict[str, str], ...]
  """``{"role": "system"|"user"|"assistant", "content": str}``, ending with a user message."""
  sampling: Sampling
  """How to sample the reply."""
  enable_thinking: bool | None
  """``chat_template_kwargs.enable_thinking``; None: the server's default."""
  conversation_id: str | None
  """``metadata.conversation_id`` (the ``X-Conversation-Id`` header wins over it)."""
  prompt: DeclaredPrompt | None
  """The ``oel_prompt`` extension, checked against the messages."""
  env: dict[str, Any] | None
  """The ``oel_env`` extension: ``{"id": str, "settings": {...}}``."""
  stream: bool = False
  """Answer as server-sent events (``chat.completion.chunk``s). The whole reply comes in one
  chunk once it is done: the stream is for clients that ask for one, not for latency."""
  include_usage: bool = False
  """``stream_options.include_usage``: a last chunk carries the token counts."""


def _number(body: Mapping[str, Any], name: str, default: float, low: float, high: float,
            *, low_open: bool = False) -> float:
  value = body.get(name)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise RequestError(name, f"expected a number, got {value!r}")
  if value > high or value < low or (low_open and value == low):
    interval = f"{'(' if low_open else '['}{low}, {high}]"
    raise RequestError(name, f"must be in {interval}, got {value!r}")
  return float(value)


def _integer(body: Mapping[str, Any], name: str, low: int, high: int | None = None
             ) -> int | None:
  value = body.get(name)
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, int):
    raise RequestError(name, f"expected an integer, got {value!r}")
  if value < low or (high is not None and value >= high):
    bound = f">= {low}" if high is None else f"in [{low}, {high})"
    raise RequestError(name, f"must be {bound}, got {value}")
  return value


def _text(content: Any, where: str) -> str:
  """A message's text: a string, or a list of ``{"type": "text", "text": str}`` parts
  (joined with newlines, as vLLM does)."""
  if isinstance(content, str):
    return content
  if isinstance(content, list) and content:
    parts = []
    for i, part in enumerate(content):
      if not isinstance(part, Mapping) or part.get("type") != "text":
        raise RequestError(f"{where}[{i}]", "only text parts ({'type': 'text', 'text': ...}) "
                           "are supported")
      if not isinstance(part.get("text"), str):
        raise RequestError(f"{where}[{i}].text", "expected a string")
      parts.append(part["text"])
    return "\n".join(parts)
  raise RequestError(where, f"expected a string or a list of text parts, got {content!r:.80}")


def parse_messages(messages: Any) -> tuple[dict[str, str], ...]:
  """The request's messages as ``{"role", "content"}`` dicts (see `ChatRequest.messages`)."""
  if messages is None:
    raise RequestError("messages", "required: a non-empty list of messages")
  if not isinstance(messages, list) or not messages:
    raise RequestError("messages", f"expected a non-empty list, got {messages!r:.80}")
  out = []
  for i, m in enumerate(messages):
    where = f"messages[{i}]"
    if not isinstance(m, Mapping):
      raise RequestError(where, f"expected an object, got {type(m).__name__}")
    extra = sorted(set(m) - {"role", "content"})
    if extra:
      raise RequestError(f"{where}.{extra[0]}", "not supported (a message has only role and "
                         "content here)")
    role = m.get("role")
    if role not in formats.CHAT_ROLES:
      raise RequestError(f"{where}.role", f"expected one of {', '.join(formats.CHAT_ROLES)}, "
                         f"got {role!r}")
    if "content" not in m:
      raise RequestError(f"{where}.content", "required")
    out.append({"role": role, "content": _text(m["content"], f"{where}.content")})
  if out[-1]["role"] != "user":
    raise RequestError(f"messages[{len(out) - 1}].role", "the last message must be the user's "
                       f"(the server writes the assistant's reply), got {out[-1]['role']!r}")
  return tuple(out)


def _stop(value: Any) -> tuple[str, ...]:
  if value is None:
    return ()
  stops = [value] if isinstance(value, str) else value
  if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
    raise RequestError("stop", f"expected a non-empty string or a list of them, got {value!r}")
  if len(stops) > MAX_STOP_STRINGS:
    raise RequestError("stop", f"at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
  return tuple(stops)


def _max_tokens(body: Mapping[str, Any], limit: int) -> int:
  given = {name: _integer(body, name, 1) for name in ("max_tokens", "max_completion_tokens")}
  values = {name: v for name, v in given.items() if v is not None}
  if len(set(values.values())) > 1:
    raise RequestError("max_completion_tokens", "differs from max_tokens; give one of them")
  for name, value in values.items():
    if value > limit:
      raise RequestError(name, f"{value} is more than this server's limit of {limit} tokens "
                         "(its --max_tokens)")
  return next(iter(values.values()), limit)


def _sampling(body: Mapping[str, Any], max_tokens: int) -> Sampling:
  top_k = _integer(body, "top_k", -1)
  return Sampling(
      temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
      top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
      top_k=0 if top_k is None or top_k < 0 else top_k,
      max_tokens=_max_tokens(body, max_tokens),
      seed=_integer(body, "seed", 0, MAX_SEED),
      stop=_stop(body.get("stop")))


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
  unknown = sorted(set(body) - _KNOWN)
  if unknown:
    raise RequestError(unknown[0], "unknown parameter")
  n = body.get("n")
  if n is not None and n != 1:
    raise RequestError("n", f"only n=1 is supported (one reply per request), got {n!r}")
  for name, neutral in _UNSUPPORTED.items():
    if body.get(name) not in (None, neutral):
      raise RequestError(name, f"not supported by this server (leave it unset or "
                         f"{neutral!r})")


def _thinking(value: Any) -> bool | None:
  if value is None:
    return None
  if not isinstance(value, Mapping):
    raise RequestError("chat_template_kwargs", f"expected an object, got {value!r:.80}")
  extra = sorted(set(value) - {"enable_thinking"})
  if extra:
    raise RequestError(f"chat_template_kwargs.{extra[0]}", "not supported (only "
                       "enable_thinking is)")
  thinking = value.get("enable_thinking")
  if thinking is not None and not isinstance(thinking, bool):
    raise RequestError("chat_template_kwargs.enable_thinking",
                       f"expected true or false, got {thinking!r}")
  return thinking


def _conversation_id(metadata: Any) -> str | None:
  if metadata is None:
    return None
  if not isinstance(metadata, Mapping):
    raise RequestError("metadata", f"expected an object, got {metadata!r:.80}")
  for key, value in metadata.items():
    if not isinstance(value, str):
      raise RequestError(f"metadata.{key}", f"expected a string, got {value!r:.80}")
  cid = metadata.get("conversation_id")
  if cid is not None:
    check_conversation_id(cid, "metadata.conversation_id")
  return cid


def check_conversation_id(cid: Any, where: str) -> str:
  """``cid`` if it is a usable conversation id (a non-empty string of at most 256 printable
  ASCII characters); otherwise a `RequestError` naming ``where``."""
  if not isinstance(cid, str) or not cid.strip():
    raise RequestError(where, f"expected a non-empty string, got {cid!r:.80}")
  if not (cid.isascii() and cid.isprintable()):  # it goes back in a response header
    raise RequestError(where, f"expected printable ASCII characters, got {cid!r:.80}")
  if len(cid) > 256:
    raise RequestError(where, f"at most 256 characters, got {len(cid)}")
  return cid


def _declared_prompt(value: Any, messages: tuple[dict[str, str], ...]) -> DeclaredPrompt | None:
  if value is None:
    return None
  if not isinstance(value, Mapping):
    raise RequestError("oel_prompt", f"expected an object, got {value!r:.80}")
  extra = sorted(set(value) - {"format", "content", "observation"})
  if extra:
    raise RequestError(f"oel_prompt.{extra[0]}", "unknown field (format, content, "
                       "observation)")
  fmt = value.get("format")
  if fmt not in formats.FORMATS:
    raise RequestError("oel_prompt.format", f"expected one of {', '.join(formats.FORMATS)}, "
                       f"got {fmt!r}")
  content, observation = value.get("content"), value.get("observation")
  if not isinstance(content, str):
    raise RequestError("oel_prompt.content", f"expected a string, got {content!r:.80}")
  if observation is not None and not isinstance(observation, str):
    raise RequestError("oel_prompt.observation", f"expected a string, got {observation!r:.80}")
  try:
    rendered = formats.FORMATS[fmt].messages(content)
  except ValueError as e:
    raise RequestError("oel_prompt.content", f"format {fmt!r} cannot render it: {e}") from None
  if [dict(m) for m in rendered] != list(messages):
    raise RequestError("oel_prompt", f"the messages are not format {fmt!r}'s rendering of "
                       "oel_prompt.content (send exactly FORMATS[format].messages(content))")
  return DeclaredPrompt(fmt, content, observation)


def _env(value: Any) -> dict[str, Any] | None:
  if value is None:
    return None
  if not isinstance(value, Mapping):
    raise RequestError("oel_env", f"expected an object, got {value!r:.80}")
  extra = sorted(set(value) - {"id", "settings"})
  if extra:
    raise RequestError(f"oel_env.{extra[0]}", "unknown field (id, settings)")
  env_id, settings = value.get("id"), value.get("settings", {})
  if not isinstance(env_id, str) or not env_id:
    raise RequestError("oel_env.id", f"expected a non-empty string, got {env_id!r:.80}")
  if not isinstance(settings, Mapping):
    raise RequestError("oel_env.settings", f"expected an object, got {settings!r:.80}")
  return {"id": env_id, "settings": dict(settings)}


def _stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
  stream, options = body.get("stream"), body.get("stream_options")
  if stream is not None and not isinstance(stream, bool):
    raise RequestError("stream", f"expected true or false, got {stream!r:.80}")
  if options is None:
    return bool(stream), False
  if not stream:
    raise RequestError("stream_options", "only with stream=true")
  if not isinstance(options, Mapping):
    raise RequestError("stream_options", f"expected an object, got {options!r:.80}")
  extra = sorted(set(options) - {"include_usage"})
  if extra:
    raise RequestError(f"stream_options.{extra[0]}", "not supported (only include_usage is)")
  usage = options.get("include_usage")
  if usage is not None and not isinstance(usage, bool):
    raise RequestError("stream_options.include_usage", f"expected true or false, got {usage!r}")
  return True, bool(usage)


def parse_chat_request(body: Any, *, max_tokens: int) -> ChatRequest:
  """Checks a decoded ``/v1/chat/completions`` body.

  Args:
    body: the decoded JSON body.
    max_tokens: the server's limit on a reply's tokens (and the default when the request
      names none).

  Raises:
    RequestError: the first malformed or unsupported field, named.
  """
  if not isinstance(body, Mapping):
    raise RequestError(None, f"the body must be a JSON object, got {type(body).__name__}")
  model = body.get("model")
  if not isinstance(model, str) or not model:
    raise RequestError("model", f"required: a non-empty string, got {model!r:.80}")
  messages = parse_messages(body.get("messages"))
  _refuse_unsupported(body)
  stream, include_usage = _stream(body)
  return ChatRequest(
      model=model, messages=messages, sampling=_sampling(body, max_tokens),
      enable_thinking=_thinking(body.get("chat_template_kwargs")),
      conversation_id=_conversation_id(body.get("metadata")),
      prompt=_declared_prompt(body.get("oel_prompt"), messages),
      env=_env(body.get("oel_env")), stream=stream, include_usage=include_usage)
