"""The OpenAI-compatible server (oel_jax.serve), driven by the official `openai` client.

The reference for every reply is today's code path: `Sampler.generate` on the request's prompt
alone (the checkpoint loaded by `load_hf`, the prompt rendered by `chat.encode_chat`), in the
test process, independent of the server's engine. The records are checked with
`oel_jax.envs.validate_record` and against the requests that made them.

One server runs in this process (uvicorn in a thread) for most tests; the API key and a server
killed with SIGKILL and restarted on the same workdir run as a subprocess (`python -m
oel_jax.serve`), as a deployment would.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jax
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

# pylint: disable=wrong-import-position
from oel_jax import chat, parallel, tiny
from oel_jax.envs import validate_record
from oel_jax.models import save_hf
from oel_jax.prompts import formats
from oel_jax.serve import checkpoint
from oel_jax.serve.app import create_app
from oel_jax.sampling import Sampler
from oel_jax.serve.engine import Engine, EngineOptions
from oel_jax.serve.protocol import Sampling
from oel_jax.serve.records import ServedModel
from oel_jax.serve.service import ChatService
from processes import free_port

MAX_TOKENS = 16  # the server's limit: every reply pads to 16 token columns (one program)
LOAD = checkpoint.LoadOptions(param_dtype="float32", compute_dtype="float32", max_seq_len=256,
                              min_prompt_bucket=64)  # every prompt here pads to 64 tokens
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["hello there", "which way is the goal?", "push the box left", "a frozen lake",
             "tell me a story about a lake", "up or down?", "what is two plus two",
             "the hole is near"]


def _checkpoint(path, seed: int) -> str:
  """A two-layer tiny model (random weights from ``seed``) with the tiny tokenizer."""
  save_hf(tiny.tiny_model(seed, num_layers=2), path, tokenizer=tiny.load_tiny_tokenizer())
  return str(path)


@pytest.fixture(scope="module", name="ckpts")
def fixture_ckpts(tmp_path_factory):
  """Two checkpoints of one architecture and tokenizer (the second one's weights differ), and
  one whose tokenizer's chat template differs."""
  root = tmp_path_factory.mktemp("ckpts")
  a, b = _checkpoint(root / "a", 0), _checkpoint(root / "b", 1)
  other = root / "other_template"
  shutil.copytree(a, other)
  with open(other / "chat_template.jinja", "a", encoding="utf-8") as f:
    f.write("{# another template #}")
  one_layer = root / "one_layer"
  save_hf(tiny.tiny_model(2, num_layers=1), one_layer, tokenizer=tiny.load_tiny_tokenizer())
  return {"a": a, "b": b, "other_template": str(other), "one_layer": str(one_layer)}


@pytest.fixture(scope="module", name="tok")
def fixture_tok(ckpts):
  return checkpoint.load_tokenizer(ckpts["a"])


class Reference:
  """`Sampler.generate` on one prompt alone, for either checkpoint's weights."""

  def __init__(self, ckpts, tok):
    self.tok = tok
    self.models = {path: checkpoint.load_model(path, LOAD) for path in (ckpts["a"], ckpts["b"])}
    self.sampler = checkpoint.make_sampler(self.models[ckpts["a"]], tok, LOAD)
    self.one_layer = ckpts["one_layer"]
    self.lock = threading.Lock()

  def reply(self, messages, *, model, max_tokens=MAX_TOKENS, temperature=0.0, top_p=1.0,
            seed=0, thinking=True):
    """``(text, finish_reason, completion tokens, prompt tokens)``."""
    ids = chat.encode_chat(self.tok, messages, enable_thinking=thinking)
    if model == self.one_layer:  # another architecture: a sampler of its own
      sampler = checkpoint.make_sampler(checkpoint.load_model(model, LOAD), self.tok, LOAD)
      out = sampler.generate([ids], max_new_tokens=max_tokens, temperature=temperature,
                             top_p=top_p, seed=[seed])
      return (self.tok.decode(out.tokens[0], skip_special_tokens=True), out.finish_reasons[0],
              len(out.tokens[0]), len(ids))
    with self.lock:
      self.sampler.update_weights(self.models[model])
      out = self.sampler.generate([ids], max_new_tokens=max_tokens, temperature=temperature,
                                  top_p=top_p, seed=[seed])
    return (self.tok.decode(out.tokens[0], skip_special_tokens=True), out.finish_reasons[0],
            len(out.tokens[0]), len(ids))


@pytest.fixture(scope="module", name="ref")
def fixture_ref(ckpts, tok):
  return Reference(ckpts, tok)


class InProcessServer:
  """uvicorn serving a `ChatService` in a thread of this process."""

  def __init__(self, ckpts, tok, workdir):
    sampler = checkpoint.make_sampler(checkpoint.load_model(ckpts["a"], LOAD), tok, LOAD)
    self.engine = Engine(sampler, ServedModel("tiny-a", 0, ckpts["a"]),
                         EngineOptions(slots=4, max_tokens=MAX_TOKENS, chunk_steps=4)).start()
    self.service = ChatService(tok, self.engine, str(workdir), LOAD)
    self.workdir = workdir
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.server = uvicorn.Server(uvicorn.Config(create_app(self.service), host="127.0.0.1",
                                                port=self.port, log_level="warning"))
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    deadline = time.time() + 60
    while not self.server.started:
      assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
      time.sleep(0.05)

  def client(self, **kwargs):
    return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                         **kwargs)

  def records(self) -> list[dict]:
    return _lines(self.workdir / "served.jsonl")

  def close(self):
    self.server.should_exit = True
    self.thread.join(30)


@pytest.fixture(scope="module", name="server")
def fixture_server(ckpts, tok, tmp_path_factory):
  server = InProcessServer(ckpts, tok, tmp_path_factory.mktemp("served"))
  yield server
  server.close()


def _lines(path) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    data = f.read()
  assert not data or data.endswith(b"\n"), f"{path} ends in a torn line"
  return [json.loads(line) for line in data.decode().splitlines()]


def _user(text: str) -> list[dict]:
  return [{"role": "user", "content": text}]


def _post(url: str, body, headers=None) -> tuple[int, dict]:
  """A raw POST (for what the openai client cannot send): ``(status, decoded body)``."""
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  request = urllib.request.Request(url, data=data, method="POST", headers={
      "Content-Type": "application/json", **(headers or {})})
  try:
    with urllib.request.urlopen(request, timeout=120) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _record_for(server, reply_id: str) -> dict:
  (record,) = [r for r in server.records() if r["metadata"]["request_id"] == reply_id]
  return record


def test_chat_completion_models_and_record(server, ref, ckpts):
  client = server.client()
  models = client.models.list()
  assert [(m.id, m.oel_round) for m in models.data] == [("tiny-a", 0)]
  messages = [{"role": "system", "content": "You are terse."},
              {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
              {"role": "user", "content": QUESTIONS[1]}]
  raw = client.chat.completions.with_raw_response.create(model="anything", messages=messages,
                                                         temperature=0, max_tokens=12)
  reply = raw.parse()
  text, reason, n, prompt_tokens = ref.reply(messages, model=ckpts["a"], max_tokens=12)
  assert reply.choices[0].message.content == text and text
  assert reply.choices[0].finish_reason == reason
  assert reply.model == "tiny-a"
  assert (reply.usage.prompt_tokens, reply.usage.completion_tokens,
          reply.usage.total_tokens) == (prompt_tokens, n, prompt_tokens + n)
  # Without a conversation id, the request is its own conversation.
  assert raw.headers["x-conversation-id"] == reply.id and reply.id.startswith("chatcmpl-")
  record = _record_for(server, reply.id)
  validate_record(record)
  (turn,) = record["turns"]
  assert record["model"] == {"name": "tiny-a", "round": 0}
  assert record["env"] == {"id": "chat", "settings": {}} and record["seed"] is None
  assert (turn["prompt"], turn["observation"], turn["response"]) == (QUESTIONS[1],) * 2 + (text,)
  assert turn["prompt_format"] == "chat"
  assert formats.parse_chat_content(turn["content"]) == messages
  assert turn["metadata"] == {"finish_reason": reason, "prompt_tokens": prompt_tokens,
                              "completion_tokens": n, "enable_thinking": True}
  meta = record["metadata"]
  assert meta["conversation_id"] == meta["request_id"] == reply.id
  assert abs(meta["created"] - time.time()) < 120
  assert meta["sampling"]["temperature"] == 0.0 and meta["sampling"]["max_tokens"] == 12
  assert record["final_feedback"] == "" and record["outcome"] is None


def test_greedy_and_seeded_replies_equal_generate(server, ref, ckpts):
  client = server.client()
  for i, question in enumerate(QUESTIONS[:3]):
    for sampling in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.9),
                     dict(temperature=0.7)):
      reply = client.chat.completions.create(model="m", messages=_user(question), seed=100 + i,
                                             max_completion_tokens=MAX_TOKENS, **sampling)
      text, reason, n, _ = ref.reply(_user(question), model=ckpts["a"], seed=100 + i,
                                     **sampling)
      assert (reply.choices[0].message.content, reply.choices[0].finish_reason,
              reply.usage.completion_tokens) == (text, reason, n), (question, sampling)
  # Without a seed the server draws one and records it: the reply is generate's with it.
  reply = client.chat.completions.create(model="m", messages=_user(QUESTIONS[3]),
                                         temperature=1.0, max_tokens=MAX_TOKENS)
  sampling = _record_for(server, reply.id)["metadata"]["sampling"]
  assert sampling["seed_given"] is False
  assert reply.choices[0].message.content == ref.reply(
      _user(QUESTIONS[3]), model=ckpts["a"], temperature=1.0, seed=sampling["seed"])[0]


def test_thinking_off_and_stop_strings(server, ref, ckpts, tok):
  client = server.client()
  reply = client.chat.completions.create(
      model="m", messages=_user(QUESTIONS[0]), temperature=0, max_tokens=MAX_TOKENS,
      extra_body={"chat_template_kwargs": {"enable_thinking": False}})
  text, _, _, prompt_tokens = ref.reply(_user(QUESTIONS[0]), model=ckpts["a"], thinking=False)
  assert reply.choices[0].message.content == text
  assert prompt_tokens == reply.usage.prompt_tokens == len(
      chat.encode_chat(tok, _user(QUESTIONS[0]), enable_thinking=False))
  assert prompt_tokens != len(chat.encode_chat(tok, _user(QUESTIONS[0]), enable_thinking=True))
  assert _record_for(server, reply.id)["turns"][0]["metadata"]["enable_thinking"] is False
  # A stop string cuts the text before it; the reply counts the tokens up to it.
  full, _, n, _ = ref.reply(_user(QUESTIONS[2]), model=ckpts["a"])
  stop = full[len(full) // 2:len(full) // 2 + 3]
  reply = client.chat.completions.create(model="m", messages=_user(QUESTIONS[2]),
                                         temperature=0, max_tokens=MAX_TOKENS,
                                         stop=[stop, "never in it"])
  assert reply.choices[0].message.content == full[:full.index(stop)]
  assert reply.choices[0].finish_reason == "stop"
  assert 1 <= reply.usage.completion_tokens < n
  record = _record_for(server, reply.id)
  assert record["turns"][0]["response"] == full[:full.index(stop)]
  assert record["metadata"]["sampling"]["stop"] == [stop, "never in it"]


def test_stream_gives_the_whole_reply_as_chunks(server, ref, ckpts):
  client = server.client()
  chunks = list(client.chat.completions.create(
      model="m", messages=_user(QUESTIONS[5]), temperature=0, max_tokens=MAX_TOKENS,
      stream=True, stream_options={"include_usage": True}))
  text, reason, n, prompt_tokens = ref.reply(_user(QUESTIONS[5]), model=ckpts["a"])
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
  assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, reason]
  assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
      prompt_tokens, n)
  assert len({c.id for c in chunks}) == 1
  assert _record_for(server, chunks[0].id)["turns"][0]["response"] == text


def test_concurrent_requests_share_steps_and_equal_their_solo_replies(server, ref, ckpts):
  """Eight clients at once, in two sampling groups: each reply is generate's on its prompt
  alone (greedy, and sampled with its seed), and the rows shared decode steps."""
  client = server.client()
  jobs = [dict(question=q, seed=7 * i, temperature=0.0 if i % 2 else 0.8)
          for i, q in enumerate(QUESTIONS)]
  stats = dict(server.engine.stats)
  barrier = threading.Barrier(len(jobs))

  def ask(job):
    barrier.wait()
    return client.chat.completions.create(model="m", messages=_user(job["question"]),
                                          temperature=job["temperature"], seed=job["seed"],
                                          max_tokens=MAX_TOKENS)

  with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
    replies = list(pool.map(ask, jobs))
  for job, reply in zip(jobs, replies):
    text, reason, n, _ = ref.reply(_user(job["question"]), model=ckpts["a"], seed=job["seed"],
                                   temperature=job["temperature"])
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason,
            reply.usage.completion_tokens) == (text, reason, n), job
  # Decode calls ran several rows at once (one at a time, each call would hold one row).
  calls = server.engine.stats["decode_calls"] - stats.get("decode_calls", 0)
  rows = server.engine.stats["decode_rows"] - stats.get("decode_rows", 0)
  assert rows / calls >= 2, (rows, calls)
  assert len({r.id for r in replies}) == len(jobs)
  for reply in replies:
    validate_record(_record_for(server, reply.id))


BAD_REQUESTS = [
    (dict(messages=[{"role": "bot", "content": "hi"}]), "messages[0].role"),
    (dict(messages=[]), "messages"),
    (dict(messages=None), "messages"),
    (dict(messages=[{"role": "user"}]), "messages[0].content"),
    (dict(messages=[{"role": "user", "content": 3}]), "messages[0].content"),
    (dict(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
     "messages[1].role"),
    (dict(n=2), "n"),
    (dict(temperature=2.5), "temperature"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=MAX_TOKENS + 1), "max_tokens"),
    (dict(max_tokens=4, max_completion_tokens=5), "max_completion_tokens"),
    (dict(seed=-1), "seed"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(stream="yes"), "stream"),
    (dict(stream_options={"include_usage": True}), "stream_options"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(logprobs=True), "logprobs"),
    (dict(model=""), "model"),
    (dict(metadata={"conversation_id": ""}), "metadata.conversation_id"),
    (dict(extra_body={"chat_template_kwargs": {"enable_thinking": "yes"}}),
     "chat_template_kwargs.enable_thinking"),
    (dict(extra_body={"oel_prompt": {"format": "nope", "content": "x"}}), "oel_prompt.format"),
    (dict(extra_body={"oel_prompt": {"format": "oel_game", "content": "x"}}), "oel_prompt"),
    (dict(extra_body={"oel_env": {"id": 3}}), "oel_env.id"),
    (dict(extra_body={"frobnicate": 1}), "frobnicate"),
    (dict(messages=[{"role": "user", "content": "word " * 300}]), "messages"),
]


def test_malformed_requests_get_4xx_naming_the_field_and_nothing_is_recorded(server):
  client = server.client()
  before = server.records()
  for overrides, field in BAD_REQUESTS:
    kwargs = {"model": "m", "messages": _user("hi"), "max_tokens": 4, **overrides}
    with pytest.raises(openai.BadRequestError) as info:
      client.chat.completions.create(**kwargs)
    assert info.value.status_code == 400
    error = info.value.body
    assert error["param"] == field, (overrides, error)
    assert error["message"].startswith(f"{field}: "), (overrides, error)
  # What the client cannot send: a body that is not JSON, or not an object.
  url = f"{server.url}/v1/chat/completions"
  assert _post(url, b"{not json")[0] == 400
  status, body = _post(url, [1, 2])
  assert status == 400 and "JSON object" in body["error"]["message"]
  status, body = _post(url, {"model": "m", "messages": _user("hi")},
                       {"X-Conversation-Id": " "})
  assert (status, body["error"]["param"]) == (400, "X-Conversation-Id")
  assert server.records() == before


def test_feedback(server):
  client = server.client()
  raw = client.chat.completions.with_raw_response.create(
      model="m", messages=_user("hi"), max_tokens=4, extra_headers={"X-Conversation-Id": "c-1"})
  assert raw.headers["x-conversation-id"] == "c-1"
  reply = client.chat.completions.create(model="m", messages=_user("again"), max_tokens=4,
                                         metadata={"conversation_id": "c-2"})
  assert _record_for(server, reply.id)["metadata"]["conversation_id"] == "c-2"
  assert _record_for(server, raw.parse().id)["metadata"]["conversation_id"] == "c-1"
  url = f"{server.url}/v1/feedback"
  feedback = server.workdir / "feedback.jsonl"
  before = _lines(feedback)
  status, body = _post(url, {"conversation_id": "c-1", "success": True, "feedback": "well done"})
  assert status == 200 and body["conversation_id"] == "c-1"
  assert _post(url, {"conversation_id": "c-2", "reward": 0.25})[0] == 200
  status, body = _post(url, {"conversation_id": "unknown", "success": False})
  assert (status, body["error"]["param"]) == (404, "conversation_id")
  status, body = _post(url, {"conversation_id": "c-1"})
  assert status == 400 and "empty feedback" in body["error"]["message"]
  status, body = _post(url, {"conversation_id": "c-1", "reward": "high"})
  assert (status, body["error"]["param"]) == (400, "reward")
  status, body = _post(url, {"conversation_id": "", "success": True})
  assert (status, body["error"]["param"]) == (400, "conversation_id")
  lines = _lines(feedback)[len(before):]
  assert [{k: v for k, v in line.items() if k != "created"} for line in lines] == [
      {"conversation_id": "c-1", "success": True, "reward": None, "feedback": "well done"},
      {"conversation_id": "c-2", "success": None, "reward": 0.25, "feedback": None}]
  assert all(abs(line["created"] - time.time()) < 120 for line in lines)


def test_declared_prompt_and_env_are_recorded(server):
  client = server.client()
  content = "You are at (0, 0). The goal is at (2, 2)."
  messages = formats.GAME.messages(content)
  reply = client.chat.completions.create(
      model="m", messages=messages, max_tokens=4,
      extra_body={"oel_prompt": {"format": "oel_game", "content": content,
                                 "observation": "at (0, 0)"},
                  "oel_env": {"id": "frozenlake", "settings": {"size": 3}}})
  record = _record_for(server, reply.id)
  validate_record(record)
  (turn,) = record["turns"]
  assert (turn["prompt_format"], turn["content"], turn["observation"]) == (
      "oel_game", content, "at (0, 0)")
  assert turn["prompt"] == messages[0]["content"]
  assert record["env"] == {"id": "frozenlake", "settings": {"size": 3}}


def test_hot_swap_under_load(server, ref, ckpts):
  """Requests run in threads while the server reloads: none fails, each record names the model
  that produced the reply, and each reply is that model's own (never a mix of two)."""
  client = server.client(timeout=300)
  stop_at = [float("inf")]
  results, errors = [], []

  def keep_asking(worker):
    i = 0
    while time.time() < stop_at[0]:
      question = QUESTIONS[(worker + i) % len(QUESTIONS)]
      try:
        reply = client.chat.completions.create(model="m", messages=_user(question),
                                               temperature=0, max_tokens=MAX_TOKENS)
        results.append((question, reply))
      except Exception as e:  # pylint: disable=broad-except
        errors.append(e)
      i += 1

  threads = [threading.Thread(target=keep_asking, args=(w,)) for w in range(4)]
  for t in threads:
    t.start()
  time.sleep(2)
  url = f"{server.url}/admin/reload"
  status, body = _post(url, {"model": ckpts["b"], "round": 1, "name": "tiny-b"})
  assert status == 200 and (body["id"], body["oel_round"]) == ("tiny-b", 1)
  time.sleep(2)
  stop_at[0] = time.time()
  for t in threads:
    t.join()
  assert not errors
  models = {"tiny-a": ckpts["a"], "tiny-b": ckpts["b"]}
  served = {}
  for question, reply in results:
    record = _record_for(server, reply.id)
    name = record["model"]["name"]
    assert (reply.model, record["model"]["round"]) == (name, {"tiny-a": 0, "tiny-b": 1}[name])
    served.setdefault(name, 0)
    served[name] += 1
    text = ref.reply(_user(question), model=models[name])[0]
    assert reply.choices[0].message.content == text, (question, name)
  assert served.get("tiny-a", 0) > 0 and served.get("tiny-b", 0) > 0, served
  # The two models answer differently: a mixed reply could not have passed.
  assert ref.reply(_user(QUESTIONS[0]), model=ckpts["a"]) != ref.reply(
      _user(QUESTIONS[0]), model=ckpts["b"])
  assert [(m.id, m.oel_round) for m in client.models.list().data] == [("tiny-b", 1)]
  # A checkpoint with another tokenizer, or none at all, is refused and nothing changes.
  status, body = _post(url, {"model": ckpts["other_template"]})
  assert status == 400 and "tokenizer is not the served one (the chat template differs)" in \
      body["error"]["message"]
  status, body = _post(url, {"model": str(server.workdir / "missing")})
  assert (status, body["error"]["param"]) == (400, "model")
  status, body = _post(url, {"model": ckpts["a"], "round": -1})
  assert (status, body["error"]["param"]) == (400, "round")
  # Another architecture with the same tokenizer: a sampler of its own.
  status, body = _post(url, {"model": ckpts["one_layer"], "round": 2})
  assert status == 200 and (body["id"], body["oel_round"]) == (ckpts["one_layer"], 2)
  reply = client.chat.completions.create(model="m", messages=_user(QUESTIONS[0]),
                                         temperature=0, max_tokens=MAX_TOKENS)
  assert reply.choices[0].message.content == ref.reply(_user(QUESTIONS[0]),
                                                       model=ckpts["one_layer"])[0]
  # Back to the first model; without a name the path names it.
  status, body = _post(url, {"model": ckpts["a"]})
  assert status == 200 and (body["id"], body["oel_round"]) == (ckpts["a"], None)
  reply = client.chat.completions.create(model="m", messages=_user(QUESTIONS[0]),
                                         temperature=0, max_tokens=MAX_TOKENS)
  assert _record_for(server, reply.id)["model"] == {"name": ckpts["a"], "round": None}
  assert reply.choices[0].message.content == ref.reply(_user(QUESTIONS[0]),
                                                       model=ckpts["a"])[0]


def test_every_served_line_is_a_valid_record(server):
  records = server.records()
  assert len(records) > 20
  for record in records:
    validate_record(record)


# ---- a server process: the API key, a SIGKILL and a restart ----

KEY = "s3cret"


def _start_process(ckpt: str, workdir, port: int) -> subprocess.Popen:
  env = {**os.environ, "OEL_API_KEY": KEY,
         "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
  process = subprocess.Popen(
      [sys.executable, "-m", "oel_jax.serve", "--model", ckpt, "--workdir", str(workdir),
       "--port", str(port), "--max_tokens", str(MAX_TOKENS), "--max_seq_len", "256",
       "--min_prompt_bucket", "64", "--compute_dtype", "float32", "--served_model_name",
       "deployed", "--round", "3", "--log_level", "warning"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 180
  while True:
    if process.poll() is not None:
      raise AssertionError(f"the server exited: {process.stdout.read()}")
    try:
      request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models",
                                       headers={"Authorization": f"Bearer {KEY}"})
      with urllib.request.urlopen(request, timeout=5):
        return process
    except (urllib.error.URLError, ConnectionError):
      assert time.time() < deadline, "the server did not start in 180 s"
      time.sleep(0.5)


def test_api_key_and_a_killed_server_keeps_its_log(ckpts, ref, tmp_path):
  port = free_port()
  process = _start_process(ckpts["a"], tmp_path, port)
  try:
    base = f"http://127.0.0.1:{port}/v1"
    bad = openai.OpenAI(base_url=base, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
      bad.models.list()
    with pytest.raises(openai.AuthenticationError):
      bad.chat.completions.create(model="m", messages=_user("hi"), max_tokens=4)
    # No key at all (the client will not send that: a raw request).
    status, body = _post(f"{base}/chat/completions", {"model": "m", "messages": _user("hi")})
    assert status == 401 and "API key" in body["error"]["message"]
    status, _ = _post(f"http://127.0.0.1:{port}/admin/reload", {"model": ckpts["b"]})
    assert status == 401
    status, _ = _post(f"http://127.0.0.1:{port}/v1/feedback", {"conversation_id": "x",
                                                                 "success": True})
    assert status == 401
    client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0)
    first = [client.chat.completions.create(
        model="deployed", messages=_user(q), temperature=0, max_tokens=MAX_TOKENS,
        metadata={"conversation_id": f"before-{i}"}) for i, q in enumerate(QUESTIONS[:3])]
    # One more in flight when the server is killed: it may or may not have been recorded.
    threading.Thread(target=lambda: _ignore(lambda: client.chat.completions.create(
        model="deployed", messages=_user(QUESTIONS[3]), max_tokens=MAX_TOKENS)),
                     daemon=True).start()
    time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
  finally:
    process.kill()
    process.stdout.close()
  served = tmp_path / "served.jsonl"
  kept = _lines(served)
  assert [r["metadata"]["request_id"] for r in kept[:3]] == [r.id for r in first]
  assert len(kept) in (3, 4)
  for record in kept:
    validate_record(record)
    assert record["model"] == {"name": "deployed", "round": 3}
  # A write cut by a crash leaves a torn last line; the restarted server cuts it off.
  with open(served, "ab") as f:
    f.write(b'{"version": 1, "env": {"id": "ch')
  process = _start_process(ckpts["a"], tmp_path, port)
  try:
    client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(model="deployed", messages=_user(QUESTIONS[4]),
                                           temperature=0, max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == ref.reply(_user(QUESTIONS[4]),
                                                         model=ckpts["a"])[0]
    # Feedback may name a conversation served before the restart.
    status, _ = _post(f"http://127.0.0.1:{port}/v1/feedback",
                      {"conversation_id": "before-1", "reward": 1.0},
                      {"Authorization": f"Bearer {KEY}"})
    assert status == 200
  finally:
    process.terminate()
    process.wait(30)
    process.stdout.close()
  after = _lines(served)
  assert after[:len(kept)] == kept
  assert [r["metadata"]["request_id"] for r in after[len(kept):]] == [reply.id]
  for record in after:
    validate_record(record)
  assert [line["conversation_id"] for line in _lines(tmp_path / "feedback.jsonl")] == [
      "before-1"]


def _ignore(fn):
  try:
    fn()
  except Exception:  # pylint: disable=broad-except
    pass


def test_command_line_bad_input(tmp_path, capsys):
  from oel_jax.serve.__main__ import main  # pylint: disable=import-outside-toplevel
  assert main(["--model", str(tmp_path / "missing"), "--workdir", str(tmp_path / "w")]) == 2
  assert capsys.readouterr().err.strip().endswith("missing: not a checkpoint directory")
  (tmp_path / "empty").mkdir()
  assert main(["--model", str(tmp_path / "empty"), "--workdir", str(tmp_path / "w")]) == 2
  assert "cannot load the checkpoint's tokenizer" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    main(["--model", "m", "--workdir", "w", "--max_tokens", "9000", "--max_seq_len", "8192"])
  assert "--max_tokens (9000) must be less than --max_seq_len (8192)" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    main(["--model", "m", "--workdir", "w", "--mesh", "2,2"])
  assert "--mesh must be DATA,FSDP,TP" in capsys.readouterr().err
  assert main(["--model", "m", "--workdir", "w", "--mesh", "3,1,1"]) == 2  # 8 devices here
  assert capsys.readouterr().err.startswith("error: --mesh 3,1,1: ")


def test_engine_on_a_mesh_gives_generates_replies(ckpts, tok, ref):
  """An engine over a sampler split on a 2x2x2 mesh (simulated CPU devices; three slots, four
  rows): concurrent requests, greedy and sampled, get `generate`'s replies on one device."""
  mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tp=2))
  on_mesh = dataclasses.replace(LOAD, mesh=mesh)  # what `--mesh 2,2,2` loads with
  sampler = checkpoint.make_sampler(checkpoint.load_model(ckpts["a"], on_mesh), tok, on_mesh)
  assert sampler.mesh is mesh
  weights = jax.tree.leaves(sampler._params)  # pylint: disable=protected-access
  assert {len(x.sharding.device_set) for x in weights} == {8}
  engine = Engine(sampler, ServedModel("tiny-a", 0, ckpts["a"]),
                  EngineOptions(slots=3, max_tokens=MAX_TOKENS, chunk_steps=4)).start()
  try:
    requests = [([{"role": "user", "content": q}], temperature, seed)
                for q, seed in zip(QUESTIONS[:5], range(5)) for temperature in (0.0, 0.8)]
    futures = [engine.submit(chat.encode_chat(tok, messages, enable_thinking=True),
                             Sampling(temperature, 1.0, 0, MAX_TOKENS, seed, ()), seed)
               for messages, temperature, seed in requests]
    for (messages, temperature, seed), future in zip(requests, futures):
      got = future.result(timeout=600)
      ids = chat.encode_chat(tok, messages, enable_thinking=True)
      assert (tok.decode(got.tokens, skip_special_tokens=True), got.finish_reason,
              len(got.tokens), len(ids)) == ref.reply(messages, model=ckpts["a"],
                                                      temperature=temperature, seed=seed)
  finally:
    engine.stop()
