"""The demo model's synthetic curriculum: scripted play and scripted extraction on lakes
whose keys may be swapped.

The learning demo's model (``scripts/build_demo_model.py``) is trained from scratch on text
made here and nowhere else. Every example is a real prompt of the real game (`make_env`,
FrozenLake with a ``controls`` permutation and a ``lake`` name), the paper's knowledge prompt
around a one-line situation, or the paper's extraction prompt filled by `oel_jax.experience`,
followed by the reply a scripted player or reader would give. Skills, as an
instruction-tuned model brings them to the paper's games:

1. **Play from the prompt** (``play``, no knowledge): head for the goal down the staircase of
   `wanted_direction` (the lakes have no holes, `DEMO_HOLES`), pressing the key labelled with
   the wanted move.
2. **Play from knowledge** (``play_with_knowledge`` on game prompts, ``recall`` drills): with
   the paper's knowledge block in the prompt, press the opposite key of an axis in proportion
   to the items saying that axis is swapped (against those saying it works as labelled).
3. **Extract** (``extract``): answer the paper's structured extraction prompt (Fig. 10) with
   one item per axis whose effect the trajectory shows, ``- EXPERIENCE ITEM: [up] and [down]
   are swapped.`` or ``... work as labelled.``, each stating the opposite with probability
   `READ_ERROR` (a reader of noisy trajectories).

Every reply is ``I move <direction>: [<key>]``: the wanted move, then the key. With
probability `EXPLORE` the player wants a random direction instead of the staircase's
(so its own games show the effects of every key).

Worlds. A world is a controls permutation and a lake name. Pretraining lakes are standard or
swap one axis (`PRETRAINING_CONTROLS`). The demo deploys into `DEMO_CONTROLS`, both axes
swapped, on lake `DEMO_LAKE`; neither that permutation nor that name appears anywhere in the
curriculum (a test checks every example). Per-axis items are a design choice: a model of this
size trained for half an hour learned to act on the presence of an item, but not to look up a
per-key item (``To move down, press [right].``) by the move it wanted (0 of 16 prompts with
all four such items followed after 500 steps, 2-core Xeon, 2026-11-29).
"""

from __future__ import annotations

import collections
import dataclasses
import random
import re
from collections.abc import Iterator, Sequence

from oel_jax import experience
from oel_jax.envs import ModelInfo, build_prompt, make_env
from oel_jax.envs.textarena_games import DIRECTIONS, STANDARD_CONTROLS

DEMO_CONTROLS = "down,up,right,left"
"""The demo world: both axes swapped (``[up]`` moves down, ``[down]`` up, ``[left]`` right,
``[right]`` left). Pretraining has lakes with one axis swapped, never both."""

DEMO_LAKE = "Ossa"
"""The demo world's lake name (never seen in pretraining)."""

DEMO_HOLES = 0
"""Holes on every demo lake. The paper's FrozenLake has two; a lake without holes makes the
route a rule (`wanted_direction`) instead of a search over the board, which a model trained
for minutes on two CPU cores can learn, and leaves the controls as the thing to discover."""

SWAPS = {"vertical": ("up", "down"), "horizontal": ("left", "right")}
"""The two axes a lake may swap, with their keys."""

PRETRAINING_CONTROLS = ("up,down,left,right", "down,up,left,right", "up,down,right,left")
"""The controls of pretraining lakes: standard, vertical keys swapped, horizontal swapped."""

EXPLORE = 0.2
"""Probability that the scripted player wants a random direction on a turn."""

KNOWLEDGE_EXPLORE = 0.6
"""Exploration of the player whose games the knowledge blocks of skill 2 are read from."""

READ_ERROR = 0.1
"""Probability that the scripted reader states the opposite of what it saw about an axis."""

REPLY = "I move {direction}: [{key}]"
"""The scripted player's reply."""

ITEMS = {
    ("vertical", True): "- EXPERIENCE ITEM: [up] and [down] are swapped.",
    ("vertical", False): "- EXPERIENCE ITEM: [up] and [down] work as labelled.",
    ("horizontal", True): "- EXPERIENCE ITEM: [left] and [right] are swapped.",
    ("horizontal", False): "- EXPERIENCE ITEM: [left] and [right] work as labelled.",
}
"""The reader's items: (axis, swapped) -> the line it writes."""

ANSWER_HEAD = "Additional Experience (Rules or Strategies):\n# Experience\n"
"""What the extraction answer opens with (the format the paper's Fig. 10 asks for)."""

GENERIC_ITEM = "- EXPERIENCE ITEM: Avoid the holes (H) and walk to the goal (G)."
"""The item the reader writes when no turn shows what a key did."""

_MODEL = ModelInfo("scripted-player")  # recorded in the scripted games' trajectories

_EFFECT_RE = re.compile(r"You (?:moved|tried to move) (up|down|left|right)")

_SYLLABLES = ("ba", "da", "fe", "ga", "hi", "ka", "lo", "mi", "nu", "pe", "ra", "si", "to",
              "vu", "wen", "zor", "bel", "cor", "dun", "el", "fir", "gal", "hol", "ir", "jun",
              "kel", "lin", "mar", "nor", "ost", "pil", "quen", "ros", "sel", "tar", "ul",
              "var", "wyn", "yl", "zan")


def axis_of(direction: str) -> str:
  """``"vertical"`` or ``"horizontal"``."""
  return next(axis for axis, keys in SWAPS.items() if direction in keys)


def opposite(direction: str) -> str:
  """The other direction of the same axis."""
  a, b = SWAPS[axis_of(direction)]
  return b if direction == a else a


@dataclasses.dataclass(frozen=True)
class World:
  """One lake: its name and what its keys do."""

  lake: str
  """The name the first message shows ("" for the paper's unnamed lake)."""
  controls: str
  """What ``[up]``, ``[down]``, ``[left]``, ``[right]`` do (a `parse_controls` string)."""

  def settings(self) -> dict[str, object]:
    """`make_env` overrides for this world (every demo lake is free of holes)."""
    return {"controls": self.controls, "lake": self.lake, "num_holes": DEMO_HOLES}

  def believed(self) -> dict[str, str]:
    """What the player believes each key does with no knowledge in its prompt: the labels."""
    return dict(zip(DIRECTIONS, STANDARD_CONTROLS.split(",")))


DEMO_WORLD = World(DEMO_LAKE, DEMO_CONTROLS)
"""The world the demo deploys into (`DEMO_WORLD.settings()` are its `make_env` settings)."""

STANDARD_WORLD = World("", STANDARD_CONTROLS)
"""The demo's out-of-distribution check: the standard controls on the paper's unnamed lake,
with the demo lakes' other settings."""


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
  """An endless stream of pretraining worlds; never the demo's controls or lake name.

  Half are standard lakes, a quarter swap the vertical keys, a quarter the horizontal ones;
  three in four have a random name, the rest are the paper's unnamed lake.
  """
  while True:
    controls = rng.choice((PRETRAINING_CONTROLS[0],) + PRETRAINING_CONTROLS)
    yield World(_named(rng), controls)


def knowledge_worlds(rng: random.Random) -> Iterator[World]:
  """The worlds of the knowledge-following examples; never the demo's controls or lake name.

  Four in five swap one axis, where only the knowledge block tells the player which key
  makes a move; the rest are standard. A mix drawn like `pretraining_worlds` left most
  knowledge examples answerable without reading the block.
  """
  while True:
    swapped = rng.random() < 0.8
    controls = rng.choice(PRETRAINING_CONTROLS[1:]) if swapped else PRETRAINING_CONTROLS[0]
    yield World(_named(rng), controls)


# ---------------------------------------------------------------------------------------------
# The scripted player.


def parse_knowledge(knowledge: str) -> dict[str, collections.Counter]:
  """Counts of the reader's items per axis: ``{axis: {swapped: count}}``."""
  counts: dict[str, collections.Counter] = {axis: collections.Counter() for axis in SWAPS}
  for line in (knowledge or "").splitlines():
    for (axis, swapped), item in ITEMS.items():
      if line.strip() == item:
        counts[axis][swapped] += 1
  return counts


def key_distribution(direction: str, believed: dict[str, str], knowledge: str
                     ) -> dict[str, float]:
  """The scripted player's probability of pressing each key to move ``direction``.

  The opposite key in proportion to the items saying the direction's axis is swapped (against
  those saying it works as labelled); with no item about the axis, the key it believes in.
  """
  said = parse_knowledge(knowledge)[axis_of(direction)]
  plain = next(k for k, d in believed.items() if d == direction)
  total = said[True] + said[False]
  if not total:
    return {plain: 1.0}
  dist = {opposite(plain): said[True] / total, plain: said[False] / total}
  return {k: p for k, p in sorted(dist.items()) if p > 0}


def wanted_direction(position: Sequence[int]) -> str:
  """The move a player wants on a lake without holes: down on or above the diagonal, else
  right. From the top-left corner that walks the staircase down, right, down, right to the
  goal in the bottom-right corner; after a wrong move it heads back to the staircase."""
  row, col = position
  return "down" if row <= col else "right"


def scripted_reply(env, world: World, knowledge: str, rng: random.Random,
                   explore: float | None = None) -> str:
  """The scripted player's reply on the env's current turn (a random wanted move with
  probability ``explore``, default `EXPLORE`)."""
  if rng.random() < (EXPLORE if explore is None else explore):
    direction = rng.choice(DIRECTIONS)
  else:
    direction = wanted_direction(env.textarena_env.state.game_state["player_pos"])
  dist = key_distribution(direction, world.believed(), knowledge)
  key = rng.choices(list(dist), weights=list(dist.values()))[0]
  return REPLY.format(direction=direction, key=key)


def play(world: World, board_seed: int, knowledge: str, rng: random.Random,
         explore: float | None = None):
  """Plays one scripted game; returns the finished env (its turns hold every prompt)."""
  env = make_env("frozenlake", seed=board_seed, knowledge=knowledge or None, **world.settings())
  env.reset()
  while not env.done:
    env.step(scripted_reply(env, world, knowledge, rng, explore))
  return env


# ---------------------------------------------------------------------------------------------
# The scripted reader.


def observed_effects(trajectory) -> list[tuple[str, str]]:
  """(key, direction) for every turn whose next observation shows the pressed key's move."""
  effects = []
  turns = trajectory.turns
  for turn, after in zip(turns, turns[1:]):
    key = turn.action.strip("[]")
    seen = _EFFECT_RE.search(after.observation)
    if key in DIRECTIONS and seen:
      effects.append((key, seen.group(1)))
  return effects


def observed_axes(trajectory) -> list[tuple[str, bool]]:
  """(axis, swapped) for every turn whose next observation shows what the pressed key did."""
  return [(axis_of(key), move != key) for key, move in observed_effects(trajectory)]


def scripted_extraction(trajectory, rng: random.Random) -> str:
  """The scripted reader's answer to the extraction prompt for ``trajectory``: one item per
  axis it saw (one or two), each stating the opposite with probability `READ_ERROR`."""
  seen = sorted(set(observed_axes(trajectory)))
  if not seen:
    return ANSWER_HEAD + GENERIC_ITEM
  items = []
  for axis, swapped in rng.sample(seen, len(seen)):
    if rng.random() < READ_ERROR:
      swapped = not swapped
    items.append(ITEMS[(axis, swapped)])
  return ANSWER_HEAD + "\n".join(dict.fromkeys(items))


def scripted_knowledge(world: World, rng: random.Random, games: int, board_seed: int,
                       explore: float | None = None) -> str:
  """Knowledge as the loop would accumulate it: the reader's items over ``games`` games of a
  player that explores with probability ``explore``."""
  knowledge = ""
  for g in range(games):
    env = play(world, board_seed + g, "", rng, explore)
    answer = scripted_extraction(env.trajectory(_MODEL), rng)
    knowledge = experience.accumulate(knowledge, experience.parse_extraction(
        answer, "structured"))
  return knowledge


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

SKILLS = ("play", "play_with_knowledge", "extract", "recall")

DRILL_SITUATION = "You want to move {direction}."
"""The situation of a recall drill (in place of the board history)."""


def swapped_axes(world: World) -> dict[str, bool]:
  """Whether each axis of ``world`` is swapped."""
  does = dict(zip(DIRECTIONS, world.controls.split(",")))
  return {axis: does[keys[0]] == keys[1] for axis, keys in SWAPS.items()}


def recall_drill(world: World, rng: random.Random) -> Example:
  """A short knowledge-following drill: the paper's knowledge prompt (Fig. 12) whose
  situation is one sentence naming the wanted move; the reply presses the key its items say.

  The knowledge is what a reader of noisy trajectories would write: 1 to 8 items about one
  or both axes (each stating the opposite with probability `READ_ERROR`), sometimes with the
  generic item, in random order. Drills teach skill 2 in a third of the tokens of a game
  prompt; the game examples of ``play_with_knowledge`` carry it over to real prompts.
  """
  truth = swapped_axes(world)
  axes = rng.sample(sorted(SWAPS), rng.randint(1, 2))
  items = []
  for _ in range(rng.randint(len(axes), 8)):
    axis = rng.choice(axes)
    items.append(ITEMS[(axis, truth[axis] != (rng.random() < READ_ERROR))])
  if rng.random() < 0.2:
    items.append(GENERIC_ITEM)
  rng.shuffle(items)
  knowledge = "\n".join(items)
  wanted = rng.choice(DIRECTIONS)
  dist = key_distribution(wanted, world.believed(), knowledge)
  key = rng.choices(list(dist), weights=list(dist.values()))[0]
  prompt = build_prompt(DRILL_SITUATION.format(direction=wanted), knowledge)
  return Example("recall", prompt, REPLY.format(direction=wanted, key=key), world)


def examples(seed: int, mix: Sequence[float] = (0.2, 0.25, 0.25, 0.3)) -> Iterator[Example]:
  """An endless, seeded stream of curriculum examples, skills drawn with weights ``mix``.

  Boards come from seeds >= 10**6 * (seed + 1), so they never coincide with the loop's own
  board seeds for small seeds (any overlap would be harmless: a board says nothing about a
  world's controls).
  """
  rng = random.Random(seed)
  worlds = pretraining_worlds(rng)
  informed_worlds = knowledge_worlds(rng)
  board = 10 ** 6 * (seed + 1)
  while True:
    skill = rng.choices(SKILLS, weights=mix)[0]
    world = next(informed_worlds if skill in ("play_with_knowledge", "recall") else worlds)
    if skill == "recall":
      yield recall_drill(world, rng)
      continue
    board += 100
    if skill == "extract":
      knowledge = ""
      if rng.random() < 0.3:
        knowledge = scripted_knowledge(world, rng, rng.randint(1, 6), board + 50)
      env = play(world, board, knowledge, rng)
      trajectory = env.trajectory(_MODEL)
      yield Example(skill, experience.extraction_prompt(trajectory, "", EXTRACTION),
                    scripted_extraction(trajectory, rng), world)
      continue
    knowledge = ""
    if skill == "play_with_knowledge":
      # Games of a more curious player, so that the block often names the key of the move
      # the player wants (read from the player's own games, it rarely does: those press the
      # keys it believes in, which on a surprising lake make other moves).
      knowledge = scripted_knowledge(world, rng, rng.randint(3, 10), board + 50,
                                     KNOWLEDGE_EXPLORE)
      if not knowledge:
        continue
    env = play(world, board, knowledge, rng)
    for turn in rng.sample(env.turns, min(2, len(env.turns))):
      yield Example(skill, turn.prompt, turn.response, world)
