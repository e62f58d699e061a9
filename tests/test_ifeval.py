"""Tests for oel_jax.ifeval: the 25 checkers, offline text tools, scoring, and the run.

The data file is IF-Eval's ``input_data.jsonl`` beside the checkout
(``../shared/data/ifeval/``); tests that need it skip when it is absent.
"""

import json
import os
import pathlib

import pytest

from oel_jax import ifeval
from oel_jax.ifeval import checkers, score, text

DATA = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ifeval" / (
    "input_data.jsonl")
needs_data = pytest.mark.skipif(
    not DATA.is_file(), reason=f"IF-Eval data not found at {DATA} (the shared/ folder beside "
    "the checkout holds it in CI)")

# (instruction id, kwargs, responses that follow it, responses that do not)
CASES = [
    ("keywords:existence", {"keywords": ["banana", "split"]},
     ["A BANANA split, please."], ["A banana, only a banana."]),
    ("keywords:frequency", {"keyword": "cat", "frequency": 3, "relation": "at least"},
     ["cat, Cat and CAT."], ["cat and cat and a dog."]),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"},
     ["One cat here."], ["A cat and a category."]),  # substrings count, as in the original
    ("keywords:forbidden_words", {"forbidden_words": ["sad", "gloomy"]},
     ["Sadness is not a whole word match."], ["I feel SAD today."]),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "at least"},
     ["Zig zag zoo."], ["Zig zag."]),
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 2, "let_relation": "at least"},
     ["#tag and #more"], ["only #one"]),
    ("language:response_language", {"language": "es"},
     ["Esta es una respuesta corta en español para la prueba.",
      "12345 !!!"],  # nothing to detect: counted as followed, as in the original
     ["This is an answer written in English, not in Spanish."]),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     ["Mr. Smith arrived at 5 p.m. today. He left."],  # Punkt knows "Mr." and "p.m."
     ["One. Two. Three."]),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
     ["One. Two! Three?"], ["Dr. Jones met Mr. Smith. They talked."]),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3},
     ["First.\n***\nSecond.\n***\nThird.", "***\nA\n***\nB\n***\nC\n***"],
     ["First.\n***\n\n***\nSecond.\n***\nThird.", "First. *** Second."]),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"},
     ["one two three four five"], ["one two, three-four"]),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "dog"},
     ["Cats are fine.\n\n\"Dog, the best friend.\""],
     ["Cats.\n\nDogs are the best.", "Cats.\n\nDog.\n\nThird."]),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     ["Dear [name], see you at [address]."], ["Dear [name], see you."]),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     ["Hello.\n\np.s. see you soon"], ["Hello. PS see you soon"]),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"},
     ["Hello.\nP.P.S. one more thing"], ["Hello.\nP.S. one thing"]),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2},
     ["Intro\n* one\n  - two"], ["* one\n* two\n* three", "**Bold** line\n* one"]),
    ("detectable_format:constrained_response", {},
     ["Let me think. My answer is maybe."], ["My answer is: yes"]),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     ["*one* and **two**"], ["*one* and * * and **"]),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     ["Section 1\nA\nSection 2\nB"], ["section 1\nA\nsection 2\nB", "Section 1\nA"]),
    ("detectable_format:json_format", {},
     ["```json\n{\"a\": [1, 2]}\n```", "[1, 2]"], ["Here it is: {\"a\": 1}"]),
    ("detectable_format:title", {},
     ["<<A Poem of Joy>>\nRoses are red."], ["<< >> and <<split\ntitle>>"]),
    ("combination:two_responses", {},
     ["First answer.\n******\nSecond answer."],
     ["Same.\n******\nSame.", "A\n******\n******\nB", "Just one."]),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about cats."},
     ["write a poem about cats. Cats purr softly."],
     ["Sure! Write a poem about cats. Cats purr."]),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     ["Done. any other questions?\""], ["Any other questions? Thanks."]),
    ("startend:quotation", {}, ["  \"Wrapped in quotes.\"  "], ["\"Only an opening quote."]),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     ["The USA and NASA agree."], ["The USA agrees."]),
    ("change_case:capital_word_frequency",
     {"capital_frequency": 2, "capital_relation": "less than"},
     ["Only the USA."], ["The USA, NASA and the UN."]),
    ("change_case:english_capital", {},
     ["I WILL WRITE THE WHOLE ANSWER IN CAPITAL LETTERS BECAUSE THAT IS WHAT YOU ASKED FOR."],
     ["I will write the whole answer in capital letters.",
      "ESTO ES UNA RESPUESTA CORTA EN ESPAÑOL PARA LA PRUEBA."]),
    ("change_case:english_lowercase", {},
     ["this is an answer in english."],
     ["This has a capital letter.", "esta es una respuesta corta en español para la prueba."]),
    ("punctuation:no_comma", {}, ["No commas here."], ["One, two."]),
]


def test_every_instruction_type_has_cases():
  assert len(checkers.INSTRUCTION_TYPES) == 25
  assert {case[0] for case in CASES} == set(checkers.INSTRUCTION_TYPES)


@pytest.mark.parametrize("instruction_id,kwargs,passing,failing", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_checker(instruction_id, kwargs, passing, failing):
  for response in passing:
    assert ifeval.check_instruction(instruction_id, response, kwargs), response
  for response in failing:
    assert not ifeval.check_instruction(instruction_id, response, kwargs), response


def test_checker_arguments_are_validated():
  with pytest.raises(ValueError, match="unknown IF-Eval instruction 'keywords:nope'"):
    ifeval.check_instruction("keywords:nope", "x", {})
  with pytest.raises(ValueError, match=r"missing \['num_bullets'\]"):
    ifeval.check_instruction("detectable_format:number_bullet_lists", "x", {})
  with pytest.raises(ValueError, match="relation must be one of"):
    ifeval.check_instruction("length_constraints:number_words", "x",
                             {"num_words": 3, "relation": "at most"})
  # None entries are dropped (the hub dataset lists every argument, None where unused).
  assert ifeval.check_instruction("punctuation:no_comma", "ok", {"num_bullets": None})


def test_sentence_splitting_is_punkt_english():
  # NLTK's documented sent_tokenize example.
  assert text.split_sentences(
      "Good muffins cost $3.88\nin New York.  Please buy me\ntwo of them.\n\nThanks.") == [
          "Good muffins cost $3.88\nin New York.", "Please buy me\ntwo of them.", "Thanks."]
  # Trained abbreviations: an untrained Punkt would split after "Mr." and "p.m.".
  assert text.count_sentences("Mr. Smith met Dr. Jones at 5 p.m. on Monday. They left.") == 2
  # word_tokenize splits sentences first, so an inner "world." becomes "world" + ".".
  assert text.word_tokenize("Hello world. Bye.") == ["Hello", "world", ".", "Bye", "."]


def test_language_detection_is_repeatable():
  sample = "bonjour hola"  # ambiguous: unseeded langdetect gives en, fr or sq from call to call
  assert len({text.detect_language(sample) for _ in range(20)}) == 1


def test_loose_passes_where_strict_fails():
  example = score.IFEvalExample(
      key=1, prompt="p", instruction_ids=("startend:quotation", "startend:end_checker"),
      kwargs=({}, {"end_phrase": "Any other questions?"}))
  # A chatty first line breaks the quotation; markdown bold breaks the ending.
  response = "Sure, here it is:\n\"My answer. **Any other questions?**\""
  result = score.score_example(example, response)
  assert result.strict == (False, False)
  assert result.loose == (True, True)
  assert "\"My answer. Any other questions?\"" in score.loose_variants(response)
  assert len(score.loose_variants(response)) == 8


def test_blank_response_follows_nothing():
  example = score.IFEvalExample(1, "p", ("punctuation:no_comma",), ({},))
  assert score.score_example(example, "  \n ").strict == (False,)
  assert score.score_example(example, "  \n ").loose == (False,)


def test_scores_by_hand():
  examples = [
      score.IFEvalExample(1, "a", ("punctuation:no_comma", "startend:quotation"), ({}, {})),
      score.IFEvalExample(2, "b", ("punctuation:no_comma",), ({},)),
      score.IFEvalExample(3, "c", ("detectable_format:title", "punctuation:no_comma"),
                          ({}, {})),
  ]
  responses = ["\"no commas\"",        # both followed
               "a, b",                  # comma
               "<<T>>, x"]              # title yes, comma no (one line: not even loosely)
  scores = ifeval.score_responses(examples, responses)
  assert (scores.num_prompts, scores.num_instructions) == (3, 5)
  assert scores.prompt_level_strict == pytest.approx(1 / 3)
  assert scores.instruction_level_strict == pytest.approx(3 / 5)
  assert scores.prompt_level_loose == pytest.approx(1 / 3)
  assert scores.instruction_level_loose == pytest.approx(3 / 5)
  assert scores.per_type["punctuation:no_comma"] == ifeval.TypeAccuracy(3, 1 / 3, 1 / 3)
  assert scores.per_type["detectable_format:title"].strict == 1.0
  assert [p.all_strict for p in scores.prompts] == [True, False, False]
  json.dumps(scores.to_dict())
  with pytest.raises(ValueError, match="3 examples but 2 responses"):
    ifeval.score_responses(examples, responses[:2])


@needs_data
def test_data_file_loads():
  examples = ifeval.load_examples(DATA)
  assert len(examples) == 541
  assert sum(len(e.instruction_ids) for e in examples) == 834
  assert {i for e in examples for i in e.instruction_ids} == set(checkers.INSTRUCTION_TYPES)
  assert [e.key for e in ifeval.load_examples(DATA, limit=3)] == [e.key for e in examples[:3]]


def _fixed_responses(examples):
  """Responses that exercise every checker: echoes, case changes, reformattings."""
  out = []
  for i, e in enumerate(examples):
    p = e.prompt
    out.append([p, p.upper(), p.lower(), f"\"{p}\"", f"Sure:\n{p}\nP.S. bye",
                "\n\n".join(text.split_sentences(p)), p.replace(",", "") + " ******\nOther."
                ][i % 7])
  return out


@needs_data
def test_scoring_is_repeatable():
  examples = ifeval.load_examples(DATA)
  responses = _fixed_responses(examples)
  first = ifeval.score_responses(examples, responses)
  second = ifeval.score_responses(examples, responses)
  assert first == second
  assert first.to_dict() == second.to_dict()
  assert first.num_instructions == 834
  # Echoing the prompt follows some instructions but far from all; loose >= strict.
  assert 0.05 < first.prompt_level_strict < 0.9
  assert first.prompt_level_loose >= first.prompt_level_strict
  assert first.instruction_level_loose >= first.instruction_level_strict
  assert set(first.per_type) == set(checkers.INSTRUCTION_TYPES)


def test_load_errors_name_file_line_and_field(tmp_path):
  good = {"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"],
          "kwargs": [{}]}
  cases = [
      ("{not json", r":2: not valid JSON"),
      (json.dumps({**good, "prompt": 5}), r":2: field 'prompt' must be a str"),
      (json.dumps({k: v for k, v in good.items() if k != "kwargs"}),
       r":2: missing field 'kwargs'"),
      (json.dumps({**good, "kwargs": []}), r":2: 'instruction_id_list' has 1 entries"),
      (json.dumps({**good, "instruction_id_list": ["x:y"]}),
       r":2: instruction 0: unknown IF-Eval instruction 'x:y'"),
  ]
  for bad, message in cases:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good) + "\n" + bad + "\n")
    with pytest.raises(ValueError, match=str(path).replace("\\", "\\\\") + message):
      ifeval.load_examples(path)


class _ScriptedSampler:
  """Answers each prompt with a fixed reply; records the calls."""

  def __init__(self, replies):
    self.replies = replies  # prompt text -> (reasoning, answer, finish_reason)
    self.calls = []

  def generate_chat(self, tokenizer, conversations, *, enable_thinking, **kwargs):
    from oel_jax.sampling import ChatCompletion  # pylint: disable=import-outside-toplevel
    self.calls.append((len(conversations), enable_thinking, kwargs))
    out = []
    for conversation in conversations:
      reasoning, answer, reason = self.replies[conversation[0]["content"]]
      full = f"<think>\n{reasoning}\n</think>\n\n{answer}"
      tokens = tokenizer.encode(full) + ([tokenizer.eos_token_id] if reason == "stop" else [])
      out.append(ChatCompletion(full, reasoning, answer, tokens, [0.0] * len(tokens), reason))
    return out


def test_evaluate_scores_answers_in_data_order():
  from oel_jax import tiny  # pylint: disable=import-outside-toplevel
  tokenizer = tiny.load_tiny_tokenizer()
  examples = [
      score.IFEvalExample(10, "A much longer prompt: " + "word " * 40,
                          ("punctuation:no_comma",), ({},)),
      score.IFEvalExample(11, "Short.", ("startend:quotation",), ({},)),
      score.IFEvalExample(12, "Medium prompt, a few words.", ("detectable_format:title",), ({},)),
  ]
  sampler = _ScriptedSampler({
      examples[0].prompt: ("I, think, with commas", "no commas at all", "stop"),
      examples[1].prompt: ("", "\"quoted\"", "stop"),
      examples[2].prompt: ("<<not in the answer>>", "", "length"),
  })
  result = ifeval.evaluate_ifeval(sampler, tokenizer, examples=examples, enable_thinking=True,
                                  max_new_tokens=64, batch_size=2, temperature=0.7, seed=5)
  # Reasoning is not scored: its commas and title do not count.
  assert [p.strict for p in result.scores.prompts] == [(True,), (True,), (False,)]
  assert [r.key for r in result.responses] == [10, 11, 12]
  assert result.prompt_level_strict == pytest.approx(2 / 3)
  assert (result.num_truncated, result.num_empty_answers) == (1, 1)
  # Two chunks (sorted by length: the short and medium prompts first), one seed per prompt
  # derived from the base seed and the prompt's key.
  assert [c[0] for c in sampler.calls] == [2, 1]
  assert [c[2]["seed"] for c in sampler.calls] == [
      [ifeval.prompt_seed(5, 11), ifeval.prompt_seed(5, 12)], [ifeval.prompt_seed(5, 10)]]
  assert all(c[1] is True and c[2]["temperature"] == 0.7 for c in sampler.calls)
  # The stop token is not counted.
  assert result.responses[0].num_tokens == len(tokenizer.encode(
      "<think>\nI, think, with commas\n</think>\n\nno commas at all"))
  d = result.to_dict()
  json.dumps(d)
  assert d["prompt_level_strict"] == result.prompt_level_strict
  assert d["responses"][2]["finish_reason"] == "length"
  assert "responses" not in result.to_dict(include_responses=False)


@needs_data
def test_evaluate_with_the_tiny_model():
  from oel_jax import chat, tiny  # pylint: disable=import-outside-toplevel
  from oel_jax.sampling import Sampler  # pylint: disable=import-outside-toplevel
  tokenizer = tiny.load_tiny_tokenizer()
  sampler = Sampler(tiny.tiny_model(), eos_ids=chat.stop_token_ids(tokenizer),
                    pad_id=tokenizer.pad_token_id, max_seq_len=1024)
  result = ifeval.evaluate_ifeval(sampler, tokenizer, path=DATA, enable_thinking=False,
                                  limit=3, max_new_tokens=8, batch_size=4, temperature=0)
  examples = ifeval.load_examples(DATA, limit=3)
  assert [r.key for r in result.responses] == [e.key for e in examples]
  assert result.scores.num_prompts == 3
  assert result.scores.num_instructions == sum(len(e.instruction_ids) for e in examples)
  assert all(0 < r.num_tokens <= 8 for r in result.responses)
  # The scores are those of the answers the model gave.
  rescored = ifeval.score_responses(examples, [r.answer for r in result.responses])
  assert rescored == result.scores
  # Each answer is the model's greedy reply to that prompt (same shapes: no recompilation).
  direct = sampler.generate_chat(
      tokenizer, [[{"role": "user", "content": e.prompt}] for e in examples],
      enable_thinking=False, max_new_tokens=8, temperature=0)
  assert [d.answer for d in direct] == [r.answer for r in result.responses]
  assert sampler.num_compilations == 1


def test_defaults_are_the_official_protocol():
  import inspect  # pylint: disable=import-outside-toplevel
  defaults = {k: v.default for k, v in
              inspect.signature(ifeval.evaluate_ifeval).parameters.items()}
  # microsoft/LMOps oel/README.md: temperature 0.7, top-p 0.8, top-k 20, seed 42, 1280 tokens.
  assert (defaults["temperature"], defaults["top_p"], defaults["top_k"], defaults["seed"],
          defaults["max_new_tokens"]) == (0.7, 0.8, 20, 42, 1280)


@needs_data
def test_sampled_answers_do_not_depend_on_the_batch_size():
  from oel_jax import chat, tiny  # pylint: disable=import-outside-toplevel
  from oel_jax.sampling import Sampler  # pylint: disable=import-outside-toplevel
  tokenizer = tiny.load_tiny_tokenizer()
  sampler = Sampler(tiny.tiny_model(), eos_ids=chat.stop_token_ids(tokenizer),
                    pad_id=tokenizer.pad_token_id, max_seq_len=1024)
  run = lambda batch_size, seed=42: ifeval.evaluate_ifeval(
      sampler, tokenizer, path=DATA, enable_thinking=False, limit=4, max_new_tokens=8,
      batch_size=batch_size, seed=seed)
  together, one_by_one = run(4), run(1)
  answers = [r.answer for r in together.responses]
  assert answers == [r.answer for r in one_by_one.responses]
  # Sampled, not greedy: another seed gives other answers.
  assert answers != [r.answer for r in run(4, seed=7).responses]


def test_hub_dataset_rows(monkeypatch):
  """path=None reads google/IFEval through `datasets`, whose kwargs list every argument."""
  import types  # pylint: disable=import-outside-toplevel
  every = {name: None for i in checkers.INSTRUCTION_TYPES
           for name in checkers.instruction_arguments(i)}
  rows = [{"key": 7, "prompt": "p", "instruction_id_list": ["detectable_format:title"],
           "kwargs": [dict(every)]},
          {"key": 8, "prompt": "q", "instruction_id_list": ["keywords:existence"],
           "kwargs": [{**every, "keywords": ["x"]}]}]
  calls = []
  fake = types.SimpleNamespace(load_dataset=lambda name, split: calls.append((name, split)) or rows)
  monkeypatch.setitem(__import__("sys").modules, "datasets", fake)
  examples = ifeval.load_examples(limit=5)
  assert calls == [("google/IFEval", "train")]
  assert [e.kwargs for e in examples] == [({},), ({"keywords": ["x"]},)]
