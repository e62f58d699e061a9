"""Decode throughput: our Sampler vs transformers' `generate`, same weights, same run.

Model: Qwen3 with Qwen3-0.6B's widths and full 151,936 vocabulary, fewer layers (default
4), random bf16 weights. Prompts of 32 tokens, 128 new tokens, greedy, batch 1/16/64.

Also prints our per-step decode time against the machine's floor for that step, the
larger of (bytes of weights + KV cache read per step / measured read bandwidth) and
(FLOPs per step / measured bf16 matmul rate), both measured in this run. Read bandwidth, not
copy bandwidth: a decode step reads its weights and cache and writes almost nothing, and a
copy, which moves each byte twice, runs at less than half the read rate (`machine.py`).

  python bench/bench_sampler.py [--layers 4] [--batches 1,16,64] [--new 128]
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

from machine import copy_bandwidth, matmul_rate, read_bandwidth
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


def time_ours(sampler, prompts, new):
  sampler.generate(prompts, max_new_tokens=new, temperature=0)  # compile
  sampler.generate(prompts, max_new_tokens=1, temperature=0)
  t = time.perf_counter()
  out = sampler.generate(prompts, max_new_tokens=new, temperature=0)
  total = time.perf_counter() - t
  t = time.perf_counter()
  sampler.generate(prompts, max_new_tokens=1, temperature=0)
  prefill = time.perf_counter() - t
  lengths = [len(x) for x in out.tokens]
  return total, prefill, lengths, out


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


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--batches", default="1,16,64")
  parser.add_argument("--new", type=int, default=128)
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())

  rate, bw, copy = matmul_rate(), read_bandwidth(), copy_bandwidth()
  print(f"machine: {os.cpu_count()} cores; bf16 matmul {rate / 1e9:.0f} GFLOP/s; "
        f"read bandwidth {bw / 1e9:.1f} GB/s (copy {copy / 1e9:.1f} GB/s); "
        f"jax {jax.__version__}, torch {torch.__version__}")
  with tempfile.TemporaryDirectory() as path:
    hf = build(args.layers, path)
    model = load_hf(path, dtype=jnp.bfloat16)
  c = model.config
  params = c.num_params()
  print(f"model: Qwen3-0.6B widths, {c.num_layers} layers, vocab {c.vocab_size}, "
        f"{params / 1e6:.0f}M params, bf16; prompt {PROMPT}, {args.new} new tokens, greedy")
  sampler = Sampler(model, eos_ids=[c.vocab_size - 1], pad_id=0,
                    max_seq_len=PROMPT + args.new + 32)
  rng = np.random.default_rng(0)
  print("| batch | ours tok/s | transformers tok/s | ratio | ours ms/step | floor ms/step | "
        "step/floor | greedy tokens equal |")
  print("|---|---|---|---|---|---|---|---|")
  for batch in [int(b) for b in args.batches.split(",")]:
    prompts = rng.integers(1, 150_000, (batch, PROMPT)).tolist()
    total, prefill, lengths, out = time_ours(sampler, prompts, args.new)
    assert min(lengths) == args.new, "a row stopped early; pick another eos id"
    hf_time, hf_tokens = time_transformers(hf, prompts, args.new)
    ours_tps = batch * args.new / total
    hf_tps = batch * args.new / hf_time
    step = (total - prefill) / (args.new - 1)
    # Bytes: every weight once (embedding rows gathered are negligible; the tied LM head
    # reads the whole [V, H] matrix) + the mean KV cache read per step.
    weight_bytes = params * 2
    slots = PROMPT + args.new / 2
    cache_bytes = 2 * c.num_layers * batch * slots * c.num_kv_heads * c.head_dim * 2
    flops = 2 * batch * (params - c.vocab_size * c.hidden_size)  # matmul weights
    flops += 2 * batch * c.vocab_size * c.hidden_size  # LM head
    flops += 4 * batch * c.num_layers * slots * c.num_heads * c.head_dim  # attention
    floor = max((weight_bytes + cache_bytes) / bw, flops / rate)
    same = np.mean([a == b for a, b in zip(out.tokens, hf_tokens)])
    print(f"| {batch} | {ours_tps:.1f} | {hf_tps:.1f} | {ours_tps / hf_tps:.2f}x | "
          f"{step * 1e3:.1f} | {floor * 1e3:.1f} | {step / floor:.2f} | {same:.0%} |",
          flush=True)


if __name__ == "__main__":
  main()
