"""Tests for the built-in tiny tokenizer (oel_jax.tiny, scripts/build_tiny_tokenizer.py)."""

import importlib.util
import json
import os
import unicodedata

import pytest
import tokenizers

from oel_jax import tiny

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BUILDER = os.path.join(_REPO, "scripts", "build_tiny_tokenizer.py")

ROUND_TRIP_TEXTS = [
    "",
    "a",
    "Hello, world!",
    "The player moves [up] then [d].\n",
    "Current Board:\n\n+-----+-----+-----+\n|  P  |     |  H  |\n+-----+-----+-----+\n",
    "# # # # # #\n# _ P X O #\n# # # # # #",
    "  leading and trailing spaces  ",
    "tabs\tand\t\ttabs\r\nwindows line\rold mac\n\n\nthree newlines",
    "numbers 0123456789 3.14159 -42 1e-6 $3.50 100%",
    "unicode: caf\u00e9 na\u00efve \u00fcber \u00df \u00e6\u00f8\u00e5 \u0142\u00f3d\u017a",
    "\u4f60\u597d\u4e16\u754c \u3053\u3093\u306b\u3061\u306f \uc548\ub155 "
    "\u041f\u0440\u0438\u0432\u0435\u0442 \u0645\u0631\u062d\u0628\u0627",
    "emoji \U0001f642\U0001f680 and \u2764\ufe0f and flags \U0001f1eb\U0001f1f7",
    "Boxes on goals are shown as \u221a; arrows \u2190\u2191\u2192\u2193.",
    "<think>\nI should move right.\n</think>\n\n[right]",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|endoftext|>",
    "mixing<think>tags</think>inside words",
    "odd bytes \x00\x01\x7f and a zero-width\u200bjoiner",
]


@pytest.fixture(scope="module")
def tok():
  return tiny.load_tiny_tokenizer()


def _load_builder():
  spec = importlib.util.spec_from_file_location("build_tiny_tokenizer", _BUILDER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_path_points_at_packaged_assets():
  path = tiny.tiny_tokenizer_path()
  assert os.path.isdir(path)
  assert os.path.samefile(path, os.path.join(_REPO, "oel_jax", "assets", "tiny_tokenizer"))
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    assert os.path.isfile(os.path.join(path, name)), name


def test_loads_offline_with_expected_size(tok):
  assert os.environ.get("HF_HUB_OFFLINE") == "1"
  assert len(tok) == tiny.TOKENIZER_LEN == 2005
  vocab = tok.get_vocab()
  assert len(vocab) == tiny.TOKENIZER_LEN
  assert sorted(vocab.values()) == list(range(tiny.TOKENIZER_LEN))
  assert tiny.PADDED_VOCAB_SIZE == 2048
  assert tiny.PADDED_VOCAB_SIZE >= tiny.TOKENIZER_LEN and tiny.PADDED_VOCAB_SIZE % 128 == 0


@pytest.mark.parametrize("token,token_id,special", [
    ("<|endoftext|>", 2000, True),
    ("<|im_start|>", 2001, True),
    ("<|im_end|>", 2002, True),
    ("<think>", 2003, False),
    ("</think>", 2004, False),
])
def test_added_tokens_are_single_ids_at_documented_ids(tok, token, token_id, special):
  assert (token, token_id, special) in tiny.ADDED_TOKENS
  assert tok.convert_tokens_to_ids(token) == token_id
  assert tok.encode(token, add_special_tokens=False) == [token_id]
  # Also inside text, with no spaces around it.
  ids = tok.encode(f"ab{token}cd", add_special_tokens=False)
  assert ids.count(token_id) == 1
  assert tok.decode(ids) == f"ab{token}cd"
  # special=True tokens are dropped by skip_special_tokens; <think> tags are kept (as Qwen3).
  kept = tok.decode(ids, skip_special_tokens=True)
  assert kept == ("abcd" if special else f"ab{token}cd")
  assert (token in tok.all_special_tokens) == special


def test_eos_pad_bos(tok):
  assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == tiny.EOS_ID == 2002
  assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == tiny.PAD_ID == 2000
  assert tok.bos_token is None and tok.unk_token is None
  assert tiny.STOP_IDS == (2002, 2000)
  # No token is added around plain text (Qwen3 adds no bos).
  assert tok("hi")["input_ids"] == tok.encode("hi", add_special_tokens=False)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok, text):
  ids = tok.encode(text, add_special_tokens=False)
  assert all(0 <= i < tiny.TOKENIZER_LEN for i in ids)
  assert tok.decode(ids) == text


def test_nfc_normalisation_like_qwen3(tok):
  decomposed = "cafe\u0301"  # e + combining acute
  assert unicodedata.normalize("NFC", decomposed) == "caf\u00e9"
  ids = tok.encode(decomposed, add_special_tokens=False)
  assert tok.decode(ids) == "caf\u00e9"
  assert ids == tok.encode("caf\u00e9", add_special_tokens=False)


def test_game_words_are_single_tokens(tok):
  words = ["player", "box", "goal", "hole", "wall", "grid", "board", "up", "down", "left",
           "right", "move", "frozen", "lake", "Sokoban", "reasoning", "answer", "action",
           "experience", "think", "because", "therefore", "position", "column", "row"]
  multi = [w for w in words if len(tok.encode(" " + w, add_special_tokens=False)) != 1]
  assert not multi, f"not single tokens: {multi}"
  # Digits are split one by one, as in Qwen3.
  assert tok.tokenize("2024") == ["2", "0", "2", "4"]
  # Compression on game text: every word above is one token, digits and marks one each.
  text = "The player is at row 1, column 2. The goal is below, so I move down. [s]"
  assert len(tok.encode(text, add_special_tokens=False)) <= 25


def test_hf_tokenizer_agrees_with_raw_tokenizer_json(tok):
  """transformers v5 rebuilds Qwen2Tokenizer's pipeline; it must equal the file's."""
  raw = tokenizers.Tokenizer.from_file(os.path.join(tiny.tiny_tokenizer_path(),
                                                    "tokenizer.json"))
  assert raw.get_vocab_size(with_added_tokens=True) == tiny.TOKENIZER_LEN
  for text in ROUND_TRIP_TEXTS + ["cafe\u0301 'll 'S don't"]:
    assert raw.encode(text, add_special_tokens=False).ids == tok.encode(
        text, add_special_tokens=False), text


def test_builder_reproduces_committed_files(tmp_path):
  builder = _load_builder()
  builder.build(str(tmp_path))
  committed = tiny.tiny_tokenizer_path()
  info = json.loads(open(os.path.join(committed, "build_info.json"), encoding="utf-8").read())
  new_info = json.loads((tmp_path / "build_info.json").read_text(encoding="utf-8"))
  assert new_info["corpus_sha256"] == info["corpus_sha256"], "the builder's corpus changed"
  # Hand-written JSON: byte-stable whatever the library versions.
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    with open(os.path.join(committed, name), "rb") as f:
      assert (tmp_path / name).read_bytes() == f.read(), name
  with open(os.path.join(committed, "tokenizer.json"), "rb") as f:
    committed_json = f.read()
  if info["tokenizers_version"] == tokenizers.__version__:
    assert (tmp_path / "tokenizer.json").read_bytes() == committed_json, (
        "rebuild differs: run `python scripts/build_tiny_tokenizer.py` and commit")
  else:
    # Another tokenizers version may serialise differently: compare the tokenization.
    old = tokenizers.Tokenizer.from_str(committed_json.decode("utf-8"))
    new = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in builder.corpus() + ROUND_TRIP_TEXTS:
      assert new.encode(text).ids == old.encode(text).ids


def test_builder_output_is_what_transformers_loads(tmp_path):
  builder = _load_builder()
  builder.build(str(tmp_path))
  from oel_jax import chat  # pylint: disable=import-outside-toplevel
  rebuilt = chat.load_tokenizer(str(tmp_path))
  assert len(rebuilt) == tiny.TOKENIZER_LEN
  assert rebuilt.chat_template == builder.CHAT_TEMPLATE
  config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
  assert config["chat_template"] == builder.CHAT_TEMPLATE
  assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
