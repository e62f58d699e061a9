"""Command-line entry point.

For now one job: load a model and its tokenizer (the built-in tiny default, or a Hugging
Face Qwen3 checkpoint directory), render a chat prompt with the tokenizer's own template
and print the model's most likely next tokens. The online OEL loop replaces it as the
default job once its stages land.

  python -m oel_jax.main                                  # tiny default, no download
  python -m oel_jax.main --model=/path/to/Qwen3-1.7B --thinking=false
"""

from __future__ import annotations

import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "tiny",
                    "'tiny' for the built-in random tiny Qwen3, or a HF checkpoint directory.")
flags.DEFINE_string("prompt", "You are on a frozen lake. Which way do you move: [up], "
                    "[down], [left] or [right]?", "User message to complete.")
flags.DEFINE_bool("thinking", True, "Render the chat template with enable_thinking.")
flags.DEFINE_integer("top", 5, "How many next-token candidates to print.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")


def next_token_candidates(model, tokenizer, messages, *, enable_thinking: bool, top: int
                          ) -> list[tuple[str, int, float]]:
  """The `top` most likely next tokens after the rendered chat: (text, id, probability)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from oel_jax import chat  # pylint: disable=import-outside-toplevel

  ids = chat.encode_chat(tokenizer, messages, enable_thinking=enable_thinking)
  logits = model(jnp.asarray([ids]))[0, -1]
  # Rows past the tokenizer's length are padding the tokenizer can never produce.
  probs = jax.nn.softmax(logits[: len(tokenizer)])
  best = jax.lax.top_k(probs, top)
  return [(tokenizer.decode([int(i)]), int(i), float(p)) for p, i in zip(*best)]


def main(argv):
  del argv
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from oel_jax import chat, tiny  # pylint: disable=import-outside-toplevel
  from oel_jax.models import load_hf  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  dtype = getattr(jnp, FLAGS.dtype)
  if FLAGS.model == "tiny":
    model, tokenizer = tiny.tiny_model(param_dtype=dtype, compute_dtype=dtype), \
        tiny.load_tiny_tokenizer()
    name = "tiny (random weights, seed 0)"
  else:
    model, tokenizer = load_hf(FLAGS.model, dtype=dtype), chat.load_tokenizer(FLAGS.model)
    name = FLAGS.model
  messages = [{"role": "user", "content": FLAGS.prompt}]
  text = chat.render_chat(tokenizer, messages, enable_thinking=FLAGS.thinking)
  print(f"model: {name}")
  print(f"prompt ({len(tokenizer(text, add_special_tokens=False)['input_ids'])} tokens):")
  print(text)
  print(f"most likely next tokens:")
  for token, token_id, prob in next_token_candidates(
      model, tokenizer, messages, enable_thinking=FLAGS.thinking, top=FLAGS.top):
    print(f"  {prob:8.4f}  id {token_id:>6}  {token!r}")
  print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
  app.run(main)
