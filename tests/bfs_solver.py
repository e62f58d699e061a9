"""A breadth-first-search player that reads the board only from the prompt text.

It knows nothing of TextArena's internals: it parses the latest ``Current Board:`` in the
prompt (FrozenLake's boxed grid or Sokoban's space-separated one) and searches for a
shortest sequence of moves. Tests use it as an independent reference for the games.
"""

from __future__ import annotations

import collections
import random

MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
WASD = {"up": "w", "left": "a", "down": "s", "right": "d"}


def _last_board(prompt: str) -> list[str]:
  at = prompt.rfind("Current Board:\n\n")
  assert at >= 0, "no board in the prompt"
  lines = prompt[at + len("Current Board:\n\n"):].split("\n")
  board = []
  for line in lines:
    if not line.strip():
      break
    board.append(line)
  return board


def parse_frozenlake(prompt: str) -> tuple[list[list[str]], tuple[int, int]]:
  """Returns (grid of ' '/'H'/'G', player position) from the latest board in ``prompt``."""
  grid, player = [], None
  for line in _last_board(prompt):
    if line.startswith("+"):
      continue
    cells = [c.strip() for c in line.strip("|").split("|")]
    row = []
    for c, cell in enumerate(cells):
      if cell in ("P", "P/G"):
        player = (len(grid), c)
        cell = "G" if cell == "P/G" else " "
      row.append(cell or " ")
    grid.append(row)
  assert player is not None, "no player on the board"
  return grid, player


def solve_frozenlake(prompt: str) -> list[str] | None:
  """A shortest list of moves to the goal avoiding holes, or None if there is none."""
  grid, start = parse_frozenlake(prompt)
  n_rows, n_cols = len(grid), len(grid[0])
  parent = {start: None}
  queue = collections.deque([start])
  while queue:
    pos = queue.popleft()
    if grid[pos[0]][pos[1]] == "G":
      path = []
      while parent[pos] is not None:
        pos, move = parent[pos]
        path.append(move)
      return path[::-1]
    for move, (dr, dc) in MOVES.items():
      nxt = (pos[0] + dr, pos[1] + dc)
      if (0 <= nxt[0] < n_rows and 0 <= nxt[1] < n_cols and nxt not in parent
          and grid[nxt[0]][nxt[1]] != "H"):
        parent[nxt] = (pos, move)
        queue.append(nxt)
  return None


def parse_sokoban(prompt: str):
  """Returns (walls, goals, boxes, player) from the latest board in ``prompt``.

  A goal under the player is not drawn ('P' hides 'O'); with as many goals as boxes, a
  missing goal must be under the player.
  """
  walls, goals, boxes, player = set(), set(), set(), None
  for r, line in enumerate(_last_board(prompt)):
    for c, cell in enumerate(line.split(" ")):
      if cell == "#":
        walls.add((r, c))
      elif cell == "O":
        goals.add((r, c))
      elif cell == "X":
        boxes.add((r, c))
      elif cell == "\u221a":
        goals.add((r, c))
        boxes.add((r, c))
      elif cell == "P":
        player = (r, c)
      else:
        assert cell == "_", f"unknown cell {cell!r}"
  assert player is not None, "no player on the board"
  if len(goals) < len(boxes):
    goals.add(player)
  return frozenset(walls), frozenset(goals), frozenset(boxes), player


def solve_sokoban(prompt: str, max_depth: int = 40) -> list[str] | None:
  """A shortest list of moves putting every box on a goal, or None (within ``max_depth``)."""
  walls, goals, boxes, player = parse_sokoban(prompt)
  start = (player, boxes)
  parent = {start: None}
  queue = collections.deque([(start, 0)])
  while queue:
    state, depth = queue.popleft()
    pos, bxs = state
    if bxs <= goals:
      path = []
      while parent[state] is not None:
        state, move = parent[state]
        path.append(move)
      return path[::-1]
    if depth >= max_depth:
      continue
    for move, (dr, dc) in MOVES.items():
      nxt = (pos[0] + dr, pos[1] + dc)
      if nxt in walls:
        continue
      new_boxes = bxs
      if nxt in bxs:
        beyond = (nxt[0] + dr, nxt[1] + dc)
        if beyond in walls or beyond in bxs:
          continue
        new_boxes = (bxs - {nxt}) | {beyond}
      new = (nxt, new_boxes)
      if new not in parent:
        parent[new] = (state, move)
        queue.append((new, depth + 1))
  return None


def response_for(move: str, rng: random.Random) -> str:
  """A chatty response whose last bracketed action is ``move`` (word or WASD form).

  Reasoning text and distractor brackets (other actions, non-actions) come before it.
  """
  others = [m for m in MOVES if m != move]
  decoy = rng.choice(others)
  final = move if rng.random() < 0.5 else WASD[move]
  wasd_decoy = WASD[rng.choice(others)]
  return (
      f"<think>\nLet me look at the board. I could try [{decoy}] or maybe [{wasd_decoy}],"
      f" but [{rng.choice(others).upper()}] and [jump] are not moves, and [ {decoy} ] neither."
      f"\nThe shortest path starts with {move}.\n</think>\n\n"
      f"Not [{decoy}]. My final answer: [{final}]"
  )
