"""Serving throughput: N concurrent clients through `oel_jax.serve` against `Sampler.generate`.

The peer is today's code path: one `Sampler.generate` call on all N prompts at once (greedy,
the same token budget), repeated R times. The server (the `ChatService` of `python -m
oel_jax.serve`: FastAPI, uvicorn, the engine thread over a `SlotDecoder` with N slots,
recording every reply with an fsync) serves N client threads of the official `openai` client,
each sending R requests one after the other; the clients run in a process of their own, as
they would. Both sides generate exactly the same tokens: the model's stop tokens are masked
(every reply runs to its budget, so the work is equal and the ratio is the server's overhead),
and the replies are checked to be generate's.

    python bench/bench_serve.py [--clients 8] [--requests 4] [--max_tokens 128] [--layers 4]
        [--hidden 256]

Prints tokens/s of both and their ratio (target: the server within 10% of generate).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

QUESTIONS = ["which way to the goal?", "push the box to the left", "a frozen lake, a hole",
             "what is two plus two", "tell me about the lake", "up, down, left or right?",
             "the box is stuck", "where is the hole"]


def client_main(url: str, clients: int, requests: int, max_tokens: int) -> None:
  """The client process: ``clients`` threads of ``requests`` requests; prints JSON."""
  import openai  # pylint: disable=import-outside-toplevel
  client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
  replies = [[] for _ in range(clients)]
  barrier = threading.Barrier(clients + 1)

  def run(i):
    barrier.wait()
    for r in range(requests):
      reply = client.chat.completions.create(
          model="m", messages=[{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} {r}"}],
          temperature=0, max_tokens=max_tokens)
      replies[i].append((reply.choices[0].message.content, reply.usage.completion_tokens))

  threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
  for t in threads:
    t.start()
  barrier.wait()
  start = time.perf_counter()
  for t in threads:
    t.join()
  print(json.dumps({"seconds": time.perf_counter() - start, "replies": replies}))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--clients", type=int, default=8)
  parser.add_argument("--requests", type=int, default=4)
  parser.add_argument("--max_tokens", type=int, default=128)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--chunk_steps", type=int, default=8)
  parser.add_argument("--trials", type=int, default=3)
  parser.add_argument("--client", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.client:
    client_main(args.client, args.clients, args.requests, args.max_tokens)
    return

  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import uvicorn

  from oel_jax import chat, tiny
  from oel_jax.sampling import Sampler
  from oel_jax.serve import checkpoint
  from oel_jax.serve.app import create_app
  from oel_jax.serve.engine import Engine, EngineOptions
  from oel_jax.serve.records import ServedModel
  from oel_jax.serve.service import ChatService
  from oel_jax.slots import SlotDecoder

  class NoStopSampler(Sampler):
    """Every reply runs to its budget: the stop tokens' logits are masked."""

    def _logits(self, model, hidden, keys, step):
      logits = super()._logits(model, hidden, keys, step)
      return logits.at[:, jnp.asarray(self.eos_ids)].set(-jnp.inf)

  tok = tiny.load_tiny_tokenizer()
  heads = max(1, args.hidden // 64)
  model = tiny.tiny_model(num_layers=args.layers, hidden_size=args.hidden,
                          intermediate_size=3 * args.hidden, num_heads=heads,
                          num_kv_heads=max(1, heads // 2), head_dim=64)
  load = checkpoint.LoadOptions(max_seq_len=1024, min_prompt_bucket=64)
  stops = chat.stop_token_ids(tok)
  make = lambda: NoStopSampler(model, eos_ids=stops, pad_id=tok.pad_token_id,
                               max_seq_len=load.max_seq_len,
                               min_prompt_bucket=load.min_prompt_bucket)
  n, r, t = args.clients, args.requests, args.max_tokens
  prompts = [[chat.encode_chat(tok, [{"role": "user", "content":
                                      f"{QUESTIONS[i % len(QUESTIONS)]} {k}"}],
                               enable_thinking=True) for i in range(n)] for k in range(r)]
  print(f"machine: {os.cpu_count()} cores (shared), jax {jax.__version__} "
        f"{jax.devices()[0].platform}; random Qwen3 {args.layers} layers, hidden "
        f"{args.hidden}, float32 weights, bfloat16 compute; {n} clients x {r} requests, "
        f"{t} tokens each, greedy; engine chunk_steps {args.chunk_steps}")

  direct = make()
  expected = [direct.generate(batch, max_new_tokens=t, temperature=0.0) for batch in prompts]

  def run_generate() -> tuple[int, float]:
    begin = time.perf_counter()
    outs = [direct.generate(batch, max_new_tokens=t, temperature=0.0) for batch in prompts]
    return sum(len(x) for out in outs for x in out.tokens), time.perf_counter() - begin

  slot_sampler = make()

  def run_slots() -> tuple[int, float]:
    """The engine's decoding alone (no HTTP): each wave of n prompts through a SlotDecoder."""
    decoder = SlotDecoder(slot_sampler, n, max_new_tokens=t, temperature=0.0, top_k=0,
                          top_p=1.0, chunk_steps=args.chunk_steps)
    begin, tokens = time.perf_counter(), 0
    for batch in prompts:
      decoder.start(list(range(n)), batch, list(range(n)))
      while decoder.busy:
        tokens += sum(len(reply.tokens) for reply in decoder.run())
    return tokens, time.perf_counter() - begin

  workdir = tempfile.mkdtemp(prefix="bench_serve_")
  engine = Engine(make(), ServedModel("bench", 0, "random"),
                  EngineOptions(slots=n, max_tokens=t, chunk_steps=args.chunk_steps)
                  ).warm_up().start()
  service = ChatService(tok, engine, workdir, load)
  port = 8000 + os.getpid() % 1000
  server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port,
                                         log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  while not server.started:
    time.sleep(0.05)
  command = [sys.executable, __file__, "--client", f"http://127.0.0.1:{port}/v1",
             "--clients", str(n), "--max_tokens", str(t), "--requests", str(r)]
  same = [True]

  def run_server() -> tuple[int, float]:
    result = json.loads(subprocess.run(command, check=True, capture_output=True,
                                       text=True).stdout)
    same[0] &= all(result["replies"][i][k][0] == tok.decode(expected[k].tokens[i],
                                                            skip_special_tokens=True)
                   for i in range(n) for k in range(r))
    return sum(k for replies in result["replies"] for _, k in replies), result["seconds"]

  # Everything once first: the engine compiles a prefill program per batch bucket of requests
  # admitted together (1, 2, 4, ...), once in a server's life.
  runs = {"generate": run_generate, "slots": run_slots, "server": run_server}
  for fn in runs.values():
    fn()
  rates = {name: [] for name in runs}
  engine.stats.clear()
  for _ in range(args.trials):  # interleaved: the machine is shared, its load drifts
    for name, fn in runs.items():
      tokens, seconds = fn()
      rates[name].append(tokens / seconds)
  server.should_exit = True
  thread.join()
  print(f"engine, {args.trials} server runs: {engine.stats['prefill_calls']} prefill calls "
        f"({engine.stats['prefill_s']:.2f} s), {engine.stats['decode_s']:.2f} s decoding")
  for name, label in (("generate", f"Sampler.generate, {r} calls of {n} prompts"),
                      ("slots", f"SlotDecoder alone, {r} waves of {n} prompts"),
                      ("server", f"server, {n} clients x {r} requests")):
    print(f"{label:44s} tokens/s: " + ", ".join(f"{x:.0f}" for x in rates[name]))
  ratio = lambda a, b: statistics.median(x / y for x, y in zip(rates[a], rates[b]))
  print(f"replies equal generate's: {same[0]}")
  print(f"median ratio server / generate: {ratio('server', 'generate'):.3f}; "
        f"SlotDecoder / generate: {ratio('slots', 'generate'):.3f}; "
        f"server / SlotDecoder: {ratio('server', 'slots'):.3f}")

if __name__ == "__main__":
  main()
