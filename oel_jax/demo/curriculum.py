"""The demo model's synthetic curriculum: scripted play and scripted extraction on lakes with
thin ice.

The learning demo's model (``scripts/build_demo_model.py``) is trained from scratch on text
made here and nowhere else. Every example is a real prompt of the real game (`make_env`,
FrozenLake with a ``thin_ice`` layout and a ``lake`` name) or the paper's extraction prompt
filled by `oel_jax.experience`, followed by the reply a scripted player or reader would give.
Skills, as an instruction-tuned model brings them to the paper's games:

1. **Play from the prompt** (``play``, no knowledge): head for the goal down the staircase of
   `wanted_direction` (down first), as a player that cannot see thin ice would.
2. **Play from knowledge** (``play_with_knowledge``): with the paper's knowledge block in the
   prompt, make the first move the majority of its items call for (`first_move`), then the
   staircase.
3. **Extract** (``extract``): answer the paper's structured extraction prompt (Fig. 10) with
   one item: where the player fell through the ice, if it did (`ITEMS`: ``- EXPERIENCE ITEM:
   The ice of the left column is thin, so move right first.``), else the generic item; with
   probability `READ_ERROR` the other side's item (a reader of noisy trajectories).

Every reply is ``I move <direction>: [<direction>]``. With probability `EXPLORE` the player
wants a random direction instead (so its games sometimes fall where it did not plan to go).

Worlds. A world is a lake name and a layout of thin ice: holes that the board draws as frozen
surface, found only by falling through them. Thin ice lies along the start's column
(``(1, 0)``, ``(2, 0)``) or along its row (``(0, 1)``, ``(0, 2)``), never both, so one first
move is always safe and the staircase after it never comes back. The demo deploys into
`DEMO_WORLD`: lake Ossa, the whole left column thin; neither that layout nor that name appears
anywhere in the curriculum (a test checks every example). Why this world and not remapped
controls (sessions 7-13 of docs/benchmarks.md): what a model of this size learns in half an
hour on two CPU cores is which verdict a block's items carry and whether a game ended in a
fall; it did not learn to bind a key to the move the board reports, which every
remapped-controls reader needed. The model built from this curriculum does not read which
side a game fell on either: it names the left column for every fall (docs/benchmarks.md,
"Session 15"), right on Ossa and wrong on a lake whose top row is thin.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from collections.abc import Iterator, Sequence

from oel_jax import experience
from oel_jax.envs import ModelInfo, make_env
from oel_jax.envs.textarena_games import DIRECTIONS

LEFT_COLUMN = ((1, 0), (2, 0))
"""The cells below the start."""

TOP_ROW = ((0, 1), (0, 2))
"""The cells right of the start."""

DEMO_THIN_ICE = LEFT_COLUMN
"""The demo world's thin ice: the whole left column below the start (never a pretraining
layout). A player that moves down first, as every player does without knowledge, falls."""

DEMO_LAKE = "Ossa"
"""The demo world's lake name (never seen in pretraining)."""

DEMO_HOLES = 0
"""Visible holes on every demo lake. The paper's FrozenLake has two; without them the route
is a rule (`wanted_direction`) instead of a search over the board, which a model trained for
minutes on two CPU cores can learn, and the thin ice is the one thing to discover."""

PRETRAINING_THIN_ICE = ((), ((1, 0),), ((2, 0),), ((0, 1),), ((0, 2),), ((0, 1), (0, 2)))
"""The layouts of pretraining lakes: none, one cell of the left column, one or both of the
top row. The demo's (both cells of the left column) is held out."""

EXPLORE = 0.2
"""Probability that the scripted player wants a random direction on a turn."""

READ_ERROR = 0.1
"""Probability that the scripted reader writes the other side's item."""

REPLY = "I move {direction}: [{direction}]"
"""The scripted player's reply."""

ITEMS = {
    "column": "- EXPERIENCE ITEM: The ice of the left column is thin, so move right first.",
    "row": "- EXPERIENCE ITEM: The ice of the top row is thin, so move down first.",
}
"""The reader's items: the side where the player fell -> the line it writes."""

FIRST_MOVE = {"column": "right", "row": "down"}
"""The first move each item calls for."""

GENERIC_ITEM = "- EXPERIENCE ITEM: Avoid the holes (H) and walk to the goal (G)."
"""The item the reader writes when the player did not fall."""

ANSWER_HEAD = "Additional Experience (Rules or Strategies):\n# Experience\n"
"""What the extraction answer opens with (the format the paper's Fig. 10 asks for)."""

_MODEL = ModelInfo("scripted-player")  # recorded in the scripted games' trajectories

_STEP = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}

_SYLLABLES = ("ba", "da", "fe", "ga", "hi", "ka", "lo", "mi", "nu", "pe", "ra", "si", "to",
              "vu", "wen", "zor", "bel", "cor", "dun", "el", "fir", "gal", "hol", "ir", "jun",
              "kel", "lin", "mar", "nor", "ost", "pil", "quen", "ros", "sel", "tar", "ul",
              "var", "wyn", "yl", "zan")


@dataclasses.dataclass(frozen=True)
class World:
  """One lake: its name and where its ice is thin."""

  lake: str
  """The name the first message shows ("" for the paper's unnamed lake)."""
  thin_ice: tuple[tuple[int, int], ...] = ()
  """Cells that are holes drawn as frozen surface (FrozenLake's ``thin_ice`` setting)."""

  def settings(self) -> dict[str, object]:
    """`make_env` overrides for this world (every demo lake is free of visible holes)."""
    return {"lake": self.lake, "num_holes": DEMO_HOLES,
            "thin_ice": [list(cell) for cell in self.thin_ice]}

  @property
  def side(self) -> str | None:
    """``"column"`` or ``"row"``: where the thin ice lies; None for a lake without any."""
    if any(cell in LEFT_COLUMN for cell in self.thin_ice):
      return "column"
    if any(cell in TOP_ROW for cell in self.thin_ice):
      return "row"
    return None


DEMO_WORLD = World(DEMO_LAKE, DEMO_THIN_ICE)
"""The world the demo deploys into (`DEMO_WORLD.settings()` are its `make_env` settings)."""

STANDARD_WORLD = World("")
"""The demo's out-of-distribution check: the paper's unnamed lake without thin ice, with the
demo lakes' other settings."""

MIRROR_WORLD = World("", TOP_ROW)
"""The unnamed lake with the opposite regularity (the top row thin): the move the demo
teaches to make first is the one that falls here."""


def lake_name(rng: random.Random) -> str:
  """A random pronounceable lake name of two or three syllables."""
  name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 2, 3))))
  return name.capitalize()


def _named(rng: random.Random) -> str:
  while True:
    name = lake_name(rng) if rng.random() < 0.75 else ""
    if name != DEMO_LAKE:
      return name


def pretraining_worlds(rng: random.Random) -> Iterator[World]:
  """An endless stream of pretraining worlds; never the demo's layout or lake name.

  A third of them have no thin ice, a third thin ice in the left column, a third in the top
  row; three in four have a random name, the rest are the paper's unnamed lake.
  """
  by_side = collections.defaultdict(list)
  for layout in PRETRAINING_THIN_ICE:
    by_side[World("", layout).side].append(layout)
  while True:
    layout = rng.choice(by_side[rng.choice((None, "column", "row"))])
    yield World(_named(rng), layout)


# ---------------------------------------------------------------------------------------------
# The scripted player.


def parse_knowledge(knowledge: str) -> collections.Counter:
  """How many of the reader's items each side has: ``{"column": n, "row": m}``."""
  counts: collections.Counter = collections.Counter()
  for line in (knowledge or "").splitlines():
    for side, item in ITEMS.items():
      if line.strip() == item:
        counts[side] += 1
  return counts


def first_move(knowledge: str) -> str:
  """The first move a knowledge block calls for: the majority's (`FIRST_MOVE`); down, the
  staircase's, when no item names a side or the sides tie."""
  said = parse_knowledge(knowledge)
  if said["column"] > said["row"]:
    return FIRST_MOVE["column"]
  if said["row"] > said["column"]:
    return FIRST_MOVE["row"]
  return "down"


def wanted_direction(position: Sequence[int]) -> str:
  """The move a player wants on a lake without visible holes: down on or above the diagonal,
  else right. From the top-left corner that walks the staircase down, right, down, right to
  the goal in the bottom-right corner; after a wrong move it heads back to the staircase."""
  row, col = position
  return "down" if row <= col else "right"


def scripted_reply(env, knowledge: str, rng: random.Random, explore: float = EXPLORE,
                   first: str | None = None) -> str:
  """The scripted player's reply on the env's current turn: a random move with probability
  ``explore``; at the start, ``first`` if given, else what the knowledge calls for
  (`first_move`); elsewhere the staircase."""
  position = tuple(env.textarena_env.state.game_state["player_pos"])
  if rng.random() < explore:
    direction = rng.choice(DIRECTIONS)
  elif position == (0, 0):
    direction = first or first_move(knowledge)
  else:
    direction = wanted_direction(position)
  return REPLY.format(direction=direction)


def play(world: World, board_seed: int, knowledge: str, rng: random.Random,
         explore: float = EXPLORE, first: str | None = None):
  """Plays one scripted game; returns the finished env (its turns hold every prompt)."""
  env = make_env("frozenlake", seed=board_seed, knowledge=knowledge or None, **world.settings())
  env.reset()
  while not env.done:
    env.step(scripted_reply(env, knowledge, rng, explore, first))
  return env


# ---------------------------------------------------------------------------------------------
# The scripted reader.


def final_position(trajectory) -> tuple[int, int]:
  """Where the player stood after the last turn: the moves replayed from the start corner
  (a move into the edge leaves it in place, as the game does)."""
  size = int(trajectory.env.settings["size"])
  row, col = 0, 0
  for turn in trajectory.turns:
    step = _STEP.get(turn.action.strip("[]"))
    if step and 0 <= row + step[0] < size and 0 <= col + step[1] < size:
      row, col = row + step[0], col + step[1]
  return row, col


def fell_on(trajectory) -> str | None:
  """``"column"`` or ``"row"``: the side of the start where the player fell through the ice;
  None when it did not fall."""
  if "fell into a hole" not in (trajectory.outcome.reason if trajectory.outcome else ""):
    return None
  row, col = final_position(trajectory)
  return "column" if col == 0 else "row" if row == 0 else None


def scripted_extraction(trajectory, rng: random.Random) -> str:
  """The scripted reader's answer to the extraction prompt for ``trajectory``: the item of
  the side where the player fell (the other side's with probability `READ_ERROR`), or the
  generic item."""
  side = fell_on(trajectory)
  if side is None:
    return ANSWER_HEAD + GENERIC_ITEM
  if rng.random() < READ_ERROR:
    side = "row" if side == "column" else "column"
  return ANSWER_HEAD + ITEMS[side]


def scripted_knowledge(world: World, rng: random.Random, items: int) -> str:
  """A knowledge block as the loop accumulates one over a world's games: ``items`` items,
  each the world's side's (the other side's with probability `READ_ERROR`) or, one time in
  four and always on a lake without thin ice, the generic item."""
  lines = []
  for _ in range(items):
    side = world.side
    if side is None or rng.random() < 0.25:
      lines.append(GENERIC_ITEM)
      continue
    if rng.random() < READ_ERROR:
      side = "row" if side == "column" else "column"
    lines.append(ITEMS[side])
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Examples.


@dataclasses.dataclass(frozen=True)
class Example:
  """One (prompt, reply) pair of the curriculum."""

  skill: str
  """``"play"``, ``"play_with_knowledge"`` or ``"extract"``."""
  prompt: str
  """The user message, exactly as the loop sends it."""
  reply: str
  """The assistant's reply (trained on)."""
  world: World
  """The lake the example comes from."""


EXTRACTION = experience.ExtractionConfig(knowledge_format="structured", with_previous=False,
                                         enable_thinking=False)
"""The extraction settings the demo runs with (the paper's Fig. 10 prompt, no previous
experience shown, as the paper runs Qwen3-1.7B)."""

SKILLS = ("play", "play_with_knowledge", "extract")


def examples(seed: int, mix: Sequence[float] = (0.3, 0.35, 0.35)) -> Iterator[Example]:
  """An endless, seeded stream of curriculum examples, skills drawn with weights ``mix``.

  Boards come from seeds >= 10**6 * (seed + 1), so they never coincide with the loop's own
  board seeds for small seeds (any overlap would be harmless: without visible holes every
  board is the same).
  """
  rng = random.Random(seed)
  worlds = pretraining_worlds(rng)
  board = 10 ** 6 * (seed + 1)
  while True:
    skill = rng.choices(SKILLS, weights=mix)[0]
    world = next(worlds)
    board += 1
    if skill == "extract":
      # Half the games read are the uninformed player's (down first, as the demo's round 0),
      # half a player that tosses a coin for its first move, so that falls on both sides and
      # wins after either first move are read.
      first = None if rng.random() < 0.5 else rng.choice(("down", "right"))
      env = play(world, board, "", rng, first=first)
      trajectory = env.trajectory(_MODEL)
      yield Example(skill, experience.extraction_prompt(trajectory, "", EXTRACTION),
                    scripted_extraction(trajectory, rng), world)
      continue
    knowledge = ""
    if skill == "play_with_knowledge":
      # A block read on this lake, or (one time in four) on another, so that the block, not
      # the lake, decides the first move: the first board is the same on every lake.
      source = world if rng.random() < 0.75 else next(worlds)
      knowledge = scripted_knowledge(source, rng, rng.randint(1, 10))
    env = play(world, board, knowledge, rng)
    turns = env.turns
    # The first turn always (where knowledge decides), and one later turn.
    picked = [turns[0]] + ([rng.choice(turns[1:])] if len(turns) > 1 else [])
    for turn in picked:
      yield Example(skill, turn.prompt, turn.response, world)
