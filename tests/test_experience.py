"""Tests for the extraction stage (oel_jax.experience).

A scripted extractor stands in for the model: it reads which trajectory each prompt holds (a
tag in the observation) and answers with items naming that trajectory and the step's seed, so
the knowledge each run ends with spells out the order it was built in. One smoke test drives
the real tiny model through the real Sampler.
"""

import dataclasses
import json
import os
import re
import string

import pytest

from oel_jax import chat, prompts, tiny
from oel_jax import experience as ex
from oel_jax.envs import EnvSpec, ModelInfo, Outcome, Trajectory, Turn
from oel_jax.prompts import formats
from oel_jax.sampling import ChatCompletion, Sampler

# The figures as the paper's text renders them (one paragraph each; arXiv:2603.16856, App. B.2).
FIG10 = (
    'You are an AI language model that continuously refines its internal experience. Here is the '
    'interaction history (the game environment (input) and your response and action (output)): '
    '{latest_experience} Here is the previous experience: # Experience {previous_experience} Your '
    'task: Based on the multi-round interaction history, generate experience for future learning. '
    'You should conduct a deep, comparative analysis to infer the game rules and the fundamental '
    'principles behind winning and losing. Using the interaction history and environment '
    'feedback, hypothesize the game rules and effective winning strategies, and organize these '
    'insights into 1-2 concise, high-level, and widely applicable experience items that help the '
    'player succeed in the game. Rules: - The experience you generate MUST be formatted strictly '
    'as a markdown item which starts with "- EXPERIENCE ITEM:": - EXPERIENCE ITEM: \u2026 - '
    'EXPERIENCE ITEM: \u2026 - The experience you generate will be directly appended to the '
    'previous experience. Do not repeat the previous experience. Make sure the newly generated '
    'experience is different from the previous experience. - Your generated experience should be '
    'possible rules, instructions or winning strategies for the game. The experience should be '
    'generally useful rather than only applicable for the current map (board). After careful '
    'reasoning step by step, output the final result in exactly this format: Additional '
    'Experience (Rules or Strategies): # Experience - EXPERIENCE ITEM: \u2026')
FIG11 = (
    'You are an AI language model that continuously refines its internal experience. Here is the '
    'interaction history (previous experience, the game environment (input) and your response '
    'and action (output)): {latest_experience} Here is the previous experience: # Experience '
    '{previous_experience} Your task: Based on the multi-round interaction history and the '
    'previous experience, generate experience for future learning. You should conduct a deep, '
    'comparative analysis to infer the game rules and the fundamental principles behind winning '
    'and losing. Using the interaction history and environment feedback, hypothesize the game '
    'rules and effective winning strategies, and organize these insights into experience items '
    'that help the player succeed in the game. Rules: - The experience you generate will be '
    'directly appended to the previous experience. Do not repeat the previous experience. Make '
    'sure the newly generated experience is different from the previous experience. - Your '
    'generated experience should be possible rules, instructions or winning strategies for the '
    'game. The experience should be generally useful rather than only applicable for the current '
    'map (board). After careful reasoning step by step, output the final additional experience.')

M = ex.ITEM_PREFIX


@pytest.fixture(scope="module")
def tok():
  return tiny.load_tiny_tokenizer()


def _traj(j: int, turns: int = 2) -> Trajectory:
  return Trajectory(
      env=EnvSpec("frozenlake"), model=ModelInfo("m", 0), seed=j,
      turns=[Turn(observation=f"[GAME] MAP-{j} turn {t}", prompt=f"prompt {j}.{t}",
                  response=f"<think>\nthink {j}.{t}\n</think>\n\nmove [down]", action="[down]")
             for t in range(turns)],
      final_feedback="Summary:\nFinal Result: Failure\nFeedback: fell in a hole\n")


def _shuffled(**fields) -> ex.ExtractionConfig:
  """An ExtractionConfig drawing its pool in a seeded shuffle: these tests were written when
  that was the default (now "chunks", the loop's and the official order)."""
  return ex.ExtractionConfig(pool_order="shuffle", **fields)


def _pool(size: int) -> list[Trajectory]:
  return [_traj(j) for j in range(size)]


class FakeExtractor:
  """Answers each prompt with one item naming its trajectory tag and the call's seed."""

  def __init__(self, reply=None, fail_at_call=None):
    self.calls = []  # (conversations, seed)
    self.reply = reply or (lambda tag, seed, prompt: (
        f"<think>\n{M} draft that must not be kept\n</think>\n\nAdditional Experience:\n"
        f"# Experience\n{M} from MAP-{tag} s{seed}"))
    self.fail_at_call = fail_at_call

  def __call__(self, conversations, *, seed):
    if self.fail_at_call is not None and len(self.calls) == self.fail_at_call:
      raise RuntimeError("extractor crashed")
    self.calls.append((conversations, seed))
    out = []
    for conv in conversations:
      assert len(conv) == 1 and conv[0]["role"] == "user"
      prompt = conv[0]["content"]
      latest = prompt.split("Here is the previous experience:")[0]
      tag = int(re.search(r"MAP-(\d+)", latest).group(1))
      out.append(self.reply(tag, seed, prompt))
    return out


# ---------------------------------------------------------------------------------------------
# Prompt files.


def _fold(text):
  return " ".join(text.replace("\u2026", "...").split())


def test_prompt_files_are_the_papers_figures():
  assert _fold(prompts.load("extraction_structured")) == _fold(FIG10)
  assert _fold(prompts.load("extraction_unstructured")) == _fold(FIG11)
  for name in ("extraction_structured", "extraction_unstructured",
               "extraction_structured_official", "extraction_unstructured_official"):
    fields = {f for _, f, _, _ in string.Formatter().parse(prompts.load(name)) if f is not None}
    assert fields == {"latest_experience", "previous_experience"}, name
    assert prompts.load(name).endswith(".\n") or prompts.load(name).endswith("...\n")
  # The official wording differs from the paper's in exactly one phrase per prompt.
  s, u = prompts.load("extraction_structured"), prompts.load("extraction_unstructured")
  assert prompts.load("extraction_structured_official") == s.replace(
      "interaction history, generate", "interaction history and the previous experience, generate")
  assert prompts.load("extraction_unstructured_official") == u.replace(
      "(previous experience, the game environment", "(the game environment")
  assert s.startswith("You are an AI language model that continuously refines its internal "
                      "experience.\nHere is the interaction history (the game")


# ---------------------------------------------------------------------------------------------
# Formatting and prompts.


def test_format_trajectory_exact():
  t = Trajectory(
      env=EnvSpec("frozenlake"), model=ModelInfo("m"),
      turns=[Turn(observation="[GAME] board A", prompt="p0",
                  response="<think>\nwhy\n</think>\n\nI go [down]"),
             Turn(observation="[GAME] board B", prompt="p1", response="[right]")],
      final_feedback="Summary:\nFinal Result: Success\nFeedback: reached the goal\n")
  assert ex.format_trajectory(t) == (
      "\nRound0_Input: [GAME] board A\n\nRound0_Output: <think>\nwhy\n</think>\n\nI go [down]"
      "\nRound1_Input: [GAME] board B\n\nRound1_Output: [right]"
      "\n\n\nSummary:\nFinal Result: Success\nFeedback: reached the goal\n\n")
  bare = dataclasses.replace(t, turns=t.turns[1:], final_feedback="")
  assert ex.format_trajectory(bare) == "\nRound0_Input: [GAME] board B\n\nRound0_Output: [right]"


@pytest.mark.parametrize("fmt", ["structured", "unstructured"])
@pytest.mark.parametrize("with_previous", [True, False])
def test_extraction_prompt(fmt, with_previous):
  config = ex.ExtractionConfig(knowledge_format=fmt, with_previous=with_previous)
  t = _traj(7, turns=1)
  text = ex.format_trajectory(t)
  known = f"{M} old one"
  head = ("You are an AI language model that continuously refines its internal experience.\n"
          "Here is the interaction history (")
  for knowledge in ("", known):
    p = ex.extraction_prompt(t, knowledge, config)
    assert p.startswith(head)
    assert f"(output)):\n{text}\n\nHere is the previous experience:\n# Experience\n" in p
    shown = knowledge if (with_previous and knowledge) else "No previous experience."
    assert f"# Experience\n{shown}\n\nYour task:\n" in p
    assert p == ex.prompt_template(config).format(latest_experience=text,
                                                  previous_experience=shown)
  official = dataclasses.replace(config, prompt_variant="official")
  assert "and the previous experience, generate" in ex.extraction_prompt(t, "", official)


# ---------------------------------------------------------------------------------------------
# Parsing.


def test_structured_parsing_keeps_only_items_and_drops_reasoning():
  reply = (
      "<think>\nLet me draft:\n- EXPERIENCE ITEM: a draft inside the reasoning\n</think>\n\n"
      "Here is what I learned.\n"
      "Additional Experience (Rules or Strategies):\n# Experience\n"
      "- EXPERIENCE ITEM: Holes end the game.   \n"
      "  - EXPERIENCE ITEM: Indented items count.\n"
      "- a plain bullet is not an item\n"
      "1. - EXPERIENCE ITEM: Text before the marker goes.\n"
      "- EXPERIENCE ITEM: one - EXPERIENCE ITEM: two on a line\n"
      "- EXPERIENCE ITEM:   \n"
      "Closing words.\n")
  assert ex.parse_extraction(reply, "structured") == (
      "- EXPERIENCE ITEM: Holes end the game.\n"
      "- EXPERIENCE ITEM: Indented items count.\n"
      "- EXPERIENCE ITEM: Text before the marker goes.\n"
      "- EXPERIENCE ITEM: one\n"
      "- EXPERIENCE ITEM: two on a line")
  assert ex.parse_extraction("no items at all\n- just bullets", "structured") == ""
  # Without a think block the whole reply is the answer.
  assert ex.parse_extraction(f"{M} x", "structured") == f"{M} x"


def test_unstructured_parsing_keeps_the_answer():
  reply = "<think>\nplan it\n</think>\n\n  Avoid holes.\n\nGo down first.  \n"
  assert ex.parse_extraction(reply, "unstructured") == "Avoid holes.\n\nGo down first."
  assert ex.parse_extraction("  plain answer \n", "unstructured") == "plain answer"
  # The last </think> ends the reasoning.
  assert ex.parse_extraction("<think>a</think>b</think> c ", "unstructured") == "c"


def test_unterminated_reasoning_is_kept_as_raw_text_as_officially():
  reply = f"<think>\nI ran out of tokens\n{M} half-formed\n{M} another  \nand"
  assert ex.drop_reasoning(reply) == (reply, True)
  assert ex.drop_reasoning("  plain answer") == ("  plain answer", False)
  assert ex.drop_reasoning("<think>a</think> b") == (" b", False)
  # Unstructured: the raw reply is the knowledge; structured: its item lines.
  assert ex.parse_extraction(reply, "unstructured") == reply.strip()
  assert ex.parse_extraction(reply, "structured") == f"{M} half-formed\n{M} another"


def test_accumulate():
  assert ex.accumulate("", "") == ""
  assert ex.accumulate("a", "") == "a"
  assert ex.accumulate("", "b") == "b"
  assert ex.accumulate("a", "b") == "a\nb"


# ---------------------------------------------------------------------------------------------
# Truncation.


def _items(n, words=6):
  return [f"{M} rule {i} " + " ".join(f"w{i}x{k}" for k in range(words)) for i in range(n)]


def test_truncation_keeps_newest_whole_items(tok):
  items = _items(12)
  knowledge = "\n".join(items)
  total = ex.count_tokens(tok, knowledge)
  assert ex.truncate_knowledge(knowledge, total, tok, "structured") == knowledge
  costs = [ex.count_tokens(tok, it + "\n") for it in items]
  for limit in (total // 2, total // 3, costs[-1], costs[-1] + costs[-2] - 1):
    kept = ex.truncate_knowledge(knowledge, limit, tok, "structured")
    kept_items = kept.split("\n")
    assert kept_items == items[len(items) - len(kept_items):]  # a suffix of whole items
    assert ex.count_tokens(tok, kept) <= limit
    # Maximal under the official rule: one more (older) item would not fit.
    assert sum(costs[len(items) - len(kept_items) - 1:]) > limit
  assert ex.truncate_knowledge(knowledge, costs[-1], tok, "structured") == items[-1]
  # The newest item alone is too long: nothing is kept.
  assert ex.truncate_knowledge(knowledge, costs[-1] - 1, tok, "structured") == ""


def test_truncation_structured_continuations_and_preamble(tok):
  k = ("preamble line\n" + f"{M} old item\n" + f"{M} middle item\ncontinued here\n"
       + f"{M} new item")
  parts = ex.split_items(k, "structured")
  assert parts == ["preamble line", f"{M} old item", f"{M} middle item\ncontinued here",
                   f"{M} new item"]
  assert "\n".join(parts) == k
  limit = ex.count_tokens(tok, k) - 1
  kept = ex.truncate_knowledge(k, limit, tok, "structured")
  assert kept == f"{M} old item\n{M} middle item\ncontinued here\n{M} new item"
  limit = sum(ex.count_tokens(tok, p + "\n") for p in parts[2:])
  assert ex.truncate_knowledge(k, limit, tok, "structured") == (
      f"{M} middle item\ncontinued here\n{M} new item")


def test_truncation_unstructured_by_lines(tok):
  lines = ["Para one is rather long " * 3, "", "Para two.", "Para three ends it."]
  k = "\n".join(lines)
  limit = sum(ex.count_tokens(tok, line + "\n") for line in lines[1:])
  assert ex.truncate_knowledge(k, limit, tok, "unstructured") == "\nPara two.\nPara three ends it."


# ---------------------------------------------------------------------------------------------
# Runs.


def test_orders():
  config = _shuffled(num_trajectories=5, num_runs=4, seed=3)
  orders = ex.plan_orders(9, config)
  assert len(orders) == 4 and len(set(orders)) == 4  # every run its own order
  for order in orders:
    assert len(order) == 5 and len(set(order)) == 5 and all(0 <= i < 9 for i in order)
  assert ex.plan_orders(9, config) == orders
  assert ex.plan_orders(9, dataclasses.replace(config, seed=4)) != orders
  chunks = ex.plan_orders(20, dataclasses.replace(config, pool_order="chunks"))
  assert chunks == tuple(tuple(range(5 * r, 5 * r + 5)) for r in range(4))
  with pytest.raises(ValueError, match="pool holds only 4"):
    ex.plan_orders(4, config)
  with pytest.raises(ValueError, match="needs num_runs"):
    ex.plan_orders(19, dataclasses.replace(config, pool_order="chunks"))


@pytest.mark.parametrize("with_previous", [True, False])
def test_accumulation_order_and_previous_switch(tok, with_previous):
  pool = _pool(6)
  config = _shuffled(num_trajectories=4, num_runs=3, with_previous=with_previous,
                     max_knowledge_tokens=4096, seed=11)
  fake = FakeExtractor()
  state = ex.run_extraction(pool, config, generate=fake, tokenizer=tok)
  assert state.done and state.step == 4
  # One batched call per step, holding the step of every run.
  assert len(fake.calls) == 4 and all(len(convs) == 3 for convs, _ in fake.calls)
  seeds = [seed for _, seed in fake.calls]
  assert seeds == [ex.step_seed(11, i) for i in range(4)] and len(set(seeds)) == 4
  for k, order in enumerate(state.orders):
    expected = [f"{M} from MAP-{j} s{seeds[i]}" for i, j in enumerate(order)]
    assert state.knowledge[k] == "\n".join(expected)  # e_i built in the run's order
    for i, (convs, _) in enumerate(fake.calls):
      prompt = convs[k][0]["content"]
      assert ex.format_trajectory(pool[order[i]]) in prompt
      shown = "\n".join(expected[:i]) if (with_previous and i) else "No previous experience."
      assert f"# Experience\n{shown}\n\nYour task:" in prompt
    assert [h["runs"][k]["trajectory"] for h in state.history] == list(order)
    assert all(h["runs"][k]["items"] == 1 and not h["runs"][k]["empty"] for h in state.history)
  assert len(set(state.knowledge)) == 3


def test_truncation_inside_the_loop(tok):
  pool = _pool(5)
  cost = ex.count_tokens(tok, f"{M} from MAP-0 s{ex.step_seed(0, 0)}\n")
  config = _shuffled(num_trajectories=5, num_runs=2, max_knowledge_tokens=2 * cost + 1)
  state = ex.run_extraction(pool, config, generate=FakeExtractor(), tokenizer=tok)
  for k, order in enumerate(state.orders):
    seeds = [h["seed"] for h in state.history]
    assert state.knowledge[k] == "\n".join(
        f"{M} from MAP-{j} s{s}" for j, s in list(zip(order, seeds))[-2:])
    last = state.history[-1]["runs"][k]
    assert last["knowledge_items"] == 2 and last["dropped_items"] == 1
    assert last["knowledge_tokens"] == ex.count_tokens(tok, state.knowledge[k])
    assert last["knowledge_tokens"] <= config.max_knowledge_tokens


def test_k_seeds_give_k_files(tok, tmp_path):
  pool = _pool(8)
  config = _shuffled(num_trajectories=3, num_runs=4, seed=5)
  state = ex.run_extraction(pool, config, generate=FakeExtractor(), tokenizer=tok,
                            out_dir=tmp_path)
  names = sorted(os.listdir(tmp_path))
  assert names == sorted(["manifest.json", ex.STATE_FILE] +
                         [f"knowledge_{k}.txt" for k in range(4)])
  for k in range(4):
    assert (tmp_path / f"knowledge_{k}.txt").read_text("utf-8") == state.knowledge[k]
  assert len(set(state.knowledge)) == 4 and len(set(state.orders)) == 4
  loaded = ex.load_knowledge_set(tmp_path)
  assert loaded.texts == state.knowledge and len(loaded) == 4
  manifest = loaded.manifest
  assert manifest["config"] == config.to_dict() and manifest["complete"] is True
  assert manifest["orders"] == [list(o) for o in state.orders]
  assert manifest["history"] == json.loads(state.to_json())["history"]
  assert manifest["empty_extractions"] == 0 and manifest["steps"] == 3
  assert manifest["knowledge_tokens"] == [ex.count_tokens(tok, t) for t in state.knowledge]
  # A single text file loads as a one-text set.
  single = ex.load_knowledge_set(tmp_path / "knowledge_2.txt")
  assert single.texts == (state.knowledge[2],) and single.manifest == {}


def test_empty_extraction_is_recorded_not_fatal(tok, tmp_path):
  def reply(tag, seed, prompt):
    if tag % 2:
      return "<think>\nhmm\n</think>\n\nI could not find anything general."
    if tag == 4:
      return "<think>\nruns out of tokens"
    return f"{M} from MAP-{tag}"

  pool = _pool(6)
  config = ex.ExtractionConfig(num_trajectories=6, num_runs=2, pool_order="shuffle")
  state = ex.run_extraction(pool, config, generate=FakeExtractor(reply), tokenizer=tok,
                            out_dir=tmp_path)
  assert state.done
  for k, order in enumerate(state.orders):
    assert state.knowledge[k] == "\n".join(f"{M} from MAP-{j}" for j in order if j in (0, 2))
    for h, j in zip(state.history, order):
      run = h["runs"][k]
      assert run["empty"] == (j % 2 == 1 or j == 4) and run["items"] == (0 if run["empty"] else 1)
      assert run["unterminated_reasoning"] == (j == 4)
  assert ex.load_knowledge_set(tmp_path).manifest["empty_extractions"] == 2 * 4


def test_replies_cut_inside_their_reasoning_are_kept_and_counted(tok, tmp_path):
  from oel_jax import metrics  # pylint: disable=import-outside-toplevel

  def reply(tag, seed, prompt):
    if tag == 1:  # cut by the token budget, items already written inside the reasoning
      return f"<think>\nSo far:\n{M} from MAP-{tag}\nand then"
    return f"<think>ok</think>{M} from MAP-{tag}"

  config = ex.ExtractionConfig(num_trajectories=3, num_runs=1, pool_order="chunks")
  state = ex.run_extraction(_pool(3), config, generate=FakeExtractor(reply), tokenizer=tok,
                            out_dir=tmp_path)
  assert state.knowledge == ("\n".join(f"{M} from MAP-{j}" for j in range(3)),)
  assert [h["runs"][0]["unterminated_reasoning"] for h in state.history] == [False, True, False]
  stats = metrics.extraction_stats(state)
  assert stats["unterminated_replies"] == 1 and stats["empty_extractions"] == 0
  assert [s["unterminated_reasoning"] for s in stats["steps"]] == [0, 1, 0]
  assert ex.load_knowledge_set(tmp_path).manifest["unterminated_replies"] == 1


def test_nothing_extracted_at_all_gives_empty_files(tok, tmp_path):
  config = _shuffled(num_trajectories=2, num_runs=2)
  state = ex.run_extraction(_pool(3), config, generate=FakeExtractor(lambda *a: "nothing"),
                            tokenizer=tok, out_dir=tmp_path)
  assert state.knowledge == ("", "")
  assert ex.load_knowledge_set(tmp_path).texts == ("", "")


def test_chat_completions_are_accepted_and_recorded(tok):
  def generate(conversations, *, seed):
    return [ChatCompletion(text=f"<think>x</think>{M} c", reasoning="x", answer=f"{M} c",
                           tokens=[1, 2, 3], logprobs=[0.0] * 3, finish_reason="stop")
            for _ in conversations]

  state = ex.run_extraction(_pool(2), _shuffled(num_trajectories=1, num_runs=2),
                            generate=generate, tokenizer=tok)
  assert state.knowledge == (f"{M} c", f"{M} c")
  run = state.history[0]["runs"][0]
  assert run["response_tokens"] == 3 and run["finish_reason"] == "stop"
  with pytest.raises(ValueError, match="returned 1 replies for 2"):
    ex.run_extraction(_pool(2), _shuffled(num_trajectories=1, num_runs=2),
                      generate=lambda convs, seed: ["x"], tokenizer=tok)


# ---------------------------------------------------------------------------------------------
# State and resume.


def test_state_json_round_trip(tok):
  pool = _pool(4)
  config = _shuffled(num_trajectories=3, num_runs=2, knowledge_format="unstructured",
                     with_previous=False, max_knowledge_tokens=100)
  state = ex.start_extraction(pool, config)
  for _ in range(2):
    state = ex.extraction_step(state, pool, FakeExtractor(), tok)
    again = ex.ExtractionState.from_json(state.to_json())
    assert again == state and again.to_json() == state.to_json()
  with pytest.raises(ValueError, match="not an extraction state"):
    ex.ExtractionState.from_json('{"kind": "other"}')
  bad = json.loads(state.to_json())
  bad["orders"][0] = [0]
  with pytest.raises(ValueError, match="orders"):
    ex.ExtractionState.from_dict(bad)


def test_resume_mid_way_equals_uninterrupted(tok, tmp_path):
  pool = _pool(7)
  config = _shuffled(num_trajectories=5, num_runs=3, seed=2, snapshot_every=2)
  whole = ex.run_extraction(pool, config, generate=FakeExtractor(), tokenizer=tok,
                            out_dir=tmp_path / "whole")
  crashing = FakeExtractor(fail_at_call=3)
  with pytest.raises(RuntimeError, match="crashed"):
    ex.run_extraction(pool, config, generate=crashing, tokenizer=tok, out_dir=tmp_path / "cut")
  saved = ex.load_state(tmp_path / "cut" / ex.STATE_FILE)
  assert saved.step == 3 and not saved.done
  with pytest.raises(FileNotFoundError, match="manifest.json missing"):
    ex.load_knowledge_set(tmp_path / "cut")
  rest = FakeExtractor()
  resumed = ex.run_extraction(pool, config, generate=rest, tokenizer=tok,
                              out_dir=tmp_path / "cut")
  assert len(rest.calls) == 2  # only the steps left
  assert resumed == whole and resumed.to_json() == whole.to_json()
  names = [f"knowledge_{k}.txt" for k in range(3)]
  for name in names + ["manifest.json", "step_0002/manifest.json", "step_0004/knowledge_1.txt"]:
    assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
  snap = ex.load_knowledge_set(tmp_path / "whole" / "step_0002")
  assert snap.manifest["steps"] == 2 and snap.manifest["complete"] is False
  assert all(t.count("\n") == 1 for t in snap.texts)
  assert not [n for n in os.listdir(tmp_path / "cut") if n.endswith(".tmp")]
  # A different config or pool is refused, not mixed in.
  with pytest.raises(ValueError, match="another config"):
    ex.run_extraction(pool, dataclasses.replace(config, seed=3), generate=rest, tokenizer=tok,
                      out_dir=tmp_path / "cut")
  with pytest.raises(ValueError, match="another trajectory pool"):
    ex.run_extraction(pool[::-1], config, generate=rest, tokenizer=tok, out_dir=tmp_path / "cut")


# ---------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("field,value", [
    ("knowledge_format", "bullets"), ("num_trajectories", 0), ("num_runs", True),
    ("max_knowledge_tokens", 0), ("max_new_tokens", 0), ("top_p", 0.0), ("top_k", -1),
    ("temperature", -0.1), ("prompt_variant", "v4"), ("pool_order", "random"),
    ("with_previous", 1),
])
def test_config_validation(field, value):
  with pytest.raises(ValueError, match=field):
    ex.ExtractionConfig(**{field: value})


def test_config_dict_round_trip():
  config = ex.ExtractionConfig(knowledge_format="unstructured", num_trajectories=15,
                               max_knowledge_tokens=2048, with_previous=False)
  assert ex.ExtractionConfig.from_dict(config.to_dict()) == config
  assert config.generation_tokens == 2048
  with pytest.raises(ValueError, match="has no field 'n'"):
    ex.ExtractionConfig.from_dict({"n": 3})


def test_load_knowledge_set_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a knowledge set"):
    ex.load_knowledge_set(tmp_path)
  (tmp_path / "manifest.json").write_text("{nope")
  with pytest.raises(ValueError, match="manifest.json: invalid JSON"):
    ex.load_knowledge_set(tmp_path)
  (tmp_path / "manifest.json").write_text(json.dumps(
      {"kind": ex.MANIFEST_KIND, "files": ["knowledge_0.txt"]}))
  with pytest.raises(FileNotFoundError, match="knowledge_0.txt, which is missing"):
    ex.load_knowledge_set(tmp_path)
  (tmp_path / "manifest.json").write_text(json.dumps(
      {"kind": ex.MANIFEST_KIND, "files": ["../x.txt"]}))
  with pytest.raises(ValueError, match="files"):
    ex.load_knowledge_set(tmp_path)


# ---------------------------------------------------------------------------------------------
# The real thing, small.


def test_tiny_model_through_the_real_sampler(tok, tmp_path):
  sampler = Sampler(tiny.tiny_model(), eos_ids=chat.stop_token_ids(tok), pad_id=tiny.PAD_ID,
                    max_seq_len=448)  # prompts here: 435 tokens
  batches = []
  generate_tokens = sampler.generate

  def counting_generate(prompt_ids, **kwargs):
    batches.append(len(prompt_ids))
    return generate_tokens(prompt_ids, **kwargs)

  sampler.generate = counting_generate
  config = _shuffled(knowledge_format="unstructured", with_previous=False,
                     num_trajectories=2, num_runs=2, max_new_tokens=8,
                     max_knowledge_tokens=64)
  pool = [_traj(j, turns=1) for j in range(3)]
  state = ex.run_extraction(pool, config, sampler=sampler, tokenizer=tok, out_dir=tmp_path)
  assert state.done and batches == [2, 2]
  for h in state.history:
    for run in h["runs"]:
      assert 1 <= run["response_tokens"] <= 8 and run["finish_reason"] in ("stop", "length")
      assert run["knowledge_tokens"] <= 64
  assert ex.load_knowledge_set(tmp_path).texts == state.knowledge


# ---------------------------------------------------------------------------------------------
# Recorded conversations (not our games): our generic prompts, not the paper's.

# The paper's game phrases and what our conversation templates say instead (prompts/README.md).
CONVERSATION_WORDS = [
    ("the game environment (input) and your response and action (output)",
     "the user's messages (input) and your responses (output)"),
    ("to infer the game rules and the fundamental principles behind winning and losing",
     "to infer what the user needs and the fundamental principles behind helpful and unhelpful "
     "responses"),
    ("Using the interaction history and environment feedback, hypothesize the game rules and "
     "effective winning strategies",
     "Using the interaction history and the user's feedback, hypothesize the user's "
     "expectations and effective strategies for responding"),
    ("that help the player succeed in the game",
     "that help the assistant succeed in future conversations"),
    ("possible rules, instructions or winning strategies for the game",
     "possible rules, instructions or strategies for responding well"),
    ("rather than only applicable for the current map (board)",
     "rather than only applicable for the current conversation"),
]


@pytest.mark.parametrize("fmt", ["structured", "unstructured"])
def test_conversation_prompts_differ_from_the_papers_in_the_game_words_only(fmt):
  paper = prompts.load(f"extraction_{fmt}")
  for game_words, ours in CONVERSATION_WORDS:
    paper = paper.replace(game_words, ours)
  assert prompts.load(f"extraction_{fmt}_conversation") == paper
  assert "game" not in paper.lower()


def _conversation(env="chat", feedback="Too long.", outcome=Outcome(False, 0.0, "Too long.")):
  history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
  return Trajectory(
      env=EnvSpec(env), model=ModelInfo("m"),
      turns=[Turn("Hi", "Hi", "Hello!", content=formats.chat_content(history),
                  prompt_format="chat"),
             Turn("Tell me a joke", "Tell me a joke", "No.", content=formats.chat_content(
                 history + [{"role": "assistant", "content": "Hello!"},
                            {"role": "user", "content": "Tell me a joke"}]),
                  prompt_format="chat")],
      final_feedback=feedback, outcome=outcome)


def test_format_conversation_exact():
  t = _conversation()
  assert ex.format_trajectory(t) == ex.format_conversation(t) == (
      "\nSystem: Be brief.\n"
      "\nUser: Hi\n\nAssistant: Hello!\n"
      "\nUser: Tell me a joke\n\nAssistant: No.\n"
      "\n\nResult: failure (reward 0)\nFeedback: Too long.\n")
  plain = dataclasses.replace(t, turns=t.turns[:1], final_feedback="",
                              outcome=Outcome(True, 0.5, ""))
  assert ex.format_trajectory(plain) == (
      "\nSystem: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\n\nResult: success (reward 0.5)\n")
  bare = dataclasses.replace(plain, outcome=None, turns=(Turn("o", "p", "r"),))
  assert ex.format_trajectory(bare) == "\nUser: o\n\nAssistant: r\n"


@pytest.mark.parametrize("fmt", ["structured", "unstructured"])
def test_the_template_follows_the_trajectory_s_env(fmt):
  config = ex.ExtractionConfig(knowledge_format=fmt)
  chat = _conversation()
  p = ex.extraction_prompt(chat, "", config)
  assert p == prompts.load(f"extraction_{fmt}_conversation").format(
      latest_experience=ex.format_conversation(chat), previous_experience=ex.NO_PREVIOUS)
  # The prompt variant picks among the paper's game prompts only.
  assert ex.extraction_prompt(chat, "", dataclasses.replace(config, prompt_variant="official")) \
      == p
  # A conversation recorded from one of our games is read as the game it is.
  game = _conversation(env="frozenlake")
  assert ex.extraction_prompt(game, "", config) == prompts.load(f"extraction_{fmt}").format(
      latest_experience=ex.format_game(game), previous_experience=ex.NO_PREVIOUS)
  assert ex.format_trajectory(game).startswith("\nRound0_Input: Hi\n\nRound0_Output: Hello!")


def test_extraction_runs_read_a_mixed_pool_each_trajectory_with_its_own_template(tok):
  """A pool of our games and recorded conversations: each extraction call's prompt is the
  paper's for a game and ours for a conversation."""
  pool = [_traj(0, turns=1), _conversation(), _traj(1, turns=1), _conversation(env="support")]
  config = ex.ExtractionConfig(knowledge_format="unstructured", num_trajectories=4, num_runs=1,
                               with_previous=False, pool_order="chunks")
  prompts_seen = []

  def generate(conversations, *, seed):
    prompts_seen.extend(c[0]["content"] for c in conversations)
    return ["learned"] * len(conversations)

  ex.run_extraction(pool, config, generate=generate, tokenizer=tok)
  paper = prompts.load("extraction_unstructured")
  ours = prompts.load("extraction_unstructured_conversation")
  assert prompts_seen == [
      paper.format(latest_experience=ex.format_game(pool[0]), previous_experience=ex.NO_PREVIOUS),
      ours.format(latest_experience=ex.format_conversation(pool[1]),
                  previous_experience=ex.NO_PREVIOUS),
      paper.format(latest_experience=ex.format_game(pool[2]), previous_experience=ex.NO_PREVIOUS),
      ours.format(latest_experience=ex.format_conversation(pool[3]),
                  previous_experience=ex.NO_PREVIOUS)]
