"""What the server writes to its workdir: a trajectory record per reply, a line per feedback.

The shared contract with the reading side (`oel_jax.trajectories.served`):

``<workdir>/served.jsonl``: one trajectory record (schema v1) per completed chat completion:
one turn whose ``content`` and ``prompt_format`` let consolidation re-render the prompt with
knowledge (the ``"chat"`` format: the messages as JSON; or the format the request declared
with ``oel_prompt``), the raw reply as ``response``, the model's name and round, and the
conversation id, request id, arrival time and sampling settings in its metadata.

``<workdir>/feedback.jsonl``: ``{"conversation_id", "created", "success", "reward",
"feedback"}`` per accepted ``POST /v1/feedback``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

from oel_jax.envs import validate_record
from oel_jax.prompts import formats
from oel_jax.serve.protocol import ChatRequest, RequestError, check_conversation_id

SERVED_FILE = "served.jsonl"
"""The replies' trajectory records, in ``--workdir``."""
FEEDBACK_FILE = "feedback.jsonl"
"""The feedback lines, in ``--workdir``."""


@dataclasses.dataclass(frozen=True)
class ServedModel:
  """The model that produced a reply, as `/v1/models` lists it and the record names it."""

  name: str
  """The served name (``--served_model_name``, or the checkpoint path as given)."""
  round: int | None
  """The OEL round that deployed it (``--round``, or ``/admin/reload``'s); None if unknown."""
  path: str
  """Its checkpoint directory."""


@dataclasses.dataclass(frozen=True)
class Reply:
  """A finished reply, as the client gets it."""

  text: str
  """The reply's text (thinking included when the model wrote it; cut before a ``stop``
  string)."""
  finish_reason: str
  """"stop" (a stop token or string) or "length" (``max_tokens`` reached)."""
  prompt_tokens: int
  """Tokens of the prompt as the chat template rendered it."""
  completion_tokens: int
  """Tokens of the reply (its stop token included; up to a stop string)."""
  enable_thinking: bool
  """Whether the prompt was rendered with thinking on."""
  seed: int
  """The seed the reply was sampled with (the request's, or one the server drew)."""
  model: ServedModel
  """The weights that produced every token of it."""


def served_record(request: ChatRequest, reply: Reply, *, conversation_id: str,
                  request_id: str, created: float, env_id: str) -> dict[str, Any]:
  """The trajectory record of one completed request (validated)."""
  declared = request.prompt
  user = formats.user_text(list(request.messages))
  sampling = request.sampling
  record = {
      "version": 1,
      "env": request.env or {"id": env_id, "settings": {}},
      "seed": None,
      "model": {"name": reply.model.name, "round": reply.model.round},
      "turns": [{
          "observation": declared.observation if declared and declared.observation is not None
                         else user,
          "prompt": user,
          "response": reply.text,
          "action": None,
          "metadata": {"finish_reason": reply.finish_reason,
                       "prompt_tokens": reply.prompt_tokens,
                       "completion_tokens": reply.completion_tokens,
                       "enable_thinking": reply.enable_thinking},
          "content": declared.content if declared else formats.chat_content(
              list(request.messages)),
          "prompt_format": declared.format if declared else formats.CHAT.id,
      }],
      "final_feedback": "",
      "outcome": None,
      "metadata": {
          "conversation_id": conversation_id, "request_id": request_id, "created": created,
          "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p,
                       "top_k": sampling.top_k, "max_tokens": sampling.max_tokens,
                       "seed": reply.seed, "seed_given": sampling.seed is not None,
                       "stop": list(sampling.stop)},
      },
  }
  validate_record(record)
  return record


def feedback_record(body: Any, *, created: float) -> dict[str, Any]:
  """A ``POST /v1/feedback`` body (``conversation_id`` and at least one of ``success``,
  ``reward``, ``feedback``) as its feedback line.

  Raises:
    RequestError: a missing or malformed field, named.
  """
  if not isinstance(body, Mapping):
    raise RequestError(None, f"the body must be a JSON object, got {type(body).__name__}")
  extra = sorted(set(body) - {"conversation_id", "success", "reward", "feedback"})
  if extra:
    raise RequestError(extra[0], "unknown field (conversation_id, success, reward, feedback)")
  cid = check_conversation_id(body.get("conversation_id"), "conversation_id")
  success, reward, text = body.get("success"), body.get("reward"), body.get("feedback")
  if success is not None and not isinstance(success, bool):
    raise RequestError("success", f"expected true, false or null, got {success!r:.80}")
  if reward is not None and (isinstance(reward, bool) or not isinstance(reward, (int, float))
                             or not math.isfinite(reward)):
    raise RequestError("reward", f"expected a finite number or null, got {reward!r:.80}")
  if text is not None and not isinstance(text, str):
    raise RequestError("feedback", f"expected a string or null, got {text!r:.80}")
  if success is None and reward is None and not text:
    raise RequestError(None, "empty feedback: give at least one of success, reward, feedback")
  return {"conversation_id": cid, "created": created, "success": success,
          "reward": None if reward is None else float(reward), "feedback": text or None}


def workdir_files(workdir: str) -> tuple[str, str]:
  """``(served.jsonl, feedback.jsonl)`` in ``workdir``, which is created if missing."""
  os.makedirs(workdir, exist_ok=True)
  return os.path.join(workdir, SERVED_FILE), os.path.join(workdir, FEEDBACK_FILE)
