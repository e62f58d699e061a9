"""Tests for oel_jax.demo.curriculum: the demo model's synthetic training data.

References: the BFS solver that reads boards only from the prompt text (tests/bfs_solver.py)
for the scripted player, and the env's own controls for what the reader writes.
"""

import collections
import random
import re

import pytest

import bfs_solver
from oel_jax import experience
from oel_jax.demo import curriculum as cur
from oel_jax.envs import ModelInfo, build_prompt, make_env
from oel_jax.envs.textarena_games import DIRECTIONS

MOVES = ("up", "down", "left", "right")


@pytest.fixture(scope="module")
def sample():
  stream = cur.examples(seed=7)
  return [next(stream) for _ in range(240)]


def test_the_demo_world_never_appears(sample):
  assert {e.skill for e in sample} == set(cur.SKILLS)
  for e in sample:
    assert e.world.controls != cur.DEMO_CONTROLS and e.world.lake != cur.DEMO_LAKE
    assert cur.DEMO_LAKE not in e.prompt
  rng = random.Random(0)
  worlds = cur.pretraining_worlds(rng)
  seen = [next(worlds) for _ in range(3000)]
  # Standard lakes and lakes with one axis swapped; never both (the demo's).
  assert {w.controls for w in seen} == set(cur.PRETRAINING_CONTROLS)
  assert cur.DEMO_CONTROLS not in cur.PRETRAINING_CONTROLS
  assert cur.swapped_axes(cur.World("", cur.DEMO_CONTROLS)) == {"vertical": True,
                                                                "horizontal": True}
  assert len({w.lake for w in seen}) > 500
  informed = cur.knowledge_worlds(random.Random(0))
  seen = [next(informed) for _ in range(3000)]
  assert cur.DEMO_CONTROLS not in {w.controls for w in seen}
  assert cur.DEMO_LAKE not in {w.lake for w in seen}
  # Most knowledge examples are on lakes where only the block says which key makes a move.
  surprising = sum(any(cur.swapped_axes(w).values()) for w in seen)
  assert 0.75 < surprising / len(seen) < 0.85


def test_prompts_are_the_games_own(sample):
  for e in sample:
    if e.skill == "extract":
      assert e.prompt.startswith("You are an AI language model that continuously refines")
      assert experience.parse_extraction(e.reply, "structured")
    else:
      assert e.prompt.endswith("(Remember to wrap your final answer of the action in square "
                               "brackets)")
      assert ("Given experience for rules or strategies" in e.prompt) == (
          e.skill in ("play_with_knowledge", "recall"))
      assert e.reply.startswith("I move ")
    if e.skill == "recall":  # the paper's knowledge prompt around a one-line situation
      move = re.search(r"I move (\w+):", e.reply).group(1)
      knowledge = e.prompt.split("learned:\n", 1)[1].split("\n\nCurrent situation:", 1)[0]
      assert e.prompt == build_prompt(cur.DRILL_SITUATION.format(direction=move), knowledge)
      key = re.search(r"\[(\w+)\]$", e.reply).group(1)
      assert cur.key_distribution(move, e.world.believed(), knowledge).get(key, 0) > 0


def _believed_key(world, move, knowledge=""):
  dist = cur.key_distribution(move, world.believed(), knowledge)
  return max(dist, key=dist.get)


def test_scripted_player_walks_the_staircase_with_the_keys_it_believes(monkeypatch):
  monkeypatch.setattr(cur, "EXPLORE", 0.0)
  rng = random.Random(1)
  world = cur.World("Brel", "up,down,left,right")
  for seed in range(20):
    env = cur.play(world, seed, "", rng)
    # The reference: a BFS over the board text; on an empty 3x3 lake every route has 4 moves.
    shortest = bfs_solver.solve_frozenlake(env.turns[0].prompt)
    assert env.outcome().success and len(env.turns) == len(shortest) == 4
    moves = [turn.response.split()[2].rstrip(":") for turn in env.turns]
    assert moves == ["down", "right", "down", "right"]
    for turn, move in zip(env.turns, moves):
      assert turn.action == f"[{move}]"
      assert "H" not in bfs_solver.parse_frozenlake(turn.prompt)[0][1]
  # A lake with swapped vertical keys: the player presses the labels and fails.
  stranger = cur.World("Zanfir", "down,up,left,right")
  assert not any(cur.play(stranger, s, "", rng).outcome().success for s in range(10))


def test_scripted_player_follows_knowledge_items_by_majority(monkeypatch):
  monkeypatch.setattr(cur, "EXPLORE", 0.0)
  world = cur.World("Zanfir", "down,up,right,left")
  swapped_v, plain_v = cur.ITEMS[("vertical", True)], cur.ITEMS[("vertical", False)]
  swapped_h = cur.ITEMS[("horizontal", True)]
  knowledge = f"{swapped_v}\n{cur.GENERIC_ITEM}\n{swapped_v}\n{plain_v}"
  assert cur.key_distribution("down", world.believed(), knowledge) == {
      "up": pytest.approx(2 / 3), "down": pytest.approx(1 / 3)}
  # No item about an axis: the labelled key.
  assert cur.key_distribution("right", world.believed(), knowledge) == {"right": 1.0}
  assert cur.key_distribution("left", world.believed(), swapped_h) == {"right": 1.0}
  rng = random.Random(2)
  both = f"{swapped_v}\n{swapped_h}"
  wins = sum(cur.play(world, s, both, rng).outcome().success for s in range(10))
  assert wins == 10
  assert not any(cur.play(world, s, swapped_v, rng).outcome().success for s in range(10))


def test_reader_writes_what_the_trajectory_shows_with_the_stated_error_rate():
  rng = random.Random(3)
  world = cur.World("Zanfir", "down,up,left,right")
  does = dict(zip(MOVES, world.controls.split(",")))
  truth = {"vertical": True, "horizontal": False}
  statements = {item: key for key, item in cur.ITEMS.items()}
  right = wrong = 0
  for seed in range(150):
    trajectory = cur.play(world, seed, "", rng).trajectory(ModelInfo("scripted"))
    for key, move in cur.observed_effects(trajectory):
      assert does[key] == move  # the reader's evidence is what the key really did
    answer = cur.scripted_extraction(trajectory, rng)
    assert answer.startswith(cur.ANSWER_HEAD)
    for item in experience.parse_items(answer):
      if item in statements:
        axis, swapped = statements[item]
        right += swapped == truth[axis]
        wrong += swapped != truth[axis]
  assert right + wrong > 150
  assert abs(wrong / (right + wrong) - cur.READ_ERROR) < 0.06


def test_the_curriculum_is_a_function_of_its_seed(sample):
  again = cur.examples(seed=7)
  assert [next(again) for _ in range(40)] == sample[:40]
  other = cur.examples(seed=8)
  assert [next(other) for _ in range(40)] != sample[:40]
