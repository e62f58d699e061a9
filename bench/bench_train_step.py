"""Consolidation train-step throughput: ours vs a PyTorch step built the official way.

Both steps: student = Qwen3 (prefix + response), frozen teacher = same architecture
(knowledge + prefix + response), bf16 compute, top-256 reverse KL over the response
tokens, AdamW. The PyTorch reference does what the official verl-based code does:
transformers' Qwen3 forward for both models, full-vocabulary log-softmax of each,
top-k of the student's log-probs, gather, the divergence, backward, AdamW step.

Prints tokens/s (response tokens scored per second) for both, the ratio, and our step's
achieved FLOP/s against this machine's measured bf16 matmul rate.

  python bench/bench_train_step.py [--layers 2] [--batch 4] [--prompt 128] [--response 128]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from machine import best_time, matmul_rate
from step_inputs import add_step_arguments, random_step_batch
from oel_jax.models import load_hf
from oel_jax.train import TrainConfig, Trainer

K = 256


def torch_step_fn(student, teacher, optimizer, s_ids, t_ids, s_pos, t_pos, temperature):
  """One official-style step; returns the loss."""

  def step():
    with torch.autocast("cpu", dtype=torch.bfloat16):
      with torch.no_grad():
        t_logits = teacher(t_ids).logits
      s_logits = student(s_ids).logits
    rows = torch.arange(s_ids.shape[0])[:, None]
    ls = torch.log_softmax(s_logits.float()[rows, s_pos] / temperature, -1)
    lt = torch.log_softmax(t_logits.float()[rows, t_pos] / temperature, -1)
    idx = torch.topk(ls.detach(), K, dim=-1).indices
    ls_k, lt_k = ls.gather(-1, idx), lt.gather(-1, idx)
    loss = (ls_k.exp() * (ls_k - lt_k)).sum(-1).mean()
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()
    return float(loss)

  return step


def main():
  parser = argparse.ArgumentParser()
  add_step_arguments(parser)
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  rate = matmul_rate()
  print(f"machine: {os.cpu_count()} cores; bf16 matmul {rate / 1e9:.0f} GFLOP/s; "
        f"jax {jax.__version__}, torch {torch.__version__}")

  config = transformers.Qwen3Config(
      vocab_size=151_936, hidden_size=1024, intermediate_size=3072,
      num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=8,
      head_dim=128, tie_word_embeddings=True,
      rope_parameters={"rope_type": "default", "rope_theta": 1e6})
  torch.manual_seed(0)
  hf = transformers.Qwen3ForCausalLM(config).float()
  with tempfile.TemporaryDirectory() as path:
    hf.save_pretrained(path)
    student = load_hf(path, dtype=jnp.float32, compute_dtype=jnp.bfloat16)
    teacher = load_hf(path, dtype=jnp.bfloat16)
  batch = random_step_batch(args)
  b, p, kn, r = args.batch, args.prompt, args.knowledge, args.response
  tokens = b * r
  print(f"model: Qwen3-0.6B widths, {args.layers} layers, vocab 151936; batch {b}, prompt {p}, "
        f"knowledge {kn}, response {r} ({tokens} scored tokens per step)")

  trainer = Trainer(student, TrainConfig(learning_rate=1e-6, k=K))
  state = trainer.init_state(student)
  teacher_params = trainer.teacher_params(teacher)
  state, _ = trainer.train_step(state, teacher_params, batch)  # compile
  times = []
  for _ in range(args.steps):
    state, metrics = trainer.train_step(state, teacher_params, batch)
    times.append(metrics["step_time"])
  ours = min(times)

  t_student = hf
  t_teacher = transformers.Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
  t_teacher.load_state_dict(hf.state_dict())
  optimizer = torch.optim.AdamW(t_student.parameters(), lr=1e-6, weight_decay=0.01)
  s_ids = torch.tensor(np.asarray(batch.student_ids), dtype=torch.long)
  t_ids = torch.tensor(np.asarray(batch.teacher_ids), dtype=torch.long)
  step = torch_step_fn(t_student, t_teacher, optimizer, s_ids, t_ids,
                       torch.tensor(np.asarray(batch.student_index), dtype=torch.long),
                       torch.tensor(np.asarray(batch.teacher_index), dtype=torch.long), 0.7)
  step()
  theirs = best_time(step, args.steps)

  c = student.config
  non_embed = c.num_params() - c.vocab_size * c.hidden_size
  s_len, t_len = p + r, kn + p + r
  # 6 N per student token (forward + backward), 2 N per teacher token, LM head on the
  # response tokens: 2 matmuls forward for both models + 2 backward (+1 recompute).
  flops = 6 * non_embed * b * s_len + 2 * non_embed * b * t_len
  flops += (2 + 2 + 4 + 2) * b * r * c.vocab_size * c.hidden_size
  print("| ours tok/s | PyTorch tok/s | ratio | ours step s | PyTorch step s | "
        "our FLOP/s | share of matmul rate |")
  print("|---|---|---|---|---|---|---|")
  print(f"| {tokens / ours:.1f} | {tokens / theirs:.1f} | {theirs / ours:.2f}x | {ours:.2f} | "
        f"{theirs:.2f} | {flops / ours / 1e9:.0f} G | {flops / ours / rate:.0%} |")


if __name__ == "__main__":
  main()
