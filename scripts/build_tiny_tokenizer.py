"""Builds the tiny Qwen3-style tokenizer shipped in ``oel_jax/assets/tiny_tokenizer/``.

Usage:
  python scripts/build_tiny_tokenizer.py [--out DIR]

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on English text this
script holds (prose of its own, plus procedurally generated game text covering the FrozenLake
and Sokoban vocabulary: boards, moves, reasoning, feedback, experience items). Its pipeline
mirrors Qwen3's: NFC normalisation, the Qwen2 split regex (digits one by one), byte-level
mapping without a prefix space, and a byte-level decoder, so that ``decode(encode(x)) == x`` for
any NFC text. The added tokens and their fixed ids are documented in ``oel_jax/tiny.py``.

The chat template (written for this project, not copied from Qwen) renders Qwen3's format:

  * every message as ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; roles system, user and
    assistant (no tools: any other role raises an error);
  * ``add_generation_prompt=True`` appends ``<|im_start|>assistant\\n``, and with
    ``enable_thinking=False`` also the empty think block ``<think>\\n\\n</think>\\n\\n``
    (``enable_thinking`` true or not given appends nothing more: the model opens ``<think>``
    itself);
  * assistant messages before the last user message lose their reasoning: the content is cut
    after its last ``</think>`` (leading newlines dropped), as Qwen3 does for history;
  * assistant messages after the last user message keep it, normalised to
    ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``; a ``reasoning_content`` field, when
    given, is used as the reasoning; the final message, when it is such an assistant message,
    always gets the think block, empty if it has no reasoning (as Qwen3 does).

On system, user and assistant conversations this renders what Qwen3's own template renders
(checked by hand against it), except for an assistant message holding several ``</think>``:
Qwen3 keeps the text before the first as reasoning, this template all before the last (in
both, only what follows the last ``<think>`` in it, without surrounding newlines).

Determinism: the corpus is fixed text plus text generated from a seeded ``random.Random``, and
BPE training on it is deterministic, so re-running the script reproduces the committed
``tokenizer.json`` byte for byte with the same ``tokenizers`` version (recorded in
``build_info.json``); ``tests/test_tiny.py`` checks it.
"""

import argparse
import hashlib
import json
import os
import random
import sys

import tokenizers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors, trainers

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from oel_jax import tiny  # pylint: disable=wrong-import-position
from oel_jax.atomic_write import atomic_write_bytes  # pylint: disable=wrong-import-position

DEFAULT_OUT = os.path.join(_REPO, "oel_jax", "assets", "tiny_tokenizer")

# Qwen2/Qwen3's pre-tokenizer split: contractions, words with one optional leading
# non-letter, single digits, punctuation runs with trailing newlines, newline runs, spaces.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+")

MODEL_MAX_LENGTH = 40960
SEED = 20240601

CHAT_TEMPLATE = r"""{#- oel_jax tiny tokenizer: a Qwen3-style chat template -#}
{#- Index of the last user message (Qwen3: the last message when there is none). -#}
{%- set state = namespace(last_user=messages | length - 1) -%}
{%- for m in messages -%}
  {%- if m.role == 'user' -%}{%- set state.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for m in messages -%}
  {%- if m.role not in ['system', 'user', 'assistant'] -%}
    {{- raise_exception('tiny chat template: unsupported role "' ~ m.role
                        ~ '" (system, user and assistant only)') -}}
  {%- endif -%}
  {%- set body = m.content if m.content is string else '' -%}
  {%- if m.role == 'assistant' -%}
    {%- set thought = m.reasoning_content if m.reasoning_content is string else '' -%}
    {%- if '</think>' in body -%}
      {%- set pieces = body.split('</think>') -%}
      {%- if m.reasoning_content is not string -%}
        {%- set thought = (pieces[:-1] | join('</think>')).split('<think>')[-1] -%}
      {%- endif -%}
      {%- set body = pieces[-1].lstrip('\n') -%}
    {%- endif -%}
    {%- set thought = thought.strip('\n') -%}
    {%- if loop.index0 > state.last_user and (loop.last or thought) -%}
      {%- set body = '<think>\n' ~ thought ~ '\n</think>\n\n' ~ body -%}
    {%- endif -%}
  {%- endif -%}
  {{- '<|im_start|>' ~ m.role ~ '\n' ~ body ~ '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n' -}}
  {%- if enable_thinking is defined and enable_thinking is false -%}
    {{- '<think>\n\n</think>\n\n' -}}
  {%- endif -%}
{%- endif -%}
"""

# ---------------------------------------------------------------------------------------------
# Corpus: prose written for this script, then generated game text.
# ---------------------------------------------------------------------------------------------

PROSE = """\
A small language model learns the shape of a task one game at a time. It reads the board, thinks
about where it stands, and answers with a single move. When the move is good, the game goes on;
when it is bad, the player falls into a hole or pushes a box against a wall, and the round is
over. Nothing in the game tells the model why it failed, so the lesson has to be written down
afterwards, in plain words, by the model itself.

Online experiential learning works in rounds. First the model is deployed and plays many games.
Its trajectories, the text it saw and the text it wrote, are saved to files. Then, on the server,
the same model reads those trajectories one by one and extracts experience: short, general
statements about the rules and about strategies that win. The experience grows with every
trajectory. Finally the knowledge is consolidated into the weights: a student model answers the
same prompts without the experience, and it is trained to match a teacher that sees the
experience in its context. The improved model is deployed again, and the next round begins.

The teacher is frozen at the start of each round. The student samples its own answers, so the
training is on-policy, and the loss is a reverse divergence over the student's most likely
tokens. There is no reward model and there are no labels. The only signal is the difference
between what the model says with the knowledge and what it says without it.

Reasoning models think before they answer. Their output opens with a think tag, holds a long
chain of thoughts, closes the tag, and then gives the answer. Let me think step by step. First, I
need to find my position on the grid. Then I should check which cells around me are safe. If
the goal is to the right and the cell on the right is frozen ice, I can move right. Wait, there
is a hole below me, so moving down would end the game. Therefore the best action is to move
right. So my answer is [right].

The frozen lake is a small square grid. The player starts in the top left corner and the goal
is in the bottom right corner. Some cells are holes in the ice; stepping on a hole loses the
game, and reaching the goal wins it. Each turn the player moves one cell up, down, left or
right. A move into the edge of the board leaves the player where it was. The game allows at
most five turns, so a wasted move can cost the win.

Sokoban is a puzzle about pushing boxes. The room is surrounded by walls. The player can walk
on empty floor and can push a box by walking into it, but only if the cell behind the box is
free. A box can never be pulled, so a box pushed into a corner is stuck forever. The puzzle is
solved when every box sits on a goal. Before each push, check the cell behind the box, and plan
the whole path so that the box never reaches a wall it cannot leave.

Good experience is short and general. It should hold for every map, not only for the board at
hand. For example: always locate the goal before moving; prefer moves that reduce the distance
to the goal; never step onto a cell marked as a hole; and write the final action in square
brackets, such as [up], [down], [left], [right], or the keys [w], [a], [s], [d].

Numbers matter as well. The board has 3 rows and 3 columns, or 6 by 6 in the puzzle. Rows and
columns are counted from 0, so the top left cell is (0, 0) and the cell below it is (1, 0).
After 1 move the player may be at (0, 1); after 2 moves at (1, 1); after 4 moves at (2, 2).
The learning rate was 1e-6, the batch held 64 games, the model saw 256 tokens per step, and the
pass rate rose from 0.25 to 0.75 in 20 steps. Prices like $3.50, dates like 2024-06-01, times
like 12:30, and percentages like 95% appear in ordinary text too.

Punctuation is text as well: commas, periods, colons: semicolons; question marks? exclamation
marks! "Double quotes", 'single quotes', (parentheses), [brackets], {braces}, <angle brackets>,
a - dash, an underscore_name, a path/to/file.json, an email like player@example.com, a hash #,
a star *, a plus +, an equals =, a pipe |, a tilde ~, a caret ^, and a backslash \\ too.
"""

# More prose of its own, on everyday topics, so that ordinary English words are in the vocabulary.
GENERAL = """\
Every morning the baker opens the shop before sunrise. She lights the oven, weighs the flour,
and mixes the dough by hand, because the machine makes the bread too dense. By seven o'clock the
shelves are full of warm loaves, rolls, and a few sweet pastries for the children who walk past
on their way to school. Her brother keeps the books and worries about the price of butter.

The river runs through the middle of the town. In spring it rises quickly when the snow melts in
the mountains, and the old stone bridge has been closed twice in the last ten years. People
still fish from the bank in summer, and in autumn the leaves collect in the slow water near the
mill, turning it red and gold. In winter, if the weather is cold enough, the shallow parts freeze.

A good teacher asks questions instead of giving answers. She waits, listens, and lets the class
make mistakes, then helps them notice what went wrong. Students remember what they discover for
themselves far better than what they are told. The same idea holds for machines: a system that
explores and reflects can learn more than one that only copies examples.

Software engineers write tests to find their own mistakes early. A test describes what the code
should do, runs it, and compares the result with the expected value. When a change breaks
something, the failing test points to the problem. Clear error messages save hours: they should
say what went wrong, where it happened, and what the user can do about it.

The weather report promised rain, but the afternoon was bright and dry. We walked along the
coast, watched the waves break against the rocks, and stopped at a small cafe for tea. A dog
followed us for a while, then lost interest and ran back toward the harbour, where the fishing
boats were coming in with their nets and the gulls were circling overhead.

History is full of plans that looked perfect on paper. Generals, architects, and ministers have
all discovered that the world is more complicated than their maps. The wise ones built in
room for error, checked their assumptions often, and changed course when the evidence demanded
it. The foolish ones blamed the evidence.

Cooking is a kind of chemistry you can eat. Heat changes the structure of proteins and sugars;
salt draws water out of vegetables; acid brightens a heavy sauce. A recipe is only a starting
point. Taste as you go, adjust the seasoning, and write down what worked, so that next time the
dish comes out even better.

Music has rules too. Scales, chords, rhythm and harmony give a composer a language, and the best
pieces both follow the rules and break them at exactly the right moment. A beginner practises
slowly, one bar at a time, until the fingers know the way without thinking.

Memory is not a recording. Each time we recall an event we rebuild it, and small details shift.
This is why written notes are so valuable: a journal kept at the time is more reliable than a
story told years later. Scientists keep lab notebooks for the same reason, and so should anyone
who wants to learn from experience.

The library was quiet except for the sound of pages turning. Rows of shelves stretched toward
the back wall, sorted by subject and then by author. A student near the window was reading about
ancient trade routes, another was solving equations, and an old man was slowly working through
the newspaper crossword with a pencil and a great deal of patience.

Travel teaches patience. Trains are late, luggage goes missing, and the hotel room is smaller
than the picture. Yet the traveller who stays curious finds something worth the trouble: a
market full of strange fruit, a conversation with a stranger, a view from a hill at dusk.

Mathematics rewards careful steps. Write down what is known, state what must be shown, and move
from one to the other one small, checked step at a time. If a step feels too large, it probably
hides an error. Simple examples help: try the smallest case, then the next, and look for a
pattern before attempting a general proof.

Gardens need attention more than effort. Water in the morning, pull weeds while they are small,
and watch which plants thrive in which corner. The tomatoes liked the sunny wall; the lettuce
preferred the shade under the apple tree. After a few seasons the gardener knows the ground as
well as her own kitchen.

Questions people often ask: How long will it take? Why did it fail? What should we try next?
Which option is cheaper, and which is safer? Who is responsible for the decision? When will we
know if it worked? Honest answers are usually short, and they often begin with "it depends".
"""

# Extra words the games and the method use, so that they become single tokens.
VOCABULARY = """\
grid board cell cells row rows column columns position positions player players box boxes goal
goals hole holes frozen lake ice surface safe wall walls floor target targets empty corner edge
up down left right move moves moved moving action actions turn turns step steps round rounds
game games win wins won lose loses lost success failure reward feedback summary result final
valid invalid available current previous next first second third last start end path route
distance nearest adjacent above below beside toward towards away blocked free stuck push pushed
pushing pull pulled Sokoban FrozenLake Frozen Lake puzzle room map maps layout symbol symbols
reasoning reason think thinking thought thoughts answer answers because therefore however since
so then if else check need should must can cannot will would might maybe perhaps wait actually
let me us we I you it they the a an of to in on at by for with from into onto over under and or
not no yes true false experience experiences knowledge item items rule rules strategy strategies
model models teacher student trajectory trajectories prompt prompts response responses token
tokens training learning consolidation extraction distillation context system user assistant
"""


def _frozenlake_board(rng: random.Random, size: int) -> str:
  cells = [[" "] * size for _ in range(size)]
  cells[size - 1][size - 1] = "G"
  free = [(r, c) for r in range(size) for c in range(size) if (r, c) not in ((0, 0), (size - 1,
                                                                                   size - 1))]
  for r, c in rng.sample(free, 2):
    cells[r][c] = "H"
  pr, pc = rng.choice([(0, 0)] + [p for p in free if cells[p[0]][p[1]] == " "])
  cells[pr][pc] = "P"
  sep = "+" + "+".join(["-----"] * size) + "+"
  lines = [sep]
  for row in cells:
    lines.append("|" + "|".join(f"  {ch}  " for ch in row) + "|")
    lines.append(sep)
  return "\n".join(lines)


def _sokoban_board(rng: random.Random) -> str:
  grid = [["#"] * 6 for _ in range(6)]
  for r in range(1, 5):
    for c in range(1, 5):
      grid[r][c] = "_"
  spots = [(r, c) for r in range(1, 5) for c in range(1, 5)]
  (pr, pc), (br, bc), (gr, gc) = rng.sample(spots, 3)
  grid[pr][pc], grid[br][bc], grid[gr][gc] = "P", "X", "O"
  return "\n".join(" ".join(row) for row in grid)


_MOVES = (("up", "w"), ("down", "s"), ("left", "a"), ("right", "d"))


def _game_text(rng: random.Random, n: int) -> str:
  """Generated turns: observations, reasoning with a think block, answers, feedback."""
  out = []
  for i in range(n):
    size = 3 if i % 2 == 0 else 4
    word, key = _MOVES[rng.randrange(4)]
    r, c = rng.randrange(size), rng.randrange(size)
    if i % 3 == 0:
      board = _sokoban_board(rng)
      obs = (f"[GAME] Current Board:\n\n{board}\n\nAvailable Moves: up, down, left, right\n"
             f"[Player] [{key}]\n[GAME] You moved {word}. The box is at ({r}, {c}).")
    else:
      board = _frozenlake_board(rng, size)
      obs = (f"Current Board:\n\n{board}\n\nAvailable Actions: [up], [down], [left], [right], "
             f"[w], [a], [s], [d]\nYou moved {word} to position ({r}, {c}).")
    thought = rng.choice([
        f"I am at row {r}, column {c}. The goal is {rng.choice(['below', 'above'])} me and to "
        f"the {rng.choice(['left', 'right'])}, so I should move {word}.",
        f"Let me check the cell to the {word}. It is safe, not a hole, so moving {word} is "
        "valid.",
        f"The box is next to the wall. If I push it {word}, it will be stuck. Wait, I need to "
        "walk around it first.",
        f"Moving {word} reduces the distance to the goal by one. There is no wall in the way.",
        "Hmm, the last move did not change my position. I must have hit the edge of the board.",
    ])
    answer = rng.choice([
        f"I will move {word}. [{word}]", f"Action: [{key}]", f"My move is [{word}].",
        f"The best action is to go {word}: [{key}]"])
    out.append(f"Turn {i % 5 + 1}\n{obs}\n<think>\n{thought}\n</think>\n\n{answer}\n")
    if i % 5 == 4:
      ok = rng.random() < 0.4
      reason = ("You reached the goal!" if ok else rng.choice([
          "You fell into a hole.", "The turn limit was reached.",
          "The box is stuck in a corner.", "Invalid action."]))
      out.append(f"Summary / Final Result: {'Success' if ok else 'Failure'} / Feedback: "
                 f"{reason}\n")
      out.append(f"- EXPERIENCE ITEM: {rng.choice(_ITEMS)}\n")
  return "\n".join(out)


_ITEMS = (
    "Locate the goal first and move along the row or column that shares it.",
    "Never step onto a hole; check every adjacent cell before you move.",
    "A box in a corner can never be moved again, so avoid pushing boxes into corners.",
    "Moving into the edge of the board wastes a turn; count the rows and columns.",
    "Write exactly one action in square brackets at the end of the answer.",
    "Plan the whole path before the first move, since the game ends after five turns.",
    "Push a box only when the cell behind it is free floor or a goal.",
)


def _numbers_text(rng: random.Random) -> str:
  parts = [" ".join(str(i) for i in range(0, 200))]
  parts.append(", ".join(f"({rng.randrange(6)}, {rng.randrange(6)})" for _ in range(120)))
  parts.append(" ".join(f"{rng.random():.3f}" for _ in range(60)))
  return "\n".join(parts)


def corpus() -> list[str]:
  """The training texts, in a fixed order."""
  rng = random.Random(SEED)
  return [
      PROSE,
      GENERAL,
      # Each word after a space (as in running text), three times, so that these words'
      # merges outrank those of words seen once.
      (" " + " ".join(VOCABULARY.split())) * 3,
      _game_text(rng, 400),
      _numbers_text(rng),
      # Chat-format text (with the markers as plain text; the added tokens are matched first
      # at encode time, so the BPE never needs to learn them).
      "\n".join(f"system\nYou are a helpful assistant.\nuser\nWhat action do you take? "
                f"(Remember to wrap your final answer of the action in square brackets)\n"
                f"assistant\n[{w}]" for w, _ in _MOVES),
  ]


def build_tokenizer() -> Tokenizer:
  """Trains the byte-level BPE and adds the special tokens at their fixed ids."""
  tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
  ])
  tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
  tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                            use_regex=False)
  trainer = trainers.BpeTrainer(
      vocab_size=tiny.BPE_VOCAB_SIZE,
      min_frequency=1,
      show_progress=False,
      special_tokens=[],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(corpus(), trainer=trainer)
  got = tok.get_vocab_size(with_added_tokens=False)
  if got != tiny.BPE_VOCAB_SIZE:
    raise RuntimeError(f"BPE training produced {got} tokens, expected {tiny.BPE_VOCAB_SIZE}: "
                       "the corpus is too small for the vocabulary; add text")
  for content, want_id, special in tiny.ADDED_TOKENS:
    token = AddedToken(content, single_word=False, lstrip=False, rstrip=False,
                       normalized=False, special=special)
    if special:
      tok.add_special_tokens([token])
    else:
      tok.add_tokens([token])
    got_id = tok.token_to_id(content)
    if got_id != want_id:
      raise RuntimeError(f"added token {content!r} got id {got_id}, expected {want_id}")
  return tok


def tokenizer_config() -> dict:
  """The transformers ``tokenizer_config.json`` (written by hand: stable across versions)."""
  decoder = {}
  for content, token_id, special in tiny.ADDED_TOKENS:
    decoder[str(token_id)] = {
        "content": content, "lstrip": False, "normalized": False, "rstrip": False,
        "single_word": False, "special": special}
  return {
      "tokenizer_class": "Qwen2Tokenizer",
      "added_tokens_decoder": decoder,
      "additional_special_tokens": [tiny.IM_START, tiny.IM_END],
      "bos_token": None,
      "eos_token": tiny.EOS_TOKEN,
      "pad_token": tiny.PAD_TOKEN,
      "unk_token": None,
      "clean_up_tokenization_spaces": False,
      "errors": "replace",
      "model_max_length": MODEL_MAX_LENGTH,
      "split_special_tokens": False,
      "chat_template": CHAT_TEMPLATE,
  }


def special_tokens_map() -> dict:
  return {
      "additional_special_tokens": [tiny.IM_START, tiny.IM_END],
      "eos_token": tiny.EOS_TOKEN,
      "pad_token": tiny.PAD_TOKEN,
  }


def _dump_json(obj) -> str:
  return json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n"


def build(out_dir: str) -> None:
  """Writes tokenizer.json, tokenizer_config.json, special_tokens_map.json, build_info.json."""
  tok = build_tokenizer()
  texts = corpus()
  files = {
      "tokenizer.json": tok.to_str(pretty=True) + "\n",
      "tokenizer_config.json": _dump_json(tokenizer_config()),
      "special_tokens_map.json": _dump_json(special_tokens_map()),
      "build_info.json": _dump_json({
          "builder": "scripts/build_tiny_tokenizer.py",
          "tokenizers_version": tokenizers.__version__,
          "corpus_sha256": hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest(),
          "corpus_chars": sum(len(t) for t in texts),
          "bpe_vocab_size": tiny.BPE_VOCAB_SIZE,
          "tokenizer_len": tiny.TOKENIZER_LEN,
      }),
  }
  os.makedirs(out_dir, exist_ok=True)
  for name, text in files.items():
    # Bytes, not text: "\n" line ends on every platform, so a rebuild matches byte for byte.
    atomic_write_bytes(os.path.join(out_dir, name), text.encode("utf-8"))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=DEFAULT_OUT, help="output directory")
  args = parser.parse_args(argv)
  build(args.out)
  print(f"wrote tiny tokenizer ({tiny.TOKENIZER_LEN} tokens) to {args.out}")


if __name__ == "__main__":
  main()
