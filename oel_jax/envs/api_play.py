"""Our games played through an OpenAI-compatible chat endpoint, as a deployment's users would.

`play_through_api` plays games of `make_env` against any server that speaks
``/v1/chat/completions`` (ours, `oel_jax.serve`; or vLLM, SGLang, a gateway): every turn is
one request whose one user message is the game's prompt, the game's id is the conversation
id (``X-Conversation-Id``), and the game's end is reported to ``/v1/feedback`` when the
server has it. Each request also declares, in ``extra_body``, the prompt format and
knowledge-free content that produced its message (``oel_prompt``) and the environment
(``oel_env``); `oel_jax.serve` records them, so the served log is consolidated exactly as our
own rollouts are (the knowledge goes into the game prompt, not into a system message).
Servers that know nothing of these fields ignore them.

    import openai
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    games = play_through_api(client, "frozenlake", DEMO_WORLD.settings(), seeds=range(24),
                             model="demo", temperature=0.7)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from oel_jax.envs.textarena_games import make_env
from oel_jax.envs.trajectory import ModelInfo, Trajectory
from oel_jax.prompts import formats


@dataclasses.dataclass(frozen=True)
class ApiSampling:
  """The sampling parameters every request sends (OpenAI's names)."""

  temperature: float = 0.7
  """Sampling temperature (0 = greedy)."""
  top_p: float = 1.0
  """Nucleus mass."""
  max_tokens: int = 16
  """Most tokens per reply."""
  enable_thinking: bool = False
  """Qwen3 thinking, sent as ``chat_template_kwargs``."""


def play_through_api(client, env: str, env_settings: Mapping[str, Any], seeds: Iterable[int],
                     *, model: str, sampling: ApiSampling = ApiSampling(),
                     conversation_prefix: str = "game", request_seed: int = 0,
                     feedback: bool = True, concurrency: int = 8) -> list[Trajectory]:
  """Plays one game per board seed through ``client`` (an ``openai.OpenAI``); returns them.

  Game ``seed``'s turn ``t`` sends ``seed=request_seed * 1_000_003 + seed * 100 + t``, so a
  server that honours OpenAI's ``seed`` (ours does) replays the same games. Games run on
  ``concurrency`` threads, so their requests share the server's decode steps.

  Returns:
    The games as trajectory records (the model named as the server answered), in seed order.
  """
  seeds = list(seeds)

  def one(seed: int) -> Trajectory:
    game = make_env(env, seed=seed, **dict(env_settings))
    prompt = game.reset()
    conversation = f"{conversation_prefix}-{seed}"
    served_by = model
    while not game.done:
      reply = client.chat.completions.create(
          model=model, messages=[{"role": "user", "content": prompt}],
          temperature=sampling.temperature, top_p=sampling.top_p,
          max_tokens=sampling.max_tokens,
          seed=request_seed * 1_000_003 + seed * 100 + len(game.turns),
          extra_headers={"X-Conversation-Id": conversation},
          extra_body={
              "chat_template_kwargs": {"enable_thinking": sampling.enable_thinking},
              "oel_prompt": {"format": formats.GAME.id, "content": game.history,
                             "observation": game.observation},
              "oel_env": {"id": game.spec.id, "settings": dict(game.spec.settings)},
          })
      served_by = reply.model or served_by
      prompt, _ = game.step(reply.choices[0].message.content or "")
    if feedback:
      outcome = game.outcome()
      client.post("/feedback", cast_to=object, body={
          "conversation_id": conversation, "success": outcome.success,
          "reward": outcome.reward, "feedback": game.final_feedback})
    return game.trajectory(ModelInfo(served_by), {"conversation_id": conversation})

  with concurrent.futures.ThreadPoolExecutor(max(1, concurrency)) as pool:
    return list(pool.map(one, seeds))
