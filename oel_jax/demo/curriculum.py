"""The demo model's synthetic curriculum: scripted play and scripted extraction on remapped lakes.

The learning demo's model (``scripts/build_demo_model.py``) is trained from scratch on text
made here and nowhere else. Every example is a real prompt of the real game (`make_env`,
FrozenLake with a ``controls`` permutation and a ``lake`` name) or the paper's extraction
prompt filled by `oel_jax.experience`, followed by the reply a scripted player or reader
would give. Three skills, as an instruction-tuned model brings them to the paper's games:

1. **Play from the prompt** (no knowledge): head for the goal down the staircase of
   `wanted_direction` (the lakes have no holes, `DEMO_HOLES`), pressing the keys the player
   believes in: the lake's real controls for the few lakes the
   model "knows by name" (`KNOWN_LAKES`, like facts a pretrained model memorised), standard
   controls for every other lake.
2. **Play from knowledge**: with the paper's knowledge block in the prompt, press the key
   that the knowledge's items say makes the wanted move (items counted, so a majority wins
   over a wrong item; with no item about that move, the believed key).
3. **Extract**: answer the paper's structured extraction prompt (Fig. 10) with one or two
   ``- EXPERIENCE ITEM: To move <direction>, press [<key>].`` items (the move first, so that
   a player wanting a move finds the key right after it), each read from a turn
   whose next observation shows what the pressed key did, and each wrong with probability
   `READ_ERROR` (a reader of noisy trajectories).

Every reply is ``I move <direction>: [<key>]``: the wanted move, then the key. With
probability `EXPLORE` the player wants a random direction instead of the staircase's
(so its own games show the effects of every key).

Worlds. A world is a controls permutation and a lake name. The demo deploys into
`DEMO_CONTROLS` on lake `DEMO_LAKE`; neither that permutation nor that name appears anywhere
in the curriculum (`pretraining_worlds` excludes both, and a test checks every example).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import random
import re
from collections.abc import Iterator, Sequence

from oel_jax import experience
from oel_jax.envs import ModelInfo, build_prompt, make_env
from oel_jax.envs.textarena_games import DIRECTIONS, STANDARD_CONTROLS

DEMO_CONTROLS = "left,right,up,down"
"""The demo world: ``[up]`` moves left, ``[down]`` right, ``[left]`` up, ``[right]`` down."""

DEMO_LAKE = "Ossa"
"""The demo world's lake name (never seen in pretraining)."""

DEMO_HOLES = 0
"""Holes on every demo lake. The paper's FrozenLake has two; a lake without holes makes the
route a rule (`wanted_direction`) instead of a search over the board, which a model trained
for minutes on two CPU cores can learn, and leaves the controls as the thing to discover."""

KNOWN_LAKES = {
    "Brel": "down,up,left,right",
    "Fenwick": "right,left,down,up",
    "Iskra": "down,left,right,up",
    "Tolva": "up,right,down,left",
}
"""Lakes whose controls the model learns by name during pretraining (its "world facts")."""

EXPLORE = 0.2
"""Probability that the scripted player wants a random direction on a turn."""

KNOWLEDGE_EXPLORE = 0.6
"""Exploration of the player whose games the knowledge blocks of skill 2 are read from."""

READ_ERROR = 0.1
"""Probability that the scripted reader writes a wrong direction in an item."""

REPLY = "I move {direction}: [{key}]"
"""The scripted player's reply."""

ITEM = "- EXPERIENCE ITEM: To move {direction}, press [{key}]."
"""One item of knowledge about the controls."""

ANSWER_HEAD = "Additional Experience (Rules or Strategies):\n# Experience\n"
"""What the extraction answer opens with (the format the paper's Fig. 10 asks for)."""

GENERIC_ITEM = "- EXPERIENCE ITEM: Avoid the holes (H) and walk to the goal (G)."
"""The item the reader writes when no turn shows what a key did."""

_MODEL = ModelInfo("scripted-player")  # recorded in the scripted games' trajectories

_ITEM_RE = re.compile(r"To move (up|down|left|right), press \[(up|down|left|right)\]")
_EFFECT_RE = re.compile(r"You (?:moved|tried to move) (up|down|left|right)")

_SYLLABLES = ("ba", "da", "fe", "ga", "hi", "ka", "lo", "mi", "nu", "pe", "ra", "si", "to",
              "vu", "wen", "zor", "bel", "cor", "dun", "el", "fir", "gal", "hol", "ir", "jun",
              "kel", "lin", "mar", "nor", "ost", "pil", "quen", "ros", "sel", "tar", "ul",
              "var", "wyn", "yl", "zan")


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
    """What the model believes each key does with no knowledge in its prompt."""
    controls = KNOWN_LAKES.get(self.lake, STANDARD_CONTROLS)
    return dict(zip(DIRECTIONS, controls.split(",")))


def all_controls() -> list[str]:
  """The 24 permutations of the four moves, as controls strings, standard first."""
  return [",".join(p) for p in itertools.permutations(DIRECTIONS)]


def lake_name(rng: random.Random) -> str:
  """A random pronounceable lake name of two or three syllables."""
  name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 2, 3))))
  return name.capitalize()


def pretraining_worlds(rng: random.Random) -> Iterator[World]:
  """An endless stream of pretraining worlds; never the demo's controls or lake name.

  A quarter are the paper's unnamed standard lake, a quarter the known lakes, the rest
  random names with random controls (a third of them standard).
  """
  others = [c for c in all_controls() if c != DEMO_CONTROLS]
  while True:
    u = rng.random()
    if u < 0.25:
      yield World("", STANDARD_CONTROLS)
    elif u < 0.5:
      lake = rng.choice(sorted(KNOWN_LAKES))
      yield World(lake, KNOWN_LAKES[lake])
    else:
      name = lake_name(rng)
      if name == DEMO_LAKE or name in KNOWN_LAKES:
        continue
      controls = STANDARD_CONTROLS if rng.random() < 1 / 3 else rng.choice(others)
      yield World(name, controls)


def knowledge_worlds(rng: random.Random) -> Iterator[World]:
  """The worlds of the knowledge-following examples; never the demo's controls or lake name.

  Four in five have random non-standard controls (a random name or none), where only the
  knowledge block tells the player which key makes a move; the rest come from
  `pretraining_worlds`, where the knowledge agrees with what the player already believes.
  Drawing them like `pretraining_worlds` left most knowledge examples answerable without
  reading the block, and a model trained on that mix ignored it (0 of 16 Ossa prompts with
  all four items followed at step 600 of an 800-step build, 2-core Xeon).
  """
  others = [c for c in all_controls() if c not in (DEMO_CONTROLS, STANDARD_CONTROLS)]
  fallback = pretraining_worlds(rng)
  while True:
    if rng.random() >= 0.8:
      yield next(fallback)
      continue
    name = lake_name(rng) if rng.random() < 0.75 else ""
    if name == DEMO_LAKE or name in KNOWN_LAKES:
      continue
    yield World(name, rng.choice(others))


# ---------------------------------------------------------------------------------------------
# The scripted player.


def parse_knowledge(knowledge: str) -> dict[str, collections.Counter]:
  """Counts of ``To move <direction>, press [<key>]`` items: ``{direction: {key: count}}``."""
  counts: dict[str, collections.Counter] = {d: collections.Counter() for d in DIRECTIONS}
  for direction, key in _ITEM_RE.findall(knowledge or ""):
    counts[direction][key] += 1
  return counts


def key_distribution(direction: str, believed: dict[str, str], knowledge: str
                     ) -> dict[str, float]:
  """The scripted player's probability of pressing each key to move ``direction``.

  Keys in proportion to the knowledge's items that say they make that move; with none, the
  key it believes makes it.
  """
  named = parse_knowledge(knowledge)[direction]
  if named:
    total = sum(named.values())
    return {k: n / total for k, n in sorted(named.items())}
  return {next(k for k, d in believed.items() if d == direction): 1.0}


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


def scripted_extraction(trajectory, rng: random.Random) -> str:
  """The scripted reader's answer to the extraction prompt for ``trajectory``."""
  effects = sorted(set(observed_effects(trajectory)))
  if not effects:
    return ANSWER_HEAD + GENERIC_ITEM
  chosen = rng.sample(effects, min(len(effects), rng.choice((1, 2))))
  items = []
  for key, direction in chosen:
    if rng.random() < READ_ERROR:
      direction = rng.choice([d for d in DIRECTIONS if d != direction])
    items.append(ITEM.format(key=key, direction=direction))
  return ANSWER_HEAD + "\n".join(items)


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


def recall_drill(world: World, rng: random.Random) -> Example:
  """A short knowledge-following drill: the paper's knowledge prompt (Fig. 12) whose
  situation is one sentence naming the wanted move; the reply presses the key its items say.

  The knowledge is what a reader of noisy trajectories would write: 1 to 12 items about 1 to 4
  of the world's moves (each wrong with probability `READ_ERROR`), sometimes with the generic
  item, in random order. One in ten drills wants a move no item is about (the believed key).
  Drills teach skill 2 in a tenth of the tokens of a game prompt; the game examples of
  ``play_with_knowledge`` carry it over to real prompts.
  """
  truth = {d: k for k, d in zip(DIRECTIONS, world.controls.split(","))}
  covered = rng.sample(DIRECTIONS, rng.randint(1, 4))
  items = []
  for _ in range(rng.randint(len(covered), 12)):
    direction = rng.choice(covered)
    key = truth[direction]
    if rng.random() < READ_ERROR:
      key = rng.choice([k for k in DIRECTIONS if k != key])
    items.append(ITEM.format(direction=direction, key=key))
  if rng.random() < 0.2:
    items.append(GENERIC_ITEM)
  rng.shuffle(items)
  knowledge = "\n".join(items)
  uncovered = [d for d in DIRECTIONS if d not in covered]
  wanted = rng.choice(uncovered) if uncovered and rng.random() < 0.1 else rng.choice(covered)
  dist = key_distribution(wanted, world.believed(), knowledge)
  key = rng.choices(list(dist), weights=list(dist.values()))[0]
  prompt = build_prompt(DRILL_SITUATION.format(direction=wanted), knowledge)
  return Example("recall", prompt, REPLY.format(direction=wanted, key=key), world)


def examples(seed: int, mix: Sequence[float] = (0.2, 0.3, 0.15, 0.35)) -> Iterator[Example]:
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
