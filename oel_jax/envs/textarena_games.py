"""FrozenLake and Sokoban over TextArena, exactly as the paper plays them.

Settings (arXiv:2603.16856 Appendix B.1; DESIGN.md section 5.1): FrozenLake is TextArena's
``FrozenLake-v0-raw`` with ``size=3, num_holes=2, randomize_start_goal=False``; Sokoban is
``Sokoban-v0`` with ``dim_room=(6, 6), num_boxes=1``; at most 5 turns per game. Every turn
the model gets one user message built from the whole observation history, TextArena's rules
paragraph replaced by the paper's task description (`oel_jax.prompts`).

The prompt text is the official implementation's, character for character
(microsoft/LMOps, ``oel/verl/verl/workers/rollout/vllm_rollout/vllm_rollout_spmd.py``),
including its quirks, so that pass rates compare with the paper's:

- FrozenLake's history is every TextArena message as ``"\\n[GAME] <text>"`` or
  ``"\\n[Player] <action>"``. Replacing the rules (which end in two newlines) glues the task
  description to the next message: ``...[s], [d][GAME] Current Board:``.
- Sokoban is played through TextArena's ``LLMObservationWrapper`` in the official code; each
  turn's new text is cut from the wrapper's string starting at its first ``[GAME]``, so the
  player's own ``[Player] [up]`` lines are dropped and the turns' texts are joined with no
  separator (``...left, right[GAME] You  moved [up].``). The leftover indentation of the
  rules paragraph stays (``[d]\\n        \\n[GAME] Current Board:``).
- The history is ``strip()``-ed and ends with one newline, so a blank line precedes the
  closing question.

We reproduce these from TextArena's raw messages (no observation wrapper: wrappers keep their
history across resets; we make a fresh TextArena env on every `reset` anyway).

Rules of play, all TextArena's (textarena 0.7.4) except where noted:

- Actions: the last of ``[up] [down] [left] [right] [w] [a] [s] [d]`` in the whole response
  (case-sensitive, as officially) is sent in word form; a response without one sends
  ``"[no valid action]"`` (`oel_jax.envs.base.parse_action`).
- An invalid move (no action, unknown action, walking into a wall or, in Sokoban, pushing a
  box into a wall) is answered with ``"You attempted an invalid move. Reason: ..."``; a second
  invalid move in a row ends the game (``"Invalid Move: <reason>"``); a valid move in between
  resets the count. Invalid moves count towards the turn limit.
- The turn limit (``max_turns``, 5) is ours, as in the official rollout loop: a game still
  running after its 5th response ends with reward 0 and the final feedback
  ``"Environment terminated because the round limit is reached"``.
- Rewards: 1 on success; partial credit in [0, 1) on failure (FrozenLake: progress towards
  the goal; Sokoban: share of boxes on targets). Pass = reward equals 1.
- Final feedback of a finished game: ``"Summary:\\nFinal Result: Success|Failure\\nFeedback:
  <reason>\\n"``.

TextArena seeds Python's global ``random`` (and FrozenLake draws its board from it); every
call into TextArena here runs with the global ``random`` and ``numpy.random`` states saved
and restored, so our other randomness is unaffected. (Not thread-safe: drive environments
from one thread.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from oel_jax import prompts
from oel_jax.envs.base import parse_action
from oel_jax.prompts import formats
from oel_jax.envs.trajectory import EnvSpec, ModelInfo, Outcome, Trajectory, Turn

TURN_LIMIT_FEEDBACK = "Environment terminated because the round limit is reached"
"""Final feedback (and outcome reason) of a game stopped by the turn limit (official text)."""

FINAL_FEEDBACK = "Summary:\nFinal Result: {result}\nFeedback: {reason}\n"
"""Final feedback of a game the environment ended (official text); result is Success|Failure."""

_GAME_ID = -1  # TextArena's sender id for game messages (textarena.GAME_ID).

DIRECTIONS = ("up", "down", "left", "right")
"""The four moves, in the order a FrozenLake ``controls`` setting lists what each key does."""

STANDARD_CONTROLS = "up,down,left,right"
"""FrozenLake's own controls: ``[up]`` moves up, and so on (the paper's setting)."""

SHOW_KEY = ("You pressed [up] and moved up to position (0, 1).",
            "You pressed [up] and moved down (not up) to position (1, 0).")
"""How FrozenLake's ``show_key`` setting words a move: the key pressed and the move it made,
in one sentence, and the key's label in ``(not ...)`` when the move was another (also before
``but hit a wall!``). The plain game says only the move (``You moved down to position (1,
0).``), with the key pressed a line above it. Off by default and in the shipped learning
demo; tried for the demo's reader in session 13 (docs/benchmarks.md, "The learning demo")."""

_MOVE_RE = re.compile(r"You (moved|tried to move) (up|down|left|right)\b")

LAKE_INTRO = "You are on the frozen lake called {lake}."
"""The game message that opens a named lake's history (FrozenLake's ``lake`` setting)."""


@dataclasses.dataclass(frozen=True)
class GameDef:
  """How one of our game names maps onto TextArena."""

  name: str
  """Our name, as given to `make_env` and recorded as ``EnvSpec.id``."""

  textarena_id: str
  """The TextArena registry id we instantiate (always a ``-raw`` one: no wrappers)."""

  defaults: Mapping[str, Any]
  """The paper's settings; `make_env` overrides may change them (JSON values only)."""

  rules: str
  """Name of the `oel_jax.prompts` file holding TextArena's rules paragraph to replace."""

  rendering: str
  """How the official code turns messages into history text: ``"messages"`` (raw env) or
  ``"llm_wrapper"`` (TextArena's LLMObservationWrapper, cut at the first ``[GAME]``)."""


GAMES: dict[str, GameDef] = {
    "frozenlake": GameDef(
        name="frozenlake", textarena_id="FrozenLake-v0-raw",
        defaults={"size": 3, "num_holes": 2, "randomize_start_goal": False, "max_turns": 5,
                  "controls": STANDARD_CONTROLS, "lake": "", "show_key": False,
                  "thin_ice": []},
        rules="frozenlake_rules", rendering="messages"),
    "sokoban": GameDef(
        name="sokoban", textarena_id="Sokoban-v0-raw",
        defaults={"dim_room": [6, 6], "num_boxes": 1, "max_turns": 5},
        rules="sokoban_rules", rendering="llm_wrapper"),
}
"""The games `make_env` knows, by name."""


def _check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def _settings(game: GameDef, overrides: Mapping[str, Any]) -> dict[str, Any]:
  """The game's full settings: its defaults with ``overrides`` applied and checked."""
  unknown = sorted(set(overrides) - set(game.defaults))
  if unknown:
    raise TypeError(f"make_env({game.name!r}) got unknown settings {unknown}; "
                    f"allowed: {sorted(game.defaults)} (and seed, knowledge)")
  s = {**game.defaults, **overrides}
  s["max_turns"] = _check_int("max_turns", s["max_turns"], 1)
  if game.name == "frozenlake":
    s["size"] = _check_int("size", s["size"], 2)
    s["num_holes"] = _check_int("num_holes", s["num_holes"], 0)
    if not isinstance(s["randomize_start_goal"], bool):
      raise ValueError(f"randomize_start_goal must be a bool, got {s['randomize_start_goal']!r}")
    s["controls"] = ",".join(parse_controls(s["controls"]))
    if not isinstance(s["lake"], str) or s["lake"] != s["lake"].strip() or "\n" in s["lake"]:
      raise ValueError(f"lake must be a one-line name without surrounding spaces (or \"\" for "
                       f"none), got {s['lake']!r}")
    if not isinstance(s["show_key"], bool):
      raise ValueError(f"show_key must be a bool, got {s['show_key']!r}")
    s["thin_ice"] = _thin_ice(s)
  else:
    dim = s["dim_room"]
    if isinstance(dim, (str, bytes)) or not hasattr(dim, "__len__") or len(dim) != 2:
      raise ValueError(f"dim_room must be two integers, got {dim!r}")
    s["dim_room"] = [_check_int("dim_room[0]", dim[0], 3), _check_int("dim_room[1]", dim[1], 3)]
    s["num_boxes"] = _check_int("num_boxes", s["num_boxes"], 1)
  return s


def _thin_ice(s: Mapping[str, Any]) -> list[list[int]]:
  """The ``thin_ice`` setting checked and sorted: distinct ``[row, col]`` cells of the board,
  neither the start nor the goal."""
  cells = s["thin_ice"]
  if isinstance(cells, (str, bytes)) or not isinstance(cells, (list, tuple)):
    raise ValueError(f"thin_ice must be a list of [row, col] cells, got {cells!r}")
  if cells and s["randomize_start_goal"]:
    raise ValueError("thin_ice needs the fixed start and goal (randomize_start_goal=False)")
  size = s["size"]
  checked = []
  for i, cell in enumerate(cells):
    if isinstance(cell, (str, bytes)) or not hasattr(cell, "__len__") or len(cell) != 2:
      raise ValueError(f"thin_ice[{i}] must be a [row, col] pair, got {cell!r}")
    row, col = (_check_int(f"thin_ice[{i}][{j}]", v, 0) for j, v in enumerate(cell))
    if row >= size or col >= size:
      raise ValueError(f"thin_ice[{i}] = {cell!r} is off the {size}x{size} board")
    if (row, col) in ((0, 0), (size - 1, size - 1)):
      raise ValueError(f"thin_ice[{i}] = {cell!r} is the start or the goal")
    checked.append([row, col])
  if len({tuple(c) for c in checked}) != len(checked):
    raise ValueError(f"thin_ice lists a cell twice: {cells!r}")
  return sorted(checked)


def parse_controls(controls: Any) -> tuple[str, str, str, str]:
  """The moves that ``[up]``, ``[down]``, ``[left]`` and ``[right]`` make, in that order.

  Args:
    controls: a permutation of the four directions, comma-separated
      (``"left,right,up,down"``: ``[up]`` moves left, ``[down]`` right, ``[left]`` up and
      ``[right]`` down) or as a sequence.

  Raises:
    ValueError: not a permutation of up, down, left, right.
  """
  moves = controls.split(",") if isinstance(controls, str) else controls
  try:
    moves = tuple(m.strip() for m in moves)
  except (TypeError, AttributeError):
    moves = ()
  if sorted(moves) != sorted(DIRECTIONS):
    raise ValueError("controls must list what [up], [down], [left] and [right] do as a "
                     f"permutation of {','.join(DIRECTIONS)} (e.g. {STANDARD_CONTROLS!r}), "
                     f"got {controls!r}")
  return moves  # type: ignore[return-value]


def _textarena_kwargs(game: GameDef, settings: Mapping[str, Any]) -> dict[str, Any]:
  if game.name == "frozenlake":
    return {"size": settings["size"], "num_holes": settings["num_holes"],
            "randomize_start_goal": settings["randomize_start_goal"]}
  return {"dim_room": tuple(settings["dim_room"]), "num_boxes": settings["num_boxes"]}


def _hide_thin_ice(env: Any, cells: Sequence[Sequence[int]]) -> None:
  """Makes ``cells`` of a freshly reset TextArena FrozenLake holes that its board draws as
  frozen surface: the player falls through them (``You fell into a hole!``) without having
  seen them. The first board was drawn before this, so it shows them as ice too."""
  grid = env.state.game_state["grid"]
  hidden = {(row, col) for row, col in cells if grid[row][col] != "H"}  # drawn holes stay drawn
  for row, col in hidden:
    grid[row][col] = "H"
  draw = env._render_board  # pylint: disable=protected-access

  def render_without_thin_ice() -> str:
    shown = [row[:] for row in grid]
    for row, col in hidden:
      grid[row][col] = " "
    try:
      return draw()
    finally:
      for r, row in enumerate(shown):
        grid[r][:] = row

  env._render_board = render_without_thin_ice  # pylint: disable=protected-access


@contextlib.contextmanager
def isolated_global_rng():
  """Runs the body with Python's ``random`` and NumPy's global RNG states restored after it."""
  py_state = random.getstate()
  np_state = np.random.get_state()
  try:
    yield
  finally:
    random.setstate(py_state)
    np.random.set_state(np_state)


class TextArenaGame:
  """One FrozenLake or Sokoban game (implements `oel_jax.envs.Environment`).

  Build it with `oel_jax.envs.make_env`. `reset` starts a fresh TextArena episode from
  `seed`, so the same seed gives the same board every time.
  """

  def __init__(self, game: GameDef, *, seed: int, settings: Mapping[str, Any],
               knowledge: str | None = None):
    self.game = game
    self.seed = _check_int("seed", seed, 0)
    self.spec = EnvSpec(id=game.name, settings=_settings(game, settings))
    if knowledge is not None and not isinstance(knowledge, str):
      raise TypeError(f"knowledge must be a string or None, got {type(knowledge).__name__}")
    self.knowledge = knowledge or None
    self.max_turns: int = self.spec.settings["max_turns"]
    self._keymap: dict[str, str] = {}
    self._intro = ""
    if game.name == "frozenlake":
      moves = parse_controls(self.spec.settings["controls"])
      self._keymap = {f"[{key}]": f"[{move}]" for key, move in zip(DIRECTIONS, moves)}
      if self.spec.settings["lake"]:
        self._intro = "\n[GAME] " + LAKE_INTRO.format(lake=self.spec.settings["lake"])
    self._rules = prompts.load(game.rules)
    self._task = prompts.load("task_description")
    self._env = None
    self._clear()

  def _clear(self) -> None:
    self._chunks: list[str] = []  # history pieces, one per turn, rules not yet replaced
    self._wrapper_text = ""  # "llm_wrapper" rendering: the wrapper's whole string so far
    self._turns: list[Turn] = []
    self._observation = ""
    self._content = ""  # the history the current prompt shows
    self._prompt = ""
    self._done = False
    self._outcome: Outcome | None = None
    self._final_feedback: str | None = None
    self._pressed = ""  # the key the last response pressed, as the history shows it

  # -- the protocol --------------------------------------------------------------------------

  def reset(self) -> str:
    """Starts a fresh episode (a new TextArena env seeded with `seed`); returns turn 0's prompt."""
    import textarena  # Imported lazily: it takes ~1.5 s and is not needed to read files.

    self._clear()
    with isolated_global_rng():
      env = textarena.make(env_id=self.game.textarena_id,
                           **_textarena_kwargs(self.game, self.spec.settings))
      env.reset(num_players=1, seed=self.seed)
      if self.spec.settings.get("thin_ice"):
        _hide_thin_ice(env, self.spec.settings["thin_ice"])
      _, messages = env.get_observation()
    self._env = env
    chunk, observation = self._render(messages)
    chunk, observation = self._intro + chunk, self._intro + observation
    if self._rules not in chunk:
      raise RuntimeError(
          f"TextArena {getattr(textarena, '__version__', '?')} no longer shows the rules "
          f"paragraph of oel_jax/prompts/{self.game.rules}.txt in {self.game.textarena_id}'s "
          "first observation, so the rules cannot be hidden from the model; update that file.")
    # The first observation as the official extractor input shows it: rules removed, stripped.
    self._advance(chunk, observation.replace(self._rules, "").strip())
    return self._prompt

  def step(self, response: str) -> tuple[str, bool]:
    """Plays ``response``; returns (the next prompt, or "" when the game is over; done)."""
    if not isinstance(response, str):
      raise TypeError(f"response must be a string, got {type(response).__name__}")
    if self._env is None:
      raise RuntimeError("call reset() before step()")
    if self._done:
      raise RuntimeError("the game is over; call reset() to play again")
    action = parse_action(response)
    # A remapped lake: the game makes the key's move; the history still shows the key pressed.
    self._pressed = action
    with isolated_global_rng():
      done, _ = self._env.step(action=self._keymap.get(action, action))
    self._turns.append(Turn(observation=self._observation, prompt=self._prompt,
                            response=response, action=action, content=self._content,
                            prompt_format=formats.GAME.id))
    if done:
      with isolated_global_rng():
        rewards, game_info = self._env.close()
      reward = float(rewards[0]) if rewards else 0.0
      reason = str(game_info[0].get("reason", ""))
      success = reward == 1.0
      self._finish(Outcome(success=success, reward=reward, reason=reason),
                   FINAL_FEEDBACK.format(result="Success" if success else "Failure",
                                         reason=reason))
    elif len(self._turns) >= self.max_turns:
      self._finish(Outcome(success=False, reward=0.0, reason=TURN_LIMIT_FEEDBACK),
                   TURN_LIMIT_FEEDBACK)
    else:
      with isolated_global_rng():
        _, messages = self._env.get_observation()
      self._advance(*self._render(messages))
    return self._prompt, self._done

  def outcome(self) -> Outcome:
    """How the game ended; raises RuntimeError while it is still running."""
    if not self._done:
      raise RuntimeError("the game is not over yet")
    return self._outcome

  @property
  def done(self) -> bool:
    """Whether the game is over."""
    return self._done

  @property
  def prompt(self) -> str:
    """The current turn's prompt text ("" once the game is over)."""
    return self._prompt

  @property
  def observation(self) -> str:
    """What the environment said this turn, alone ("" once the game is over)."""
    return self._observation

  @property
  def history(self) -> str:
    """The observation history under ``Current situation:`` (as of the last prompt)."""
    text = "".join(self._chunks).replace(self._rules, self._task)
    return text.strip() + "\n" if self._chunks else ""

  @property
  def turns(self) -> tuple[Turn, ...]:
    """The turns played so far."""
    return tuple(self._turns)

  @property
  def final_feedback(self) -> str | None:
    """The closing text once the game is over, else None."""
    return self._final_feedback

  @property
  def textarena_env(self) -> Any:
    """The underlying TextArena env of the current episode (for inspection only)."""
    return self._env

  def trajectory(self, model: ModelInfo, metadata: Mapping[str, Any] | None = None) -> Trajectory:
    """The finished episode as a trajectory record."""
    if not self._done:
      raise RuntimeError("the game is not over yet")
    return Trajectory(env=self.spec, seed=self.seed, model=model, turns=tuple(self._turns),
                      final_feedback=self._final_feedback, outcome=self._outcome,
                      metadata=dict(metadata or {}))

  # -- internals -----------------------------------------------------------------------------

  def _name(self, sender: int) -> str:
    if sender == _GAME_ID:
      return "GAME"
    return self._env.state.role_mapping.get(sender, f"Player {sender}")

  def _render(self, messages: list[tuple[int, str, Any]]) -> tuple[str, str]:
    """Returns (history piece, this turn's observation) for new TextArena messages."""
    # The player's message is the key pressed, not the move a remapped lake made of it.
    messages = [(sender, message if sender == _GAME_ID else self._pressed or message, kind)
                for sender, message, kind in messages]
    if self.spec.settings.get("show_key") and self._pressed:
      messages = [(sender, _MOVE_RE.sub(self._with_key, message) if sender == _GAME_ID
                   else message, kind) for sender, message, kind in messages]
    text = "".join(f"\n[{self._name(sender)}] {message}" for sender, message, _ in messages)
    if self.game.rendering == "messages":
      observation = "".join(f"\n[GAME] {m}" for sender, m, _ in messages if sender == _GAME_ID)
      return text, observation
    # "llm_wrapper": the official code gets the wrapper's whole history string, keeps what
    # follows the previous turn's piece, and cuts it at its first "[GAME]".
    self._wrapper_text += text
    new = self._wrapper_text
    if self._chunks:
      new = new.split(self._chunks[-1])[-1]
    chunk = new[new.find("[GAME]"):]
    return chunk, chunk

  def _with_key(self, move: re.Match) -> str:
    """`SHOW_KEY`'s wording of TextArena's ``You moved <move>`` for the key just pressed."""
    verb, made = move.groups()
    label = self._pressed.strip("[]")
    said = f"You pressed {self._pressed} and {verb} {made}"
    return said if made == label else f"{said} (not {label})"

  def _advance(self, chunk: str, observation: str) -> None:
    self._chunks.append(chunk)
    self._observation = observation
    self._content = self.history
    self._prompt = formats.user_text(formats.GAME.messages(self._content, self.knowledge))

  def _finish(self, outcome: Outcome, final_feedback: str) -> None:
    self._done = True
    self._outcome = outcome
    self._final_feedback = final_feedback
    self._observation = ""
    self._content = ""
    self._prompt = ""


def make_env(name: str, *, seed: int, knowledge: str | None = None,
             **overrides: Any) -> TextArenaGame:
  """Returns the game ``name`` ("frozenlake" or "sokoban") with the paper's settings.

  Args:
    name: the game.
    seed: non-negative integer; the same seed gives the same board.
    knowledge: experiential knowledge to show in every prompt (paper Fig. 12); None or ""
      for none. It is part of the prompts, not of ``env.spec``.
    **overrides: settings to change. FrozenLake: ``size`` (3), ``num_holes`` (2),
      ``randomize_start_goal`` (False), ``max_turns`` (5), ``controls`` (what ``[up]``,
      ``[down]``, ``[left]``, ``[right]`` do, as a permutation: ``"up,down,left,right"``;
      ``[w]``/``[s]``/``[a]``/``[d]`` follow their words) and ``lake`` (a name shown in the
      first message, ``"You are on the frozen lake called <lake>."``; "" for none) and
      ``show_key`` (False; True: the game's message after a move names the key pressed,
      `SHOW_KEY`) and ``thin_ice`` (``[]``; ``[[1, 0], [2, 0]]``: holes the board draws as
      frozen surface, found only by falling through them). Sokoban: ``dim_room`` ((6, 6)),
      ``num_boxes`` (1), ``max_turns`` (5).

  The environment is not started: call ``env.reset()`` for the first prompt.
  """
  if name not in GAMES:
    raise ValueError(f"unknown environment {name!r}; known: {', '.join(GAMES)}")
  return TextArenaGame(GAMES[name], seed=seed, settings=overrides, knowledge=knowledge)
