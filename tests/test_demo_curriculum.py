"""Tests for oel_jax.demo.curriculum: the demo model's synthetic training data.

References: the BFS solver that reads boards only from the prompt text (tests/bfs_solver.py)
for the scripted player's route, TextArena's own game state for where a game ended, and each
world's ``thin_ice`` setting for what the reader should write.
"""

import collections
import random

import pytest

import bfs_solver
from oel_jax import experience
from oel_jax.demo import curriculum as cur
from oel_jax.envs import ModelInfo


@pytest.fixture(scope="module")
def sample():
  stream = cur.examples(seed=7)
  return [next(stream) for _ in range(240)]


def test_the_demo_world_never_appears(sample):
  assert {e.skill for e in sample} == set(cur.SKILLS)
  for e in sample:
    assert e.world.thin_ice != cur.DEMO_THIN_ICE and e.world.lake != cur.DEMO_LAKE
    assert cur.DEMO_LAKE not in e.prompt
  worlds = cur.pretraining_worlds(random.Random(0))
  seen = [next(worlds) for _ in range(3000)]
  assert {w.thin_ice for w in seen} == set(cur.PRETRAINING_THIN_ICE)
  assert cur.DEMO_THIN_ICE not in cur.PRETRAINING_THIN_ICE
  assert cur.DEMO_LAKE not in {w.lake for w in seen} and len({w.lake for w in seen}) > 500
  sides = collections.Counter(w.side for w in seen)
  assert all(900 < sides[side] < 1100 for side in (None, "column", "row")), sides
  # One first move is always safe: no layout has thin ice on both sides of the start.
  for layout in cur.PRETRAINING_THIN_ICE + (cur.DEMO_THIN_ICE,):
    assert not ({(1, 0), (0, 1)} <= set(layout))


def test_prompts_are_the_games_own(sample):
  for e in sample:
    if e.skill == "extract":
      assert e.prompt.startswith("You are an AI language model that continuously refines")
      assert experience.parse_extraction(e.reply, "structured")
    else:
      assert e.prompt.endswith("(Remember to wrap your final answer of the action in square "
                               "brackets)")
      assert ("Given experience for rules or strategies" in e.prompt) == (
          e.skill == "play_with_knowledge")
      assert e.reply.startswith("I move ")
    # The board never shows thin ice: it is found only by falling through it.
    assert "|  H  |" not in e.prompt


def test_scripted_player_walks_the_staircase_and_falls_on_thin_ice(monkeypatch):
  monkeypatch.setattr(cur, "EXPLORE", 0.0)
  rng = random.Random(1)
  for seed in range(10):
    env = cur.play(cur.World("Brel"), seed, "", rng, explore=0.0)
    # The reference: a BFS over the board text; on an empty 3x3 lake every route has 4 moves.
    shortest = bfs_solver.solve_frozenlake(env.turns[0].prompt)
    assert env.outcome().success and len(env.turns) == len(shortest) == 4
    assert [turn.action for turn in env.turns] == ["[down]", "[right]", "[down]", "[right]"]
    assert not any("H" in row for row in bfs_solver.parse_frozenlake(env.turns[0].prompt)[0])
  # Without knowledge it moves down first, so thin ice below the start ends every game.
  for layout in ((1, 0),), cur.DEMO_THIN_ICE:
    env = cur.play(cur.World("Zanfir", layout), 0, "", rng, explore=0.0)
    assert not env.outcome().success and len(env.turns) == 1
    assert "fell into a hole" in env.outcome().reason
    assert tuple(env.textarena_env.state.game_state["player_pos"]) == (1, 0)


def test_scripted_player_makes_the_first_move_the_majority_of_items_calls_for():
  column, row = cur.ITEMS["column"], cur.ITEMS["row"]
  assert cur.first_move(f"{column}\n{cur.GENERIC_ITEM}\n{column}\n{row}") == "right"
  assert cur.first_move(f"{row}\n{row}\n{column}") == "down"
  assert cur.first_move(f"{row}\n{column}") == "down"  # a tie: the staircase
  assert cur.first_move(cur.GENERIC_ITEM) == cur.first_move("") == "down"
  rng = random.Random(2)
  for world, knowledge in ((cur.DEMO_WORLD, column), (cur.MIRROR_WORLD, row),
                           (cur.STANDARD_WORLD, column)):
    for seed in range(5):
      env = cur.play(world, seed, knowledge, rng, explore=0.0)
      assert env.outcome().success, (world, knowledge)
      assert env.turns[0].action == f"[{cur.first_move(knowledge)}]"
  # The wrong block on the mirror lake: right first, through the thin top row.
  assert not cur.play(cur.MIRROR_WORLD, 0, column, rng, explore=0.0).outcome().success


def test_reader_writes_where_the_player_fell_with_the_stated_error_rate():
  rng = random.Random(3)
  right = wrong = generic = 0
  for seed in range(700):
    world = cur.World("Zanfir", cur.PRETRAINING_THIN_ICE[1 + seed % 5])
    env = cur.play(world, seed, "", rng, explore=0.5)
    trajectory = env.trajectory(ModelInfo("scripted"))
    # The reader's replay of the moves ends where TextArena's state says the player stands.
    assert cur.final_position(trajectory) == tuple(
        env.textarena_env.state.game_state["player_pos"])
    answer = cur.scripted_extraction(trajectory, rng)
    assert answer.startswith(cur.ANSWER_HEAD)
    items = experience.parse_items(answer)
    assert len(items) == 1
    fell = "fell into a hole" in env.outcome().reason
    if not fell:
      assert items[0] == cur.GENERIC_ITEM
      generic += 1
      continue
    said = next(side for side, item in cur.ITEMS.items() if item == items[0])
    right += said == world.side
    wrong += said != world.side
  assert right + wrong > 180 and generic > 100
  assert abs(wrong / (right + wrong) - cur.READ_ERROR) < 0.06


def test_scripted_knowledge_is_the_worlds_side_with_noise():
  rng = random.Random(4)
  counts = collections.Counter()
  for _ in range(200):
    counts.update(cur.parse_knowledge(cur.scripted_knowledge(cur.World("", ((2, 0),)), rng, 8)))
  assert counts["row"] / (counts["row"] + counts["column"]) == pytest.approx(cur.READ_ERROR,
                                                                             abs=0.03)
  assert not cur.parse_knowledge(cur.scripted_knowledge(cur.STANDARD_WORLD, rng, 8))


def test_the_curriculum_is_a_function_of_its_seed(sample):
  again = cur.examples(seed=7)
  assert [next(again) for _ in range(40)] == sample[:40]
  other = cur.examples(seed=8)
  assert [next(other) for _ in range(40)] != sample[:40]
