"""oel_jax.trajectories: chat logs and the serve workdir's log as trajectory records.

The expected records are written out by hand from the module docstrings and the serve log
contract (``serve_log_spec.md``, issue 16), not computed by the code under test.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from oel_jax.envs import EnvSpec, ModelInfo, Outcome, Trajectory, Turn, load_trajectories
from oel_jax.prompts import formats
from oel_jax.trajectories import (LogError, import_chat_logs, load_served, outcome_of,
                                  parse_time, read_served)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_lines(path, lines, end="\n"):
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + end)
  return str(path)


SYSTEM = {"role": "system", "content": "Be brief."}
CHAT = {"id": "c1", "model": "acme-7b", "feedback": "Wrong city.", "reward": 0,
        "messages": [SYSTEM,
                     {"role": "user", "content": "Capital of France?"},
                     {"role": "assistant", "content": "Paris."},
                     {"role": "user", "content": "And of Italy?"},
                     {"role": "user", "content": [{"type": "text", "text": "Just the name."},
                                                  {"type": "image_url",
                                                   "image_url": {"url": "x"}}]},
                     {"role": "assistant", "content": None,
                      "tool_calls": [{"id": "t", "type": "function"}]},
                     {"role": "tool", "content": "Rome", "tool_call_id": "t"},
                     {"role": "assistant", "content": [{"type": "text", "text": "Milan."}]}],
        "usage": {"total_tokens": 9}}


def test_a_chat_log_becomes_exact_records(tmp_path):
  path = _write_lines(tmp_path / "chats.jsonl", [CHAT, "", {"messages": [
      {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
      "success": True}])
  trajectories, summary = import_chat_logs([path], model_name="fallback")
  history1 = [SYSTEM, {"role": "user", "content": "Capital of France?"}]
  history2 = history1 + [{"role": "assistant", "content": "Paris."},
                         {"role": "user", "content": "And of Italy?"},
                         {"role": "user", "content": "Just the name."}]
  assert trajectories == [
      Trajectory(env=EnvSpec("chat"), model=ModelInfo("acme-7b", None),
                 turns=(Turn("Capital of France?", "Capital of France?", "Paris.",
                             content=json.dumps(history1), prompt_format="chat"),
                        Turn("And of Italy?\n\nJust the name.", "Just the name.", "Milan.",
                             content=json.dumps(history2), prompt_format="chat")),
                 final_feedback="Wrong city.",
                 outcome=Outcome(success=False, reward=0.0, reason="Wrong city."),
                 metadata={"source": path, "line": 1, "id": "c1"}),
      Trajectory(env=EnvSpec("chat"), model=ModelInfo("fallback", None),
                 turns=(Turn("Hi", "Hi", "Hello", content=json.dumps(
                     [{"role": "user", "content": "Hi"}]), prompt_format="chat"),),
                 final_feedback="", outcome=Outcome(True, 1.0, ""),
                 metadata={"source": path, "line": 3}),
  ]
  # The content renders back to the messages the model saw (the chat format's own reader).
  assert formats.CHAT.messages(trajectories[0].turns[1].content) == history2
  assert (summary.lines, summary.trajectories, summary.turns) == (2, 2, 3)
  assert dict(summary.dropped_messages) == {"image_url content part": 1, "tool message": 1,
                                            "assistant tool call": 1}
  assert dict(summary.ignored_keys) == {"usage": 1}
  assert not summary.skipped_lines


def test_turns_need_a_user_message_and_lines_need_a_turn(tmp_path):
  path = _write_lines(tmp_path / "c.jsonl", [
      {"messages": [{"role": "developer", "content": "Sys"},
                    {"role": "assistant", "content": "Welcome!"},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hey"},
                    {"role": "assistant", "content": "Anything else?"},
                    {"role": "user", "content": "No"},
                    {"role": "system", "content": "Wrap up."},
                    {"role": "assistant", "content": "Bye"}]},
      {"messages": [{"role": "user", "content": "Only a question"}]}])
  trajectories, summary = import_chat_logs([path])
  (t,) = trajectories
  assert [turn.response for turn in t.turns] == ["Hey"]
  assert formats.parse_chat_content(t.turns[0].content) == [
      {"role": "system", "content": "Sys"}, {"role": "assistant", "content": "Welcome!"},
      {"role": "user", "content": "Hi"}]
  assert dict(summary.dropped_messages) == {
      "assistant message without a user message before it": 2,
      "assistant message right after a system message": 1}
  assert dict(summary.skipped_lines) == {"no assistant reply to a user message": 1}


@pytest.mark.parametrize("line, where", [
    ("{not json", "c.jsonl:2: invalid JSON"),
    ({"messages": "hi"}, "c.jsonl:2: messages: expected an array of messages, got a string"),
    ({"feedback": "x"}, "c.jsonl:2: messages: required field is missing"),
    ({"messages": [{"role": "user", "content": 3}]},
     "c.jsonl:2: messages[0].content: expected a string, a list of parts or null, got an "
     "integer"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "c.jsonl:2: messages[0].role: expected"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
     "c.jsonl:2: messages[0].content[0].text: expected a string, got null"),
    ({"messages": [], "reward": "high"}, "c.jsonl:2: reward: expected a number or null, got a "
     "string"),
    ({"messages": [], "success": 1}, "c.jsonl:2: success: expected a boolean or null"),
    ([1, 2], "c.jsonl:2: expected a JSON object, got an array"),
])
def test_malformed_lines_name_file_line_and_field(tmp_path, line, where):
  good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
  path = _write_lines(tmp_path / "c.jsonl", [good, line, good])
  with pytest.raises(LogError) as e:
    import_chat_logs([path])
  assert str(e.value).startswith(str(tmp_path / where)), str(e.value)
  assert e.value.line == 2
  trajectories, summary = import_chat_logs([path], skip_invalid=True)
  assert len(trajectories) == 2 and summary.lines == 3
  assert sum(summary.skipped_lines.values()) == 1
  assert summary.errors == [str(e.value)]


def test_skipping_counts_by_field(tmp_path):
  path = _write_lines(tmp_path / "c.jsonl", [
      {"messages": [{"role": "user", "content": 1}]},
      {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": 2}]},
      {"messages": 5}])
  trajectories, summary = import_chat_logs([path], skip_invalid=True)
  assert trajectories == []
  assert dict(summary.skipped_lines) == {"malformed: messages[].content": 2,
                                         "malformed: messages": 1}
  assert "skipped lines: malformed: messages: 1, malformed: messages[].content: 2" in \
      summary.describe()


def test_the_outcome_rule():
  assert outcome_of(None, None, "meh") is None
  assert outcome_of(None, 0.5, None) == Outcome(True, 0.5, "")
  assert outcome_of(None, 0, "no") == Outcome(False, 0.0, "no")
  assert outcome_of(None, -1, None) == Outcome(False, -1.0, "")
  assert outcome_of(True, None, None) == Outcome(True, 1.0, "")
  assert outcome_of(False, None, "bad") == Outcome(False, 0.0, "bad")
  assert outcome_of(False, 0.7, None) == Outcome(False, 0.7, "")


def test_parse_time(monkeypatch):
  monkeypatch.setenv("TZ", "America/New_York")   # a local zone that is not UTC
  time.tzset()
  assert parse_time("1700000000.5") == 1700000000.5
  assert parse_time("1970-01-01T00:01:00Z") == 60.0
  assert parse_time("1970-01-01T00:01:00") == 60.0     # UTC when no zone is named
  assert parse_time("1970-01-01T01:01:00+01:00") == 60.0
  with pytest.raises(ValueError, match="neither unix seconds nor an ISO 8601 time"):
    parse_time("yesterday")
  monkeypatch.undo()
  time.tzset()


def test_text_parts_join_with_newlines(tmp_path):
  path = _write_lines(tmp_path / "c.jsonl", [{"messages": [
      {"role": "user", "content": [{"type": "text", "text": "one"},
                                   {"type": "text", "text": "two"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "A"},
                                        {"type": "input_audio", "input_audio": {}},
                                        {"type": "text", "text": "B"}]}]}])
  (t,), summary = import_chat_logs([path])
  assert (t.turns[0].observation, t.turns[0].response) == ("one\ntwo", "A\nB")
  assert dict(summary.dropped_messages) == {"input_audio content part": 1}


# ---- the serve workdir's log, written here from the contract ----


def served_line(conversation, request, created, user, reply, *, model="m", round_=0,
                env="chat", history=None):
  messages = (history or []) + [{"role": "user", "content": user}]
  return {"version": 1, "env": {"id": env, "settings": {}}, "seed": None,
          "model": {"name": model, "round": round_},
          "turns": [{"observation": user, "prompt": user, "response": reply, "action": None,
                     "content": formats.chat_content(messages), "prompt_format": "chat",
                     "metadata": {"finish_reason": "stop", "prompt_tokens": 5,
                                  "completion_tokens": 2, "enable_thinking": False}}],
          "final_feedback": "", "outcome": None,
          "metadata": {"conversation_id": conversation, "request_id": request,
                       "created": created, "sampling": {"temperature": 0.7}}}


def feedback_line(conversation, created, success=None, reward=None, feedback=None):
  return {"conversation_id": conversation, "created": created, "success": success,
          "reward": reward, "feedback": feedback}


@pytest.fixture(name="serve_dir")
def fixture_serve_dir(tmp_path):
  d = tmp_path / "serve"
  d.mkdir()
  _write_lines(d / "served.jsonl", [
      served_line("A", "chatcmpl-1", 100.0, "a1", "r1"),
      served_line("B", "chatcmpl-2", 101.0, "b1", "s1", model="m2", round_=1),
      # Appended after a later request of A (requests finish out of order).
      served_line("A", "chatcmpl-4", 103.0, "a3", "r3", model="other",
                  history=[{"role": "user", "content": "a1"},
                           {"role": "assistant", "content": "r1"}]),
      served_line("A", "chatcmpl-3", 102.0, "a2", "r2"),
      served_line("C", "chatcmpl-5", 110.0, "c1", "t1"),
  ])
  _write_lines(d / "feedback.jsonl", [
      feedback_line("A", 104.0, success=False, feedback="too slow"),
      feedback_line("A", 105.0, reward=0.5, feedback="fine"),
      feedback_line("B", 106.0, feedback="thanks"),
      feedback_line("C", 111.0, success=True),
      feedback_line("A", 120.0, success=False, reward=0.0, feedback="late"),
  ])
  return str(d)


def test_served_requests_group_into_conversations(serve_dir):
  a, b, c = read_served(serve_dir)
  assert [t.metadata["conversation_id"] for t in (a, b, c)] == ["A", "B", "C"]
  assert [turn.response for turn in a.turns] == ["r1", "r2", "r3"]       # created order
  assert a.metadata["request_ids"] == ["chatcmpl-1", "chatcmpl-3", "chatcmpl-4"]
  assert (a.metadata["created"], a.metadata["last_created"]) == (100.0, 103.0)
  assert [turn.metadata["created"] for turn in a.turns] == [100.0, 102.0, 103.0]
  assert a.turns[1].metadata["request_id"] == "chatcmpl-3"
  assert a.turns[0].metadata["finish_reason"] == "stop"
  assert a.model == ModelInfo("m", 0) and b.model == ModelInfo("m2", 1)  # the first request's
  assert a.env == EnvSpec("chat") and a.seed is None
  # Latest feedback wins, each field by the rule: A's last word (at 120) is "late".
  assert (a.final_feedback, a.outcome) == ("late", Outcome(False, 0.0, "late"))
  assert (b.final_feedback, b.outcome) == ("thanks", None)
  assert (c.final_feedback, c.outcome) == ("", Outcome(True, 1.0, ""))


def test_served_cut_off(serve_dir):
  log = load_served(serve_dir, 105.0)
  a, b = log.trajectories
  assert [turn.response for turn in a.turns] == ["r1", "r2", "r3"]
  assert (a.final_feedback, a.outcome) == ("fine", Outcome(True, 0.5, "fine"))
  assert (log.requests, log.outside, log.feedback, log.unmatched_feedback) == (4, 1, 1, 0)
  # The cut-off itself is inside: A's third request was created at 103.
  assert [turn.response for turn in read_served(serve_dir, 103.0)[0].turns] == ["r1", "r2", "r3"]
  (a,) = read_served(serve_dir, 101.5)[:1]
  assert [turn.response for turn in a.turns] == ["r1"] and a.outcome is None
  # Since an earlier cut-off: C only (its feedback line applies), A's old feedback does not.
  later = load_served(serve_dir, None, after=105.0)
  assert [t.metadata["conversation_id"] for t in later.trajectories] == ["C"]
  assert later.unmatched_feedback == 4


def test_a_truncated_last_line_is_skipped_and_counted(serve_dir):
  path = os.path.join(serve_dir, "served.jsonl")
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(served_line("D", "chatcmpl-6", 130.0, "d", "u"))[:50])
  with open(os.path.join(serve_dir, "feedback.jsonl"), "a", encoding="utf-8") as f:
    f.write('{"conversation_id": "C", "crea')
  log = load_served(serve_dir)
  assert [t.metadata["conversation_id"] for t in log.trajectories] == ["A", "B", "C"]
  assert log.truncated == {"served.jsonl": 1, "feedback.jsonl": 1}
  assert "1 truncated last line in served.jsonl" in log.describe()


def test_a_malformed_served_line_names_file_line_and_field(serve_dir, tmp_path):
  path = os.path.join(serve_dir, "served.jsonl")
  lines = open(path).read().splitlines()
  bad = json.loads(lines[1])
  bad["turns"][0]["response"] = 7
  lines[1] = json.dumps(bad)
  open(path, "w").write("\n".join(lines) + "\n")
  with pytest.raises(LogError, match=rf"^{path}:2: turns\[0\].response: expected a string"):
    read_served(serve_dir)
  bad = json.loads(lines[2])
  del bad["metadata"]["conversation_id"]
  lines[1], lines[2] = lines[0], json.dumps(bad)
  open(path, "w").write("\n".join(lines) + "\n")
  with pytest.raises(LogError, match=rf"^{path}:3: metadata.conversation_id: required"):
    read_served(serve_dir)
  fb = os.path.join(serve_dir, "feedback.jsonl")
  open(path, "w").write(lines[0] + "\n")
  open(fb, "w").write(json.dumps(feedback_line("A", "soon")) + "\n")
  with pytest.raises(LogError, match=rf"^{fb}:1: created: expected a number, got a string"):
    read_served(serve_dir)


def test_the_command_line(tmp_path, serve_dir):
  chats = _write_lines(tmp_path / "chats.jsonl", [CHAT, {"messages": 3}])
  out = str(tmp_path / "t.jsonl")
  env = {**os.environ, "PYTHONPATH": ROOT}
  command = [sys.executable, "-m", "oel_jax.trajectories"]
  p = subprocess.run(command + ["import", "--input", chats, "--output", out],
                     capture_output=True, text=True, env=env, cwd=ROOT)
  assert p.returncode == 2 and p.stderr.strip() == \
      f"error: {chats}:2: messages: expected an array of messages, got an integer"
  assert not os.path.exists(out)
  p = subprocess.run(command + ["import", "--input", chats, "--output", out, "--skip_invalid",
                                "--env_id", "support"],
                     capture_output=True, text=True, env=env, cwd=ROOT)
  assert p.returncode == 0, p.stderr
  assert "1 trajectories, 2 turns" in p.stdout and "malformed: messages: 1" in p.stdout
  assert [t.env.id for t in load_trajectories(out)] == ["support"]
  p = subprocess.run(command + ["served", "--workdir", serve_dir, "--until",
                                "1970-01-01T00:01:45Z", "--output", out],
                     capture_output=True, text=True, env=env, cwd=ROOT)
  assert p.returncode == 0, p.stderr
  assert load_trajectories(out) == load_served(serve_dir, 105.0).trajectories
