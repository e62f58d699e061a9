"""User side: the games the model plays, and the trajectory files it leaves behind.

- `make_env` ("frozenlake" | "sokoban", the paper's settings) returns an `Environment`:
  ``reset() -> prompt``, ``step(response) -> (prompt, done)``, ``outcome()``.
- `Trajectory` records (with `EnvSpec`, `ModelInfo`, `Turn`, `Outcome`) and JSONL files:
  `read_trajectories` (streaming), `write_trajectories` / `TrajectoryWriter` (atomic).
- `parse_action`, `build_prompt` and `insert_knowledge`: the prompt and action conventions
  shared by every game (`build_prompt` is the text of `oel_jax.prompts.formats.GAME`, the
  prompt format each played turn records with its knowledge-free ``content``).
- `rollout` (with `RolloutConfig`): many games played in lockstep by one sampler, one batched
  generation per turn, or with continuous batching (``RolloutConfig.slots``); `game_seeds`:
  training and held-out board seeds that never overlap.
- `play_through_api` (with `ApiSampling`): the games played through an OpenAI-compatible
  chat endpoint, as a deployment's users would (`oel_jax.serve` records them).

TextArena is imported only when a game is reset, so reading trajectory files does not need it.
"""

from oel_jax.envs.api_play import ApiSampling, play_through_api
from oel_jax.envs.base import (
    ACTIONS,
    NO_ACTION,
    Environment,
    build_prompt,
    insert_knowledge,
    parse_action,
)
from oel_jax.envs.lockstep import (
    FORMAT_ERROR_RESPONSE,
    RolloutConfig,
    game_seeds,
    rollout,
    strip_reasoning,
)
from oel_jax.envs.textarena_games import (
    FINAL_FEEDBACK,
    GAMES,
    TURN_LIMIT_FEEDBACK,
    TextArenaGame,
    isolated_global_rng,
    make_env,
)
from oel_jax.envs.trajectory import (
    FORMAT_VERSION,
    EnvSpec,
    ModelInfo,
    Outcome,
    Trajectory,
    TrajectoryFormatError,
    TrajectoryWriter,
    Turn,
    load_trajectories,
    read_trajectories,
    schema,
    validate_record,
    write_trajectories,
)

__all__ = [
    "ACTIONS", "NO_ACTION", "Environment", "build_prompt", "insert_knowledge", "parse_action",
    "FINAL_FEEDBACK", "GAMES", "TURN_LIMIT_FEEDBACK", "TextArenaGame", "isolated_global_rng",
    "make_env",
    "FORMAT_VERSION", "EnvSpec", "ModelInfo", "Outcome", "Trajectory", "TrajectoryFormatError",
    "TrajectoryWriter", "Turn", "load_trajectories", "read_trajectories", "schema",
    "validate_record", "write_trajectories",
    "FORMAT_ERROR_RESPONSE", "RolloutConfig", "game_seeds", "rollout", "strip_reasoning",
    "ApiSampling", "play_through_api",
]
