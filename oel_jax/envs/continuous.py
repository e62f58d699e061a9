"""Rollouts with continuous batching: a game's next turn starts as soon as its reply ends.

The lockstep loop (`oel_jax.envs.lockstep`) sends one turn of every running game to one
`generate` call, which decodes until the longest reply ends: with thinking replies (a heavy
tail up to the token budget) most rows sit finished while the batch decodes on, and every
game's next turn waits for every other game's current one. Here a `oel_jax.slots.SlotDecoder`
keeps ``RolloutConfig.slots`` rows decoding; after each chunk of decode steps, each reply
that ended is played in its game at once, and that game's next turn (or, when it is over,
the next game not yet started) is prefilled into the freed row while the others keep their
caches.

The trajectories are those of the lockstep loop: a game's turn ``t`` is sampled with the
same seed (`game_turn_seed`) and the same per-step random stream, and its prompt is built
from the same history, so only the order in which the games' turns are played changes.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from tqdm.auto import tqdm

from oel_jax import slots as slots_lib
from oel_jax.envs import lockstep
from oel_jax.prompts import formats

CHUNK_STEPS = 16
"""Decode steps per call: a finished row waits at most this many steps for its next prompt,
and each call's Python work (a few milliseconds) is spread over this many tokens."""


def play(games: lockstep._Games, sampler: Any, tokenizer: Any,  # pylint: disable=protected-access
         config: lockstep.RolloutConfig, knowledge: str | None,
         prompt_format: formats.PromptFormat) -> None:
  """Resets the games and plays them to the end in ``config.slots`` rows of ``sampler``.

  Games enter in seed order; a game whose reply ended goes back into a row ahead of games
  not yet started, so games finish in about the order they started. ``games.calls`` counts
  decode chunks; ``games.generate_s`` the time in prefill and decode calls.
  """
  for env in games.envs:
    env.reset()
  n = len(games.envs)
  if not n:
    return
  decoder = slots_lib.SlotDecoder(
      sampler, min(int(config.slots), n), max_new_tokens=config.max_new_tokens,
      temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
      chunk_steps=CHUNK_STEPS)
  max_seq_len = getattr(sampler, "max_seq_len", None)
  unstarted = collections.deque(range(n))
  continuing: collections.deque[int] = collections.deque()
  in_row: dict[int, tuple[int, list[int]]] = {}  # row -> (game, prompt ids)
  running = n
  bar = tqdm(total=n, unit="game", desc=f"{config.env} rollout", disable=not config.progress,
             leave=False)
  try:
    while unstarted or continuing or decoder.busy:
      rows, requests = [], []
      for row in decoder.free_rows:
        if not (continuing or unstarted):
          break
        game = (continuing or unstarted).popleft()
        requests.append(lockstep.next_turn(games, game, tokenizer, config, knowledge,
                                           prompt_format, max_seq_len))
        rows.append(row)
        in_row[row] = (game, requests[-1][1])
      bar.set_postfix(turn=games.turns, running=running)
      t0 = time.perf_counter()
      decoder.start(rows, [ids for _, ids in requests], [seed for seed, _ in requests])
      replies = decoder.run()
      games.generate_s += time.perf_counter() - t0
      games.calls += 1
      for reply in replies:
        game, ids = in_row.pop(reply.row)
        lockstep.play_reply(games, game, ids, reply.tokens, reply.finish_reason, tokenizer,
                            config)
        games.turns = max(games.turns, len(games.turn_meta[game]))
        if games.envs[game].done:
          running -= 1
          bar.update(1)
        else:
          continuing.append(game)
  finally:
    bar.close()
