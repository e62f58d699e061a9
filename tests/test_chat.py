"""Tests for oel_jax.chat, on the tiny Qwen3-style tokenizer (offline)."""

import copy

import numpy as np
import pytest

from oel_jax import chat, tiny

IM_START, IM_END, EOT, THINK, UNTHINK = 2001, 2002, 2000, 2003, 2004


@pytest.fixture(scope="module")
def tok():
  return tiny.load_tiny_tokenizer()


# --- render_chat: the exact Qwen3-format strings, written by hand. ---------------------------

USER_ONLY = [{"role": "user", "content": "Which way?"}]


def test_render_single_user_thinking_on(tok):
  got = chat.render_chat(tok, USER_ONLY, enable_thinking=True)
  assert got == "<|im_start|>user\nWhich way?<|im_end|>\n<|im_start|>assistant\n"


def test_render_single_user_thinking_off(tok):
  got = chat.render_chat(tok, USER_ONLY, enable_thinking=False)
  assert got == ("<|im_start|>user\nWhich way?<|im_end|>\n<|im_start|>assistant\n"
                 "<think>\n\n</think>\n\n")


def test_render_without_generation_prompt(tok):
  for thinking in (True, False):
    got = chat.render_chat(tok, USER_ONLY, enable_thinking=thinking,
                           add_generation_prompt=False)
    assert got == "<|im_start|>user\nWhich way?<|im_end|>\n"


def test_render_system_and_multiline_user(tok):
  messages = [{"role": "system", "content": "You play games."},
              {"role": "user", "content": "Board:\n# P #\n\nMove?"}]
  got = chat.render_chat(tok, messages, enable_thinking=False)
  assert got == ("<|im_start|>system\nYou play games.<|im_end|>\n"
                 "<|im_start|>user\nBoard:\n# P #\n\nMove?<|im_end|>\n"
                 "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_render_history_reasoning_stripped(tok):
  messages = [
      {"role": "user", "content": "Turn 1"},
      {"role": "assistant", "content": "<think>\nThe goal is right.\n</think>\n\nI go [right]"},
      {"role": "user", "content": "Turn 2"},
      {"role": "assistant", "content": "no think here [down]"},
      {"role": "user", "content": "Turn 3"},
  ]
  want_history = ("<|im_start|>user\nTurn 1<|im_end|>\n"
                  "<|im_start|>assistant\nI go [right]<|im_end|>\n"
                  "<|im_start|>user\nTurn 2<|im_end|>\n"
                  "<|im_start|>assistant\nno think here [down]<|im_end|>\n"
                  "<|im_start|>user\nTurn 3<|im_end|>\n")
  assert chat.render_chat(tok, messages, enable_thinking=True) == (
      want_history + "<|im_start|>assistant\n")
  assert chat.render_chat(tok, messages, enable_thinking=False) == (
      want_history + "<|im_start|>assistant\n<think>\n\n</think>\n\n")
  assert "goal is right" not in chat.render_chat(tok, messages, enable_thinking=True)


def test_render_history_without_opening_think_tag(tok):
  # Outputs of templates that open <think> in the prompt hold only the closing tag.
  messages = [{"role": "user", "content": "Q"},
              {"role": "assistant", "content": "reasoning only\n</think>\n\nA"},
              {"role": "user", "content": "Q2"}]
  assert chat.render_chat(tok, messages, enable_thinking=True) == (
      "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
      "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n")


def test_render_final_assistant_keeps_reasoning(tok):
  messages = [{"role": "user", "content": "Q"},
              {"role": "assistant", "content": "<think>\n\nstep one\nstep two\n\n</think>\n\n\nA"}]
  got = chat.render_chat(tok, messages, enable_thinking=True, add_generation_prompt=False)
  assert got == ("<|im_start|>user\nQ<|im_end|>\n"
                 "<|im_start|>assistant\n<think>\nstep one\nstep two\n</think>\n\nA<|im_end|>\n")
  # Without reasoning the final assistant message gets the empty think block (Qwen3).
  messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
  got = chat.render_chat(tok, messages, enable_thinking=True, add_generation_prompt=False)
  assert got == ("<|im_start|>user\nQ<|im_end|>\n"
                 "<|im_start|>assistant\n<think>\n\n</think>\n\nA<|im_end|>\n")


def test_render_reasoning_content_field(tok):
  messages = [{"role": "user", "content": "Q"},
              {"role": "assistant", "content": "A", "reasoning_content": "because"}]
  got = chat.render_chat(tok, messages, enable_thinking=True, add_generation_prompt=False)
  assert got == ("<|im_start|>user\nQ<|im_end|>\n"
                 "<|im_start|>assistant\n<think>\nbecause\n</think>\n\nA<|im_end|>\n")


def test_render_rejects_tool_role(tok):
  with pytest.raises(Exception, match="unsupported role"):
    chat.render_chat(tok, [{"role": "tool", "content": "{}"}], enable_thinking=True)


@pytest.mark.parametrize("messages,match", [
    ([], "empty"),
    ("hello", "list"),
    ([{"content": "x"}], "role"),
    ([{"role": "user"}], "content"),
    ([{"role": "user", "content": 3}], "content"),
    (["user: hi"], "dict"),
])
def test_render_rejects_bad_messages(tok, messages, match):
  with pytest.raises((TypeError, ValueError), match=match):
    chat.render_chat(tok, messages, enable_thinking=True)


def test_render_requires_a_chat_template(tok):
  bare = copy.deepcopy(tok)
  bare.chat_template = None
  with pytest.raises(ValueError, match="no chat template"):
    chat.render_chat(bare, USER_ONLY, enable_thinking=True)
  with pytest.raises(ValueError, match="no chat template"):
    chat.encode_chat(bare, USER_ONLY, enable_thinking=True)


# --- encode_chat -----------------------------------------------------------------------------


@pytest.mark.parametrize("thinking", [True, False])
def test_encode_matches_render(tok, thinking):
  messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Move? [w]"}]
  ids = chat.encode_chat(tok, messages, enable_thinking=thinking)
  assert isinstance(ids, list)
  assert all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
  text = chat.render_chat(tok, messages, enable_thinking=thinking)
  assert ids == tok.encode(text, add_special_tokens=False)
  assert tok.decode(ids) == text
  assert ids[0] == IM_START and ids.count(IM_START) == 3 and ids.count(IM_END) == 2
  newline = tok.encode("\n", add_special_tokens=False)
  assistant = tok.encode("assistant", add_special_tokens=False)
  if thinking:
    assert ids[-len(assistant) - 2:] == [IM_START] + assistant + newline
  else:
    block = [THINK] + tok.encode("\n\n", add_special_tokens=False) + [UNTHINK]
    block += tok.encode("\n\n", add_special_tokens=False)
    assert ids[-len(block):] == block
    assert ids[-len(block) - len(assistant) - 2:-len(block)] == [IM_START] + assistant + newline


class _FakeTokenizer:
  """Returns a fixed object from apply_chat_template, as various transformers versions do."""

  chat_template = "{{ messages }}"
  name_or_path = "fake"

  def __init__(self, result):
    self.result = result

  def apply_chat_template(self, messages, **kwargs):
    del messages, kwargs
    return self.result


@pytest.mark.parametrize("result", [
    {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]},
    [5, 6, 7],
    [[5, 6, 7]],
    np.array([5, 6, 7]),
    np.array([[5, 6, 7]]),
    {"input_ids": [[5, 6, 7]]},
])
def test_encode_normalises_return_types(result):
  ids = chat.encode_chat(_FakeTokenizer(result), USER_ONLY, enable_thinking=True)
  assert ids == [5, 6, 7]
  assert all(type(i) is int for i in ids), "numpy ints must become Python ints"


def test_encode_rejects_a_batch():
  with pytest.raises(ValueError, match="batch of 2"):
    chat.encode_chat(_FakeTokenizer([[1], [2]]), USER_ONLY, enable_thinking=True)


def test_load_tokenizer_refuses_remote_code():
  with pytest.raises(ValueError, match="trust_remote_code"):
    chat.load_tokenizer(tiny.tiny_tokenizer_path(), trust_remote_code=True)


# --- split_reasoning -------------------------------------------------------------------------


@pytest.mark.parametrize("text,want", [
    # The usual thinking output.
    ("<think>\nThe hole is below.\n</think>\n\nI move [right]", ("The hole is below.",
                                                               "I move [right]")),
    # Only the closing tag (the prompt opened <think>).
    ("reasoning\n</think>\n\n[up]", ("reasoning", "[up]")),
    # Split at the last </think>; earlier ones stay in the reasoning.
    ("<think>a</think>b</think>  c  ", ("a</think>b", "c")),
    # Empty think block (thinking off, or a model that chose not to think).
    ("<think>\n\n</think>\n\n[w]", ("", "[w]")),
    # Nothing after </think>.
    ("<think>x</think>", ("x", "")),
    # No tags at all: everything is answer.
    ("  just an answer [d]\n", ("", "just an answer [d]")),
    ("", ("", "")),
    # Unterminated <think>: the budget ran out; all reasoning, no answer.
    ("<think>\nI think I should go [left], but", ("I think I should go [left], but", "")),
    ("\n  <think>partial", ("partial", "")),
    # A <think> that does not open the text is not treated as a reasoning block.
    ("answer mentions <think> in passing", ("", "answer mentions <think> in passing")),
    # Inner whitespace of the answer is kept.
    ("<think>r</think>\nline one\n\nline two\n", ("r", "line one\n\nline two")),
])
def test_split_reasoning(text, want):
  assert chat.split_reasoning(text) == want


def test_split_reasoning_think_open():
  assert chat.split_reasoning("still thinking [up] maybe", think_open=True) == (
      "still thinking [up] maybe", "")
  assert chat.split_reasoning("done\n</think>\n\n[s]", think_open=True) == ("done", "[s]")
  assert chat.split_reasoning("still thinking", think_open=False) == ("", "still thinking")


def test_split_reasoning_on_decoded_tokens(tok):
  """The <think> tags survive skip_special_tokens=True, so decoded outputs split correctly."""
  ids = tok.encode("<think>\nGo down.\n</think>\n\n[s]", add_special_tokens=False) + [IM_END]
  text = tok.decode(ids, skip_special_tokens=True)
  assert chat.split_reasoning(text) == ("Go down.", "[s]")


def test_split_reasoning_rejects_non_str():
  with pytest.raises(TypeError):
    chat.split_reasoning([1, 2])


# --- stop_token_ids --------------------------------------------------------------------------


def test_stop_token_ids_tiny(tok):
  assert chat.stop_token_ids(tok) == [IM_END, EOT] == list(tiny.STOP_IDS)


class _VocabTokenizer:

  def __init__(self, vocab, eos_token_id):
    self._vocab = vocab
    self.eos_token_id = eos_token_id
    self.name_or_path = "vocab-only"

  def get_vocab(self):
    return dict(self._vocab)


@pytest.mark.parametrize("vocab,eos,want", [
    # Qwen3 post-trained: eos is <|im_end|> (deduplicated).
    ({"<|endoftext|>": 151643, "<|im_end|>": 151645}, 151645, [151645, 151643]),
    # Qwen3 base: eos is <|endoftext|>.
    ({"<|endoftext|>": 151643, "<|im_end|>": 151645}, 151643, [151645, 151643]),
    # Another family: its own eos only.
    ({"</s>": 2}, 2, [2]),
    # Turn-end tokens present, a different eos, in order.
    ({"<|im_end|>": 7}, 9, [7, 9]),
    # eos given as a list.
    ({"<|im_end|>": 7}, [9, 7, 11], [7, 9, 11]),
    # No eos at all.
    ({"<|endoftext|>": 3}, None, [3]),
])
def test_stop_token_ids_variants(vocab, eos, want):
  assert chat.stop_token_ids(_VocabTokenizer(vocab, eos)) == want


def test_stop_token_ids_none_found():
  with pytest.raises(ValueError, match="no stop token"):
    chat.stop_token_ids(_VocabTokenizer({"a": 0}, None))
