"""Chat formatting over transformers' tokenizers: templates, reasoning splits, stop tokens.

Every prompt the models see is rendered by the checkpoint's own chat template through
``tokenizer.apply_chat_template``; this module never writes a template for a real checkpoint.
(The built-in tiny tokenizer, ``oel_jax.tiny``, carries a Qwen3-style template of its own.)

Thinking. Qwen3 thinking models take ``enable_thinking``: on, the generation prompt ends with
``<|im_start|>assistant\\n`` and the model writes ``<think>\\n...\\n</think>\\n\\n`` then its
answer; off, the template appends an empty think block and the model answers directly. Templates
that do not know the flag (Instruct-2507) ignore it.

Splitting reasoning from answer (``split_reasoning``) follows the official OEL code
(microsoft/LMOps ``oel/``), which cuts a response at its last ``</think>`` and keeps what follows
as the answer. For a response with an unterminated ``<think>`` (the token budget ran out in the
middle of the reasoning) that code keeps no answer in the game loop (it replaces the response
by a format-error note, so no action is parsed); we likewise return all the text as reasoning
and an empty answer. (Its extraction stage, by contrast, keeps such a text whole; the extraction
code decides that for itself.)
"""

from collections.abc import Mapping, Sequence
from typing import Any

THINK_START = "<think>"
THINK_END = "</think>"
# Qwen3's turn terminators: <|im_end|> ends a chat turn, <|endoftext|> ends a document (and
# is the base models' eos). Qwen3's generation_config lists both: eos_token_id [151645, 151643].
TURN_END_TOKENS = ("<|im_end|>", "<|endoftext|>")

_ROLES_HINT = "a list of {'role': str, 'content': str} dicts"


def load_tokenizer(path_or_id: str, **kwargs: Any) -> Any:
  """Loads a tokenizer with ``transformers.AutoTokenizer`` (never with remote code).

  Args:
    path_or_id: a local tokenizer/checkpoint directory, or a hub id (needs the network or a
      populated cache; with ``HF_HUB_OFFLINE=1`` only the cache is used).
    **kwargs: passed to ``AutoTokenizer.from_pretrained`` (``revision``, ``cache_dir``, ...).

  Returns:
    A ``transformers.PreTrainedTokenizerBase``.

  Raises:
    ValueError: ``trust_remote_code`` was asked for.
  """
  # Imported here: transformers takes seconds to import, and only loading a tokenizer needs it.
  import transformers  # pylint: disable=import-outside-toplevel

  if kwargs.pop("trust_remote_code", False):
    raise ValueError("load_tokenizer: trust_remote_code is not allowed (oel_jax never runs "
                     "code shipped with a checkpoint)")
  return transformers.AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=False,
                                                    **kwargs)


def _check_messages(messages: Any) -> list[dict[str, Any]]:
  if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
    raise TypeError(f"messages must be {_ROLES_HINT}, got {type(messages).__name__}")
  if not messages:
    raise ValueError("messages is empty: give at least one message")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping):
      raise TypeError(f"messages[{i}] must be a dict, got {type(m).__name__}")
    role = m.get("role")
    if not isinstance(role, str) or not role:
      raise ValueError(f"messages[{i}] has no 'role' (a non-empty str); got {role!r}")
    if not isinstance(m.get("content"), str):
      raise ValueError(f"messages[{i}] (role {role!r}): 'content' must be a str, got "
                       f"{type(m.get('content')).__name__}")
    out.append(dict(m))
  return out


def _check_template(tokenizer: Any) -> None:
  if not getattr(tokenizer, "chat_template", None):
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    raise ValueError(f"tokenizer {name!r} has no chat template (tokenizer_config.json "
                     "'chat_template' or chat_template.jinja); oel_jax uses the checkpoint's "
                     "own template and does not write one")


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *,
                enable_thinking: bool, add_generation_prompt: bool = True) -> str:
  """Renders a conversation to text with the tokenizer's own chat template.

  Args:
    tokenizer: a transformers tokenizer with a chat template.
    messages: ``[{"role": ..., "content": ...}, ...]``.
    enable_thinking: passed to the template (Qwen3: False appends an empty think block after
      the generation prompt). Templates without the flag ignore it.
    add_generation_prompt: append the opening of an assistant turn.

  Returns:
    The prompt text, exactly as the model sees it (special tokens as text).
  """
  messages = _check_messages(messages)
  _check_template(tokenizer)
  text = tokenizer.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=add_generation_prompt,
      enable_thinking=bool(enable_thinking))
  if not isinstance(text, str):
    raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, "
                    "expected str")
  return text


def _as_id_list(out: Any) -> list[int]:
  """Normalises apply_chat_template(tokenize=True) results across transformers versions."""
  if isinstance(out, Mapping) or hasattr(out, "keys"):  # BatchEncoding / dict (v5 default).
    out = out["input_ids"]
  if hasattr(out, "tolist"):  # array / tensor
    out = out.tolist()
  out = list(out)
  if out and not isinstance(out[0], int) and hasattr(out[0], "__len__"):
    if len(out) != 1:
      raise ValueError(f"expected one sequence of token ids, got a batch of {len(out)}")
    out = list(out[0])
  return [int(i) for i in out]


def encode_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *,
                enable_thinking: bool, add_generation_prompt: bool = True) -> list[int]:
  """Renders a conversation with the tokenizer's chat template and returns its token ids.

  The ids equal ``tokenizer.encode(render_chat(...), add_special_tokens=False)``: the template
  writes every special token itself, so none is added.

  Returns:
    A list of Python ints.
  """
  messages = _check_messages(messages)
  _check_template(tokenizer)
  out = tokenizer.apply_chat_template(
      messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt,
      enable_thinking=bool(enable_thinking))
  return _as_id_list(out)


def split_reasoning(text: str, *, think_open: bool = False) -> tuple[str, str]:
  """Splits a thinking model's output into (reasoning, answer).

  * With ``</think>``: the text is cut at the **last** ``</think>``. The reasoning is what comes
    before it, with surrounding whitespace and one leading ``<think>`` removed; the answer is
    what follows, stripped of surrounding whitespace.
  * Without ``</think>`` but starting with ``<think>`` (after whitespace), or with
    ``think_open=True``: the reasoning never ended (the token budget ran out), so all of it is
    reasoning (leading ``<think>`` and surrounding whitespace removed) and the answer is "".
  * Otherwise (no think tags: thinking off, or a non-thinking model): reasoning is "" and the
    answer is the whole text, stripped.

  Args:
    text: the decoded response, without the turn's stop token (decode with
      ``skip_special_tokens=True``, which keeps Qwen3's ``<think>`` tags: they are not
      special tokens).
    think_open: the prompt itself ended with ``<think>`` (templates that open the think block
      for the model, such as Qwen3 *-Thinking-2507), so the text starts inside the reasoning.

  Returns:
    ``(reasoning, answer)``.
  """
  if not isinstance(text, str):
    raise TypeError(f"split_reasoning expects str, got {type(text).__name__}")
  answer = after_reasoning(text)
  if answer is not None:
    return _strip_think_start(text[:len(text) - len(answer) - len(THINK_END)]), answer.strip()
  if think_open or opens_reasoning(text):
    return _strip_think_start(text), ""
  return "", text.strip()


def after_reasoning(text: str) -> str | None:
  """The text after the last ``</think>``, as it is (not stripped); None when there is none.

  The one place a reply is cut at its reasoning: `split_reasoning` (chat replies),
  `oel_jax.envs.strip_reasoning` (game replies) and `oel_jax.experience.drop_reasoning`
  (extractor replies) differ only in what they make of a reply without ``</think>``.
  """
  if THINK_END not in text:
    return None
  return text.rsplit(THINK_END, 1)[1]


def opens_reasoning(text: str) -> bool:
  """Whether ``text`` starts (after whitespace) with ``<think>``."""
  return text.lstrip().startswith(THINK_START)


def _strip_think_start(text: str) -> str:
  text = text.strip()
  if text.startswith(THINK_START):
    text = text[len(THINK_START):].strip()
  return text


def stop_token_ids(tokenizer: Any) -> list[int]:
  """The ids that end an assistant turn: ``<|im_end|>``, ``<|endoftext|>``, the eos token.

  Tokens the vocabulary lacks are skipped; the result is deduplicated, in that order.

  Raises:
    ValueError: the tokenizer has none of them.
  """
  vocab = tokenizer.get_vocab()
  ids: list[int] = []
  for token in TURN_END_TOKENS:
    if token in vocab:
      ids.append(int(vocab[token]))
  eos = getattr(tokenizer, "eos_token_id", None)
  if isinstance(eos, int):
    ids.append(eos)
  elif isinstance(eos, (list, tuple)):
    ids.extend(int(i) for i in eos)
  out = list(dict.fromkeys(ids))
  if not out:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    raise ValueError(f"tokenizer {name!r} has no stop token: none of {TURN_END_TOKENS} is in "
                     "its vocabulary and it has no eos_token")
  return out
