"""Decode throughput: our Sampler vs transformers' `generate`, same weights, same run.

Model: Qwen3 with Qwen3-0.6B's widths and full 151,936 vocabulary, few layers (default 2
and 4; transformers runs beside the 4-layer model), random bf16 weights. Prompts of 32
tokens, 128 new tokens, greedy, batch 1/16/64.

Prints our per-step decode time against the machine's floor for that step, the larger of
(bytes of weights + KV cache read per step / measured read bandwidth) and (FLOPs per step /
measured bf16 matmul rate), both measured in this run. Read bandwidth, not copy bandwidth:
a decode step reads its weights and cache and writes almost nothing, and a copy, which moves
each byte twice, runs at less than half the read rate (`machine.py`). From the two layer
counts it also prints one decoder layer's time (the step's growth per added layer; the layer
counts' timings take turns, so that a shared machine's changing load falls on both) and the
rest of the step (LM head, token choice, loop) against their own floors.

  python bench/bench_sampler.py [--layers 2,4] [--batches 1,16,64] [--new 128] [--peer_layers 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from machine import best_time, copy_bandwidth, matmul_rate, read_bandwidth
from oel_jax.models import load_hf
from oel_jax.sampling import Sampler

PROMPT = 32


def build(layers: int, path: str) -> transformers.Qwen3ForCausalLM:
  config = transformers.Qwen3Config(
      vocab_size=151_936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
      num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
      rope_parameters={"rope_type": "default", "rope_theta": 1e6})
  torch.manual_seed(0)
  model = transformers.Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
  model.save_pretrained(path)
  return model


def time_ours(samplers, prompts, new, repeats):
  """Per sampler: the best of `repeats` seconds for `new` tokens and for 1 (the prefill),
  and the output. The samplers take turns within each repeat, so that load from other
  processes, which moves over minutes on a shared machine, falls on all of them alike."""
  runs = [lambda n, s=s: s.generate(prompts, max_new_tokens=n, temperature=0)
          for s in samplers]
  for run in runs:
    run(new), run(1)  # compile
  totals, prefills = [float("inf")] * len(runs), [float("inf")] * len(runs)
  for _ in range(repeats):
    for i, run in enumerate(runs):
      totals[i] = min(totals[i], best_time(lambda: run(new), 1))
      prefills[i] = min(prefills[i], best_time(lambda: run(1), 1))
  return [(total, prefill, run(new)) for total, prefill, run in zip(totals, prefills, runs)]


def time_transformers(model, prompts, new):
  ids = torch.tensor(prompts)
  kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
            attention_mask=torch.ones_like(ids))
  with torch.no_grad():
    model.generate(ids[:, :8], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4,
                                  "attention_mask": torch.ones_like(ids[:, :8])})
    t = time.perf_counter()
    out = model.generate(ids, **kw)
  return time.perf_counter() - t, out[:, ids.shape[1]:].tolist()


def floors(c, params: int, batch: int, slots: float, bw: float, rate: float
           ) -> dict[str, float]:
  """Seconds per decode step that reading the bytes (at `bw`) or doing the matmul FLOPs (at
  `rate`) takes at least: the whole step, one decoder layer, and the LM head.

  Bytes: every weight once (the embedding rows gathered are negligible; the tied LM head
  reads the whole `[V, H]` matrix) + the KV cache read at `slots` slots per row."""
  head = c.vocab_size * c.hidden_size
  layer = (params - head) / c.num_layers  # the few norm scales included
  cache = 2 * batch * slots * c.num_kv_heads * c.head_dim * 2  # one layer's K and V, bf16
  attention = 4 * batch * slots * c.num_heads * c.head_dim
  layer_floor = max((layer * 2 + cache) / bw, (2 * batch * layer + attention) / rate)
  head_floor = max(head * 2 / bw, 2 * batch * head / rate)
  step_floor = max((params * 2 + c.num_layers * cache) / bw,
                   (2 * batch * params + c.num_layers * attention) / rate)
  return {"step": step_floor, "layer": layer_floor, "head": head_floor}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", default="2,4",
                      help="layer counts; each decoder layer's time is the step's growth "
                           "from the fewest to the most layers, per layer")
  parser.add_argument("--batches", default="1,16,64")
  parser.add_argument("--new", type=int, default=128)
  parser.add_argument("--peer_layers", type=int, default=4,
                      help="the layer count also run with transformers (0: none)")
  parser.add_argument("--repeats", type=int, default=3, help="our timings: best of this many")
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  layer_counts = sorted(int(n) for n in args.layers.split(","))
  batches = [int(b) for b in args.batches.split(",")]

  rate, bw, copy = matmul_rate(), read_bandwidth(), copy_bandwidth()
  print(f"machine: {os.cpu_count()} cores; bf16 matmul {rate / 1e9:.0f} GFLOP/s; "
        f"read bandwidth {bw / 1e9:.1f} GB/s (copy {copy / 1e9:.1f} GB/s); "
        f"jax {jax.__version__}, torch {torch.__version__}")
  steps = {}  # (layers, batch) -> seconds per decode step
  bandwidths, rates = {}, {}  # (layers, batch) -> read bandwidth, matmul rate just before
  configs = {}
  print(f"Qwen3-0.6B widths, vocab 151,936, bf16; prompt {PROMPT}, {args.new} new tokens, "
        "greedy")
  print("Each batch measures the read bandwidth and matmul rate again just before its timings "
        "(on a shared machine they move) and takes its floors from those; the layer counts' "
        "timings take turns.")
  print("| layers | batch | read GB/s | GFLOP/s | ours tok/s | transformers tok/s | ratio | ours ms/step | "
        "floor ms/step | step/floor | greedy tokens equal |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  samplers, hfs = [], {}
  for layers in layer_counts:
    with tempfile.TemporaryDirectory() as path:
      hf = build(layers, path)
      model = load_hf(path, dtype=jnp.bfloat16)
    if layers == args.peer_layers:
      hfs[layers] = hf
    configs[layers] = model.config
    samplers.append(Sampler(model, eos_ids=[model.config.vocab_size - 1], pad_id=0,
                            max_seq_len=PROMPT + args.new + 32))
    del hf, model
  rng = np.random.default_rng(0)
  for batch in batches:
    prompts = rng.integers(1, 150_000, (batch, PROMPT)).tolist()
    bw, rate = read_bandwidth(repeats=3), matmul_rate()
    timed = time_ours(samplers, prompts, args.new, args.repeats)
    for layers, (total, prefill, out) in zip(layer_counts, timed):
      c = configs[layers]
      bandwidths[layers, batch], rates[layers, batch] = bw, rate
      assert min(len(x) for x in out.tokens) == args.new, "a row stopped early"
      step = steps[layers, batch] = (total - prefill) / (args.new - 1)
      floor = floors(c, c.num_params(), batch, PROMPT + args.new / 2, bw, rate)["step"]
      ours_tps = batch * args.new / total
      peer = ("-", "-", "-")
      if layers in hfs:
        hf_time, hf_tokens = time_transformers(hfs[layers], prompts, args.new)
        hf_tps = batch * args.new / hf_time
        same = np.mean([a == b for a, b in zip(out.tokens, hf_tokens)])
        peer = (f"{hf_tps:.1f}", f"{ours_tps / hf_tps:.2f}x", f"{same:.0%}")
      print(f"| {layers} | {batch} | {bw / 1e9:.1f} | {rate / 1e9:.0f} | {ours_tps:.1f} | "
            f"{peer[0]} | {peer[1]} | {step * 1e3:.1f} | {floor * 1e3:.1f} | "
            f"{step / floor:.2f} | {peer[2]} |", flush=True)

  if len(layer_counts) < 2:
    return
  lo, hi = layer_counts[0], layer_counts[-1]
  c = configs[hi]
  print(f"\nPer decoder layer (step growth from {lo} to {hi} layers) and the rest of the step "
        "(LM head, token choice, embedding, loop), against their own floors:")
  print("| batch | ms per layer | layer floor ms | layer/floor | rest ms | LM head floor ms | "
        "rest/head floor | rest share of the step |")
  print("|---|---|---|---|---|---|---|---|")
  for batch in batches:
    per_layer = (steps[hi, batch] - steps[lo, batch]) / (hi - lo)
    rest = steps[hi, batch] - hi * per_layer
    f = floors(c, c.num_params(), batch, PROMPT + args.new / 2, bandwidths[hi, batch],
               rates[hi, batch])
    print(f"| {batch} | {per_layer * 1e3:.1f} | {f['layer'] * 1e3:.2f} | "
          f"{per_layer / f['layer']:.2f} | {rest * 1e3:.1f} | {f['head'] * 1e3:.1f} | "
          f"{rest / f['head']:.2f} | {rest / steps[hi, batch]:.0%} |", flush=True)


if __name__ == "__main__":
  main()
