"""Tests for pass-rate evaluation (oel_jax.evaluate).

A scripted sampler plays the held-out Sokoban maps with a behaviour chosen per sampling seed
and replies of exact token lengths, so that every metric can be computed by hand from the
first boards alone; the tiny model then runs the whole evaluation through the real sampler.
"""

import dataclasses
import json
import math
import statistics

import pytest

import bfs_solver
from oel_jax import chat, tiny
from oel_jax.envs import ModelInfo, Outcome, game_seeds, load_trajectories, make_env
from oel_jax.envs import lockstep
from oel_jax.evaluate import EvalConfig, EvalResult, evaluate, summarize
from oel_jax.sampling import Sampler
from scripted_sampler import ScriptedSampler

MODEL = ModelInfo("tiny", round=2)


@pytest.fixture(scope="module", name="tok")
def fixture_tok():
  return tiny.load_tiny_tokenizer()


# Per sampling seed: (behaviour, reply length in tokens before the stop token).
SCRIPT = {5: ("solve", 12), 9: ("jump", 40), 11: ("solve_short", 20)}
MAX_NEW = 32  # Cuts the 40-token "jump" replies: finish "length", 32 tokens.


def _policy():
  # Each reply's seed is derived from (sampling seed, board, turn): map it back.
  boards = game_seeds("eval", 0, 0, 9)
  sampling_seed = {lockstep.game_turn_seed(s, b, t): s
                   for s in SCRIPT for b in boards for t in range(6)}

  def policy(user, seed):
    behaviour, length = SCRIPT[sampling_seed[seed]]
    path = bfs_solver.solve_sokoban(user)
    if behaviour == "jump" or not path or (behaviour == "solve_short" and len(path) > 2):
      return "[jump]", length  # No action: two of these end the game.
    return f"[{path[0]}]", length

  return policy


def _by_hand(seeds):
  """Every metric, from each map's shortest solution and the script alone."""
  shortest = [bfs_solver.solve_sokoban(make_env("sokoban", seed=s).reset()) for s in seeds]
  shortest = [len(p) if p else None for p in shortest]
  turns, wins, tokens, cut = {}, {}, {}, {}
  for s, (behaviour, length) in SCRIPT.items():
    plays = []
    for n in shortest:
      if behaviour == "jump" or n is None or (behaviour == "solve_short" and n > 2):
        plays.append((2, False))
      else:
        plays.append((min(n, 5), n <= 5))
    turns[s] = [t for t, _ in plays]
    wins[s] = sum(w for _, w in plays)
    tokens[s] = min(length + 1, MAX_NEW) - (length + 1 <= MAX_NEW)  # Stop token not counted.
    cut[s] = length + 1 > MAX_NEW
  return shortest, turns, wins, tokens, cut


def test_metrics_equal_a_hand_computation(tok, tmp_path):
  config = EvalConfig(env="sokoban", num_games=9, base_seed=0, sampling_seeds=tuple(SCRIPT),
                      max_new_tokens=MAX_NEW, progress=False)
  seeds = game_seeds("eval", 0, 0, 9)
  shortest, turns, wins, tokens, cut = _by_hand(seeds)
  # The maps make every branch count: wins, turn-limit failures, short and long solutions.
  assert 0 < wins[11] < wins[5] < 9 and any(n and n > 5 for n in shortest)
  sampler = ScriptedSampler(tok, _policy())
  path = tmp_path / "eval.jsonl"
  result = evaluate(sampler, tok, config, model=MODEL, trajectory_path=str(path))

  n = 9
  pass_rates = [wins[s] / n for s in SCRIPT]
  all_turns = sum((turns[s] for s in SCRIPT), [])
  turn_tokens = [tokens[s] for s in SCRIPT for _ in range(sum(turns[s]))]
  expected = EvalResult(
      env="sokoban", num_games=n, sampling_seeds=(5, 9, 11), with_knowledge=False,
      pass_rates=tuple(pass_rates), pass_rate_mean=statistics.mean(pass_rates),
      pass_rate_std=statistics.stdev(pass_rates), pass_rate_min=min(pass_rates),
      pass_rate_max=max(pass_rates),
      mean_response_tokens=sum(turn_tokens) / len(turn_tokens),
      mean_response_tokens_per_seed=tuple(float(tokens[s]) for s in SCRIPT),
      mean_turns=sum(all_turns) / len(all_turns),
      mean_turns_per_seed=tuple(sum(turns[s]) / n for s in SCRIPT),
      truncated_fraction=sum(sum(turns[s]) for s in SCRIPT if cut[s]) / sum(all_turns))
  assert result.sampling_seeds == expected.sampling_seeds
  for field in dataclasses.fields(EvalResult):
    got, want = getattr(result, field.name), getattr(expected, field.name)
    if isinstance(want, float):
      assert math.isclose(got, want, rel_tol=1e-12), field.name
    elif isinstance(want, tuple) and want and isinstance(want[0], float):
      assert all(math.isclose(g, w, rel_tol=1e-12) for g, w in zip(got, want)), field.name
    else:
      assert got == want, field.name
  assert (result.pass_rates, result.truncated_fraction) == ((7 / 9, 0.0, 2 / 9), 18 / 70)

  # The sampler saw the paper's evaluation sampling and the held-out maps.
  for call in sampler.calls:
    assert {k: call.kwargs[k] for k in ("temperature", "top_k", "top_p", "max_new_tokens")} == {
        "temperature": 0.7, "top_k": 20, "top_p": 0.8, "max_new_tokens": MAX_NEW}
  # The file holds every game of every seed, in seed order, and gives the same result.
  saved = load_trajectories(path)
  assert [t.seed for t in saved] == seeds * 3
  assert [t.metadata["sampling"]["seed"] for t in saved] == [5] * 9 + [9] * 9 + [11] * 9
  assert all(t.metadata["split"] == "eval" for t in saved)
  assert summarize({s: saved[9 * i:9 * i + 9] for i, s in enumerate(SCRIPT)}) == result
  # JSON logging.
  record = json.loads(json.dumps(result.to_dict()))
  assert record["pass_rates"] == list(result.pass_rates)
  assert record == {f.name: (list(v) if isinstance(v := getattr(result, f.name), tuple) else v)
                    for f in dataclasses.fields(EvalResult)}


def test_in_context_knowledge(tok):
  knowledge = "- EXPERIENCE ITEM: push boxes from behind."
  config = EvalConfig(env="sokoban", num_games=3, sampling_seeds=(5,), max_new_tokens=MAX_NEW,
                      progress=False)
  sampler = ScriptedSampler(tok, _policy())
  with_k = evaluate(sampler, tok, config, model=MODEL, knowledge=knowledge)
  assert with_k.with_knowledge
  assert sampler.calls and all(knowledge in m for c in sampler.calls for m in c.user_messages)
  plain_sampler = ScriptedSampler(tok, _policy())
  plain = evaluate(plain_sampler, tok, config, model=MODEL)
  assert not plain.with_knowledge
  assert not any(knowledge in m for c in plain_sampler.calls for m in c.user_messages)
  # This scripted player ignores the knowledge, so the numbers agree.
  assert dataclasses.replace(with_k, with_knowledge=False) == plain


def test_eval_config_defaults_are_the_papers():
  config = EvalConfig()
  assert (config.num_games, config.temperature, config.top_p, config.top_k,
          config.max_new_tokens) == (128, 0.7, 0.8, 20, 1024)
  assert len(config.sampling_seeds) >= 2
  assert config.game_seeds() == game_seeds("eval", 0, 0, 128)
  rollout = config.rollout_config(7)
  assert (rollout.seed, rollout.temperature, rollout.top_k, rollout.top_p) == (7, 0.7, 20, 0.8)
  for bad, match in [(dict(num_games=0), "num_games"), (dict(sampling_seeds=()), "sampling"),
                     (dict(sampling_seeds=(1, 1)), "sampling"), (dict(top_p=2.0), "top_p"),
                     (dict(env="go"), "go"), (dict(base_seed=-1), "base_seed")]:
    with pytest.raises(ValueError, match=match):
      EvalConfig(**bad)


def test_summarize_rejects_what_it_cannot_measure(tok):
  sampler = ScriptedSampler(tok, lambda user, seed: "[up]")
  games = lockstep.rollout(sampler, tok, game_seeds("eval", 0, 0, 2),
                           lockstep.RolloutConfig(progress=False), model=MODEL)
  assert summarize({0: games}).pass_rate_std == 0.0  # One seed: no spread.
  with pytest.raises(ValueError, match="at least one run"):
    summarize({})
  with pytest.raises(ValueError, match="same, non-zero number"):
    summarize({0: games, 1: games[:1]})
  no_outcome = [dataclasses.replace(games[0], outcome=None), games[1]]
  with pytest.raises(ValueError, match="no outcome"):
    summarize({0: no_outcome})
  bare = dataclasses.replace(games[1], turns=tuple(
      dataclasses.replace(t, metadata={}) for t in games[1].turns))
  with pytest.raises(ValueError, match=r"trajectory 1 .* turn 0: .*response_tokens"):
    summarize({0: [games[0], bare]})
  assert isinstance(games[0].outcome, Outcome)


def test_tiny_model_evaluation_through_the_real_sampler(tok, tmp_path):
  sampler = Sampler(tiny.tiny_model(), eos_ids=chat.stop_token_ids(tok), pad_id=tiny.PAD_ID,
                    max_seq_len=1024)
  config = EvalConfig(num_games=4, sampling_seeds=(0, 1), max_new_tokens=16, progress=False)
  path = tmp_path / "eval.jsonl"
  result = evaluate(sampler, tok, config, model=MODEL, trajectory_path=str(path))
  saved = load_trajectories(path)
  assert len(saved) == 8 and summarize({0: saved[:4], 1: saved[4:]}) == result
  assert result.env == "frozenlake" and result.num_games == 4
  assert all(0 <= p <= 1 for p in result.pass_rates)
  assert 0 < result.mean_response_tokens <= 16 and 1 <= result.mean_turns <= 5
  lengths = [t.metadata["response_tokens"] for g in saved for t in g.turns]
  assert result.mean_response_tokens == pytest.approx(sum(lengths) / len(lengths))
  # Different sampling seeds, same maps, other replies.
  assert [g.seed for g in saved[:4]] == [g.seed for g in saved[4:]]
  assert [g.turns[0].response for g in saved[:4]] != [g.turns[0].response for g in saved[4:]]


class _PrefixSharingScript(ScriptedSampler):
  """The scripted sampler, declaring that it prefills shared prefixes (it just logs the ask)."""

  shares_prefixes = True

  def generate(self, prompts, *, share_prefix=False, **kwargs):
    out = super().generate(prompts, **kwargs)
    self.calls[-1].kwargs["share_prefix"] = share_prefix
    return out


def test_in_context_evaluation_asks_for_the_shared_prefix(tok):
  """With knowledge, every sampler call asks a sampler that can for its shared-prefix prefill;
  without knowledge, or from a sampler that cannot (`ScriptedSampler`), nothing is passed."""
  config = EvalConfig(env="sokoban", num_games=3, sampling_seeds=(5,), max_new_tokens=MAX_NEW,
                      progress=False)
  sharing = _PrefixSharingScript(tok, _policy())
  evaluate(sharing, tok, config, model=MODEL, knowledge="- EXPERIENCE ITEM: push boxes.")
  assert sharing.calls and all(c.kwargs["share_prefix"] for c in sharing.calls)
  plain = _PrefixSharingScript(tok, _policy())
  evaluate(plain, tok, config, model=MODEL)
  assert plain.calls and not any(c.kwargs["share_prefix"] for c in plain.calls)


def test_tiny_model_in_context_evaluation_with_a_shared_prefix(tok, tmp_path):
  """In-context evaluation through the real sampler: the knowledge prefix prefilled once per
  call, every reply and metric the same as with the whole prompts prefilled (a sampler told
  it cannot share)."""
  knowledge = "\n".join(f"- EXPERIENCE ITEM: on lake {i}, [up] and [down] are swapped."
                        for i in range(6))
  config = EvalConfig(num_games=4, sampling_seeds=(0,), max_new_tokens=12, progress=False)
  shared = Sampler(tiny.tiny_model(), eos_ids=chat.stop_token_ids(tok), pad_id=tiny.PAD_ID,
                   max_seq_len=1024)
  whole = Sampler(tiny.tiny_model(), eos_ids=chat.stop_token_ids(tok), pad_id=tiny.PAD_ID,
                  max_seq_len=1024)
  whole.shares_prefixes = False
  results, games = [], []
  for name, sampler in (("shared", shared), ("whole", whole)):
    path = tmp_path / f"{name}.jsonl"
    results.append(evaluate(sampler, tok, config, model=MODEL, knowledge=knowledge,
                            trajectory_path=str(path)))
    games.append(load_trajectories(path))
  assert shared._jitted_shared._cache_size() >= 1  # pylint: disable=protected-access
  assert whole._jitted_shared._cache_size() == 0  # pylint: disable=protected-access
  assert results[0] == results[1]
  replies = [[[t.response for t in g.turns] for g in run] for run in games]
  assert replies[0] == replies[1] and sum(map(len, replies[0])) > 4
