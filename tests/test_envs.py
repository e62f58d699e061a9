"""Tests for oel_jax.envs: the paper's games over TextArena.

The reference for game play is a BFS solver that reads the board only from the prompt text
(tests/bfs_solver.py); the reference for the prompt text is the official implementation's
output (microsoft/LMOps oel/, literals below, produced by running its prompt-building code on
TextArena 0.7.4).
"""
# pylint: disable=line-too-long

import random

import numpy as np
import pytest

import bfs_solver
from oel_jax import prompts
from oel_jax.envs import (
    FINAL_FEEDBACK,
    NO_ACTION,
    TURN_LIMIT_FEEDBACK,
    Environment,
    ModelInfo,
    Trajectory,
    insert_knowledge,
    make_env,
    parse_action,
)

# ---------------------------------------------------------------------------------------------
# The BFS solver wins every map whose shortest solution fits the turn limit.


def _check_board_matches_internal(env, prompt):
  """The board the prompt shows last is TextArena's actual state."""
  ta = env.textarena_env
  if env.spec.id == "frozenlake":
    grid, player = bfs_solver.parse_frozenlake(prompt)
    assert player == tuple(ta.state.game_state["player_pos"])
    assert grid == [[c if c in "HG" else " " for c in row] for row in ta.state.game_state["grid"]]
  else:
    walls, goals, boxes, player = bfs_solver.parse_sokoban(prompt)
    room, fixed = ta.room_state, ta.room_fixed
    assert walls == {tuple(p) for p in np.argwhere(room == 0)}
    assert boxes == {tuple(p) for p in np.argwhere((room == 3) | (room == 4))}
    assert player == tuple(np.argwhere(room == 5)[0])
    assert goals == {tuple(p) for p in np.argwhere(fixed == 2)}


@pytest.mark.parametrize("game,seeds,overrides,min_wins,min_too_long", [
    ("frozenlake", range(200), {}, 200, 0),  # 3x3: every shortest path has 4 moves.
    ("frozenlake", range(1000, 1040), {"size": 4, "num_holes": 3, "max_turns": 7}, 40, 0),
    ("frozenlake", range(1000, 1020), {"size": 4, "num_holes": 3}, 0, 20),  # 6 moves > 5.
    ("sokoban", range(200), {}, 150, 10),
    ("sokoban", range(2000, 2060), {"max_turns": 7}, 40, 1),
])
def test_bfs_solver_wins_every_map_that_fits_the_turn_limit(game, seeds, overrides, min_wins,
                                                            min_too_long):
  solve = bfs_solver.solve_frozenlake if game == "frozenlake" else bfs_solver.solve_sokoban
  rng = random.Random(0)
  wins = fits = too_long = 0
  for seed in seeds:
    env = make_env(game, seed=seed, **overrides)
    prompt = env.reset()
    shortest = solve(prompt)
    while not env.done:
      _check_board_matches_internal(env, prompt)
      plan = solve(prompt)
      move = plan[0] if plan else "up"
      prompt, done = env.step(bfs_solver.response_for(move, rng))
      assert done == env.done and (prompt == "") == done
      assert env.turns[-1].action == f"[{move}]"  # The last bracketed action counted.
    outcome = env.outcome()
    limit = env.max_turns
    if shortest is not None and len(shortest) <= limit:
      fits += 1
      assert outcome.success, (seed, shortest, outcome)
      assert outcome.reward == 1.0
      assert len(env.turns) == len(shortest)
      assert env.final_feedback == FINAL_FEEDBACK.format(result="Success", reason=outcome.reason)
      wins += outcome.success
    else:
      too_long += 1
      assert not outcome.success and outcome.reward == 0.0
      assert len(env.turns) == limit
      assert outcome.reason == env.final_feedback == TURN_LIMIT_FEEDBACK
  # The seed sets exercise both branches (so this test cannot pass vacuously).
  assert wins == fits >= min_wins and too_long >= min_too_long, (wins, fits, too_long)


# ---------------------------------------------------------------------------------------------
# Prompt shape.


def _textarena_rules(game):
  """TextArena's own rules paragraph, straight from the installed TextArena."""
  env = make_env(game, seed=0)
  env.reset()
  ta = env.textarena_env
  if game == "frozenlake":
    return ta._prompt(player_id=0, game_state=ta.state.game_state)  # pylint: disable=protected-access
  return ta._generate_player_prompt(player_id=0, game_state=ta.state.game_state)  # pylint: disable=protected-access


@pytest.mark.parametrize("game", ["frozenlake", "sokoban"])
def test_prompt_hides_textarena_rules_and_shows_the_task_description(game):
  task = prompts.load("task_description")
  rules = _textarena_rules(game)
  # The rules' own sentences: every line not also part of the paper's task description.
  sentences = [s.strip() for s in rules.split("\n") if s.strip()]
  sentences = [s for s in sentences if s not in task]
  assert len(sentences) >= 6
  assert prompts.load(f"{game}_rules").strip() in rules  # Our copy matches TextArena's text.
  env = make_env(game, seed=5)
  seen = [env.reset()]
  for response in ["[up]", "[left]", "[down]", "[right]", "[up]"]:
    if env.done:
      break
    prompt, _ = env.step(response)
    seen.append(prompt or env.turns[-1].prompt)
  for prompt in seen:
    for sentence in sentences:
      assert sentence not in prompt
    assert "\nCurrent situation:\n[GAME] " + task in prompt
    assert prompt.startswith("You are an agent playing a game on a grid, acting as a reasoning engine.\n\n")
    assert prompt.endswith("\n\n\nWhat action do you take? (Remember to wrap your final answer of the action in square brackets)")
    assert prompt.count(task) == 1
  for turn in env.turns:  # The extractor's per-turn inputs carry no rules either.
    for sentence in sentences:
      assert sentence not in turn.observation


def test_prompts_match_the_official_implementation_exactly():
  env = make_env("frozenlake", seed=0)
  env.reset()
  env.step("[down]")
  prompt, _ = env.step("[left]")
  assert prompt == FROZENLAKE_SEED0_TURN2
  env = make_env("sokoban", seed=0, knowledge="- EXPERIENCE ITEM: Push boxes from behind.")
  env.reset()
  env.step("[right]")
  prompt, _ = env.step("[left]")
  assert prompt == SOKOBAN_SEED0_TURN2_KNOWLEDGE
  # The per-turn observations, as the official extractor input records them.
  assert [t.observation for t in env.turns] == [
      "[GAME] \n        \n[GAME] Current Board:\n\n# # # # # #\n# _ _ O _ #\n# # _ _ _ #\n# # # X _ #\n# # # P _ #\n# # # # # #\n\nAvailable Moves: up, down, left, right",
      "[GAME] You  moved [right].\n[GAME] Current Board:\n\n# # # # # #\n# _ _ O _ #\n# # _ _ _ #\n# # # X _ #\n# # # _ P #\n# # # # # #\n\nAvailable Moves: up, down, left, right",
  ]


@pytest.mark.parametrize("game", ["frozenlake", "sokoban"])
def test_knowledge_block_appears_only_when_knowledge_is_given(game):
  knowledge = "- EXPERIENCE ITEM: Holes are deadly.\n- EXPERIENCE ITEM: {braces} are kept."
  marker = "Given experience for rules or strategies you have learned:\n"
  plain, empty, with_k = (make_env(game, seed=3), make_env(game, seed=3, knowledge=""),
                          make_env(game, seed=3, knowledge=knowledge))
  prompts_ = [[e.reset()] for e in (plain, empty, with_k)]
  for response in ["[right]", "[down]"]:
    for env, seen in zip((plain, empty, with_k), prompts_):
      if not env.done:
        seen.append(env.step(response)[0])
  for p_plain, p_empty, p_k in zip(*prompts_):
    if not p_plain:
      continue
    assert marker not in p_plain and "experience" not in p_plain
    assert p_empty == p_plain
    assert f"{marker}{knowledge}\n\nCurrent situation:\n" in p_k
    assert p_k == insert_knowledge(p_plain, knowledge)
    assert p_k.count(knowledge) == 1
  with pytest.raises(ValueError, match="knowledge-free"):
    insert_knowledge(prompts_[2][0], knowledge)


# ---------------------------------------------------------------------------------------------
# Action parsing and invalid responses.


def test_parse_action_takes_the_last_bracketed_action():
  assert parse_action("[up] then [down]") == "[down]"
  assert parse_action("I'd go [left]... no: [d]") == "[right]"
  assert parse_action("[w]") == "[up]" and parse_action("[a]") == "[left]"
  assert parse_action("[s]") == "[down]" and parse_action("x[right]y") == "[right]"
  assert parse_action("[up][left]") == "[left]"
  assert parse_action("[left] but not [Up], [UP], [ up ], [jump] or [north]") == "[left]"
  for none in ["", "up", "[Up]", "[ up ]", "[jump]", "[upp]", "(up)", "[", "]]][[["]:
    assert parse_action(none) == NO_ACTION
  with pytest.raises(TypeError):
    parse_action(None)


def _invalid(reason):
  return (f"You attempted an invalid move. Reason: {reason} Please resubmit a valid move and "
          "remember to follow the game rules to avoid penalties.")


FL_FORMAT = "Invalid action format. Use [up], [down], [left], [right] or [w], [a], [s], [d]."
SK_FORMAT = ("The submitted move does not follow the correct format. Use [up], [down], [left], "
             "[right] or [w], [a], [s], [d].")


@pytest.mark.parametrize("game,first,second,reason", [
    ("frozenlake", "I am not sure what to do.", "[jump]", FL_FORMAT),
    ("frozenlake", "<think>[UP]?</think> [ up ]", "", FL_FORMAT),
    ("frozenlake", "Going [up].", "[w]", "You tried to move up but hit a wall!"),
    ("sokoban", "no idea", "[north]", SK_FORMAT),
])
def test_a_second_invalid_move_ends_the_game(game, first, second, reason):
  env = make_env(game, seed=0)
  env.reset()
  prompt, done = env.step(first)
  assert not done
  assert f"[GAME] {_invalid(reason)}" in prompt
  prompt, done = env.step(second)
  # Recorded: the second turn's observation is the game's complaint about the first response.
  assert env.turns[1].observation.lstrip("\n").startswith(f"[GAME] {_invalid(reason)}")
  assert done and prompt == ""
  outcome = env.outcome()
  assert outcome.reason == f"Invalid Move: {reason}"
  assert not outcome.success and outcome.reward == 0.0  # Partial credit: no progress made.
  assert env.final_feedback == f"Summary:\nFinal Result: Failure\nFeedback: Invalid Move: {reason}\n"
  t = env.trajectory(ModelInfo("m"))
  assert [turn.response for turn in t.turns] == [first, second]
  assert [turn.action for turn in t.turns] == [parse_action(first), parse_action(second)]
  assert Trajectory.from_json(t.to_json()) == t
  with pytest.raises(RuntimeError, match="over"):
    env.step("[down]")


def test_sokoban_wall_twice_and_valid_move_resets_the_count():
  wall_dir = None
  for seed in range(50):
    env = make_env("sokoban", seed=seed)
    prompt = env.reset()
    walls, _, _, (r, c) = bfs_solver.parse_sokoban(prompt)
    for move, (dr, dc) in bfs_solver.MOVES.items():
      if (r + dr, c + dc) in walls:
        wall_dir = move
    if wall_dir:
      break
  assert wall_dir
  prompt, done = env.step(f"[{wall_dir}]")
  assert not done and _invalid("You cannot move into a wall!") in prompt
  prompt, done = env.step(f"bump [{wall_dir}] again")
  assert done and env.outcome().reason == "Invalid Move: You cannot move into a wall!"
  # invalid, valid, invalid: the valid move in between resets TextArena's error count.
  env = make_env("frozenlake", seed=0)
  env.reset()
  assert env.step("[up]") == (env.prompt, False)
  assert not env.step("[down]")[1]
  assert not env.step("[left]")[1]
  assert env.step("[left]")[1]
  assert env.outcome().reason == "Invalid Move: You tried to move left but hit a wall!"


@pytest.mark.parametrize("game", ["frozenlake", "sokoban"])
def test_odd_responses_never_raise(game):
  odd = ["", " ", "[", "]", "][", "\x00\ufffd", "</think>", "\u2028[\u2028up\u2028]", "x" * 100_000,
         "[up" * 1000, "[[up]]"]
  for seed in range(8):
    env = make_env(game, seed=seed)
    env.reset()
    for i in range(10):
      if env.done:
        break
      env.step(odd[(seed + i) % len(odd)])
    assert env.done and isinstance(env.outcome().reason, str)
  with pytest.raises(TypeError, match="string"):
    make_env(game, seed=0).step(None)


def test_partial_credit_is_a_failure():
  env = make_env("frozenlake", seed=0)  # Holes at (1, 1) and (2, 1).
  env.reset()
  env.step("[down]")
  assert env.step("Into the hole: [right]") == ("", True)
  outcome = env.outcome()
  assert outcome.reward == 0.5 and not outcome.success  # TextArena's partial credit.
  assert outcome.reason == "You fell into a hole! Game over. You completed 50% of the journey to the goal."
  assert env.final_feedback == (
      "Summary:\nFinal Result: Failure\nFeedback: You fell into a hole! Game over. "
      "You completed 50% of the journey to the goal.\n")


def test_turn_limit():
  env = make_env("frozenlake", seed=0)  # (1, 0) is safe: down/up forever.
  env.reset()
  for i, move in enumerate(["[down]", "[up]", "[down]", "[up]", "[down]"]):
    assert env.max_turns == 5
    with pytest.raises(RuntimeError, match="not over"):
      env.outcome()
    prompt, done = env.step(move)
    assert done == (i == 4)
  assert env.outcome().reason == TURN_LIMIT_FEEDBACK == env.final_feedback
  assert env.outcome().reward == 0.0 and not env.outcome().success
  env = make_env("frozenlake", seed=0, max_turns=2)
  env.reset()
  env.step("[down]")
  assert env.step("[up]") == ("", True) and len(env.turns) == 2


# ---------------------------------------------------------------------------------------------
# Remapped lakes (the learning demo's worlds).


@pytest.mark.parametrize("controls", ["left,right,up,down", "down,up,right,left",
                                      "right,left,down,up"])
def test_remapped_controls_move_as_the_permutation_says(controls):
  moves = dict(zip(["up", "down", "left", "right"], controls.split(",")))
  keys = {move: key for key, move in moves.items()}
  for seed in range(12):
    plain = make_env("frozenlake", seed=seed)
    solution = bfs_solver.solve_frozenlake(plain.reset())
    env = make_env("frozenlake", seed=seed, controls=controls)
    prompt = env.reset()
    assert prompt == plain.prompt  # no lake name: the paper's prompt, word for word
    for move in solution:
      assert not env.done
      # The solver (which reads only the board text) sees the move the key made.
      before = bfs_solver.parse_frozenlake(prompt)[1]
      prompt, _ = env.step(f"I press [{keys[move]}]")
      assert env.turns[-1].action == f"[{keys[move]}]"
      if not env.done:
        after = bfs_solver.parse_frozenlake(prompt)[1]
        step = bfs_solver.MOVES[move]
        assert after == (before[0] + step[0], before[1] + step[1])
        # The history shows the key pressed, then what it did.
        assert prompt.count(f"[Player] [{keys[move]}]\n[GAME] You moved {move} to position")
    assert env.outcome().success


def test_wasd_follow_their_words_and_walls_name_the_real_move():
  env = make_env("frozenlake", seed=0, controls="left,right,up,down")
  env.reset()
  prompt, done = env.step("[w]")  # [w] is [up], which moves left: into the wall.
  assert not done and "[Player] [up]\n[GAME] You attempted an invalid move. Reason: You tried " \
      "to move left but hit a wall!" in prompt
  prompt, done = env.step("[right]")  # moves down
  assert "You moved down to position (1, 0)." in prompt


def test_show_key_puts_the_key_pressed_into_the_games_sentence():
  played = {}
  for show in (False, True):
    env = make_env("frozenlake", seed=0, controls="left,right,up,down", show_key=show)
    env.reset()
    env.step("[w]")  # [w] is [up], which moves left: into the wall.
    prompt, _ = env.step("[right]")  # moves down
    played[show] = prompt
  assert played[True] == played[False].replace(
      "Reason: You tried to move left", "Reason: You pressed [up] and tried to move left (not up)"
  ).replace("You moved down to position (1, 0).",
            "You pressed [right] and moved down (not right) to position (1, 0).")
  env = make_env("frozenlake", seed=0, controls="left,right,up,down", show_key=True)
  env.reset()
  prompt, _ = env.step("[left]")  # moves up: a wall
  assert "You pressed [left] and tried to move up (not left) but hit a wall!" in prompt
  env = make_env("frozenlake", seed=0, show_key=True)
  env.reset()
  prompt, _ = env.step("[s]")
  assert "You pressed [down] and moved down to position (1, 0)." in prompt  # no "(not"
  assert played[True] != played[False]
  with pytest.raises(ValueError, match="show_key must be a bool"):
    make_env("frozenlake", seed=0, show_key="yes")


def test_lake_name_opens_the_history():
  env = make_env("frozenlake", seed=5, lake="Ossa")
  prompt = env.reset()
  plain = make_env("frozenlake", seed=5).reset()
  line = "[GAME] You are on the frozen lake called Ossa.\n"
  assert prompt == plain.replace("Current situation:\n", "Current situation:\n" + line)
  assert env.turns == () and env.spec.settings["lake"] == "Ossa"
  env.step("[down]")
  assert env.turns[0].observation.startswith(line)
  with_knowledge = make_env("frozenlake", seed=5, lake="Ossa", knowledge="k")
  with_knowledge.reset()
  with_knowledge.step("[down]")
  assert insert_knowledge(env.turns[0].prompt, "k") == with_knowledge.turns[0].prompt


def test_bad_controls_and_lake_names_are_refused():
  for bad in ["up,down,left", "up,up,left,right", "north,down,left,right", 5]:
    with pytest.raises(ValueError, match="controls must list"):
      make_env("frozenlake", seed=0, controls=bad)
  for bad in [" Ossa", "Os\nsa", 3]:
    with pytest.raises(ValueError, match="lake must be"):
      make_env("frozenlake", seed=0, lake=bad)
  assert make_env("frozenlake", seed=0, controls=["down", "up", "left", "right"]).spec.settings[
      "controls"] == "down,up,left,right"


def _textarena_with_holes(seed, holes):
  """The reference for thin ice: TextArena's own FrozenLake (no holes of its own) with real,
  drawn holes put on the same cells."""
  import textarena  # pylint: disable=import-outside-toplevel
  env = textarena.make(env_id="FrozenLake-v0-raw", size=3, num_holes=0,
                       randomize_start_goal=False)
  env.reset(num_players=1, seed=seed)
  for row, col in holes:
    env.state.game_state["grid"][row][col] = "H"
  return env


@pytest.mark.parametrize("thin_ice", [[[1, 0], [2, 0]], [[0, 1]], [[2, 1], [0, 2]]])
def test_thin_ice_is_a_hole_the_board_draws_as_ice(thin_ice):
  rng = random.Random(0)
  for seed in range(12):
    env = make_env("frozenlake", seed=seed, num_holes=0, thin_ice=thin_ice)
    plain = make_env("frozenlake", seed=seed, num_holes=0)
    reference = _textarena_with_holes(seed, thin_ice)
    prompt = env.reset()
    plain.reset()
    assert prompt == plain.prompt
    while not env.done:
      move = rng.choice(["up", "down", "left", "right"])
      prompt, _ = env.step(f"[{move}]")
      done, _ = reference.step(action=f"[{move}]")
      assert env.done == done or (not done and len(env.turns) == env.max_turns)
      if not env.done:
        plain.step(f"[{move}]")
        # Where the player stands and what the board shows are the plain lake's: no H.
        grid = bfs_solver.parse_frozenlake(prompt)[0]
        assert prompt == plain.prompt and not any("H" in row for row in grid)
    rewards, info = reference.close()
    if env.outcome().reason != "Environment terminated because the round limit is reached":
      assert env.outcome().reward == rewards[0] and env.outcome().reason == info[0]["reason"]
    fell = "fell into a hole" in env.outcome().reason
    assert fell == (list(reference.state.game_state["player_pos"]) in thin_ice)


def test_a_drawn_hole_listed_as_thin_ice_stays_drawn():
  for seed in range(20):
    plain = make_env("frozenlake", seed=seed)
    prompt = plain.reset()
    grid = bfs_solver.parse_frozenlake(prompt)[0]
    holes = [[r, c] for r, row in enumerate(grid) for c, cell in enumerate(row) if cell == "H"]
    move = bfs_solver.solve_frozenlake(prompt)[0]
    env = make_env("frozenlake", seed=seed, thin_ice=holes)
    assert env.reset() == prompt
    assert env.step(f"[{move}]") == plain.step(f"[{move}]")


def test_bad_thin_ice_is_refused():
  assert make_env("frozenlake", seed=0, thin_ice=[[2, 0], [1, 0]]).spec.settings[
      "thin_ice"] == [[1, 0], [2, 0]]
  for bad, match in [("1,0", "a list of"), ([[1]], r"thin_ice\[0\] must be a \[row, col\]"),
                     ([[0, 0]], "the start or the goal"), ([[2, 2]], "the start or the goal"),
                     ([[3, 0]], "off the 3x3 board"), ([[1, -1]], r"thin_ice\[0\]\[1\]"),
                     ([[1, 0], [1, 0]], "twice")]:
    with pytest.raises(ValueError, match=match):
      make_env("frozenlake", seed=0, thin_ice=bad)
  with pytest.raises(ValueError, match="fixed start"):
    make_env("frozenlake", seed=0, thin_ice=[[1, 0]], randomize_start_goal=True)


# ---------------------------------------------------------------------------------------------
# Determinism, seeding and settings.


@pytest.mark.parametrize("game", ["frozenlake", "sokoban"])
def test_same_seed_same_board_and_trajectory(game):
  responses = ["[right]", "hmm", "[d]", "[s]", "[left]"]

  def play(seed):
    env = make_env(game, seed=seed)
    env.reset()
    for r in responses:
      if env.done:
        break
      env.step(r)
    return env.trajectory(ModelInfo("m", round=0))

  assert play(7) == play(7)
  first = {make_env(game, seed=s).reset() for s in range(12)}
  assert len(first) >= 4  # Different seeds give different boards.
  env = make_env(game, seed=7)
  p0 = env.reset()
  env.step("[up]")
  assert env.reset() == p0 and env.turns == ()  # No history survives a reset.
  # The recorded spec rebuilds the same game.
  t = play(7)
  assert make_env(t.env.id, seed=t.seed, **t.env.settings).reset() == t.turns[0].prompt


def test_global_random_state_is_unaffected():
  import textarena  # pylint: disable=import-outside-toplevel

  random.seed(123)
  np.random.seed(456)
  py_state, np_state = random.getstate(), np.random.get_state()
  # Control: TextArena itself reseeds the global RNG (so the check below can fail).
  raw = textarena.make("FrozenLake-v0-raw", size=3, num_holes=2, randomize_start_goal=False)
  raw.reset(num_players=1, seed=1)
  assert random.getstate() != py_state
  random.setstate(py_state)
  for game in ["frozenlake", "sokoban"]:
    env = make_env(game, seed=11)
    env.reset()
    while not env.done:
      env.step("[down]")
    env.trajectory(ModelInfo("m"))
  assert random.getstate() == py_state
  after = np.random.get_state()
  assert all(np.array_equal(a, b) for a, b in zip(after, np_state))
  # And our seeds do not depend on the global state.
  random.seed(999)
  assert make_env("frozenlake", seed=4).reset() == make_env("frozenlake", seed=4).reset()


def test_settings_and_errors():
  env = make_env("frozenlake", seed=1)
  assert isinstance(env, Environment)
  assert env.spec.settings == {"size": 3, "num_holes": 2, "randomize_start_goal": False,
                               "max_turns": 5, "controls": "up,down,left,right", "lake": "",
                               "show_key": False, "thin_ice": []}
  assert make_env("sokoban", seed=1).spec.settings == {"dim_room": [6, 6], "num_boxes": 1,
                                                       "max_turns": 5}
  big = make_env("sokoban", seed=1, dim_room=(7, 7), num_boxes=2)
  walls, goals, boxes, _ = bfs_solver.parse_sokoban(big.reset())
  assert len(boxes) == 2 and max(r for r, _ in walls) == 6
  with pytest.raises(ValueError, match="unknown environment"):
    make_env("chess", seed=0)
  with pytest.raises(TypeError, match="num_boxes"):
    make_env("frozenlake", seed=0, num_boxes=2)
  for bad in [-1, None, True, 1.5]:
    with pytest.raises(ValueError, match="seed"):
      make_env("sokoban", seed=bad)
  with pytest.raises(ValueError, match="max_turns"):
    make_env("sokoban", seed=0, max_turns=0)
  with pytest.raises(RuntimeError, match="reset"):
    make_env("sokoban", seed=0).step("[up]")


def test_prompt_files_keep_their_bytes():
  assert prompts.load("frozenlake_rules").endswith("without falling into any holes!\n\n")
  assert prompts.load("sokoban_rules").endswith("and [d] for right.")
  assert "'P' \n        - Walls" in prompts.load("sokoban_rules")  # Trailing spaces kept.
  assert prompts.load("task_description").endswith("[s], [d]")
  assert prompts.load("game_prompt").endswith("square brackets)")
  with pytest.raises(KeyError):
    prompts.load("nope")


# ---------------------------------------------------------------------------------------------
# Official prompt text (microsoft/LMOps oel/ _build_textgame_prompt on TextArena 0.7.4).

FROZENLAKE_SEED0_TURN2 = (
    "You are an agent playing a game on a grid, acting as a reasoning engine.\n"
    "\n"
    "Current situation:\n"
    "[GAME] You are the player and you are represented by 'P' on the grid. You should select the best action to reach the goal in the shortest number of steps. Your only way to interact is to move one step each time. Available actions: up, down, left, right (or w, a, s, d). Type your action as: [up], [down], [left], [right] or [w], [a], [s], [d][GAME] Current Board:\n"
    "\n"
    "+-----+-----+-----+\n"
    "|  P  |     |     |\n"
    "+-----+-----+-----+\n"
    "|     |  H  |     |\n"
    "+-----+-----+-----+\n"
    "|     |  H  |  G  |\n"
    "+-----+-----+-----+\n"
    "\n"
    "Available Actions: [up], [down], [left], [right], [w], [a], [s], [d]\n"
    "[Player] [down]\n"
    "[GAME] You moved down to position (1, 0).\n"
    "[GAME] Current Board:\n"
    "\n"
    "+-----+-----+-----+\n"
    "|     |     |     |\n"
    "+-----+-----+-----+\n"
    "|  P  |  H  |     |\n"
    "+-----+-----+-----+\n"
    "|     |  H  |  G  |\n"
    "+-----+-----+-----+\n"
    "\n"
    "Available Actions: [up], [down], [left], [right], [w], [a], [s], [d]\n"
    "[Player] [left]\n"
    "[GAME] You attempted an invalid move. Reason: You tried to move left but hit a wall! Please resubmit a valid move and remember to follow the game rules to avoid penalties.\n"
    "[GAME] Current Board:\n"
    "\n"
    "+-----+-----+-----+\n"
    "|     |     |     |\n"
    "+-----+-----+-----+\n"
    "|  P  |  H  |     |\n"
    "+-----+-----+-----+\n"
    "|     |  H  |  G  |\n"
    "+-----+-----+-----+\n"
    "\n"
    "Available Actions: [up], [down], [left], [right], [w], [a], [s], [d]\n"
    "\n"
    "\n"
    "What action do you take? (Remember to wrap your final answer of the action in square brackets)"
)
SOKOBAN_SEED0_TURN2_KNOWLEDGE = (
    "You are an agent playing a game on a grid, acting as a reasoning engine.\n"
    "\n"
    "Your decisions are based on the experience you have learned about the game's rules or strategies. This experience is only a guess of how the game works, and the rules and strategies may be incomplete or incorrect.\n"
    "\n"
    "Given experience for rules or strategies you have learned:\n"
    "- EXPERIENCE ITEM: Push boxes from behind.\n"
    "\n"
    "Current situation:\n"
    "[GAME] You are the player and you are represented by 'P' on the grid. You should select the best action to reach the goal in the shortest number of steps. Your only way to interact is to move one step each time. Available actions: up, down, left, right (or w, a, s, d). Type your action as: [up], [down], [left], [right] or [w], [a], [s], [d]\n"
    "        \n"
    "[GAME] Current Board:\n"
    "\n"
    "# # # # # #\n"
    "# _ _ O _ #\n"
    "# # _ _ _ #\n"
    "# # # X _ #\n"
    "# # # P _ #\n"
    "# # # # # #\n"
    "\n"
    "Available Moves: up, down, left, right[GAME] You  moved [right].\n"
    "[GAME] Current Board:\n"
    "\n"
    "# # # # # #\n"
    "# _ _ O _ #\n"
    "# # _ _ _ #\n"
    "# # # X _ #\n"
    "# # # _ P #\n"
    "# # # # # #\n"
    "\n"
    "Available Moves: up, down, left, right[GAME] You  moved [left].\n"
    "[GAME] Current Board:\n"
    "\n"
    "# # # # # #\n"
    "# _ _ O _ #\n"
    "# # _ _ _ #\n"
    "# # # X _ #\n"
    "# # # P _ #\n"
    "# # # # # #\n"
    "\n"
    "Available Moves: up, down, left, right\n"
    "\n"
    "\n"
    "What action do you take? (Remember to wrap your final answer of the action in square brackets)"
)
