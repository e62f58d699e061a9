"""Tests for trajectory records and files (oel_jax.envs.trajectory).

Schema validity is checked by a small JSON Schema interpreter written here (the subset the
schema uses), independent of the package's hand-written validator; the two must agree.
"""

import json
import math
import os
import types

import pytest

from oel_jax.envs import (
    FORMAT_VERSION,
    EnvSpec,
    ModelInfo,
    Outcome,
    Trajectory,
    TrajectoryFormatError,
    TrajectoryWriter,
    Turn,
    load_trajectories,
    make_env,
    read_trajectories,
    schema,
    validate_record,
    write_trajectories,
)
from oel_jax.envs import trajectory as trajectory_module
from oel_jax.prompts import formats

# ---------------------------------------------------------------------------------------------
# A minimal JSON Schema (draft 2020-12) interpreter for the keywords the schema uses.

_KEYWORDS = {"$schema", "$id", "title", "description", "type", "properties", "required",
             "additionalProperties", "items", "$ref", "anyOf", "const", "minimum", "$defs",
             "dependentRequired"}


def _type_ok(value, name):
  return {
      "null": value is None,
      "boolean": isinstance(value, bool),
      "integer": isinstance(value, int) and not isinstance(value, bool),
      "number": (isinstance(value, (int, float)) and not isinstance(value, bool)
                 and math.isfinite(value)),
      "string": isinstance(value, str),
      "array": isinstance(value, list),
      "object": isinstance(value, dict),
  }[name]


def schema_errors(value, node, root, where="$"):
  """Returns the list of places where ``value`` breaks schema ``node``."""
  unknown = set(node) - _KEYWORDS
  assert not unknown, f"test interpreter lacks keywords {unknown}"
  if "$ref" in node:
    name = node["$ref"].removeprefix("#/$defs/")
    return schema_errors(value, root["$defs"][name], root, where)
  if "anyOf" in node:
    if any(not schema_errors(value, sub, root, where) for sub in node["anyOf"]):
      return []
    return [f"{where}: matches no anyOf branch"]
  errors = []
  if "type" in node:
    names = node["type"] if isinstance(node["type"], list) else [node["type"]]
    if not any(_type_ok(value, n) for n in names):
      return [f"{where}: not {names}"]
  if "const" in node and value != node["const"]:
    errors.append(f"{where}: not const")
  if "minimum" in node and isinstance(value, (int, float)) and value < node["minimum"]:
    errors.append(f"{where}: below minimum")
  if isinstance(value, dict):
    props = node.get("properties", {})
    for key in node.get("required", []):
      if key not in value:
        errors.append(f"{where}.{key}: missing")
    for key, needed in node.get("dependentRequired", {}).items():
      if key in value:
        errors += [f"{where}.{n}: missing beside {key}" for n in needed if n not in value]
    for key, sub in value.items():
      if key in props:
        errors += schema_errors(sub, props[key], root, f"{where}.{key}")
      elif node.get("additionalProperties") is False:
        errors.append(f"{where}.{key}: not allowed")
  if isinstance(value, list) and "items" in node:
    for i, item in enumerate(value):
      errors += schema_errors(item, node["items"], root, f"{where}[{i}]")
  return errors


# ---------------------------------------------------------------------------------------------
# Fixtures.


def _played(game, seed, responses, round_=1):
  env = make_env(game, seed=seed)
  env.reset()
  for r in responses:
    if env.done:
      break
    env.step(r)
  while not env.done:
    env.step("[left]")
  return env.trajectory(ModelInfo("Qwen/Qwen3-1.7B", round=round_),
                        metadata={"temperature": 0.7, "thinking": True})


def _synthetic():
  """A deployment's record: no seed, no outcome, odd characters everywhere."""
  return Trajectory(
      env=EnvSpec(id="support-chat", settings={"locale": "fr", "nested": {"a": [1, 2.5, None]}}),
      model=ModelInfo("/ckpt/round-3"),
      turns=[Turn(observation="Bonjour \u2028 \u2029 \r\n\t \x00 \U0001F600 \"quoted\"",
                  prompt="line1\nline2", response="<think>\u00e9</think>ok",
                  metadata={"tokens": 12, "finish_reason": "stop"}),
             Turn(observation="", prompt="", response=""),
             Turn(observation="o", prompt="line", response="r", content="line",
                  prompt_format="system_knowledge")],
      final_feedback="",
  )


@pytest.fixture(name="records")
def fixture_records():
  return [
      _played("frozenlake", 0, ["[right]", "[d]", "[s]", "[down]"]),  # Success.
      _played("frozenlake", 1, ["nothing", "[up]"]),  # Two invalid moves.
      _played("sokoban", 3, ["[up]", "[up]", "[left]", "[down]"], round_=0),
      _synthetic(),
  ]


# ---------------------------------------------------------------------------------------------
# Round trip and schema validity.


def test_written_file_reads_back_identical(tmp_path, records):
  path = tmp_path / "t.jsonl"
  assert write_trajectories(path, records) == len(records)
  it = read_trajectories(path)
  assert isinstance(it, types.GeneratorType)  # Streaming, not a list.
  back = list(it)
  assert back == records
  assert records[0].outcome.success and not records[1].outcome.success
  assert back[3].outcome is None and back[3].seed is None
  again = tmp_path / "again.jsonl"
  write_trajectories(again, back)
  assert again.read_bytes() == path.read_bytes()
  assert path.read_bytes().count(b"\n") == len(records)  # One line per record.
  assert load_trajectories(str(path)) == records


def test_written_records_are_schema_valid(tmp_path, records):
  path = tmp_path / "t.jsonl"
  write_trajectories(path, records)
  root = schema()
  lines = path.read_text("utf-8").split("\n")[:-1]  # Not splitlines: U+2028 is in a string.
  assert len(lines) == len(records)
  for line in lines:
    record = json.loads(line)
    assert record["version"] == FORMAT_VERSION
    assert schema_errors(record, root, root) == []
  # Minimal records (optional fields absent) are valid for both.
  minimal = {"env": {"id": "x"}, "model": {"name": "m"}, "turns": [], "final_feedback": ""}
  assert schema_errors(minimal, root, root) == []
  validate_record(minimal)
  t = Trajectory.from_dict(minimal)
  assert t.outcome is None and t.seed is None and t.metadata == {} and t.env.settings == {}


def _leaves(name):
  """The validator's field list for record ``name`` in schema terms."""
  out = {}
  for key, spec in trajectory_module.FIELDS[name].items():
    out[key] = (spec["types"], spec["required"], spec.get("const"), spec.get("minimum"))
  return out


def _schema_types(node):
  if "$ref" in node:
    return (node["$ref"].removeprefix("#/$defs/"),)
  if "anyOf" in node:
    return tuple(t for sub in node["anyOf"] for t in _schema_types(sub))
  if node.get("type") == "array":
    return (_schema_types(node["items"])[0] + "[]",)
  return tuple(node["type"]) if isinstance(node["type"], list) else (node["type"],)


def test_schema_file_agrees_with_the_validator_field_list():
  root = schema()
  nodes = {"Trajectory": root, **root["$defs"]}
  assert set(nodes) == set(trajectory_module.FIELDS)
  for name, node in nodes.items():
    assert node["type"] == "object" and node["additionalProperties"] is False, name
    fields = _leaves(name)
    assert set(node["properties"]) == set(fields), name
    assert set(node["required"]) == {k for k, f in fields.items() if f[1]}, name
    for key, prop in node["properties"].items():
      types_, _, const, minimum = fields[key]
      assert _schema_types(prop) == types_, (name, key)
      assert prop.get("const") == const and prop.get("minimum") == minimum, (name, key)
      assert prop.get("description"), (name, key)
    requires = {k: [f["requires"]] for k, f in trajectory_module.FIELDS[name].items()
                if "requires" in f}
    assert node.get("dependentRequired", {}) == requires, name


# ---------------------------------------------------------------------------------------------
# Malformed input.

_GOOD = {"version": 1, "env": {"id": "frozenlake", "settings": {"size": 3}}, "seed": 4,
         "model": {"name": "m", "round": 1},
         "turns": [{"observation": "o", "prompt": "p", "response": "r", "action": "[up]"},
                   {"observation": "o", "prompt": "p", "response": "r"}],
         "final_feedback": "f", "outcome": {"success": True, "reward": 1.0, "reason": "x"},
         "metadata": {}}


def _with(path, value):
  """A copy of _GOOD with the field at ``path`` (a tuple of keys) set (or deleted if ...)."""
  record = json.loads(json.dumps(_GOOD))
  node = record
  for key in path[:-1]:
    node = node[key]
  if value is ...:
    del node[path[-1]]
  else:
    node[path[-1]] = value
  return json.dumps(record)


MALFORMED = [
    # (line text, field named in the error, words in the problem)
    ("{not json", None, "invalid JSON"),
    ('{"a": NaN}', None, "invalid JSON"),
    ('{"env": {"id": "x"}, "env": {"id": "y"}}', None, "duplicate key 'env'"),
    ("[1, 2]", None, "expected a Trajectory"),
    (_with(("turns",), ...), "turns", "required field is missing"),
    (_with(("model", "name"), ...), "model.name", "required field is missing"),
    (_with(("turns", 1, "response"), 7), "turns[1].response", "expected a string, got an integer"),
    (_with(("turns", 0, "prompt"), None), "turns[0].prompt", "expected a string, got null"),
    (_with(("turns",), {"0": {}}), "turns", "expected an array of Turn objects"),
    (_with(("turns", 0), "hi"), "turns[0]", "expected a Turn object"),
    (_with(("turns", 1, "mood"), "sad"), "turns[1].mood", "unknown field"),
    (_with(("outcome", "success"), "yes"), "outcome.success", "expected a boolean"),
    (_with(("outcome", "reward"), True), "outcome.reward", "expected a number, got a boolean"),
    (_with(("outcome", "reward"), "1"), "outcome.reward", "expected a number"),
    (_with(("outcome", "reason"), ...), "outcome.reason", "required field is missing"),
    (_with(("outcome",), []), "outcome", "expected an Outcome object or null"),
    (_with(("seed",), -1), "seed", "must be >= 0"),
    (_with(("seed",), 1.5), "seed", "expected an integer or null"),
    (_with(("model", "round"), "1"), "model.round", "expected an integer or null"),
    (_with(("version",), 2), "version", "must be 1"),
    (_with(("env", "settings"), [1]), "env.settings", "expected an object, got an array"),
    (_with(("env",), "frozenlake"), "env", "expected an EnvSpec object"),
    (_with(("metadata",), None), "metadata", "expected an object, got null"),
    (_with(("final_feedback",), ...), "final_feedback", "required field is missing"),
    (_with(("turnz",), []), "turnz", "unknown field"),
    (_with(("turns", 0, "prompt_format"), "oel_game"), "turns[0].prompt_format",
     "needs turns[0].content beside it"),
    (_with(("turns", 0, "content"), 3), "turns[0].content", "expected a string"),
]


@pytest.mark.parametrize("line,field,problem", MALFORMED)
def test_malformed_line_names_file_line_and_field(tmp_path, line, field, problem):
  path = tmp_path / "bad.jsonl"
  good = json.dumps(_GOOD)
  path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n", encoding="utf-8")
  it = read_trajectories(path)
  assert next(it) and next(it)  # Lines before the bad one stream out.
  with pytest.raises(TrajectoryFormatError) as info:
    next(it)
  e = info.value
  assert (e.path, e.line, e.field) == (str(path), 4, field)
  prefix = f"{path}:4: " + (f"{field}: " if field else "")
  assert str(e).startswith(prefix) and problem in str(e), str(e)
  # The schema agrees that the record is bad (where the line is JSON at all).
  try:
    record = json.loads(line)
  except ValueError:
    return
  if "duplicate" not in problem:
    assert schema_errors(record, schema(), schema()), line


def test_non_utf8_and_blank_lines(tmp_path):
  path = tmp_path / "bin.jsonl"
  path.write_bytes(json.dumps(_GOOD).encode() + b"\n  \n\xff\xfe\n")
  with pytest.raises(TrajectoryFormatError, match=r"bin\.jsonl:3: not UTF-8"):
    list(read_trajectories(path))
  path.write_bytes(b"\n" + json.dumps(_GOOD).encode() + b"\r\n\n")
  assert len(list(read_trajectories(path))) == 1


# ---------------------------------------------------------------------------------------------
# Atomic writes.


def test_nothing_is_half_written(tmp_path, records):
  path = tmp_path / "t.jsonl"
  write_trajectories(path, records[:1])
  before = path.read_bytes()

  def failing():
    yield records[1]
    yield records[2]
    raise KeyboardInterrupt("stopped mid-file")

  with pytest.raises(KeyboardInterrupt):
    write_trajectories(path, failing())
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["t.jsonl"]  # No temporary file left behind.

  bad = Trajectory(env=EnvSpec("x"), model=ModelInfo("m"), turns=[Turn("o", "p", 5)],
                   final_feedback="")
  with pytest.raises(TrajectoryFormatError, match=r"turns\[0\]\.response"):
    write_trajectories(path, [records[0], bad])
  assert path.read_bytes() == before
  new = tmp_path / "new.jsonl"
  with pytest.raises(TrajectoryFormatError):
    write_trajectories(new, [records[0], bad])
  assert not new.exists() and os.listdir(tmp_path) == ["t.jsonl"]

  with TrajectoryWriter(new) as w:  # Streaming writer: the file appears only at the end.
    w.write(records[0])
    assert not new.exists()
  assert new.exists() and w.count == 1
  (tmp_path / "plain").touch()  # A new file gets the permissions a plain open() gives.
  assert os.stat(new).st_mode & 0o777 == os.stat(tmp_path / "plain").st_mode & 0o777
  w = TrajectoryWriter(new)
  w.write(records[1])
  w.abort()
  assert load_trajectories(new) == records[:1]


def test_record_values_must_be_exact_json():
  with pytest.raises(TrajectoryFormatError, match="not a finite number"):
    Trajectory(env=EnvSpec("x"), model=ModelInfo("m"), turns=[], final_feedback="",
               metadata={"loss": float("nan")})
  with pytest.raises(TrajectoryFormatError, match="key 1 is not a string"):
    EnvSpec("x", settings={1: "a"})
  with pytest.raises(TrajectoryFormatError, match="set is not a JSON value"):
    EnvSpec("x", settings={"a": {1, 2}})
  spec = EnvSpec("sokoban", settings={"dim_room": (6, 6)})
  assert spec.settings == {"dim_room": [6, 6]}  # Tuples are stored as JSON arrays.
  t = Trajectory(env=spec, model=ModelInfo("m"), turns=[], final_feedback="",
                 outcome=Outcome(success=True, reward=1, reason="ok"))
  assert t.outcome.reward == 1.0 and isinstance(t.outcome.reward, float)
  assert Trajectory.from_json(t.to_json()) == t
  with pytest.raises(Exception):
    t.seed = 3  # Frozen.


def test_records_without_content_fields_read_and_write_as_before(tmp_path):
  """A turn of today's format (no content, no prompt_format) round-trips without them."""
  line = json.dumps(_GOOD)
  t = Trajectory.from_json(line)
  assert all(turn.content is None and turn.prompt_format is None for turn in t.turns)
  assert all("content" not in turn and "prompt_format" not in turn
             for turn in t.to_dict()["turns"])


def test_played_turns_record_their_content_and_format():
  t = _played("frozenlake", 0, ["[right]", "[d]"])
  for turn in t.turns:
    assert turn.prompt_format == "oel_game"
    assert formats.GAME.messages(turn.content) == [{"role": "user", "content": turn.prompt}]
