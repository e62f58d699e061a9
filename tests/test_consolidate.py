"""The consolidation stage: prefixes, teacher inputs, a tiny end-to-end run, resume, bad input."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from oel_jax import chat, consolidate, losses, metrics, parallel, tiny
from oel_jax.consolidate import ConsolidationConfig, run_consolidation
from oel_jax.envs import (EnvSpec, ModelInfo, Turn, insert_knowledge, load_trajectories,
                          make_env, write_trajectories)
from oel_jax.prompts import formats
from oel_jax.sampling import Sampler
from oel_jax.train import NonFiniteLossError, TrainConfig, Trainer

KNOWLEDGE = ("- EXPERIENCE ITEM: Holes end the game; step around them.",
             "",  # a run that extracted nothing: the teacher sees no knowledge block
             "- EXPERIENCE ITEM: The goal is at the bottom right; move down and right.")

# A tiny run whose every step has the same batch shape (one compiled train step).
CONFIG = ConsolidationConfig(
    steps=4, games_per_step=2, max_new_tokens=16, checkpoint_every=2, enable_thinking=False,
    min_length_bucket=512, min_row_bucket=4, seed=3,
    train=TrainConfig(learning_rate=1e-3, k=16))


def _model(seed=0, **overrides):
  """The tiny model's vocabulary and tokenizer, smaller still (fast on CPU)."""
  shape = dict(num_layers=1, hidden_size=64, intermediate_size=128, num_heads=2, num_kv_heads=1)
  return tiny.tiny_model(seed, **{**shape, **overrides})


def _play(game, seed, replies):
  """Plays scripted replies; returns the trajectory and every prompt the game gave."""
  env = make_env(game, seed=seed, max_turns=len(replies))
  seen = [env.reset()]
  for reply in replies:
    prompt, done = env.step(reply)
    if done:
      break
    seen.append(prompt)
  return env.trajectory(ModelInfo("tiny", 0)), seen


@pytest.fixture(scope="module")
def tok():
  return tiny.load_tiny_tokenizer()


@pytest.fixture(scope="module")
def played():
  specs = [("frozenlake", 1, ["[down]", "[right]"]), ("sokoban", 3, ["[up]"]),
           ("frozenlake", 5, ["no action here", "[up]"]), ("frozenlake", 7, ["[left]"]),
           ("sokoban", 9, ["[a]", "[w]", "[d]"])]
  return [_play(*s) for s in specs]


@pytest.fixture(scope="module")
def trajectories(played):
  return [t for t, _ in played]


# ---- prefixes and per-step data (no model) ----


def test_every_turn_gives_exactly_one_prefix_equal_to_the_prompt_seen(played, tmp_path):
  trajectories = [t for t, _ in played]
  prefixes = consolidate.build_prefixes(trajectories)
  assert len(prefixes) == sum(len(t.turns) for t in trajectories)
  assert [(p.game, p.turn) for p in prefixes] == [
      (g, i) for g, t in enumerate(trajectories) for i in range(len(t.turns))]
  for p in prefixes:
    assert p.prompt == played[p.game][1][p.turn]  # what the environment showed the model
    assert p.prompt == trajectories[p.game].turns[p.turn].prompt
    assert "Given experience" not in p.prompt
  # Through a trajectory file: the same prefixes.
  path = tmp_path / "consolidate.jsonl"
  write_trajectories(path, trajectories)
  assert consolidate.build_prefixes(load_trajectories(path)) == prefixes
  assert consolidate.group_by_game(prefixes) == [
      [i for i, p in enumerate(prefixes) if p.game == g] for g in range(len(trajectories))]


def _legacy(trajectory):
  """The trajectory as files written before turns carried content and a prompt format."""
  return dataclasses.replace(trajectory, turns=tuple(
      dataclasses.replace(t, content=None, prompt_format=None) for t in trajectory.turns))


def test_a_file_in_the_format_without_content_consolidates_exactly_as_before(
    tok, trajectories, tmp_path):
  """Turns without content/prompt_format: the recorded prompt, knowledge spliced in."""
  path = tmp_path / "old.jsonl"
  write_trajectories(path, [_legacy(t) for t in trajectories])
  with open(path, encoding="utf-8") as f:
    assert '"content"' not in f.read()  # the file is in today's format
  old = consolidate.build_prefixes(load_trajectories(path))
  new = consolidate.build_prefixes(trajectories)
  assert all(p.format is formats.RECORDED_GAME for p in old)
  assert all(p.format is formats.GAME for p in new)
  config = dataclasses.replace(CONFIG, games_per_step=5)
  games = consolidate.group_by_game(old)
  a = consolidate.step_inputs(old, games, KNOWLEDGE, tok, config, step=1)
  b = consolidate.step_inputs(new, games, KNOWLEDGE, tok, config, step=1)
  assert a == b  # the same student and teacher token ids, row by row
  for p, c, ids in zip(a.prefixes, a.contexts, a.teacher_prompts):
    assert list(ids) == chat.encode_chat(
        tok, [{"role": "user", "content": insert_knowledge(old[p].prompt, KNOWLEDGE[c])}],
        enable_thinking=False)


def test_a_prompt_format_puts_the_knowledge_in_a_system_message(tok, trajectories):
  """A deployment whose prompts are not our game template still consolidates."""
  turns = [Turn(observation="o", prompt=f"Ticket {i}: printer on fire", response="r",
                content=f"Ticket {i}: printer on fire", prompt_format="system_knowledge")
           for i in range(2)]
  own = dataclasses.replace(trajectories[0], env=EnvSpec("helpdesk"), turns=tuple(turns))
  prefixes = consolidate.build_prefixes([own])
  config = dataclasses.replace(CONFIG, games_per_step=1)
  inputs = consolidate.step_inputs(prefixes, [[0, 1]], ["Unplug it first."], tok, config, 1)
  for p, student, teacher in zip(inputs.prefixes, inputs.student_prompts,
                                 inputs.teacher_prompts):
    user = {"role": "user", "content": turns[p].content}
    assert list(student) == chat.encode_chat(tok, [user], enable_thinking=False)
    assert list(teacher) == chat.encode_chat(
        tok, [{"role": "system", "content": "Unplug it first."}, user], enable_thinking=False)
  unknown = dataclasses.replace(own, turns=(dataclasses.replace(turns[0], prompt_format="x"),))
  with pytest.raises(ValueError, match="trajectory 0, turn 0: unknown prompt format 'x'"):
    consolidate.build_prefixes([unknown])


def test_a_recorded_conversation_consolidates_with_its_history_and_the_knowledge(
    tok, trajectories):
  """The chat format: the whole conversation before the response, knowledge in its system."""
  history = [{"role": "system", "content": "You are a helpdesk."},
             {"role": "user", "content": "My printer is on fire."},
             {"role": "assistant", "content": "Please unplug it."},
             {"role": "user", "content": "Done. Now what?"}]
  turn = Turn(observation="Done. Now what?", prompt="Done. Now what?", response="Call us.",
              content=formats.chat_content(history), prompt_format="chat")
  own = dataclasses.replace(trajectories[0], env=EnvSpec("helpdesk"), turns=(turn,))
  prefixes = consolidate.build_prefixes([own])
  config = dataclasses.replace(CONFIG, games_per_step=1)
  inputs = consolidate.step_inputs(prefixes, [[0]], ["Fires need water."], tok, config, 1)
  assert list(inputs.student_prompts[0]) == chat.encode_chat(tok, history,
                                                             enable_thinking=False)
  with_knowledge = [{"role": "system", "content": "Fires need water.\n\nYou are a helpdesk."}]
  assert list(inputs.teacher_prompts[0]) == chat.encode_chat(
      tok, with_knowledge + history[1:], enable_thinking=False)
  assert formats.CHAT.messages(formats.chat_content(history[1:]), "K")[0] == {
      "role": "system", "content": "K"}
  for bad, message in [("[]", r"chat content: expected a non-empty list"),
                       ('[{"role": "bot", "content": "x"}]', r"chat content\[0\]\.role"),
                       ('[{"role": "user", "content": 3}]', r"chat content\[0\]\.content"),
                       ('[{"role": "user", "content": "a"}, {"role": "assistant", '
                        '"content": "b"}]', r"chat content\[1\]\.role: the last message"),
                       ("{", "chat content is not JSON")]:
    with pytest.raises(ValueError, match=message):
      formats.CHAT.messages(bad)


def test_stale_teacher_hook_gives_the_teacher_the_students_prompt(tok, trajectories,
                                                                  monkeypatch):
  """scripts/demo_failure_checks.py's stale_teacher break patches consolidate.insert_knowledge."""
  monkeypatch.setattr(consolidate, "insert_knowledge", lambda prompt, knowledge: prompt)
  prefixes = consolidate.build_prefixes(trajectories)
  inputs = consolidate.step_inputs(prefixes, consolidate.group_by_game(prefixes), KNOWLEDGE,
                                   tok, dataclasses.replace(CONFIG, games_per_step=5), 1)
  assert inputs.teacher_prompts == inputs.student_prompts


def test_step_selection_is_a_seeded_pass_over_the_games(trajectories):
  games = consolidate.group_by_game(consolidate.build_prefixes(trajectories))
  config = ConsolidationConfig(games_per_step=2, seed=5)
  first_pass = [consolidate.select_prefixes(games, config, s) for s in (1, 2)]
  rows = [r for step in first_pass for r in step]
  chosen = [g for g, turns in enumerate(games) if turns[0] in rows]
  assert len(chosen) == 4 and len(rows) == sum(len(games[g]) for g in chosen)  # no repeats
  assert consolidate.select_prefixes(games, config, 2) == first_pass[1]  # a function of step
  assert len({tuple(consolidate.select_prefixes(games, dataclasses.replace(config, seed=k), 1))
              for k in range(10)}) > 1  # the seed matters
  in_order = dataclasses.replace(config, shuffle=False)
  assert consolidate.select_prefixes(games, in_order, 1) == games[0] + games[1]
  assert consolidate.select_prefixes(games, in_order, 3) == games[4] + games[0]  # next pass
  capped = dataclasses.replace(in_order, games_per_step=5, max_prefixes_per_game=2)
  rows = consolidate.select_prefixes(games, capped, 1)
  assert len(rows) == sum(min(2, len(t)) for t in games) and rows == sorted(rows)
  contexts = consolidate.draw_contexts(1000, 3, config, 1)
  assert contexts == consolidate.draw_contexts(1000, 3, config, 1)
  assert set(contexts) == {0, 1, 2} and contexts != consolidate.draw_contexts(1000, 3, config, 2)


def test_bucket_sizes():
  assert [consolidate.bucket_size(n, 64, 2) for n in (1, 64, 65, 96, 97, 128, 129, 300, 8000)
          ] == [64, 64, 96, 96, 128, 128, 192, 384, 8192]
  assert [consolidate.bucket_size(n, 1, 1) for n in (1, 3, 5, 9)] == [1, 4, 8, 16]
  assert consolidate.bucket_size(5, 1, 2, multiple=4) == 8
  assert consolidate.bucket_size(3, 4, 2) == 4


def test_teacher_inputs_hold_the_knowledge_and_the_same_response_at_aligned_positions(
    tok, trajectories):
  prefixes = consolidate.build_prefixes(trajectories)
  games = consolidate.group_by_game(prefixes)
  config = dataclasses.replace(CONFIG, games_per_step=5, min_length_bucket=64, min_row_bucket=1)
  inputs = consolidate.step_inputs(prefixes, games, KNOWLEDGE, tok, config, step=1)
  rows = len(inputs.prefixes)
  assert sorted(inputs.prefixes) == list(range(len(prefixes)))  # one pass: every prefix
  responses = [tok.encode(f"I think [down] {'x' * i}", add_special_tokens=False)
               + [tiny.IM_END_ID] for i in range(rows)]
  batch = consolidate.build_batch(inputs.student_prompts, inputs.teacher_prompts, responses,
                                  pad_id=tiny.PAD_ID, config=config, row_multiple=4)
  assert batch.batch_size % 4 == 0 and batch.batch_size >= rows
  assert set(inputs.contexts) == {0, 1, 2}
  for i, (p, c) in enumerate(zip(inputs.prefixes, inputs.contexts)):
    n = len(responses[i])
    sidx = np.asarray(batch.student_index[i, :n])
    tidx = np.asarray(batch.teacher_index[i, :n])
    assert np.asarray(batch.student_ids[i])[sidx + 1].tolist() == responses[i]
    assert np.asarray(batch.teacher_ids[i])[tidx + 1].tolist() == responses[i]
    assert float(batch.response_mask[i].sum()) == n
    student_prompt = tok.decode(np.asarray(batch.student_ids[i])[:sidx[0] + 1].tolist())
    teacher_prompt = tok.decode(np.asarray(batch.teacher_ids[i])[:tidx[0] + 1].tolist())
    assert student_prompt == chat.render_chat(
        tok, [{"role": "user", "content": prefixes[p].prompt}], enable_thinking=False)
    assert teacher_prompt == chat.render_chat(
        tok, [{"role": "user", "content": insert_knowledge(prefixes[p].prompt, KNOWLEDGE[c])}],
        enable_thinking=False)
    for k, text in enumerate(KNOWLEDGE):
      if text:
        assert (text in teacher_prompt) == (k == c)
        assert text not in student_prompt
    if not KNOWLEDGE[c]:
      assert teacher_prompt == student_prompt
  assert float(batch.response_mask[rows:].sum()) == 0  # padding rows score nothing
  assert batch.student_ids.shape[1] % 64 == 0 and batch.teacher_ids.shape[1] % 64 == 0


def test_raw_trajectory_contexts(tok, trajectories):
  texts = consolidate.raw_trajectory_contexts(trajectories, tok, num_contexts=3, max_tokens=600,
                                              seed=1)
  assert len(texts) == 3 and len(set(texts)) > 1
  for t in texts:
    assert "Round0_Input:" in t and len(tok.encode(t, add_special_tokens=False)) <= 600
  short = consolidate.raw_trajectory_contexts(trajectories, tok, num_contexts=1, max_tokens=10)
  assert len(tok.encode(short[0], add_special_tokens=False)) <= 10


# ---- runs with the tiny model ----


class SpySampler:
  """Wraps a Sampler; records every weight swap (a checksum) and every generate call."""

  def __init__(self, sampler):
    self.inner = sampler
    self.max_seq_len = sampler.max_seq_len
    self.updates, self.calls = [], []

  def update_weights(self, params):
    self.updates.append(sum(float(np.abs(np.asarray(x, np.float64)).sum())
                            for x in jax.tree.leaves(params)))
    self.inner.update_weights(params)

  def generate(self, prompts, **kwargs):
    self.calls.append((prompts, kwargs))
    return self.inner.generate(prompts, **kwargs)


def _params(model):
  return [np.array(x) for x in jax.tree.leaves(nnx.state(model))]


def _checksum(model):
  return sum(float(np.abs(x.astype(np.float64)).sum()) for x in _params(model))


def _deterministic(metrics):
  return [{k: v for k, v in m.items() if k not in consolidate.TIMING_KEYS} for m in metrics]


@pytest.fixture(scope="module")
def engine(tok):
  model = _model()
  sampler = Sampler(model, eos_ids=chat.stop_token_ids(tok), pad_id=tiny.PAD_ID,
                    max_seq_len=1024, min_prompt_bucket=512)
  return model, Trainer(model, CONFIG.train), sampler


@pytest.fixture(scope="module")
def full_run(tok, trajectories, engine, tmp_path_factory):
  model, trainer, sampler = engine
  before = _params(model)
  spy = SpySampler(sampler)
  workdir = tmp_path_factory.mktemp("full")
  result = run_consolidation(model, model, tok, trajectories, KNOWLEDGE, CONFIG,
                             workdir=workdir, sampler=spy, trainer=trainer, progress=False)
  return result, workdir, before, spy


def test_tiny_run_trains_the_student_and_leaves_the_teacher_alone(tok, trajectories, full_run,
                                                                  engine):
  result, workdir, before, spy = full_run
  model, trainer, _ = engine
  after = _params(result.model)
  assert any(not np.array_equal(a, b) for a, b in zip(before, after))
  # The teacher (here the same object as the student argument) is bit-identical.
  assert all(np.array_equal(a, b) for a, b in zip(before, _params(model)))
  assert int(result.state.step) == CONFIG.steps and result.resumed_from == 0
  assert trainer.num_compilations == 1  # bucketed shapes: one program for every step
  # The sampler had the student's current weights for every step, and the final ones after.
  assert len(spy.calls) == CONFIG.steps and len(spy.updates) == CONFIG.steps + 1
  assert spy.updates[0] == pytest.approx(_checksum(model), rel=1e-12)
  assert len(set(spy.updates)) == len(spy.updates)
  assert spy.updates[-1] == pytest.approx(_checksum(result.model), rel=1e-12)
  seeds = [kw["seed"] for _, kw in spy.calls]
  assert len(set(seeds)) == len(seeds)
  assert all(kw["temperature"] == 0.7 and kw["top_p"] == 1.0 and kw["max_new_tokens"] == 16
             for _, kw in spy.calls)
  # Metrics: one line per step, in the file too.
  assert [m["step"] for m in result.metrics] == [1, 2, 3, 4]
  with open(os.path.join(workdir, consolidate.METRICS_FILE)) as f:
    lines = [json.loads(line) for line in f]
  assert lines == list(result.metrics)
  for m in result.metrics:
    for key in ("loss", "grad_norm", "student_entropy", "teacher_entropy", "tokens",
                "tokens_per_second", "sampling_time", "student_topk_mass",
                "teacher_topk_mass"):
      assert np.isfinite(m[key]), key
    assert m["rows"] <= m["padded_rows"] == 4 and 0 < m["tokens"] <= 16 * m["rows"]
    # k = 16 of a 4096-token vocabulary: the top-k holds part of the mass, not all.
    assert 0 < m["teacher_topk_mass"] < 1 and 0 < m["student_topk_mass"] < 1
    assert m["skipped"] is False and m["skipped_steps"] == 0
  assert result.skipped_steps == 0
  assert sorted(os.listdir(os.path.join(workdir, consolidate.CHECKPOINT_DIR))) == ["4"]
  # Run again: the finished checkpoint is found, nothing is recomputed.
  again = run_consolidation(model, model, tok, trajectories, KNOWLEDGE, CONFIG,
                            workdir=workdir, sampler=spy.inner, trainer=trainer, progress=False)
  assert again.resumed_from == 4 and again.metrics == result.metrics
  assert all(np.array_equal(a, b) for a, b in zip(after, _params(again.model)))


class Interrupt(Exception):
  pass


@pytest.mark.parametrize("how", ["crash", "shorter_run"])
def test_resume_gives_the_uninterrupted_result(tok, trajectories, engine, full_run, tmp_path,
                                               how):
  model, trainer, sampler = engine
  result = full_run[0]

  if how == "crash":  # dies after step 3's metrics line, before any checkpoint of step 3
    def die(step, metrics):
      del metrics
      if step == 3:
        raise Interrupt
    with pytest.raises(Interrupt):
      run_consolidation(model, model, tok, trajectories, KNOWLEDGE, CONFIG, workdir=tmp_path,
                        sampler=sampler, trainer=trainer, progress=False, on_step=die)
    with open(tmp_path / consolidate.METRICS_FILE) as f:
      assert len(f.readlines()) == 3
  else:  # a run of 2 steps, extended to 4
    run_consolidation(model, model, tok, trajectories, KNOWLEDGE,
                      dataclasses.replace(CONFIG, steps=2), workdir=tmp_path, sampler=sampler,
                      trainer=trainer, progress=False)
  resumed = run_consolidation(model, model, tok, trajectories, KNOWLEDGE, CONFIG,
                              workdir=tmp_path, sampler=sampler, trainer=trainer,
                              progress=False)
  assert resumed.resumed_from == 2
  assert _deterministic(resumed.metrics) == _deterministic(result.metrics)
  with open(tmp_path / consolidate.METRICS_FILE) as f:
    assert _deterministic(json.loads(line) for line in f) == _deterministic(result.metrics)
  for a, b in zip(_params(result.model), _params(resumed.model)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(result.state.opt_state),
                  jax.tree.leaves(resumed.state.opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert all(np.array_equal(a, b) for a, b in zip(full_run[2], _params(model)))
  # A resumed state is placed like a fresh one: the compiled step is reused, not recompiled
  # (jit's program cache, an internal counter).
  assert trainer.num_compilations == 1 and trainer._step._cache_size() == 1


def test_resuming_with_other_settings_or_inputs_is_refused(tok, trajectories, engine,
                                                           full_run):
  model, trainer, sampler = engine
  workdir = full_run[1]
  kwargs = dict(workdir=workdir, sampler=sampler, trainer=trainer, progress=False)
  with pytest.raises(ValueError, match="config.seed"):
    run_consolidation(model, model, tok, trajectories, KNOWLEDGE,
                      dataclasses.replace(CONFIG, seed=4), **kwargs)
  with pytest.raises(ValueError, match="knowledge"):
    run_consolidation(model, model, tok, trajectories, KNOWLEDGE[:2], CONFIG, **kwargs)
  with pytest.raises(ValueError, match="prefixes"):
    run_consolidation(model, model, tok, trajectories[:3], KNOWLEDGE, CONFIG, **kwargs)


def test_sharded_run_resumes_on_the_mesh(tok, trajectories, full_run, tmp_path):
  mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=4, tp=1))
  model = _model()
  # One trainer for both runs: its compiled step is reused.
  kwargs = dict(workdir=tmp_path, trainer=Trainer(model, CONFIG.train, mesh=mesh),
                progress=False)
  run_consolidation(model, model, tok, trajectories, KNOWLEDGE,
                    dataclasses.replace(CONFIG, steps=1), **kwargs)
  result = run_consolidation(model, model, tok, trajectories, KNOWLEDGE,
                             dataclasses.replace(CONFIG, steps=2), **kwargs)
  assert result.resumed_from == 1 and [m["step"] for m in result.metrics] == [1, 2]
  assert kwargs["trainer"]._step._cache_size() == 1  # the restored state needs no new program
  assert all(m["padded_rows"] % 8 == 0 for m in result.metrics)  # rows split over 8 devices
  up = result.state.params["layers"][0]["mlp"]["up_proj"][...]
  assert up.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tp")
  # The same first step as on one device (padding rows change nothing).
  first = full_run[0].metrics[0]
  assert result.metrics[0]["tokens"] == first["tokens"]
  assert result.metrics[0]["loss"] == pytest.approx(first["loss"], rel=1e-3, abs=1e-6)


def test_off_policy_baseline_samples_from_the_teacher_with_knowledge(tok, trajectories, engine):
  model, _, sampler = engine
  config = dataclasses.replace(
      CONFIG, steps=1, mode="off_policy",
      train=dataclasses.replace(CONFIG.train, divergence=losses.FORWARD_KL))
  spy = SpySampler(sampler)
  student = _model(seed=1)
  result = run_consolidation(student, model, tok, trajectories, KNOWLEDGE, config, sampler=spy,
                             progress=False)
  (prompts, _), = spy.calls
  texts = [tok.decode(p) for p in prompts]
  assert any(KNOWLEDGE[0] in t or KNOWLEDGE[2] in t for t in texts)
  assert spy.updates[0] == pytest.approx(_checksum(model), rel=1e-12)  # teacher weights
  assert spy.updates[-1] == pytest.approx(_checksum(result.model), rel=1e-12)
  assert np.isfinite(result.metrics[0]["loss"])


# ---- non-finite steps ----


class PoisonedTrainer:
  """Delegates to a real `Trainer`, but gives the teacher a NaN on the chosen train_step calls
  (1-based), so that those steps' loss is not finite. Records each call's train state before
  and after as NumPy copies (the step donates its input)."""

  def __init__(self, trainer, poisoned_calls):
    self._inner = trainer
    self.poisoned = set(poisoned_calls)
    self.calls = []  # per call: (state before, state after, metrics)

  def __getattr__(self, name):
    return getattr(self._inner, name)

  def train_step(self, state, teacher_params, batch, **kwargs):
    if len(self.calls) + 1 in self.poisoned:
      teacher_params = jax.tree.map(lambda x: x, teacher_params)
      scale = teacher_params["final_norm"]["scale"]
      scale[...] = jnp.full_like(scale[...], jnp.nan)
    snapshot = lambda s: [np.array(x) for x in jax.tree.leaves((s.params, s.opt_state,
                                                                s.step))]
    before = snapshot(state)
    state, m = self._inner.train_step(state, teacher_params, batch, **kwargs)
    self.calls.append((before, snapshot(state), m))
    return state, m


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(a, b))


def test_non_finite_steps_are_skipped_and_the_run_goes_on(tok, trajectories, engine, tmp_path,
                                                          caplog):
  model, trainer, sampler = engine
  # Two skipped steps, never two in a row: the limit of 2 is not reached.
  config = dataclasses.replace(CONFIG, max_consecutive_skipped_steps=2)
  poisoned = PoisonedTrainer(trainer, {2, 4})
  with caplog.at_level("WARNING"):
    result = run_consolidation(model, model, tok, trajectories, KNOWLEDGE, config,
                               workdir=tmp_path, sampler=sampler, trainer=poisoned,
                               progress=False)
  assert [m["step"] for m in result.metrics] == [1, 2, 3, 4]
  assert [m["skipped"] for m in result.metrics] == [False, True, False, True]
  assert [m["skipped_steps"] for m in result.metrics] == [0, 1, 1, 2]
  assert result.skipped_steps == 2
  for i, (before, after, m) in enumerate(poisoned.calls):
    if i + 1 in (2, 4):  # parameters, Adam moments and step count exactly as they were
      assert not m["finite"] and _same(before, after)
      assert result.metrics[i]["loss"] is None and result.metrics[i]["grad_norm"] is None
    else:  # the others train on
      assert m["finite"] and not _same(before, after)
      assert np.isfinite(result.metrics[i]["loss"])
  assert int(result.state.step) == 2  # optimizer steps taken
  for a, b in zip(poisoned.calls[1][1], poisoned.calls[2][0]):  # step 3 starts from step 2's
    np.testing.assert_array_equal(a, b)
  with open(tmp_path / consolidate.METRICS_FILE) as f:
    assert [json.loads(line) for line in f] == list(result.metrics)
  warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
  assert len(warnings) == 2 and "step 2 skipped: non-finite loss nan" in warnings[0]
  stats = metrics.consolidation_stats(result)
  assert stats["skipped_steps"] == 2
  assert stats["first_loss"] == result.metrics[0]["loss"]
  assert stats["final_loss"] == result.metrics[2]["loss"]


def test_consecutive_skipped_steps_stop_the_round_and_count_across_a_resume(
    tok, trajectories, engine, tmp_path):
  model, trainer, sampler = engine
  config = dataclasses.replace(CONFIG, max_consecutive_skipped_steps=2)
  kwargs = dict(workdir=tmp_path, sampler=sampler, progress=False)

  def die(step, metrics):
    del metrics
    if step == 3:
      raise Interrupt

  # Step 2 is skipped and checkpointed; the run dies after step 3.
  with pytest.raises(Interrupt):
    run_consolidation(model, model, tok, trajectories, KNOWLEDGE, config,
                      trainer=PoisonedTrainer(trainer, {2}), on_step=die, **kwargs)
  # Resumed from step 2, whose metrics say it was skipped: a skipped step 3 makes two in a
  # row, and the round stops, with step 3's line written and no checkpoint of it.
  with pytest.raises(NonFiniteLossError, match=r"steps 2-3 \(2 in a row\).*"
                     r"max_consecutive_skipped_steps=2 allows no more.*raise that limit") as err:
    run_consolidation(model, model, tok, trajectories, KNOWLEDGE, config,
                      trainer=PoisonedTrainer(trainer, {1}), **kwargs)
  assert int(err.value.state.step) == 1
  with open(tmp_path / consolidate.METRICS_FILE) as f:
    lines = [json.loads(line) for line in f]
  assert [(m["step"], m["skipped"], m["skipped_steps"]) for m in lines] == [
      (1, False, 0), (2, True, 1), (3, True, 2)]
  assert sorted(os.listdir(tmp_path / consolidate.CHECKPOINT_DIR)) == ["2"]
  # A higher limit may be set on resuming; the round then ends as an uninterrupted run with
  # the same skipped steps does.
  config = dataclasses.replace(config, max_consecutive_skipped_steps=3)
  resumed = run_consolidation(model, model, tok, trajectories, KNOWLEDGE, config,
                              trainer=PoisonedTrainer(trainer, {1}), **kwargs)
  assert resumed.resumed_from == 2 and resumed.skipped_steps == 2
  assert [m["skipped_steps"] for m in resumed.metrics] == [0, 1, 2, 2]
  whole = run_consolidation(model, model, tok, trajectories, KNOWLEDGE, config,
                            sampler=sampler, trainer=PoisonedTrainer(trainer, {2, 3}),
                            progress=False)
  assert _deterministic(resumed.metrics) == _deterministic(whole.metrics)
  assert whole.skipped_steps == 2 and int(whole.state.step) == 2
  for a, b in zip(_params(whole.model), _params(resumed.model)):
    np.testing.assert_array_equal(a, b)


def test_a_checkpoint_from_before_new_config_fields_still_resumes():
  # A field added to the config later (here train.tail) is absent from an older checkpoint's
  # fingerprint; it compares as its default, which is what that run used.
  fingerprinted = lambda c: {k: v for k, v in json.loads(json.dumps(c.to_dict())).items()
                             if k not in consolidate.RESUMABLE_FIELDS}
  new = fingerprinted(CONFIG)
  old = json.loads(json.dumps(new))
  del old["train"]["tail"]
  assert consolidate._with_defaults(old, consolidate._default_fingerprint_config()) == new
  changed = fingerprinted(dataclasses.replace(
      CONFIG, train=dataclasses.replace(CONFIG.train, tail=True)))
  assert consolidate._with_defaults(old, consolidate._default_fingerprint_config()) != changed


# ---- bad input ----


def test_bad_input_fails_before_any_work(tok, trajectories, engine, tmp_path):
  model = engine[0]

  def run(trajs=trajectories, knowledge=KNOWLEDGE, config=CONFIG, teacher=model):
    run_consolidation(model, teacher, tok, trajs, knowledge, config, workdir=tmp_path,
                      sampler=object(), progress=False)  # a sampler that would fail if used

  with pytest.raises(ValueError, match="knowledge set is empty"):
    run(knowledge=[])
  with pytest.raises(TypeError, match="not a single string"):
    run(knowledge=KNOWLEDGE[0])
  with pytest.raises(TypeError, match=r"knowledge\[1\]"):
    run(knowledge=["a", 3])
  with pytest.raises(ValueError, match="no consolidation trajectories"):
    run(trajs=[])
  no_turns = dataclasses.replace(trajectories[0], turns=())
  with pytest.raises(ValueError, match="no turns"):
    run(trajs=[no_turns])
  turns = list(trajectories[1].turns)
  # A turn in the format written before turns carried their content: its prompt is parsed.
  turns[0] = dataclasses.replace(turns[0], prompt=insert_knowledge(turns[0].prompt, "k"),
                                 content=None, prompt_format=None)
  with pytest.raises(ValueError, match="trajectory 1, turn 0"):
    run(trajs=[trajectories[0], dataclasses.replace(trajectories[1], turns=tuple(turns))])
  with pytest.raises(ValueError, match="architectures differ"):
    run(teacher=_model(num_layers=2))
  with pytest.raises(ValueError, match="k \\(4096\\) exceeds the vocabulary"):
    run(config=dataclasses.replace(CONFIG, train=dataclasses.replace(CONFIG.train, k=4096)))
  assert os.listdir(tmp_path) == []


def test_config_validation():
  with pytest.raises(ValueError, match="train.temperature"):
    ConsolidationConfig(temperature=1.0)
  with pytest.raises(ValueError, match="forward_kl"):
    ConsolidationConfig(mode="off_policy")
  with pytest.raises(ValueError, match="mode='off_policy'"):
    ConsolidationConfig(train=TrainConfig(divergence=losses.FORWARD_KL))
  with pytest.raises(ValueError, match="games_per_step"):
    ConsolidationConfig(games_per_step=0)
  with pytest.raises(ValueError, match="context"):
    ConsolidationConfig(context="trajectories")
  with pytest.raises(ValueError, match="enable_thinking"):
    ConsolidationConfig(enable_thinking=1)
  with pytest.raises(ValueError, match="max_consecutive_skipped_steps must be an integer >= 1"):
    ConsolidationConfig(max_consecutive_skipped_steps=0)
  assert ConsolidationConfig().max_consecutive_skipped_steps == 3
  config = ConsolidationConfig(steps=3, train=TrainConfig(learning_rate=5e-6))
  assert ConsolidationConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
  with pytest.raises(ValueError, match="unknown"):
    ConsolidationConfig.from_dict({"step": 3})
