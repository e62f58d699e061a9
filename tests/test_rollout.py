"""Tests for batched multi-turn rollouts (oel_jax.envs.rollout, module oel_jax.envs.lockstep).

Two samplers play: the tiny model through the real `Sampler` (schema-valid files, records
equal to what the environments and the sampler saw, determinism), and a scripted sampler
whose replies are a BFS solver's moves (the lockstep loop: calls, batch sizes, order, wins).
"""

import dataclasses
import json

import pytest

import bfs_solver
from oel_jax import chat, tiny
from oel_jax.envs import (
    FORMAT_ERROR_RESPONSE,
    NO_ACTION,
    ModelInfo,
    RolloutConfig,
    game_seeds,
    load_trajectories,
    make_env,
    parse_action,
    rollout,
    schema,
    strip_reasoning,
)
from oel_jax.envs import lockstep as rollout_module
from oel_jax.prompts import formats
from oel_jax.sampling import Sampler
from scripted_sampler import ScriptedSampler, bfs_policy
from test_trajectory import schema_errors

MODEL = ModelInfo("tiny", round=0)
FAST = dict(progress=False, max_new_tokens=16)


@pytest.fixture(scope="module", name="tok")
def fixture_tok():
  return tiny.load_tiny_tokenizer()


class Recording:
  """Wraps a sampler and logs every call's prompts and outputs."""

  def __init__(self, sampler):
    self.sampler = sampler
    self.max_seq_len = sampler.max_seq_len
    self.calls = []

  def generate(self, prompts, **kwargs):
    out = self.sampler.generate(prompts, **kwargs)
    self.calls.append(([list(p) for p in prompts], kwargs, out))
    return out


@pytest.fixture(scope="module", name="tiny_sampler")
def fixture_tiny_sampler(tok):
  return Sampler(tiny.tiny_model(), eos_ids=chat.stop_token_ids(tok), pad_id=tiny.PAD_ID,
                 max_seq_len=1024)


@pytest.fixture(scope="module", name="tiny_run")
def fixture_tiny_run(tok, tiny_sampler, tmp_path_factory):
  """Four FrozenLake games by the tiny model, written to a file."""
  path = tmp_path_factory.mktemp("rollout") / "tiny.jsonl"
  sampler = Recording(tiny_sampler)
  config = RolloutConfig(seed=3, temperature=1.0, **FAST)
  seeds = game_seeds("train", 0, 1, 4)
  timings = {}
  trajectories = rollout(sampler, tok, seeds, config, model=MODEL, path=str(path),
                         metadata={"split": "train"}, timings=timings)
  return dict(trajectories=trajectories, path=path, calls=sampler.calls, config=config,
              seeds=seeds, timings=timings)


# ---------------------------------------------------------------------------------------------
# The tiny model through the real sampler.


def test_tiny_rollout_file_is_schema_valid_and_reads_back_identical(tiny_run):
  trajectories, path = tiny_run["trajectories"], tiny_run["path"]
  assert [t.seed for t in trajectories] == tiny_run["seeds"]
  lines = path.read_text("utf-8").splitlines()
  assert len(lines) == len(trajectories)
  for line in lines:
    record = json.loads(line)
    assert schema_errors(record, schema(), schema()) == []
  assert load_trajectories(path) == trajectories
  for t in trajectories:
    assert t.outcome is not None and t.final_feedback
    assert t.model == MODEL and t.env.id == "frozenlake"
    assert t.metadata == {"sampling": tiny_run["config"].sampling(), "enable_thinking": True,
                          "keep_reasoning": True, "with_knowledge": False, "split": "train",
                          "play": 0}
    assert 1 <= len(t.turns) <= 5


def test_tiny_rollout_records_what_the_env_and_the_sampler_saw(tok, tiny_run):
  trajectories, calls = tiny_run["trajectories"], tiny_run["calls"]
  # Replay each game with the recorded responses: the prompts are exactly the env's.
  for t in trajectories:
    env = make_env("frozenlake", seed=t.seed)
    prompt = env.reset()
    for turn in t.turns:
      assert turn.prompt == prompt
      assert turn.action == parse_action(turn.response)
      prompt, _ = env.step(turn.response)
    assert env.done and env.outcome() == t.outcome and env.final_feedback == t.final_feedback
  # Each call went to the games still running, in game order, with the templated prompts;
  # the responses are the decoded sampler output.
  assert len(calls) == max(len(t.turns) for t in trajectories)
  for turn_index, (prompts, kwargs, out) in enumerate(calls):
    running = [t for t in trajectories if len(t.turns) > turn_index]
    assert len(prompts) == len(running)
    assert kwargs == dict(max_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0,
                          seed=[rollout_module.game_turn_seed(3, t.seed, turn_index)
                                for t in running])
    for t, ids, toks, reason in zip(running, prompts, out.tokens, out.finish_reasons):
      turn = t.turns[turn_index]
      assert ids == chat.encode_chat(tok, [{"role": "user", "content": turn.prompt}],
                                     enable_thinking=True)
      assert turn.response == tok.decode(toks, skip_special_tokens=True)
      assert turn.metadata == {"prompt_tokens": len(ids),
                               "response_tokens": len(toks) - (reason == "stop"),
                               "finish_reason": reason}
  timings = tiny_run["timings"]
  assert timings["calls"] == timings["turns"] == len(calls)
  assert timings["wall_s"] >= timings["generate_s"] > 0


def test_tiny_rollout_same_config_same_trajectories(tok, tiny_sampler, tiny_run):
  config, seeds = tiny_run["config"], tiny_run["seeds"]
  again = rollout(tiny_sampler, tok, seeds, config, model=MODEL, metadata={"split": "train"})
  assert again == tiny_run["trajectories"]
  # A game's replies depend on its board, turn and sampling seed only: not on the other
  # games in the call, its row, or how the calls are split.
  split = rollout(tiny_sampler, tok, seeds[::-1], dataclasses.replace(config, max_batch_size=3),
                  model=MODEL, metadata={"split": "train"})
  assert split[::-1] == again
  alone = rollout(tiny_sampler, tok, seeds[2:3], config, model=MODEL,
                  metadata={"split": "train"})
  assert alone == again[2:3]
  other = rollout(tiny_sampler, tok, seeds, dataclasses.replace(config, seed=4), model=MODEL)
  # Same boards, other samples.
  assert [t.turns[0].prompt for t in other] == [t.turns[0].prompt for t in again]
  assert [t.turns[0].response for t in other] != [t.turns[0].response for t in again]


def test_plays_of_one_board_are_different_games(tok, tiny_sampler, tiny_run):
  """K plays of a board in one call are K games (the official code runs K extraction jobs with
  K rollout seeds), each the same whatever else shares the call."""
  config, seeds = tiny_run["config"], tiny_run["seeds"]
  board = seeds[0]
  plays = rollout(tiny_sampler, tok, [board] * 3, config, model=MODEL, plays=[0, 1, 2])
  assert [t.metadata["play"] for t in plays] == [0, 1, 2]
  assert len({t.turns[0].prompt for t in plays}) == 1  # the same board
  responses = [t.turns[0].response for t in plays]
  assert len(set(responses)) == 3, responses
  # Play 0 is the game a plain rollout of that board plays; play 2 alone is play 2.
  assert plays[0].turns == tiny_run["trajectories"][0].turns
  alone = rollout(tiny_sampler, tok, [board], config, model=MODEL, plays=[2])
  assert alone[0].turns == plays[2].turns
  with pytest.raises(ValueError, match="plays must hold one integer >= 0 per seed"):
    rollout(tiny_sampler, tok, [board] * 2, config, model=MODEL, plays=[0])
  with pytest.raises(ValueError, match="plays must hold one integer >= 0 per seed"):
    rollout(tiny_sampler, tok, [board], config, model=MODEL, plays=[-1])


# ---------------------------------------------------------------------------------------------
# The lockstep loop, with a scripted BFS player.


def _expected_turns(game, seeds):
  """(turns, success) per game for the BFS player, from each first board alone."""
  solve = {"frozenlake": bfs_solver.solve_frozenlake, "sokoban": bfs_solver.solve_sokoban}[game]
  out = []
  for s in seeds:
    path = solve(make_env(game, seed=s).reset())
    if not path:
      out.append((2, False))  # No action twice.
    else:
      out.append((min(len(path), 5), len(path) <= 5))
  return out


def test_lockstep_loop_batches_only_running_games(tok):
  seeds = game_seeds("train", 0, 0, 8)
  expected = _expected_turns("sokoban", seeds)
  lengths = [n for n, _ in expected]
  # The seeds make the test meaningful: games end at several turns, some by the turn limit.
  assert len(set(lengths)) >= 3 and (5, False) in expected and any(ok for _, ok in expected)
  sampler = ScriptedSampler(tok, bfs_policy("sokoban"))
  trajectories = rollout(sampler, tok, seeds, RolloutConfig(env="sokoban", progress=False),
                         model=MODEL)
  assert [(len(t.turns), t.outcome.success) for t in trajectories] == expected
  # One call per turn, over exactly the games still running, in game order.
  assert sampler.batch_sizes == [sum(n > k for n in lengths) for k in range(max(lengths))]
  for k, call in enumerate(sampler.calls):
    running = [t for t in trajectories if len(t.turns) > k]
    assert call.user_messages == [t.turns[k].prompt for t in running]
    assert call.kwargs["seed"] == [rollout_module.game_turn_seed(0, t.seed, k) for t in running]
    assert call.kwargs["max_new_tokens"] == 1024
    for t, toks in zip(running, call.tokens):
      assert t.turns[k].response == tok.decode(toks, skip_special_tokens=True)
  for t in trajectories:
    # Turns are in order: each prompt is the previous one's board after the recorded move.
    env = make_env("sokoban", seed=t.seed)
    assert [turn.prompt for turn in t.turns] == [env.reset()] + [
        env.step(turn.response)[0] for turn in t.turns][:-1]
    assert t.outcome.success == (t.outcome.reward == 1.0)
    assert ("Success" in t.final_feedback) == t.outcome.success
    assert all(turn.metadata["finish_reason"] == "stop" for turn in t.turns)


def test_chunked_calls_give_the_same_games(tok):
  seeds = game_seeds("train", 0, 0, 8)
  bfs = bfs_policy("sokoban")
  whole = ScriptedSampler(tok, lambda user, seed: bfs(user, 0))  # Replies ignore the seed.
  chunked = ScriptedSampler(tok, lambda user, seed: bfs(user, 0))
  config = RolloutConfig(env="sokoban", progress=False)
  a = rollout(whole, tok, seeds, config, model=MODEL)
  b = rollout(chunked, tok, seeds, dataclasses.replace(config, max_batch_size=3), model=MODEL)
  assert [[tt.response for tt in t.turns] for t in a] == [[tt.response for tt in t.turns]
                                                          for t in b]
  assert max(chunked.batch_sizes) == 3
  per_turn = [-(-n // 3) for n in whole.batch_sizes]
  assert len(chunked.calls) == sum(per_turn)
  # Each game keeps its own seeds however the calls are split.
  flat = lambda calls: [s for c in calls for s in c.kwargs["seed"]]
  assert flat(chunked.calls) == flat(whole.calls)


def test_responses_without_actions_never_crash_a_batch(tok):
  replies = iter(["", "[jump]", "\u00e9\U0001F600 [UP]", "[ up ]", "<think>", "[upp]", "]"] * 20)
  sampler = ScriptedSampler(tok, lambda user, seed: next(replies))
  trajectories = rollout(sampler, tok, game_seeds("train", 2, 0, 6), RolloutConfig(
      progress=True), model=MODEL)
  for t in trajectories:
    assert len(t.turns) == 2 and not t.outcome.success
    assert all(turn.action == NO_ACTION for turn in t.turns)
    assert "Invalid Move" in t.final_feedback


# ---------------------------------------------------------------------------------------------
# Thinking and reasoning.


REPLIES = {
    "reasoned": "<think>\nI go [up]\n</think>\n\nNot sure.",       # action only in reasoning
    "answered": "<think>\nNot [left].\n</think>\n\nMy move: [down]",  # answer after </think>
    "twice": "a</think>b [left]</think>\n[right] then",            # cut at the last </think>
    "unfinished": "<think>\nLet me think [up]",                    # budget ran out
}


@pytest.mark.parametrize("keep", [True, False])
def test_reasoning_kept_or_stripped(tok, keep):
  kinds = list(REPLIES)
  seeds = game_seeds("train", 0, 0, len(kinds))
  replies = iter(REPLIES.values())  # One turn per game: one call, rows in game order.

  def policy(user, seed):
    return next(replies)

  sampler = ScriptedSampler(tok, policy)
  config = RolloutConfig(keep_reasoning=keep, env_settings={"max_turns": 1}, progress=False)
  trajectories = rollout(sampler, tok, seeds, config, model=MODEL)
  for t, kind, toks in zip(trajectories, kinds, sampler.calls[0].tokens):
    turn = t.turns[0]
    text = tok.decode(toks, skip_special_tokens=True)
    assert text == REPLIES[kind]
    if keep:
      assert turn.response == text
    else:
      # The official _postprocess_textgame_response: split at "</think>", keep the last part.
      official = (text.split("</think>")[-1] if "</think>" in text else
                  "Format error: no </think> found in the response")
      assert turn.response == official == strip_reasoning(text)
    assert turn.action == parse_action(turn.response)
    assert t.metadata["keep_reasoning"] is keep
    assert turn.metadata["response_tokens"] == len(toks) - 1  # Reasoning counted either way.
  actions = {kind: t.turns[0].action for kind, t in zip(kinds, trajectories)}
  if keep:
    assert actions == {"reasoned": "[up]", "answered": "[down]", "twice": "[right]",
                       "unfinished": "[up]"}
  else:
    assert actions == {"reasoned": NO_ACTION, "answered": "[down]", "twice": "[right]",
                       "unfinished": NO_ACTION}
    assert trajectories[3].turns[0].response == FORMAT_ERROR_RESPONSE
    assert trajectories[2].turns[0].response == "\n[right] then"


@pytest.mark.parametrize("thinking", [True, False])
def test_thinking_on_off_reaches_the_chat_template(tok, thinking):
  sampler = ScriptedSampler(tok, lambda user, seed: "[left]")
  seeds = game_seeds("train", 0, 0, 2)
  trajectories = rollout(sampler, tok, seeds,
                         RolloutConfig(enable_thinking=thinking, progress=False), model=MODEL)
  for ids, t in zip(sampler.calls[0].prompts, trajectories):
    messages = [{"role": "user", "content": t.turns[0].prompt}]
    assert ids == chat.encode_chat(tok, messages, enable_thinking=thinking)
    assert tok.decode(ids).endswith("</think>\n\n") is not thinking
    assert t.metadata["enable_thinking"] is thinking


def test_knowledge_goes_into_every_prompt(tok):
  knowledge = "- EXPERIENCE ITEM: holes are deadly."
  sampler = ScriptedSampler(tok, bfs_policy("frozenlake"))
  seeds = game_seeds("train", 0, 0, 3)
  with_k = rollout(sampler, tok, seeds, RolloutConfig(progress=False), model=MODEL,
                   knowledge=knowledge)
  plain = rollout(sampler, tok, seeds, RolloutConfig(progress=False), model=MODEL)
  for a, b in zip(with_k, plain):
    assert a.metadata["with_knowledge"] and not b.metadata["with_knowledge"]
    assert all(knowledge in turn.prompt for turn in a.turns)
    assert not any(knowledge in turn.prompt for turn in b.turns)
    assert [turn.action for turn in a.turns] == [turn.action for turn in b.turns]


def test_a_prompt_format_renders_every_turn_and_is_recorded(tok):
  """Knowledge in a system message: the turns record the format, the history and the user text."""
  knowledge = "- EXPERIENCE ITEM: holes are deadly."
  sampler = ScriptedSampler(tok, bfs_policy("frozenlake"))
  seeds = game_seeds("train", 0, 0, 3)
  own = rollout(sampler, tok, seeds, RolloutConfig(progress=False), model=MODEL,
                knowledge=knowledge, prompt_format=formats.SYSTEM_KNOWLEDGE)
  game = rollout(sampler, tok, seeds, RolloutConfig(progress=False), model=MODEL)
  for a, b in zip(own, game):
    assert [turn.action for turn in a.turns] == [turn.action for turn in b.turns]
    for x, y in zip(a.turns, b.turns):
      assert x.prompt_format == "system_knowledge" and y.prompt_format == "oel_game"
      assert x.content == y.content and x.prompt == x.content  # the user message: the history
      assert y.prompt == formats.GAME.messages(y.content)[0]["content"]
  first = tok.decode(sampler.calls[0].prompts[0])
  assert first.startswith(f"<|im_start|>system\n{knowledge}<|im_end|>")


def test_prompt_too_long_for_the_sampler_is_named(tok):
  sampler = ScriptedSampler(tok, lambda user, seed: "[up]", max_seq_len=600)
  seeds = game_seeds("train", 0, 0, 2)
  with pytest.raises(ValueError, match=rf"seed {seeds[0]}\), turn 0: .* max_seq_len=600"):
    rollout(sampler, tok, seeds, RolloutConfig(progress=False), model=MODEL)
  assert not sampler.calls


def test_a_failed_rollout_leaves_no_file(tok, tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text("old\n")

  def policy(user, seed):
    raise RuntimeError("sampler died")

  with pytest.raises(RuntimeError, match="sampler died"):
    rollout(ScriptedSampler(tok, policy), tok, [1], RolloutConfig(progress=False), model=MODEL,
            path=str(path))
  assert path.read_text() == "old\n"
  assert [p.name for p in tmp_path.iterdir()] == ["t.jsonl"]


# ---------------------------------------------------------------------------------------------
# Seeds and config.


def test_game_seeds_train_and_eval_never_overlap():
  evals = {b: game_seeds("eval", b, 0, 256) for b in range(3)}
  train = set()
  for b in range(3):
    assert game_seeds("eval", b, 7, 256) == evals[b]  # Fixed across rounds.
    for r in range(100):
      seeds = game_seeds("train", b, r, 256)
      assert len(set(seeds)) == 256 and all(s >= 0 for s in seeds)
      assert train.isdisjoint(seeds)  # Rounds (and base seeds) never share training seeds.
      train.update(seeds)
  all_eval = set().union(*evals.values())
  assert len(all_eval) == 3 * 256 and all_eval.isdisjoint(train)
  # Extremes of the ranges too: parity separates the splits.
  assert all(s % 2 == 0 for s in game_seeds("eval", 10**6, 0, 5, start=999_995))
  assert all(s % 2 == 1 for s in game_seeds("train", 10**6, 999, 5, start=999_995))
  # `start` continues the same set.
  assert game_seeds("train", 0, 2, 10) == (game_seeds("train", 0, 2, 4)
                                           + game_seeds("train", 0, 2, 6, start=4))
  assert game_seeds("eval", 0, 0, 4) == [0, 2, 4, 6]
  assert game_seeds("train", 0, 0, 3) == [1, 3, 5]


@pytest.mark.parametrize("args,match", [
    (("test", 0, 0, 4), "split"), (("train", -1, 0, 4), "base_seed"),
    (("train", 0, 1000, 4), "round_"), (("train", 0, 0, -1), "n"),
    (("eval", 0, 0, 10, 999_995), "GAMES_PER_ROUND"), (("train", 0.5, 0, 4), "base_seed"),
])
def test_game_seeds_errors(args, match):
  with pytest.raises(ValueError, match=match):
    game_seeds(*args)


def test_rollout_config_checks_its_fields():
  config = RolloutConfig()
  assert (config.max_new_tokens, config.temperature, config.top_k, config.top_p) == (
      1024, 0.7, 0, 1.0)
  assert config.keep_reasoning and config.enable_thinking
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.seed = 1
  for bad, match in [(dict(env="chess"), "chess"), (dict(max_new_tokens=0), "max_new_tokens"),
                     (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
                     (dict(top_k=-1), "top_k"), (dict(seed=-2), "seed"),
                     (dict(max_batch_size=0), "max_batch_size"), (dict(slots=0), "slots"),
                     (dict(keep_reasoning=1), "keep_reasoning")]:
    with pytest.raises(ValueError, match=match):
      RolloutConfig(**bad)
  assert RolloutConfig(env_settings={"max_turns": 3}).env_settings == {"max_turns": 3}
